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

from odpo.app.admin_service import AdminService
from odpo.app.ui_common import guarded

log = logging.getLogger(__name__)

REFRESH_SECONDS = 5.0
QUIET = {"queue": True, "concurrency_limit": 4, "api_visibility": "private", "show_progress": "hidden"}
TRAIN_COLUMNS = ["step", "version", "loss", "reward_accuracy", "reward_margin", "version_lag"]


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
    outputs = [state, loss, acc, margin, lag, win, per_hour, labelers, agreement]
    timer = gr.Timer(REFRESH_SECONDS, active=False)

    @guarded(outputs=len(outputs))
    def refresh():
        return dashboard_outputs(admin.dashboard())

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


def state_markdown(data: dict[str, Any]) -> str:
    """Trainer and sampler at a glance. Values that come from other processes are escaped."""
    status, step, sampler = data["status"], data.get("last_step"), data.get("sampler") or {}
    e = html.escape
    trainer = "**paused**" if data.get("paused") else "running"
    last = (f"step {step['step']} → v{step['version']}, loss {step['loss']:.4f}, {_ago(step['age_s'])}"
            if step else "no training step yet")
    lines = [
        f"**Trainer** — {trainer}; last step: {e(last)}; latest version v{status['latest_version']}; "
        f"{status['unconsumed_trainable']} trainable labels waiting",
        f"**Sampler** — {_sampler_line(sampler)}",
        f"**Data** — {status['prompts']} prompts ({status['held_out']} held out); pairs "
        + ", ".join(f"{k} {v}" for k, v in status["pairs"].items())
        + "; labels " + (", ".join(f"{e(k)} {v}" for k, v in status["labels"].items()) or "none"),
    ]
    return "\n\n".join(lines)


def _sampler_line(state: dict[str, Any]) -> str:
    if not state:
        return "not running in this process"
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
