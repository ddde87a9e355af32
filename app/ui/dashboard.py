"""The Dashboard tab: training curves, win rate per version, labeling throughput, labelers, judge
agreement, version lag and the live state of trainer and sampler.

It refreshes with a gr.Timer that only runs while the tab is selected, so an idle dashboard costs
the database nothing.
"""
from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from typing import Any, Optional

import gradio as gr
import pandas as pd

from odpo.app.services.admin import AdminService
from odpo.app.services.human_eval import human_series
from odpo.app.services.labeler_quality import cell
from odpo.app.ui.shared import guarded
from odpo.trainer.training.modes import progress_line

log = logging.getLogger(__name__)

REFRESH_SECONDS = 5.0
QUIET = {"queue": True, "concurrency_limit": 4, "api_visibility": "private", "show_progress": "hidden"}
TRAIN_COLUMNS = ["step", "version", "loss", "reward_accuracy", "reward_margin", "version_lag"]
HUMAN_COLUMNS = ["version", "vs", "human win rate", "n", "95% CI"]
SELECTOR_COLUMNS = ["selector", "version", "labels", "tie", "both bad", "undecided"]
QUALITY_COLUMNS = ["labeler", "labels", "vs people (n · rate)", "vs judges (n · rate)", "vs gold (n · rate)"]


@dataclass
class DashboardTab:
    timer: gr.Timer
    outputs: list


def build_dashboard_tab(*, admin: AdminService, tab: gr.Tab, other_tabs: list) -> DashboardTab:
    state = gr.Markdown("Loading…", elem_id="odpo-dash-state", sanitize_html=True, latex_delimiters=[])
    with gr.Row():
        loss = gr.LinePlot(x="step", y="loss", title="DPO loss per step", height=240)
        acc = gr.LinePlot(x="step", y="reward_accuracy", title="Reward accuracy", y_lim=[0, 1], height=240)
    with gr.Row():
        margin = gr.LinePlot(x="step", y="reward_margin", title="Reward margin", height=240)
        lag = gr.LinePlot(x="step", y="version_lag", title="Version lag of trained pairs", height=240)
    with gr.Row():
        win = gr.LinePlot(x="version", y="win_rate", color="judge", title="Win rate vs base per version",
                          y_lim=[0, 1], height=240)
        per_hour = gr.BarPlot(x="hour", y="labels", color="source", title="Labels per hour (48 h)", height=240)
    with gr.Row():
        labelers = gr.Dataframe(label="Labelers", interactive=False, elem_id="odpo-dash-labelers")
        agreement = gr.Dataframe(label="Human–judge agreement (pairs both labeled A/B)", interactive=False)
    human = gr.Dataframe(label="Blind human evaluation: win rate per version (ties count half)",
                         interactive=False, elem_id="odpo-dash-human")
    quality = gr.Dataframe(label="Labeler quality: agreement on pairs also labeled A/B by other people, judges, or "
                                 "an admin's gold answer (ties, both bad and skips not compared)",
                           interactive=False, elem_id="odpo-dash-quality")
    selectors = gr.Dataframe(label="Labels per pair selector and version: the share of ties and both-bad "
                                   "(labels DPO cannot train on)", interactive=False, elem_id="odpo-dash-selectors")
    outputs = [state, loss, acc, margin, lag, win, per_hour, labelers, agreement, human, quality, selectors]
    timer = gr.Timer(REFRESH_SECONDS, active=False)

    @guarded(outputs=len(outputs), ticking=True)
    def refresh(request: gr.Request):
        data = admin.dashboard(username=getattr(request, "username", None))
        return (*dashboard_outputs(data), human_eval_table(data), labeler_quality_table(data), selector_table(data))

    timer.tick(refresh, None, outputs, **QUIET)
    tab.select(refresh, None, outputs, **QUIET).then(lambda: gr.Timer(active=True), None, timer,
                                                      api_visibility="private", queue=False)
    for other in other_tabs:  # stop polling when the dashboard is not on screen
        other.select(lambda: gr.Timer(active=False), None, timer, api_visibility="private", queue=False)
    return DashboardTab(timer=timer, outputs=outputs)


def dashboard_outputs(data: dict[str, Any]) -> tuple:
    """Plain dashboard data -> (markdown, DataFrames...) in the order of the tab's outputs."""
    train = pd.DataFrame(data["train"], columns=TRAIN_COLUMNS + ["seconds", "committed", "at"])
    train = train[TRAIN_COLUMNS]
    evals = pd.DataFrame(data["evals"], columns=["version", "vs", "judge", "win_rate", "ci_low", "ci_high", "n", "at"])
    evals = evals[evals["vs"] == 0][["version", "win_rate", "judge"]] if len(evals) else \
        pd.DataFrame(columns=["version", "win_rate", "judge"])
    human = pd.DataFrame(human_series(data.get("human_evals") or []), columns=["version", "win_rate", "judge"])
    if len(human):  # people's blind judgments, one series beside each judge's
        evals = human if not len(evals) else pd.concat([evals, human], ignore_index=True)
    hours = pd.DataFrame(data["labels_per_hour"], columns=["hour", "source", "labels"])
    if len(hours):
        hours["hour"] = hours["hour"].map(lambda h: h.strftime("%m-%d %H:00"))
    labelers = pd.DataFrame([{"labeler": r["labeler"], "labels": r["labels"],
                              "median s/label": r["median_seconds"]} for r in data["labelers"]],
                            columns=["labeler", "labels", "median s/label"])
    agreement = pd.DataFrame([{"judge": r["judge"], "pairs": r["n"], "agree": r["agree"],
                               "agreement": r["rate"]} for r in data["agreement"]],
                             columns=["judge", "pairs", "agree", "agreement"])
    return (state_markdown(data), train[["step", "loss"]], train[["step", "reward_accuracy"]],
            train[["step", "reward_margin"]], train[["step", "version_lag"]], evals, hours, labelers, agreement)


def human_eval_table(data: dict[str, Any]) -> pd.DataFrame:
    """version | vs | human win rate | n | 95% CI, from people's judgments on eval pairs."""
    rows = [{"version": f"v{r['version']}", "vs": "base" if r["vs"] == 0 else f"v{r['vs']}",
             "human win rate": round(r["win_rate"], 3), "n": r["n"],
             "95% CI": f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]"} for r in data.get("human_evals") or []]
    return pd.DataFrame(rows, columns=HUMAN_COLUMNS)


def selector_table(data: dict[str, Any]) -> pd.DataFrame:
    """selector | version | labels | tie | both bad | undecided (shares as percentages)."""
    rows = [[r["selector"], r["version"], r["labels"], f"{r['tie_rate']:.0%}", f"{r['both_bad_rate']:.0%}",
             f"{r['undecided_rate']:.0%}"] for r in data.get("selectors") or []]
    return pd.DataFrame(rows, columns=SELECTOR_COLUMNS)


def labeler_quality_table(data: dict[str, Any]) -> pd.DataFrame:
    """labeler | labels | vs people | vs judges | vs gold, each "n · rate" ("–" when nothing compared)."""
    rows = [[r["labeler"], r["labels"], cell(r["people_n"], r["people_rate"]), cell(r["judges_n"], r["judges_rate"]),
             cell(r["gold_n"], r["gold_rate"])] for r in data.get("labeler_quality") or []]
    return pd.DataFrame(rows, columns=QUALITY_COLUMNS)


def state_markdown(data: dict[str, Any]) -> str:
    """Trainer and sampler at a glance. Values that come from other processes are escaped."""
    status, step, sampler = data["status"], data.get("last_step"), data.get("sampler") or {}
    e = html.escape
    trainer = _trainer_word(data)
    last = (f"step {step['step']} → v{step['version']}, loss {step['loss']:.4f}, {_ago(step['age_s'])}"
            if step else "no training step yet")
    warning = [f"**⚠ {e(data['warning'])}**"] if data.get("warning") else []
    lines = [
        *warning,
        f"**Trainer** — {trainer}; last step: {e(last)}; latest version v{status['latest_version']}; "
        f"{status['unconsumed_trainable']} trainable labels waiting" + _progress_part(data.get("train_progress")),
        f"**Sampler** — {_sampler_line(sampler)}",
        *_worker_lines(sampler.get("workers")),
        *_process_lines(data.get("processes"), data.get("now")),
        *_judge_lines(data.get("judges") or [], data.get("now")),
        f"**Data** — {_disk(data.get('disk_free_bytes'))}{status['prompts']} prompts "
        f"({status['held_out']} held out); pairs "
        + ", ".join(f"{k} {v}" for k, v in status["pairs"].items())
        + "; labels " + (", ".join(f"{e(k)} {v}" for k, v in status["labels"].items()) or "none"),
    ]
    return "\n\n".join(lines)


def _disk(free: Optional[int]) -> str:
    return "" if free is None else f"{free / 2**20:,.0f} MB free on the data disk; "


def _trainer_word(data: dict[str, Any]) -> str:
    """paused, or what the database says of the trainer process (app/services/status.py): a page
    that says "running" with no trainer anywhere is the defect the label page's chip had too."""
    if data.get("paused"):
        return "**paused**"
    seen = data.get("trainer")
    if seen is None:
        return "running"
    words = {"running": "running", "starting": "starting", "down": "**not running**",
             "unknown": "not seen lately", "paused": f"**{html.escape(seen.detail)}**"}
    return words.get(seen.state, html.escape(seen.state))


def _progress_part(progress: Optional[dict[str, Any]]) -> str:
    """"; round 3: 17/32 labels" while an iterative or offline trainer runs (trainer/training/modes.py)."""
    line = progress_line(progress) if isinstance(progress, dict) else ""
    return f"; {html.escape(line)}" if line else ""


def _sampler_line(state: dict[str, Any]) -> str:
    if not state:
        return "not running in this process"
    if state.get("phase") == "no_worker":
        return "**no sampler worker is running**: start one with `odpo sample` (`odpo up` does)"
    parts = [f"serving v{state.get('serving_version', '?')}", f"queue {state.get('queue', '?')}",
             "generating" if state.get("generating") else "idle"]
    if state.get("pairs_per_minute") is not None:
        parts.append(f"{_num(state['pairs_per_minute'])} pairs/min")
    if state.get("last_batch_seconds") is not None:
        parts.append(f"last batch {_num(state['last_batch_seconds'])} s")
    if state.get("swap_ms") is not None:
        parts.append(f"last swap {_num(state['swap_ms'])} ms")
    parts = [html.escape(p) for p in parts]
    if state.get("last_error"):
        parts.append("**error:** " + html.escape(str(state["last_error"])[:300]))
    return "; ".join(parts)


def _worker_lines(workers: Optional[list[dict[str, Any]]]) -> list[str]:
    """One line per live `odpo sample` worker, and one per vLLM server it samples with (down ones
    say when they are retried)."""
    e, lines = html.escape, []
    for w in workers or []:
        parts = [str(w.get("phase")), f"serving v{w.get('serving_version', '?')}"]
        if w.get("pairs_per_minute") is not None:
            parts.append(f"{_num(w['pairs_per_minute'])} pairs/min")
        parts.append(f"heartbeat {_num(w.get('age_s') or 0)} s ago")
        error = f"; **error:** {e(str(w['last_error'])[:300])}" if w.get("last_error") else ""
        lines.append(f"**Worker {e(str(w.get('name')))}** ({e(str(w.get('host')))}, {e(str(w.get('backend')))}) — "
                     + e("; ".join(parts)) + error)
        for server in w.get("servers") or []:
            state = "up" if server.get("up") else "**down**"
            retry = f", retried in {_num(server['next_retry_in_s'])} s" if server.get("next_retry_in_s") else ""
            why = f": {e(str(server['last_error'])[:200])}" if server.get("last_error") and not server.get("up") else ""
            lines.append(f"&nbsp;&nbsp;vLLM {e(str(server.get('url')))} {state}{retry}{why}")
    return lines


STALE_REPORT_S = 60.0  # reports refresh every 10 s; older than this, their writer is gone
JUDGES_SHOWN_FOR_S = 24 * 3600.0  # a judge that stopped long ago is no news


def _process_lines(state: Optional[dict[str, Any]], now: Optional[float]) -> list[str]:
    """`odpo up`'s children: pid, state, restarts and last exit code, from its control row."""
    if not state:
        return []
    e = html.escape
    age = _age(state, now)
    header = f"odpo up (pid {e(str(state.get('pid', '?')))}) {e(str(state.get('state', '?')))}, reported {_ago(age)}"
    if state.get("state") not in ("stopped",) and age is not None and age > STALE_REPORT_S:
        header += " — **no longer reporting** (killed?)"
    parts = []
    for child in state.get("children") or []:
        text = f"{child.get('name', '?')} {child.get('state', '?')}"
        details = [f"pid {child['pid']}"] if child.get("pid") else []
        if child.get("restarts"):
            details.append(f"restarted {child['restarts']}×")
        if child.get("last_exit") is not None:
            details.append(f"last exit code {child['last_exit']}")
        if child.get("last_error"):
            details.append(str(child["last_error"])[:200])
        text = e(text + (f" ({', '.join(details)})" if details else ""))
        parts.append(f"**{text}**" if child.get("state") in ("given up", "restarting") else text)
    return [f"**Processes** — {e(header)}: " + "; ".join(parts)]


def _judge_lines(judges: list[dict[str, Any]], now: Optional[float]) -> list[str]:
    """One line per judge worker that reported recently; a failing one says why, in bold."""
    lines = []
    for judge in judges:
        age = _age(judge, now)
        if age is not None and age > JUDGES_SHOWN_FOR_S:
            continue
        state = str(judge.get("state", "?"))
        text = (f"{judge.get('judge', '?')}: {state}, reported {_ago(age)}; labeled {judge.get('labeled', 0)}, "
                f"abstained {judge.get('abstained', 0)} (failed {judge.get('failed', 0)})")
        if state not in ("stopped", "failed") and age is not None and age > STALE_REPORT_S:
            text += "; no longer reporting"
        line = html.escape(text)
        if state == "failing":
            line += (" — **failing:** " + html.escape(f"{judge.get('failed_in_a_row', 0)} pairs in a row failed; "
                                                      f"last: {str(judge.get('last_failure', ''))[:200]}")
                     + "; those pairs wait for people")
        elif state == "failed":
            line += " — **stopped by an error:** " + html.escape(str(judge.get("error", ""))[:300])
        lines.append(f"**Judge** — {line}")
    return lines


def _age(report: dict[str, Any], now: Optional[float]) -> Optional[float]:
    try:
        return max(0.0, float(now) - float(report["at"]))  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return None


def _num(value: Any) -> str:
    try:
        return f"{float(value):.1f}"
    except (TypeError, ValueError):
        return str(value)


def _ago(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"
