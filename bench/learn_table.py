"""The learn table: arms of `odpo bench learn` pooled over seeds, per rule x loss x mode.

Pooling adds up the held-out wins, losses and ties of every seed's final policy and puts one Wilson
95 % interval on that proportion (ties as half), so three seeds of 48 comparisons make n = 144.
The interval speaks for eval-prompt noise and seed noise only as far as the seeds differ; the
per-seed rates sit beside it so a reader sees the spread. "Online beats offline" means the two
pooled intervals do not overlap, the issue's bar.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from odpo.bench.common import BenchResult, Target, result_path
from odpo.trainer.options import MODES  # the order tables and legends show them in

log = logging.getLogger(__name__)

TARGETS = (Target("learn: online win rate vs base (first rule, DPO, pooled)", "online_win_rate", ">=", 0.80),
           Target("learn: rules where online beats offline (DPO, 95 % intervals apart)",
                  "rules_online_beats_offline", ">=", 2))


def pooled(evals: Sequence[Optional[dict[str, Any]]]) -> Optional[dict[str, Any]]:
    """Wins/losses/ties summed over seeds, with the Wilson interval of the sum; None if none ran."""
    from odpo.trainer.evaluation.win_rate import wilson_interval

    done = [e for e in evals if e]
    if not done:
        return None
    w, lo, t = (sum(e[k] for e in done) for k in ("wins", "losses", "ties"))
    if w + lo + t == 0:
        return None
    wr = wilson_interval(w, lo, t)
    return {"win_rate": wr.rate, "low": wr.low, "high": wr.high, "n": wr.n, "wins": w, "losses": lo, "ties": t}


def cells(arms: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One cell per (rule, loss, mode), in the order the arms ran."""
    keys: list[tuple[str, str, str]] = []
    for arm in arms:
        key = (arm["rule"], arm["loss"], arm["mode"])
        if key not in keys:
            keys.append(key)
    out = []
    for rule, loss, mode in keys:
        mine = [a for a in arms if (a["rule"], a["loss"], a["mode"]) == (rule, loss, mode)]
        points = sorted({p["labels"] for a in mine for p in a.get("curve", [])})
        curve = [{"labels": n, **(pooled([p.get("eval") for a in mine for p in a.get("curve", [])
                                          if p["labels"] == n]) or {"win_rate": None})} for n in points]
        out.append({"rule": rule, "loss": loss, "mode": mode, "seeds": [a["seed"] for a in mine],
                    "final": pooled([a.get("eval") for a in mine]),
                    "per_seed": [a.get("win_rate") for a in mine],
                    "wall_seconds_mean": sum(a["wall_seconds"] for a in mine) / len(mine),
                    "steps": [a["steps"] for a in mine], "labels_used": [a["labels_used"] for a in mine],
                    "decisive_labels": [decisive(a) for a in mine], "curve": curve})
    return out


def decisive(arm: dict[str, Any]) -> int:
    """Labels of an arm that named a winner (A or B): the only ones DPO can train on. Ties and
    "both bad" spend the budget too, and how many a mode draws is part of what the table measures:
    a policy that already does what the rule wants yields pairs where both answers pass."""
    choices = arm.get("choices") or {}
    return int(choices.get("a", 0)) + int(choices.get("b", 0))


def arm_label(mode: str, passes: int) -> str:
    """The name an arm goes by in tables and head-to-head pairs: its mode, and its passes when more
    than one, so runs that differ only in --passes merge into one table as different arms."""
    return mode if passes == 1 else f"{mode} ({passes} passes)"


def split_label(name: str) -> tuple[str, int]:
    """arm_label's inverse: "online (2 passes)" -> ("online", 2), "offline" -> ("offline", 1)."""
    found = re.fullmatch(r"(.+) \((\d+) passes\)", name)
    return (found.group(1), int(found.group(2))) if found else (name, 1)


def _find(table: Sequence[dict[str, Any]], rule: str, loss: str, mode: str) -> Optional[dict[str, Any]]:
    return next((c for c in table if (c["rule"], c["loss"], c["mode"]) == (rule, loss, mode)), None)


def _online_and_offline(table: Sequence[dict[str, Any]], rule: str,
                        loss: Optional[str]) -> tuple[Optional[dict[str, Any]], Optional[dict[str, Any]]]:
    """The rule's online and offline cells trained with the same passes (the first such passes in
    the table), so the comparison is between sampling policies, not between amounts of training."""
    for passes in dict.fromkeys(split_label(c["mode"])[1] for c in table if c["rule"] == rule):
        on = _find(table, rule, loss, arm_label("online", passes))
        off = _find(table, rule, loss, arm_label("offline", passes))
        if on and off:
            return on, off
    return None, None


def headline(table: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The target metrics: the first rule's DPO online rate and margin, and the rules where online's
    pooled interval sits wholly above offline's (both with the same passes)."""
    rules = list(dict.fromkeys(c["rule"] for c in table))
    loss = "sigmoid" if any(c["loss"] == "sigmoid" for c in table) else (table[0]["loss"] if table else None)
    beats, online_rate, margin = [], None, None
    for i, rule in enumerate(rules):
        on, off = _online_and_offline(table, rule, loss)
        on_f, off_f = (on or {}).get("final"), (off or {}).get("final")
        if i == 0 and on_f:
            online_rate = on_f["win_rate"]
            margin = on_f["win_rate"] - off_f["win_rate"] if off_f else None
        if on_f and off_f and on_f["low"] > off_f["high"]:
            beats.append(rule)
    return {"online_win_rate": online_rate, "online_minus_offline": margin,
            "rules_online_beats_offline": len(beats), "rules_where_online_beats_offline": beats}


def _rate(final: Optional[dict[str, Any]]) -> str:
    if not final:
        return "-"
    return f"{final['win_rate']:.2f} [{final['low']:.2f}, {final['high']:.2f}] n={final['n']}"


def fill(result: BenchResult, arms: Sequence[dict[str, Any]]) -> None:
    """Metrics (every arm, the pooled cells, the headline, the arms head to head) and rows."""
    from odpo.bench.learn_h2h import annotate, annotate_self_ties, head_to_head
    from odpo.trainer.judges import load_judge

    table = cells(arms)
    answered = [a for a in arms if any(p.get("answers") for p in a.get("curve", []))]
    judges = {rule: load_judge(rule) for rule in dict.fromkeys(a["rule"] for a in answered)}
    for c in table:
        mine = [a for a in arms if (a["rule"], a["loss"], a["mode"]) == (c["rule"], c["loss"], c["mode"])]
        annotate(c, mine)
        if c["rule"] in judges:
            annotate_self_ties(c, mine, judges[c["rule"]])
    pairs = head_to_head(answered, judges)
    result.metrics = {**headline(table), **h2h_headline(table, pairs), "cells": table, "head_to_head": pairs,
                      "arms": list(arms)}
    _h2h_rows(result, pairs, budget=max((a["labels_used"] for a in arms), default=0))
    for c in table:
        name = f"{c['rule'].split(':', 1)[-1]} / {c['loss']} / {c['mode']}"
        seeds = " ".join("-" if r is None else f"{r:.2f}" for r in c["per_seed"])
        curve = ", ".join(f"{p['labels']}: {'-' if p['win_rate'] is None else format(p['win_rate'], '.2f')}"
                          for p in c["curve"])
        result.row(f"{name}: win rate vs base, pooled over {len(c['seeds'])} seed(s)", _rate(c["final"]))
        result.row(f"{name}: per seed | curve (labels: rate) | wall per arm | decisive labels per seed",
                   f"{seeds} | {curve} | {c['wall_seconds_mean']:.0f} s | {' '.join(map(str, c['decisive_labels']))}")
        ties = ", ".join(f"{p['labels']}: {p['self_tie_share']:.2f}" for p in c["curve"]
                         if p.get("self_tie_share") is not None)
        if ties:
            result.row(f"{name}: two of its own answers to one prompt tie (labels: share)", ties)
    for arm in arms:
        if arm.get("eval_note"):
            result.notes.append(f"{arm['rule']} {arm['loss']} {arm['mode']} seed {arm['seed']}: {arm['eval_note']}")


def _h2h_rows(result: BenchResult, pairs: Sequence[dict[str, Any]], *, budget: int) -> None:
    for p in pairs:
        if p["labels"] == budget:
            result.row(f"{p['rule'].split(':', 1)[-1]} / {p['loss']}: {p['a']} vs {p['b']} head to head at "
                       f"{budget} labels ({len(p['seeds'])} seed(s))",
                       f"{p['win_rate']:.2f} [{p['low']:.2f}, {p['high']:.2f}] n={p['n']}")


def h2h_headline(table: Sequence[dict[str, Any]], pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rules where an on-policy arm beats offline head to head with its whole interval above 0.5
    (at the largest budget), and labels to 0.8 of the best on-policy arm vs offline per rule."""
    rules, wins, fewer = list(dict.fromkeys(c["rule"] for c in table)), [], {}
    for rule in rules:
        final = [p for p in pairs if p["rule"] == rule and _is_offline(p["a"]) != _is_offline(p["b"])]
        top = max((p["labels"] for p in final), default=None)
        for p in (p for p in final if p["labels"] == top):
            b_offline = _is_offline(p["b"])
            on_arm, off_arm = (p["a"], p["b"]) if b_offline else (p["b"], p["a"])
            if (p["low"] if b_offline else 1 - p["high"]) > 0.5:  # the on-policy arm's interval above 0.5
                wins.append(f"{rule} {p['loss']}: {on_arm} over {off_arm}")
        reached = [c for c in table if c["rule"] == rule and c.get("labels_to_0.8") is not None]
        off = [c["labels_to_0.8"] for c in reached if _is_offline(c["mode"])]
        on = [c["labels_to_0.8"] for c in reached if not _is_offline(c["mode"])]
        if off and on:  # the best on-policy arm against the best offline one, whatever their passes
            fewer[rule] = 1 - min(on) / min(off)
    return {"h2h_rules_on_policy_beats_offline": len({w.split(" ")[0] for w in wins}),
            "h2h_wins_over_offline": wins, "labels_to_0.8_saving_vs_offline": fewer}


def _is_offline(name: str) -> bool:
    return split_label(name)[0] == "offline"


def write_curve_plot(result: BenchResult, out_dir: Path) -> Optional[str]:
    """learn[-quick]-curve.png beside the JSON: pooled win rate vs labels spent, one line per
    loss x mode, one panel per rule. None (and a log line) without matplotlib (the bench extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("no learn curve picture: matplotlib is not installed (pip install 'odpo[bench]')")
        return None
    table = result.metrics.get("cells", [])
    rules = list(dict.fromkeys(c["rule"] for c in table))
    if not rules:
        return None
    fig, axes = plt.subplots(1, len(rules), figsize=(5.5 * len(rules), 4), squeeze=False)
    styles = line_styles(table)
    order = list(styles)
    for ax, rule in zip(axes[0], rules, strict=True):
        for c in sorted((c for c in table if c["rule"] == rule), key=lambda c: order.index((c["mode"], c["loss"]))):
            pts = [p for p in c["curve"] if p.get("win_rate") is not None]
            xs, ys = [p["labels"] for p in pts], [p["win_rate"] for p in pts]
            line = ax.plot(xs, ys, marker="o", label=f"{c['mode']} / {c['loss']}", **styles[(c["mode"], c["loss"])])[0]
            ax.fill_between(xs, [p["low"] for p in pts], [p["high"] for p in pts], alpha=0.12,
                            color=line.get_color())
        ax.set(title=rule, xlabel="labels spent", ylabel="win rate vs base (95 % CI)", ylim=(0, 1.02))
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = result_path(out_dir, "learn", quick=result.quick).with_name(
        f"learn{'-quick' if result.quick else ''}-curve.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def line_styles(table: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, str]]:
    """One colour per mode and one dash per loss, the same in every panel, so a reader matches
    lines across rules (cells come in the order their arms ran, which differs between rules)."""
    modes = sorted({c["mode"] for c in table}, key=lambda m: (MODES.index(m) if m in MODES else 99, m))
    losses = sorted({c["loss"] for c in table}, key=lambda x: (x != "sigmoid", x))
    dashes = ("-", "--", ":", "-.")
    return {(m, loss): {"color": f"C{i % 10}", "linestyle": dashes[j % len(dashes)]}
            for j, loss in enumerate(losses) for i, m in enumerate(modes)}  # legend order: by loss, then mode


# Parameters that may differ between runs merged into one table: which seeds, rules, losses and
# modes each covered (the union is the table), where each drew its picture, and, for an input that
# is itself a merged table, how many runs and which commits it already pooled (merge sums/unites them).
# Passes name their arms (learn.arm_label), so runs with other --passes merge as other arms.
MERGEABLE = ("first_seed", "seeds", "rules", "losses", "modes", "curve_plot", "merged_runs", "code_commits",
             "passes")


def run_commits(result: dict[str, Any]) -> list[str]:
    """The commits a result measured: a merged one lists its runs' in params, a single run has one."""
    if result["params"].get("code_commits"):
        return list(result["params"]["code_commits"])
    return [(result["machine"].get("code") or {}).get("commit") or "unknown"]


def merge(results: Sequence[dict[str, Any]], out_dir: Path) -> BenchResult:
    """One learn table from several learn results (e.g. one process per seed on a small machine).

    A merged table is itself an input: new cells or seeds can be pooled with it later.

    Raises ValueError, naming the parameter, when the runs are not the same experiment (another
    budget, curve, learning rate, ...) or an arm (rule, loss, mode, seed) appears twice.
    """
    if not results:
        raise ValueError("nothing to merge")
    first = results[0]
    for other in results[1:]:
        for key in sorted(set(first["params"]) | set(other["params"])):
            if key not in MERGEABLE and first["params"].get(key) != other["params"].get(key):
                raise ValueError(f"the runs differ in {key}: {first['params'].get(key)!r} vs "
                                 f"{other['params'].get(key)!r}")
    arms = [a for r in results for a in r["metrics"].get("arms", [])]
    seen = set()
    for arm in arms:
        key = (arm["rule"], arm["loss"], arm["mode"], arm["seed"])
        if key in seen:
            raise ValueError(f"arm {' '.join(map(str, key))} is in two of the runs")
        seen.add(key)
    params = {k: v for k, v in first["params"].items() if k not in MERGEABLE}
    commits = sorted({c for r in results for c in run_commits(r)})
    params.update(merged_runs=sum(r["params"].get("merged_runs", 1) for r in results),
                  seeds=sorted({a["seed"] for a in arms}), code_commits=commits)
    result = BenchResult(bench="learn", quick=bool(first["quick"]), params=params, machine=first["machine"],
                         started_at=min(r["started_at"] for r in results),
                         seconds=sum(r["seconds"] for r in results))
    fill(result, arms)
    if len(commits) > 1:
        result.notes.append(f"the runs ran on {len(commits)} versions of the code ({', '.join(commits)}): "
                            "compare wall times only between arms of one version")
    result.params["curve_plot"] = write_curve_plot(result, out_dir)
    result.check(TARGETS)
    return result
