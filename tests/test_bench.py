"""`odpo bench`: the harness's arithmetic (percentiles, ratios, targets, per-pair costs), its result
JSON, counting in the benches, and tiny-model runs through the CLI. No timing thresholds: timings
on a shared machine are noise, so tests check what was counted and how it was combined."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import func, select

from odpo.app.cli import cli
from odpo.bench import common, labelers, learn, memory, reload, sampling, train_step
from odpo.bench.common import BenchContext, BenchResult, Target, percentile, ratio, summarize
from odpo.bench.labeler_sim import (
    ApiClient,
    ApiError,
    LabelerStats,
    Monitor,
    choose_side,
    idle_votes_ms,
    round_trips_ms,
    run_labeler,
)
from odpo.db.models import Label
from odpo.trainer.judges import load_judge
from odpo.trainer.options import DEFAULT_PASSES
from tests import ui_fixtures
from tests.db_helpers import make_pairs

live_app = ui_fixtures.live_app  # a fixture, requested by name
REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_ctx(common_config, tiny_model_dir, tmp_path, **kw) -> BenchContext:
    return BenchContext(common=common_config, quick=True, model=str(tiny_model_dir), device="cpu", dtype="fp32",
                        out_dir=tmp_path / "results", **kw)


# --- arithmetic ------------------------------------------------------------------------------


def test_percentile_interpolates_linearly_between_ranks():
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 95) == pytest.approx(3.85)
    assert percentile([1, 2, 3, 4], 0) == 1 and percentile([1, 2, 3, 4], 100) == 4
    assert percentile([7.0], 95) == 7.0 and percentile([], 50) is None
    assert percentile(list(range(101)), 95) == 95
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_ratio_summary_and_per_minute():
    assert ratio(6, 2) == 3.0 and ratio(1, 0) is None and ratio(None, 2) is None and ratio(2, None) is None
    s = summarize([3, 1, 2])
    assert (s["n"], s["mean"], s["p50"], s["min"], s["max"]) == (3, 2.0, 2.0, 1.0, 3.0)
    assert summarize([])["p50"] is None and summarize([])["n"] == 0
    assert common.per_minute(10, 30) == 20.0 and common.per_minute(1, 0) is None


def test_targets_check_both_directions_and_missing_values():
    low = Target("wait", "wait_ms", "<=", 50.0)
    high = Target("speedup", "speedup", ">=", 3.0)
    assert low.check(50.0) and not low.check(50.1) and high.check(3.0) and not high.check(2.9)
    assert low.check(None) is None and low.check(float("nan")) is None
    assert high.evaluate({"speedup": 4.0}) == {"name": "speedup", "metric": "speedup", "op": ">=",
                                               "threshold": 3.0, "value": 4.0, "met": True}
    with pytest.raises(ValueError):
        Target("x", "x", "<", 1.0)


# --- result JSON -----------------------------------------------------------------------------


def make_result(bench="sampling", quick=True, **metrics) -> BenchResult:
    result = BenchResult(bench=bench, quick=quick, params={"n": 1}, metrics=metrics or {"speedup": 2.0},
                         started_at=common.utc_now_iso(), seconds=1.5, machine=common.machine_description())
    result.row("speedup", result.metrics.get("speedup"), "x")
    result.check(sampling.TARGETS)
    return result


def test_result_json_schema_roundtrip_and_tables(tmp_path):
    path = make_result().write(tmp_path)
    assert path.name == "sampling-quick.json" and not list(tmp_path.glob("*.tmp"))
    data = json.loads(path.read_text())
    assert common.validate_result(data) == []
    machine = data["machine"]
    assert machine["cores"] == os.cpu_count() and machine["versions"]["torch"] == torch.__version__
    assert machine["device"] == "cpu" and machine["cpu_model"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    if head.returncode == 0:  # a git checkout (CI's is one): the result names the code it measured
        assert machine["code"]["commit"] == head.stdout.strip() and isinstance(machine["code"]["dirty"], bool)
    assert data["targets"][0]["met"] is False and data["rows"] == [["speedup", "2 x"]]
    table = common.result_table(data)
    assert "| sampling: batched / one pair at a time | 2 | >= 3 | **no** |" in table
    make_result(bench="reload", quick=False, swap_ms_p95=10.0).write(tmp_path)
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"schema": "something else"}))
    loaded = common.load_results(tmp_path)
    assert [(d["bench"], d["quick"]) for d in loaded] == [("sampling", True), ("reload", False)]
    readme = common.readme_table(loaded)
    assert readme.splitlines()[0] == "| bench | metric | measured | target | met |"
    assert "| sampling (quick) | sampling: batched / one pair at a time | 2 | >= 3 | **no** |" in readme
    mem = BenchResult(bench="memory", quick=True, rows=[["peak RSS train", "3,943 MiB"]])
    broken = BenchResult(bench="learn", quick=True, status="failed")
    assert common.readme_table([mem.to_dict(), broken.to_dict()]).splitlines()[2:] == [
        "| memory (quick) | peak RSS train | 3,943 MiB | - | - |", "| learn (quick) | failed | - | - | - |"]


def test_validate_result_names_the_problems():
    data = make_result().to_dict()
    assert common.validate_result({**data, "status": "meh"}) == ["status 'meh' not in ('ok', 'unavailable', 'failed')"]
    assert common.validate_result({**data, "bench": "nope"}) == ["unknown bench 'nope'"]
    assert "missing key 'metrics'" in common.validate_result({k: v for k, v in data.items() if k != "metrics"})
    assert common.validate_result({**data, "targets": [{"name": "x"}]})[0].startswith("malformed target")


def test_results_default_to_the_checkouts_bench_results_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert common.default_out_dir() == REPO / "bench" / "results"
    assert BenchContext(common=None).out_dir == REPO / "bench" / "results"
    report = CliRunner().invoke(cli, ["--data-dir", str(tmp_path / "data"), "bench", "report"])
    assert report.exit_code == 0, report.output
    assert "| learn |" in report.output and not (tmp_path / "bench").exists()


# --- the harness beside the product ------------------------------------------------------------


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_product_module_imports_the_bench():
    """app/, trainer/ and db/ never import odpo.bench: only the CLI's lazy table names it."""
    for folder in ("app", "trainer", "db"):
        for path in (REPO / folder).rglob("*.py"):
            bench = {m for m in _imported_modules(path) if m == "odpo.bench" or m.startswith("odpo.bench.")}
            assert not bench, f"{path.relative_to(REPO)} imports {sorted(bench)}"


def test_learn_labels_with_the_built_in_rules_by_default():
    assert learn.DEFAULT_RULE == "rule:finished_and_short"
    assert load_judge(learn.DEFAULT_RULE).spec == "rule:finished_and_short"
    assert load_judge(learn.SECOND_RULE).spec == "rule:say_the_early"
    assert learn.resolve_grid(True).rules == (learn.DEFAULT_RULE,)
    full = learn.resolve_grid(False)
    assert full.rules == (learn.DEFAULT_RULE, learn.SECOND_RULE) and full.seeds >= 3
    assert set(full.modes) == {"online", "iterative", "offline"} and set(full.losses) == {"sigmoid", "simpo"}
    assert full.curve == (50, 100, 150, 200) == tuple(range(50, full.budget + 1, 50))


def test_learn_grid_takes_the_users_sizes_and_always_ends_the_curve_at_the_budget():
    grid = learn.resolve_grid(True, budget=30, curve=(10, 50, 20), seeds=2, rules=["rule:shorter"], modes=())
    assert grid.curve == (10, 20, 30) and grid.seeds == 2 and grid.rules == ("rule:shorter",)
    assert grid.modes == learn.SIZES["quick"].modes


def test_learn_cli_refuses_an_unknown_mode_or_curve_in_one_line(tmp_path):
    from click.testing import CliRunner

    from odpo.app.cli import cli

    for args, words in ((["--modes", "online,streaming"], "streaming"), (["--curve", "10,x"], "label counts")):
        res = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "bench", "learn", "--quick", "--out",
                                       str(tmp_path), *args])
        assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output


# --- per-bench arithmetic --------------------------------------------------------------------


def test_sampling_mode_metrics_totals():
    calls = [{"pairs": 4.0, "seconds": 2.0, "tokens": 40.0, "hit_limit": 2.0},
             {"pairs": 4.0, "seconds": 6.0, "tokens": 120.0, "hit_limit": 0.0}]
    m = sampling.mode_metrics(calls)
    assert m["pairs_per_minute"] == 60.0 and m["tokens_per_second"] == 20.0
    assert m["mean_tokens_per_sample"] == 10.0 and m["share_hit_max_new_tokens"] == 0.125
    assert m["seconds_per_call"]["p50"] == 4.0


def test_train_step_per_pair_costs_and_ratios():
    odpo = [{"generate": 2.0, "judge": 0.0, "dpo_step": 1.0, "write_version": 0.5, "swap": 0.5,
             "tokens_per_sample": 10.0}] * 2
    trl = [{"step": 8.0, "generate": 5.0, "judge": 0.0, "update": 3.0, "tokens_per_sample": 12.0}] * 2
    result = BenchResult(bench="train-step", quick=True)
    train_step.fill(result, odpo_rounds=odpo, trl_steps=trl, batch=4)
    m = result.metrics
    assert m["odpo_seconds_per_pair"] == 1.0 and m["trl_seconds_per_pair"] == 2.0
    assert m["odpo_over_trl_per_pair"] == 0.5 and m["odpo_over_trl_update"] == pytest.approx(0.25 / 0.75)
    assert m["odpo_overhead_seconds_per_pair"] == 0.25 and m["odpo_pairs_per_second"] == 1.0
    result.check(train_step.TARGETS)
    assert result.targets[0]["met"] is True
    empty = BenchResult(bench="train-step", quick=True)
    train_step.fill(empty, odpo_rounds=odpo, trl_steps=[], batch=4)
    assert empty.metrics["trl_seconds_per_pair"] is None and empty.metrics["odpo_over_trl_per_pair"] is None


def test_train_step_variant_ratios_come_from_the_same_rounds():
    base = {"generate": 2.0, "judge": 0.0, "write_version": 0.0, "swap": 0.0, "tokens_per_sample": 10.0}
    odpo = [{**base, "dpo_step": 2.0, "dpo_step_concatenated": 3.0, "simpo_step": 1.5},
            {**base, "dpo_step": 4.0, "dpo_step_concatenated": 5.0, "simpo_step": 2.5}]
    trl = [{"step": 8.0, "generate": 5.0, "judge": 0.0, "update": 4.0, "tokens_per_sample": 12.0}] * 2
    result = BenchResult(bench="train-step", quick=True)
    train_step.fill(result, odpo_rounds=odpo, trl_steps=trl, batch=4)
    m = result.metrics
    assert m["odpo_shared_over_concatenated_step"] == pytest.approx(3.0 / 4.0)  # p50 of [2, 4] vs of [3, 5]
    assert m["odpo_simpo_over_dpo_step"] == pytest.approx(2.0 / 3.0)
    assert m["odpo_concatenated_over_trl_update"] == pytest.approx((8.0 / 8) / (8.0 / 8))
    assert any("TRL's layout" in row[0] for row in result.rows)
    plain = BenchResult(bench="train-step", quick=True)
    train_step.fill(plain, odpo_rounds=[{**base, "dpo_step": 1.0}], trl_steps=trl, batch=4)
    assert "odpo_simpo_over_dpo_step" not in plain.metrics


def test_trl_reward_function_matches_the_pairwise_judge():
    reward = train_step.pair_reward(load_judge("rule:shorter"))
    prompts = [[{"role": "user", "content": "p"}]] * 6
    completions = [[{"role": "assistant", "content": t}] for t in ("aa", "a", "same", "long one", "x", "same")]
    # pairs: (aa, long one) -> first shorter wins; (a, x) -> tie; (same, same) -> tie
    assert reward(prompts=prompts, completions=completions) == [1.0, 0.5, 0.5, 0.0, 0.5, 0.5]
    assert reward(prompts=["p", "p"], completions=["longer", "s"]) == [0.0, 1.0]


def test_reload_fill_reports_percentiles_of_recorded_swaps():
    rows = [{"version": v, "swap_ms": float(v), "commit_to_serving_ms": 100.0 * v} for v in range(1, 5)]
    result = BenchResult(bench="reload", quick=True)
    reload.fill(result, observed_ms=[90.0, float("nan"), 300.0, 400.0], write_ms=[5.0] * 4, reload_rows=rows,
                extra={"missed_versions": 1})
    m = result.metrics
    assert m["swap_ms_p50"] == 2.5 and m["commit_to_serving_ms_p95"] == pytest.approx(385.0)
    assert m["observed_commit_to_serving_ms"]["n"] == 3 and m["versions_committed"] == 4


def test_labelers_fill_counts_waits_and_empty_share():
    a = LabelerStats("bench-labeler-0", waits=[(0.01, False), (0.03, False), (2.0, True)], votes=4,
                     empty_seconds=3.0, active_seconds=10.0, choices={"left": 3, "right": 1})
    b = LabelerStats("bench-labeler-1", waits=[(0.02, False)], votes=1, errors=["vote: boom"], active_seconds=10.0,
                     choices={"tie": 1})
    monitor = Monitor("http://unused")
    monitor.samples = [0, 3, 0, 5]
    result = BenchResult(bench="labelers", quick=True, params={"think_s": 1.0, "offered_labels_per_hour": 7200.0})
    facts = {"labels_by_labeler": {"bench-labeler-0": 4, "bench-labeler-1": 1, "someone": 9},
             "version_lags": [0.0, 1.0, 2.0], "versions": [1, 2, 3]}
    labelers.fill(result, stats=[a, b], monitor=monitor, elapsed=1800.0, db_facts=facts, labelers=2)
    m = result.metrics
    assert m["wait_ms_nonempty"]["n"] == 3 and m["wait_ms_p50"] == pytest.approx(20.0)
    assert m["wait_ms_empty"]["n"] == 1 and m["queue_empty_share"] == 0.15
    assert (m["votes"], m["labels_stored"], m["errors"]) == (5, 5, 1)
    assert m["labels_per_hour"] == 10.0 and m["monitor_queue_zero_share"] == 0.5
    assert m["version_lag"]["mean"] == 1.0 and m["choices"] == {"left": 3, "right": 1, "tie": 1}


def _arm(mode, seed, w, lo, t, *, rule="rule:x", loss="sigmoid", curve=(), choices=None):
    ev = {"wins": w, "losses": lo, "ties": t, "n": w + lo + t}
    rate = (w + t / 2) / (w + lo + t) if w + lo + t else None
    return {"rule": rule, "loss": loss, "mode": mode, "seed": seed, "win_rate": rate,
            "eval": ev, "wall_seconds": 10.0 * (seed + 1), "steps": 3, "labels_used": 24,
            "choices": choices or {"a": 24},
            "curve": [{"labels": n, "eval": {"wins": cw, "losses": cl, "ties": 0}} for n, cw, cl in curve]}


def test_learn_table_pools_seeds_into_one_interval_per_cell():
    from odpo.bench import learn_table
    from odpo.trainer.evaluation.win_rate import wilson_interval

    arms = [_arm("online", 0, 20, 4, 0, curve=[(12, 10, 14), (24, 20, 4)]),
            _arm("online", 1, 22, 1, 1, curve=[(12, 12, 12), (24, 22, 1)],
                 choices={"a": 9, "b": 6, "tie": 7, "both_bad": 2}),
            _arm("offline", 0, 12, 12, 0), _arm("offline", 1, 10, 14, 0)]
    table = learn_table.cells(arms)
    on = table[0]
    expected = wilson_interval(42, 5, 1)
    assert (on["mode"], on["seeds"], on["final"]["n"]) == ("online", [0, 1], 48)
    assert on["final"]["low"] == pytest.approx(expected.low) and on["final"]["win_rate"] == pytest.approx(42.5 / 48)
    assert [p["labels"] for p in on["curve"]] == [12, 24] and on["curve"][0]["win_rate"] == pytest.approx(22 / 48)
    assert on["wall_seconds_mean"] == 15.0
    assert on["decisive_labels"] == [24, 15]  # ties and "both bad" spend labels DPO cannot train on
    head = learn_table.headline(table)
    assert head["rules_online_beats_offline"] == 1
    assert head["online_minus_offline"] == pytest.approx(42.5 / 48 - 22 / 48)
    result = BenchResult(bench="learn", quick=True)
    learn_table.fill(result, arms)
    assert result.rows[0][0] == "x / sigmoid / online: win rate vs base, pooled over 2 seed(s)"
    assert result.rows[0][1].startswith("0.89 [") and result.rows[0][1].endswith("n=48")
    assert "0.83 0.94 | 12: 0.46, 24: 0.89 | 15 s | 24 15" == result.rows[1][1]


def test_arms_trained_with_more_passes_meet_their_own_kind_in_the_headlines():
    """Since two passes are the default, an arm's name carries its passes: online is compared with the
    offline arm of the same passes, a win over any offline arm counts, and labels to 0.8 of the best
    on-policy arm are set against the best offline arm, so no saving is claimed from passes alone."""
    from odpo.bench import learn_h2h, learn_table

    assert learn_table.split_label(learn_table.arm_label("offline", 2)) == ("offline", 2)
    assert learn_table.split_label("online+margin") == ("online+margin", 1)
    arms = [_arm("online (2 passes)", 0, 20, 4, 0), _arm("offline (2 passes)", 0, 10, 14, 0),
            _arm("offline", 0, 23, 1, 0)]
    head = learn_table.headline(learn_table.cells(arms))
    assert head["online_win_rate"] == pytest.approx(20 / 24) and head["online_minus_offline"] == pytest.approx(10 / 24)
    table = [{"rule": "rule:x", "mode": m, "labels_to_0.8": n}
             for m, n in (("online (2 passes)", 30), ("offline (2 passes)", 60), ("offline", 50), ("online", None))]
    pairs = [{"rule": "rule:x", "loss": "sigmoid", "a": "online (2 passes)", "b": "offline (2 passes)", "labels": 24,
              "low": 0.6, "high": 0.8},
             {"rule": "rule:x", "loss": "sigmoid", "a": "online", "b": "offline", "labels": 24,
              "low": 0.4, "high": 0.6}]
    h2h = learn_table.h2h_headline(table, pairs)
    assert h2h["h2h_wins_over_offline"] == ["rule:x sigmoid: online (2 passes) over offline (2 passes)"]
    assert h2h["labels_to_0.8_saving_vs_offline"] == {"rule:x": pytest.approx(1 - 30 / 50)}
    names = ["offline (2 passes)", "online", "offline", "online (2 passes)", "online+margin"]
    assert sorted(names, key=learn_h2h._rank) == ["online+margin", "online (2 passes)", "online",
                                                  "offline (2 passes)", "offline"]


def test_learn_curve_styles_a_mode_and_a_loss_alike_in_every_panel():
    from odpo.bench import learn_table

    # the second rule's cells ran in another order; its lines must still match the first rule's
    table = learn_table.cells([_arm("offline", 0, 1, 1, 0), _arm("online", 0, 1, 1, 0, loss="simpo"),
                               _arm("online", 0, 1, 1, 0), _arm("online", 0, 1, 1, 0, rule="rule:y", loss="simpo"),
                               _arm("offline", 0, 1, 1, 0, rule="rule:y", loss="simpo")])
    styles = learn_table.line_styles(table)
    assert set(styles) == {(m, loss) for m in ("online", "offline") for loss in ("sigmoid", "simpo")}
    assert styles[("online", "sigmoid")]["color"] == styles[("online", "simpo")]["color"]  # colour = mode
    assert styles[("online", "sigmoid")]["color"] != styles[("offline", "sigmoid")]["color"]
    assert styles[("online", "sigmoid")]["linestyle"] == "-" != styles[("online", "simpo")]["linestyle"]
    assert styles[("offline", "simpo")]["linestyle"] == styles[("online", "simpo")]["linestyle"]  # dash = loss


def test_learn_table_counts_a_rule_only_when_the_intervals_are_apart():
    from odpo.bench import learn_table

    close = [_arm("online", 0, 14, 10, 0, rule="rule:y"), _arm("offline", 0, 12, 12, 0, rule="rule:y")]
    head = learn_table.headline(learn_table.cells(close))
    assert head["rules_online_beats_offline"] == 0 and head["online_minus_offline"] == pytest.approx(2 / 24)
    result = BenchResult(bench="learn", quick=True)
    learn_table.fill(result, [_arm("online", 0, 10, 0, 0), {**_arm("offline", 0, 0, 0, 0), "eval": None,
                                                            "win_rate": None, "eval_note": "no DPO step"}])
    assert result.metrics["online_minus_offline"] is None
    assert result.notes == ["rule:x sigmoid offline seed 0: no DPO step"]
    result.check(learn_table.TARGETS)
    assert [t["met"] for t in result.targets] == [True, False]


def _learn_run(tmp_path, name, arms, commit="c0ffee", **params):
    base = {"budget": 96, "lr": 1e-3, "first_seed": arms[0]["seed"], "seeds": 1, "rules": ["rule:x"]}
    data = {"schema": "odpo-bench/1", "bench": "learn", "quick": False, "status": "ok", "seconds": 10.0,
            "started_at": f"2026-11-29T21:0{len(name)}:00Z",
            "machine": {"cores": 2, "code": {"commit": commit, "dirty": False}},
            "params": {**base, **params}, "metrics": {"arms": arms}, "targets": [], "rows": [], "notes": []}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def test_learn_merge_pools_runs_of_one_experiment_and_refuses_others(tmp_path):
    from click.testing import CliRunner

    from odpo.app.cli import cli

    one = _learn_run(tmp_path, "s0", [_arm("online", 0, 20, 4, 0), _arm("offline", 0, 12, 12, 0)])
    two = _learn_run(tmp_path, "s1", [_arm("online", 1, 22, 1, 1), _arm("offline", 1, 10, 14, 0)], first_seed=1)
    out = tmp_path / "merged"
    res = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "bench", "learn-merge", str(one), str(two),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    merged = json.loads((out / "learn.json").read_text())
    assert merged["params"]["seeds"] == [0, 1] and merged["params"]["merged_runs"] == 2
    online = next(c for c in merged["metrics"]["cells"] if c["mode"] == "online")
    assert online["final"]["n"] == 48 and online["final"]["wins"] == 42
    assert merged["metrics"]["rules_online_beats_offline"] == 1 and merged["seconds"] == 20.0
    assert merged["params"]["code_commits"] == ["c0ffee"] and merged["notes"] == []
    later = _learn_run(tmp_path, "s2", [_arm("online", 2, 20, 4, 0)], commit="beef", first_seed=2)
    res = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "bench", "learn-merge", str(one), str(later),
                                   "--out", str(out)])
    merged = json.loads((out / "learn.json").read_text())
    assert merged["params"]["code_commits"] == ["beef", "c0ffee"]
    assert any("2 versions of the code" in note for note in merged["notes"]), merged["notes"]
    res = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "bench", "learn-merge", str(one), str(two),
                                   "--out", str(out)])  # seeds 0 and 1 again, on one commit
    assert res.exit_code == 0, res.output
    pooled = tmp_path / "pooled"  # a merged table merges again: here with a later seed on another commit
    res = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "bench", "learn-merge", str(out / "learn.json"),
                                   str(later), "--out", str(pooled)])
    assert res.exit_code == 0, res.output
    repooled = json.loads((pooled / "learn.json").read_text())
    assert repooled["params"]["seeds"] == [0, 1, 2] and repooled["params"]["merged_runs"] == 3
    assert repooled["params"]["code_commits"] == ["beef", "c0ffee"]
    online = next(c for c in repooled["metrics"]["cells"] if c["mode"] == "online")
    assert online["final"]["n"] == 72 and online["final"]["wins"] == 62
    res = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "bench", "learn-merge", str(out / "learn.json"),
                                   str(one), "--out", str(tmp_path / "no")])
    assert res.exit_code == 1 and "in two of the runs" in res.output
    other = _learn_run(tmp_path, "lr", [_arm("online", 2, 1, 1, 0)], lr=5e-4)
    again = _learn_run(tmp_path, "again", [_arm("online", 0, 1, 1, 0)])
    for files, words in (([one, other], "differ in lr"), ([one, again], "in two of the runs")):
        res = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "bench", "learn-merge", *map(str, files),
                                       "--out", str(tmp_path / "no")])
        assert res.exit_code == 1 and words in res.output and "Traceback" not in res.output
        assert not (tmp_path / "no" / "learn.json").exists()


def test_memory_process_tree_helpers():
    me = os.getpid()
    status = memory.read_status_kib(me)
    assert status["VmRSS"] > 0 and status["VmHWM"] >= status["VmRSS"]
    assert memory.read_status_kib(2**31 - 1) == {}
    assert me in memory.descendants(me)
    assert memory.role_of(["python", "-c", "x", "--data-dir", "d", "serve", "--port", "1"]) == "serve"
    assert memory.role_of(["python", "-c", "x", "--db", "sqlite://", "up", "--judge", "rule:x"]) == "up"
    assert memory.role_of(["python"]) == "other"
    tree = memory.TreeSampler(me)
    tree.sample()
    assert tree.samples == 1 and tree.peak_total_kib >= status["VmRSS"] // 2


# --- runs on the tiny model ------------------------------------------------------------------


def test_labeler_votes_through_http_are_counted_once(live_app):
    make_pairs(live_app.db, 4)
    judge = load_judge("rule:shorter")
    stats = LabelerStats("bench-labeler-0")
    stop = threading.Event()
    deadline = time.perf_counter() + 8.0  # ample for 4 votes on a loaded CI box
    run_labeler(url=live_app.url, stats=stats, decide=lambda pair: choose_side(judge, pair), deadline=deadline,
                think_s=0.0, stop=stop)
    with live_app.db.sessions() as s:
        stored = s.scalar(select(func.count(Label.id)).where(Label.labeler == "bench-labeler-0"))
    assert stats.votes == stored == 4 and not stats.errors
    # three votes came back with the next pair; the last one found the queue empty until the deadline
    assert [empty for _, empty in stats.waits] == [False, False, False]
    assert stats.empty_seconds > 0 and stats.active_seconds > 0
    assert sum(stats.choices.values()) == 4 and set(stats.choices) <= {"left", "right", "tie"}


def test_plain_http_client_returns_outputs_and_one_line_errors(live_app):
    make_pairs(live_app.db, 1)
    client = ApiClient(live_app.url)
    pair = client.predict("erin", api_name="/next_pair")["pair"]
    assert pair["prompt"].startswith("prompt 0")
    with pytest.raises(ApiError, match="unknown choice"):
        client.predict(pair["assignment_id"], "sideways", "erin", "", api_name="/vote")
    assert client.predict(api_name="/counters")["queue"] == 0
    assert len(round_trips_ms(live_app.url, n=3)) == 3
    client.close()


def test_idle_vote_probe_skips_so_nothing_is_trained(live_app):
    make_pairs(live_app.db, 3)
    assert len(idle_votes_ms(live_app.url, n=5)) == 3  # stops when the queue runs dry
    with live_app.db.sessions() as s:
        choices = list(s.scalars(select(Label.choice).where(Label.labeler == "bench-probe")))
    assert choices == ["skip"] * 3


def test_sampling_bench_through_the_cli(common_config, tiny_model_dir, tmp_path):
    out = tmp_path / "results"
    args = ["--data-dir", str(common_config.data_dir), "bench", "sampling", "--quick", "--model", str(tiny_model_dir),
            "--device", "cpu", "--dtype", "fp32", "--out", str(out), "--rounds", "2", "--prompts-per-batch", "2",
            "--max-new-tokens", "4", "--candidates", "3"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "sampling-quick.json").read_text())
    assert common.validate_result(data) == [] and data["status"] == "ok"
    m = data["metrics"]
    for key, ratio_key in (("candidates_3", "candidates_cost_ratio"),
                           ("candidates_3_unscored", "candidates_cost_ratio_unscored")):
        assert (m[key]["calls"], m[key]["pairs"]) == (2, 4.0)  # shown pairs: 2 of the 3 per prompt
        assert m[ratio_key] == pytest.approx(m["batched_pairs_per_minute"] / m[key]["pairs_per_minute"])
    assert "(margin-scored) vs 2" in res.output and "(not scored) vs 2" in res.output
    assert (m["batched"]["calls"], m["batched"]["pairs"]) == (2, 4.0)
    assert (m["one_pair_at_a_time"]["calls"], m["one_pair_at_a_time"]["pairs"]) == (4, 4.0)
    assert m["speedup"] == pytest.approx(m["batched_pairs_per_minute"] / m["single_pairs_per_minute"])
    assert "speedup (batched / one pair)" in res.output
    report = CliRunner().invoke(cli, ["bench", "report", "--out", str(out)])
    assert report.exit_code == 0 and "| sampling (quick) |" in report.output


def test_failed_bench_writes_a_failed_result_and_exits_nonzero(common_config, tmp_path):
    out = tmp_path / "results"
    res = CliRunner().invoke(cli, ["--data-dir", str(common_config.data_dir), "bench", "sampling", "--quick",
                                   "--model", str(tmp_path / "no-such-model"), "--out", str(out)])
    assert res.exit_code == 1 and "bench sampling failed" in res.output and "Traceback" not in res.output
    data = json.loads((out / "sampling-quick.json").read_text())
    assert data["status"] == "failed" and "does not exist" in data["notes"][0]


def test_reload_bench_counts_every_committed_version(common_config, tiny_model_dir, tmp_path):
    result = reload.run(tiny_ctx(common_config, tiny_model_dir, tmp_path), versions=2, max_new_tokens=4, interval_s=0,
                        prompts_per_batch=1)
    m = result.metrics
    assert m["versions_committed"] == m["swaps_recorded"] == 2 and m["missed_versions"] == 0
    assert m["base_weights_reloaded"] is False and m["swap_ms"]["n"] == 2
    assert [t["metric"] for t in result.targets] == ["swap_ms_p95", "commit_to_serving_ms_p95"]


def test_learn_bench_spends_exactly_the_budget_in_every_mode(common_config, tiny_model_dir, tmp_path):
    result = learn.run(tiny_ctx(common_config, tiny_model_dir, tmp_path), rules=("rule:shorter",), budget=12,
                       curve=(6,), batch_size=3, max_new_tokens=4, eval_n=3, lr=1e-2)
    names = {m: learn.arm_label(m, DEFAULT_PASSES) for m in ("online", "iterative", "offline")}  # "online (2 passes)"
    assert {a["mode"] for a in result.metrics["arms"]} == set(names.values()) and result.params["round_labels"] == 6
    assert {a["passes"] for a in result.metrics["arms"]} == {DEFAULT_PASSES} == {result.params["passes"]}
    arms = {m: next(a for a in result.metrics["arms"] if a["mode"] == name) for m, name in names.items()}
    for arm in arms.values():
        assert arm["labels_used"] == sum(arm["choices"].values()) == 12
        assert [p["labels"] for p in arm["curve"]] == [6, 12]
        trainable = arm["choices"].get("a", 0) + arm["choices"].get("b", 0)
        assert arm["steps"] == trainable // 3
    cells = {m: next(c for c in result.metrics["cells"] if c["mode"] == names[m]) for m in names}
    assert {m: c["decisive_labels"] for m, c in cells.items()} == {
        m: [a["choices"].get("a", 0) + a["choices"].get("b", 0)] for m, a in arms.items()}
    assert arms["online"]["final_version"] == arms["online"]["steps"]
    assert arms["offline"]["sampler_versions"] == [0] and arms["offline"]["final_version"] == arms["offline"]["steps"]
    it = arms["iterative"]  # one version per round, each round sampled from the one before
    assert it["final_version"] == it["rounds"] <= 2 and it["sampler_versions"][0] == 0
    assert it["sampler_versions"] == sorted(set(it["sampler_versions"])) and it["steps"] > it["rounds"]
    assert (tmp_path / "results" / result.params["curve_plot"]).stat().st_size > 1000
    evaluated = sum(1 for arm in arms.values() for point in arm["curve"] if point.get("eval"))
    assert evaluated >= 2 and result.metrics["base_answers_reused"] == evaluated - 1  # one seed: the base answered once


@pytest.mark.timeout(300)
def test_first_pair_bench_times_a_fresh_up_through_the_cli(common_config, tiny_model_dir, tmp_path):
    out = tmp_path / "results"
    res = CliRunner().invoke(cli, ["--data-dir", str(common_config.data_dir), "bench", "first-pair", "--quick",
                                   "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32", "--out",
                                   str(out), "--runs", "1"])
    data = json.loads((out / "first-pair-quick.json").read_text())
    assert common.validate_result(data) == [] and data["status"] == "ok", res.output
    [page], [pair] = data["metrics"]["page_s"], data["metrics"]["first_pair_s"]
    assert 0 < page and 0 < pair and data["metrics"]["first_pair_s_p50"] == pair
    assert [t["metric"] for t in data["targets"]] == ["first_pair_s_p50"]


def test_rate_bench_splits_cpu_by_role():
    import os

    from odpo.bench.labelers_rate import CpuByRole

    cpu = CpuByRole(os.getpid())
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # burn some CPU in this process
        pass
    used = cpu.lap()
    assert used["bench"] > 0 and set(used) >= {"bench"}


def test_learn_runs_that_differ_in_passes_merge_as_different_arms(tmp_path):
    from odpo.bench.learn import arm_label
    from odpo.bench.learn_table import merge

    assert arm_label("online", 1) == "online" and arm_label("online+margin", 2) == "online+margin (2 passes)"
    older = _learn_run(tmp_path, "old", [_arm("online", 0, 20, 4, 0), _arm("offline", 0, 12, 12, 0)])  # no passes
    twice = _learn_run(tmp_path, "p2", [{**_arm(arm_label("online", 2), 0, 22, 2, 0), "passes": 2}], passes=2)
    result = merge([json.loads(p.read_text()) for p in (older, twice)], tmp_path / "out")
    modes = {c["mode"]: c["final"]["wins"] for c in result.metrics["cells"]}
    assert modes == {"online": 20, "offline": 12, "online (2 passes)": 22}
    assert "passes" not in result.params
    with pytest.raises(ValueError, match="in two of the runs"):
        merge([json.loads(twice.read_text())] * 2, tmp_path / "out")
