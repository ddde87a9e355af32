"""`--report-to`: the trainer's metrics in TensorBoard, W&B and trackio are its train_steps rows.

TensorBoard is read back with tensorboard's own EventAccumulator after real DPO steps of the tiny
model; wandb (WANDB_MODE=offline) and trackio (local, TRACKIO_DIR) run in a child process, since
both keep process-wide state (trackio reads TRACKIO_DIR at import), and read back what they wrote.
A backend whose package is missing is skipped here with the reason.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from odpo.db import store
from odpo.db.models import Adapter, Eval, TrainStep
from odpo.trainer.training import tracking
from odpo.trainer.training.loop import DPOTrainer
from tests.db_helpers import label_all, make_pairs
from tests.model_fixtures import tiny_train_config

REPO_ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ("Name a colour.", "Say hi.")


def _needs(package: str) -> None:
    if not tracking.installed(package):
        pytest.skip(f"{package} is not installed (pip install {package}, or make dev)")


def _rows(db) -> tuple[list[TrainStep], dict[int, int], list[Eval]]:
    """The committed train_steps rows, {version: the step it ends on}, and the evals."""
    with db.sessions() as s:
        rows = list(s.scalars(select(TrainStep).where(TrainStep.committed.is_(True)).order_by(TrainStep.step)))
        versions = {a.version: a.step for a in s.scalars(select(Adapter))}
        evals = list(s.scalars(select(Eval).order_by(Eval.version_a)))
        s.expunge_all()
    return rows, versions, evals


def _expected_steps(rows: list[TrainStep]) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as the rows hold them (a column where there is one, else the metrics JSON)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, tag in tracking.STEP_SCALARS.items():
            value = getattr(row, key) if hasattr(TrainStep, key) else row.metrics[key]
            out.setdefault(tag, []).append((row.step, float(value)))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """Three DPO steps on the tiny model, a version every two (v1 at step 2, v2 at step 3 on exit) and
    an auto-eval of each, through the CLI's layout: <data_dir>/runs/default/{adapters,tensorboard}."""
    from odpo.app.config import CommonConfig

    tmp = tmp_path_factory.mktemp("tracking")
    cfg = CommonConfig.resolve(data_dir=str(tmp / "data"), db_url=f"sqlite:///{tmp / 'odpo.sqlite3'}")
    db = cfg.open_db()
    with db.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text=t, held_out=True) for t in HELD_OUT])
    make_pairs(db, 6)
    label_all(db, "alice", "a")
    train_cfg = tiny_train_config(tiny_model_dir, batch_size=2, save_every=2, eval_every=1,  # report_to: default
                                  eval_judge="rule:shorter", eval_n=2, eval_max_new_tokens=8)
    trainer = DPOTrainer(train_cfg, db=db, adapters_dir=cfg.adapters_dir("default"), model_cache_dir=tmp / "models")
    try:
        trainer.start()
        assert trainer.run().versions == [1, 2]
    finally:
        trainer.close()
    yield cfg, db
    db.close()


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6, abs=1e-7)  # float32 in the file


def test_tensorboard_by_default_holds_the_train_steps_rows(trained):
    _needs("tensorboard")
    cfg, db = trained
    rows, versions, evals = _rows(db)
    assert [r.step for r in rows] == [1, 2, 3] and versions == {1: 2, 2: 3} and len(evals) == 2
    scalars = _scalars(cfg.data_dir / "runs" / "default" / "tensorboard")
    want = _expected_steps(rows)
    assert {t for t in scalars if t.startswith("train/")} == set(want) | {tracking.VERSION_SCALAR}
    for tag, points in want.items():
        _same(scalars[tag], points)
    _same(scalars[tracking.VERSION_SCALAR], [(step, float(v)) for v, step in sorted(versions.items())])
    for suffix, field in (("", "win_rate"), ("_low", "ci_low"), ("_high", "ci_high")):
        _same(scalars["eval/win_rate_vs_base" + suffix],
              [(versions[e.version_a], getattr(e, field)) for e in evals])


def test_a_replayed_step_hides_the_discarded_point(database, tmp_path, tiny_model_dir):
    """A trainer killed with a step uncommitted replays it from the head; TensorBoard then shows the
    replay's numbers at that step, not the lost ones (purge_step), as the committed rows do."""
    _needs("tensorboard")
    make_pairs(database, 4)
    label_all(database, "alice", "a")
    adapters = tmp_path / "runs" / "default" / "adapters"
    crashed = DPOTrainer(tiny_train_config(tiny_model_dir, batch_size=2, save_every=2, report_to="tensorboard"),
                         db=database, adapters_dir=adapters, model_cache_dir=tmp_path / "models")
    crashed.start()
    assert crashed.train_available() and crashed.pending  # step 1, uncommitted
    crashed.close()  # its point at step 1 is in the file now
    again = DPOTrainer(tiny_train_config(tiny_model_dir, batch_size=2, save_every=2, lr=3e-3, report_to="tensorboard"),
                       db=database, adapters_dir=adapters, model_cache_dir=tmp_path / "models")
    try:
        again.start()
        assert again.run().versions == [1]
    finally:
        again.close()
    rows, _, _ = _rows(database)
    scalars = _scalars(tmp_path / "runs" / "default" / "tensorboard")
    assert [r.step for r in rows] == [1, 2]
    _same(scalars["train/learning_rate"], [(1, 3e-3), (2, 3e-3)])  # the replay's, not the lost step's 1e-3
    _same(scalars["train/loss"], _expected_steps(rows)["train/loss"])


_REPLAY = r"""
import json, struct, sys
from pathlib import Path
from types import SimpleNamespace
from odpo.trainer.training.tracking import open_tracker

data = json.load(sys.stdin)
backend, out = data["backend"], Path(data["dir"])
tracker = open_tracker(backend, run="default", job="train", log_dir=out / "tb", config={"lr": 0.001})
for step, metrics in data["steps"]:  # as the trainer calls it: each step, then a version ending there
    tracker.step(step, metrics)
    for version, at in data["versions"]:
        if at == step:
            tracker.version(step, version)
for at, rate, low, high in data["evals"]:
    win = SimpleNamespace(rate=rate, low=low, high=high)
    tracker.win_rate(SimpleNamespace(version_b=0, details={}, win_rate=win), step=at)
tracker.close()


def wandb_history():
    from wandb.proto import wandb_internal_pb2 as pb
    (path,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    data, pos, chunk = path.read_bytes(), 7, b""  # ":W&B" header, then LevelDB log records of 32 KiB blocks
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                yield {"step": row.pop("train/global_step"), **{k: v for k, v in row.items() if not k.startswith("_")}}


def trackio_history():
    from trackio.sqlite_storage import SQLiteStorage
    for row in SQLiteStorage.get_logs("odpo", "default"):
        yield {k: v for k, v in row.items() if k != "timestamp"}


print("HISTORY " + json.dumps(list(wandb_history() if backend == "wandb" else trackio_history())))
"""


def _replay(backend: str, tmp_path: Path, trained) -> list[dict]:
    """Feed the trained run's rows to one backend in a child process; what it wrote, read back."""
    _, db = trained
    rows, versions, evals = _rows(db)
    data = {"backend": backend, "dir": str(tmp_path), "steps": [(r.step, r.metrics) for r in rows],
            "versions": sorted(versions.items()),
            "evals": [(versions[e.version_a], e.win_rate, e.ci_low, e.ci_high) for e in evals]}
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
           "TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("WANDB_PROJECT", None)
    done = subprocess.run([sys.executable, "-c", _REPLAY], input=json.dumps(data), env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("HISTORY "))
    return json.loads(line[len("HISTORY "):])


def _check_history(history: list[dict], trained) -> None:
    """Every scalar the backend kept, per tag: the same (step, value) points as the rows."""
    rows, versions, evals = _rows(trained[1])
    got: dict[str, list[tuple[int, float]]] = {}
    for point in history:
        for tag, value in point.items():
            if tag != "step":
                got.setdefault(tag, []).append((point["step"], value))
    want = {**_expected_steps(rows), tracking.VERSION_SCALAR: [(s, float(v)) for v, s in sorted(versions.items())],
            "eval/win_rate_vs_base": [(versions[e.version_a], e.win_rate) for e in evals],
            "eval/win_rate_vs_base_low": [(versions[e.version_a], e.ci_low) for e in evals],
            "eval/win_rate_vs_base_high": [(versions[e.version_a], e.ci_high) for e in evals]}
    assert set(got) == set(want)
    for tag, points in want.items():
        assert got[tag] == [(s, pytest.approx(v, rel=1e-9)) for s, v in points], tag


def test_wandb_offline_run_holds_the_train_steps_rows(tmp_path, trained):
    _needs("wandb")
    _check_history(_replay("wandb", tmp_path, trained), trained)


def test_trackio_local_run_holds_the_train_steps_rows(tmp_path, trained):
    _needs("trackio")
    _check_history(_replay("trackio", tmp_path, trained), trained)


def test_odpo_eval_report_to_logs_its_win_rate_at_version_a_step(trained):
    _needs("tensorboard")
    from odpo.app.cli import cli

    cfg, db = trained
    _, versions, _ = _rows(db)
    args = ["--data-dir", str(cfg.data_dir), "--db", cfg.db_url, "eval", "--a", "v1", "--b", "v2", "--judge",
            "rule:shorter", "--n", "2", "--max-new-tokens", "8", "--device", "cpu", "--dtype", "fp32",
            "--report-to", "tensorboard", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index('{"eval_id"'):].splitlines()[0])  # stderr bars mix in
    scalars = _scalars(cfg.data_dir / "runs" / "default" / "tensorboard")
    _same(scalars["eval/win_rate_vs_v2"], [(versions[1], summary["rate"])])
    _same(scalars["eval/win_rate_vs_v2_low"], [(versions[1], summary["low"])])


def test_a_missing_package_is_one_line_before_the_model_loads(common_config, monkeypatch):
    from odpo.app.cli import cli

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if it were not installed
    base = ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url, "train",
            "--model", str(common_config.data_dir / "no-such-model"), "--device", "cpu"]
    result = CliRunner().invoke(cli, base + ["--report-to", "tensorboard,wandb"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "--report-to wandb needs the wandb package: pip install wandb" in result.output
    assert "no-such-model" not in result.output  # refused before the model was looked for
    bad = CliRunner().invoke(cli, base + ["--report-to", "tensorbord"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output
    assert "report_to must be tensorboard, wandb or trackio (comma-separated), all or none" in bad.output
    human = CliRunner().invoke(cli, base[:4] + ["eval", "--human", "--report-to", "tensorboard"])
    assert human.exit_code != 0 and "--report-to logs a judged win rate" in human.output


def test_report_to_names_and_the_default():
    assert tracking.report_to_names("none") == ()
    assert tracking.report_to_names(" wandb, tensorboard,wandb ") == ("wandb", "tensorboard")
    assert tracking.report_to_names(None) == (("tensorboard",) if tracking.installed("tensorboard") else ())
    assert tracking.report_to_names("all") == tuple(b for b in tracking.BACKENDS if tracking.installed(b))
    for bad in ("", "none,wandb", "mlflow"):
        assert not tracking.valid_report_to(bad)
    assert tracking.logging_dir(None, Path("/d/runs/r")) == Path("/d/runs/r/tensorboard")


def test_the_commands_list_the_option_and_up_passes_it_on():
    from odpo.app.cli import cli
    from odpo.app.cli.serve import up, up_children

    for command in ("train", "eval", "up"):
        help_text = CliRunner().invoke(cli, [command, "--help"]).output
        assert "--report-to" in help_text, command
    assert "--logging-dir" in CliRunner().invoke(cli, ["train", "--help"]).output
    children = {c.name: c for c in up_children(up.make_context("up", ["--report-to", "wandb,trackio"]).params)}
    args = list(children["train"].args)
    assert args[args.index("--report-to") + 1] == "wandb,trackio"
    assert "--report-to" not in children["serve"].args
