"""`odpo train --mode online|iterative|offline` (issue 12): one trainer, one ledger, real tiny DPO steps."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import select

from odpo.app.services.dataset_import import import_dataset
from odpo.db import store
from odpo.db.models import Adapter, Label, Pair, TrainStep
from odpo.trainer.training.loop import DPOTrainer
from odpo.trainer.training.modes import PROGRESS_KEY, progress_line
from odpo.trainer.training.train_config import TrainConfig, TrainConfigError
from tests.db_helpers import label_all, make_pairs
from tests.model_fixtures import tiny_train_config

torch.set_num_threads(1)


def _config(tiny_model_dir, **overrides) -> TrainConfig:
    return tiny_train_config(tiny_model_dir, **{"batch_size": 2, **overrides})


@pytest.fixture
def run_trainer(database, tmp_path, tiny_model_dir):
    """Start a trainer with these overrides, run it to its exit, close it; returns (trainer, stats)."""

    def run(**overrides):
        trainer = DPOTrainer(_config(tiny_model_dir, **overrides), db=database,
                             adapters_dir=tmp_path / "runs" / overrides.get("run", "default") / "adapters",
                             model_cache_dir=tmp_path / "models")
        try:
            trainer.start()
            return trainer, trainer.run()
        finally:
            trainer.close()

    return run


def labels_at(database, n: int, version: int) -> set[int]:
    """n new pairs sampled at `version`, each labeled 'a' by a person; their label ids."""
    pair_ids = set(make_pairs(database, n, version=version))
    label_all(database, "alice")
    with database.sessions() as s:
        return set(s.scalars(select(Label.id).where(Label.pair_id.in_(pair_ids))))


def ledger(database, run: str = "default") -> dict[int, set[int]]:
    """version -> label ids trained into it (the run's ledger)."""
    out: dict[int, set[int]] = {}
    with database.sessions() as s:
        for lid, (version, _step) in store.label_uses(s, run=run).items():
            out.setdefault(version, set()).add(lid)
    return out


def steps_of(database, version: int, run: str = "default") -> list[list[int]]:
    with database.sessions() as s:
        return [r.label_ids for r in s.scalars(select(TrainStep).where(TrainStep.run == run,
                                                                      TrainStep.version == version,
                                                                      TrainStep.committed.is_(True))
                                               .order_by(TrainStep.step))]


def metrics(database, version: int, run: str = "default") -> dict:
    with database.sessions() as s:
        return dict(s.scalar(select(Adapter).where(Adapter.run == run, Adapter.version == version)).metrics)


# --- iterative -------------------------------------------------------------------------------------


def test_iterative_rounds_train_exactly_their_labels_into_one_version(database, run_trainer):
    early = labels_at(database, 3, version=0)
    _, stats = run_trainer(mode="iterative", round_labels=4, epochs=2, save_every=1)
    assert stats.versions == [] and stats.steps == 0  # 3 of 4 labels: no version yet
    with database.sessions() as s:
        progress = store.get_control(s, key=PROGRESS_KEY)
    assert progress_line(progress) == "round 1: 3/4 labels"

    round1 = early | labels_at(database, 1, version=0)
    _, stats = run_trainer(mode="iterative", round_labels=4, epochs=2)
    assert stats.versions == [1] and stats.steps == 4  # 2 epochs x 2 batches, ONE version
    assert ledger(database) == {1: round1}
    steps = steps_of(database, 1)
    assert Counter(lid for step in steps for lid in step) == {lid: 2 for lid in round1}  # each label, each epoch
    assert {k: metrics(database, 1)[k] for k in ("round", "round_labels", "epochs")} == {
        "round": 1, "round_labels": 4, "epochs": 2}

    older = labels_at(database, 2, version=0)  # pairs of v0, labeled after v1: never part of a round
    round2 = labels_at(database, 4, version=1)
    _, stats = run_trainer(mode="iterative", round_labels=4)
    assert stats.versions == [2]
    assert ledger(database) == {1: round1, 2: round2}
    assert metrics(database, 2)["round"] == 2 and metrics(database, 2)["labels"] == 4
    with database.sessions() as s:
        assert older <= {r.label_id for r in store.unconsumed_labels(s, limit=100)}  # left unused, not skipped
        assert store.get_adapter(s, version=2).parent == 1


def test_iterative_round_cut_short_commits_nothing_and_replays(database, run_trainer, tiny_model_dir, tmp_path):
    round1 = labels_at(database, 4, version=0)
    trainer = DPOTrainer(_config(tiny_model_dir, mode="iterative", round_labels=4), db=database,
                         adapters_dir=tmp_path / "runs" / "default" / "adapters", model_cache_dir=tmp_path / "models")
    trainer.on_step = lambda step, version, m: trainer.request_stop()  # SIGTERM after the first step
    try:
        trainer.start()
        stats = trainer.run()
    finally:
        trainer.close()
    assert stats.steps == 1 and stats.versions == [] and stats.exit_reason == "stopped"
    assert ledger(database) == {}
    _, stats = run_trainer(mode="iterative", round_labels=4)
    assert stats.versions == [1] and ledger(database) == {1: round1} and stats.steps == 2


# --- offline ---------------------------------------------------------------------------------------


def write_dataset(tmp_path, n: int) -> str:
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": f"The cat waits near hill {i}."}],
             "rejected": [{"role": "assistant", "content": f"Every student remembers page {i} of the question."}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def dataset_label_ids(database) -> set[int]:
    with database.sessions() as s:
        return set(s.scalars(select(Label.id).where(Label.source == "dataset:prefs")))


def test_offline_trains_the_dataset_and_online_does_not(database, run_trainer, tmp_path):
    import_dataset(database, path=write_dataset(tmp_path, 6))
    imported = dataset_label_ids(database)
    _, stats = run_trainer()  # online, the default: imported labels are not its to train
    assert stats.steps == 0 and ledger(database) == {}
    live = labels_at(database, 2, version=0)
    _, stats = run_trainer(run="live")
    assert stats.steps == 1 and ledger(database, "live") == {1: live}

    _, stats = run_trainer(mode="offline", epochs=2, save_every=2, exit_when_idle=None)
    assert stats.exit_reason == "done" and stats.steps == 6 and stats.versions == [1, 2, 3]
    assert set().union(*ledger(database).values()) == imported  # each label once in the ledger
    trained = Counter(lid for v in (1, 2, 3) for step in steps_of(database, v) for lid in step)
    assert trained == {lid: 2 for lid in imported}  # and trained once per epoch
    assert [metrics(database, v)["offline_done"] for v in (1, 2, 3)] == [2, 4, 6]
    _, stats = run_trainer(mode="offline", exit_when_idle=None)  # nothing new imported: done at once
    assert stats.steps == 0 and stats.exit_reason == "done"


def test_offline_resumes_the_job_from_the_head(database, run_trainer, tmp_path):
    import_dataset(database, path=write_dataset(tmp_path, 5))
    _, stats = run_trainer(mode="offline", epochs=2, save_every=2, max_steps=3, exit_when_idle=None)
    assert stats.versions == [1, 2] and stats.exit_reason == "max_steps"
    _, stats = run_trainer(mode="offline", epochs=2, save_every=2, exit_when_idle=None)
    assert stats.steps == 3 and stats.versions == [3, 4]  # 3 steps/epoch x 2 = 6 in all
    trained = Counter(lid for v in (1, 2, 3, 4) for step in steps_of(database, v) for lid in step)
    assert trained == {lid: 2 for lid in dataset_label_ids(database)}
    assert set().union(*ledger(database).values()) == dataset_label_ids(database)
    with database.sessions() as s:
        assert {p.purpose for p in s.scalars(select(Pair))} == {"dataset"}


# --- flags -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (dict(mode="iterative"), "mode iterative needs round_labels"),
    (dict(mode="iterative", round_labels=4, save_every=3), "save_every does not apply to mode iterative"),
    (dict(mode="iterative", round_labels=4, max_steps=3), "max_steps does not apply to mode iterative"),
    (dict(round_labels=4), "round_labels only applies to mode iterative"),
    (dict(epochs=2), "epochs only applies to mode iterative or offline"),
    (dict(mode="offline", sources="human"), "mode offline trains on imported datasets only"),
    (dict(sources="dataset"), "sources 'dataset' .* needs mode offline"),
    (dict(mode="nope"), "mode must be one of online, iterative, offline"),
])
def test_conflicting_mode_flags_are_refused(overrides, message):
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig(**overrides)


def test_online_defaults_keep_the_hyperparameter_hash():
    assert TrainConfig().sources == "all" and TrainConfig(mode="offline").sources == "dataset"
    assert "mode" not in TrainConfig().hyperparameters()


@pytest.mark.parametrize("args, message", [
    (["--mode", "iterative", "--round-labels", "0"], "Invalid value for '--round-labels'"),
    (["--mode", "iterative"], "mode iterative needs round_labels"),
    (["--mode", "iterative", "--round-labels", "8", "--save-every", "4"], "save_every does not apply"),
    (["--mode", "offline", "--sources", "human"], "mode offline trains on imported datasets only"),
])
def test_cli_bad_mode_flags_are_one_line(common_config, args, message):
    from odpo.app.cli import cli

    result = CliRunner().invoke(cli, ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url,
                                      "train", *args])
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
