"""The DPO trainer on a tiny model: steps, commits, resume, staleness, pause, rollback, CLI."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import select

from odpo.db import store
from odpo.db.models import Adapter, Label, TrainStep
from odpo.db.store import STALE_STEP, count_stale_skipped
from odpo.trainer.policy import checkpoint as ckpt
from odpo.trainer.policy.batching import PairExample
from odpo.trainer.policy.loading import load_model_and_tokenizer
from odpo.trainer.policy.lora import LoraSettings, attach_lora
from odpo.trainer.training.loop import DPOTrainer, TrainerBusyError
from odpo.trainer.training.step import dpo_step, make_optimizer
from odpo.trainer.training.train_config import TrainConfig, TrainConfigError
from tests.db_helpers import label_all, make_pairs
from tests.model_fixtures import tiny_model_config, tiny_train_config

torch.set_num_threads(1)

EXAMPLES = [
    PairExample(prompt="Where is the cat?", chosen="The cat waits near the green hill.",
                rejected="A small robot opens the open window and talks about a quiet morning."),
    PairExample(prompt="Say something.", chosen="The river runs across the blue sky.",
                rejected="Every student remembers the last page of the long question."),
]


def _config(tiny_model_dir, **overrides) -> TrainConfig:
    return tiny_train_config(tiny_model_dir, **overrides)


@pytest.fixture
def make_trainer(database, tmp_path, tiny_model_dir):
    trainers = []

    def build(**overrides) -> DPOTrainer:
        trainer = DPOTrainer(_config(tiny_model_dir, **overrides), db=database,
                             adapters_dir=tmp_path / "runs" / "default" / "adapters",
                             model_cache_dir=tmp_path / "models")
        trainer.start()
        trainers.append(trainer)
        return trainer

    yield build
    for trainer in trainers:
        trainer.close()


def _labels(database, n: int, *, version: int = 0, choice: str = "a") -> list[int]:
    make_pairs(database, n, version=version)
    return label_all(database, "alice", choice)


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _consumed(database, run: str = "default") -> dict[int, tuple]:
    """label id -> (version, step) of `run`'s ledger, (None, None) for labels it has not used."""
    with database.sessions() as s:
        used = store.label_uses(s, run=run)
        return {lid: used.get(lid, (None, None)) for lid in s.scalars(select(Label.id))}


def _adapters(database) -> dict[int, Adapter]:
    with database.sessions() as s:
        return {a.version: a for a in s.scalars(select(Adapter))}


# --- the step itself -------------------------------------------------------------------------


@pytest.fixture
def tiny_peft(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    torch.manual_seed(0)
    return attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0)), tokenizer


def test_one_step_changes_only_lora_weights(tiny_peft, tiny_model_dir):
    model, tokenizer = tiny_peft
    cfg = _config(tiny_model_dir)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = _lora(model)
    metrics = dpo_step(model=model, tokenizer=tokenizer, optimizer=make_optimizer(model, cfg),
                       examples=EXAMPLES, cfg=cfg)
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_before[name]), f"base weight {name} changed"
    changed = [n for n, p in _lora(model).items() if not torch.equal(p, lora_before[n])]
    assert any("lora_B" in n for n in changed)
    assert metrics["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference at v0
    assert metrics["grad_norm"] > 0 and metrics["pairs"] == 2


def test_loss_decreases_on_a_fixed_batch(tiny_peft, tiny_model_dir):
    model, tokenizer = tiny_peft
    cfg = _config(tiny_model_dir)
    optimizer = make_optimizer(model, cfg)
    history = [dpo_step(model=model, tokenizer=tokenizer, optimizer=optimizer, examples=EXAMPLES, cfg=cfg)
               for _ in range(6)]
    losses = [m["loss"] for m in history]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < losses[0] - 0.03, losses
    assert history[-1]["reward_accuracy"] == 1.0 and history[-1]["reward_margin"] > 0


def test_grad_accum_gives_the_same_update(tiny_model_dir, tmp_path):
    results = []
    for accum in (1, 2):
        model, tokenizer = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path / "m"))
        torch.manual_seed(0)
        model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
        cfg = _config(tiny_model_dir, grad_accum=accum, batch_size=2)
        optimizer = make_optimizer(model, cfg)
        for _ in range(2):
            dpo_step(model=model, tokenizer=tokenizer, optimizer=optimizer, examples=EXAMPLES, cfg=cfg)
        results.append(_lora(model))
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-4, atol=1e-6)


# --- versions, resume, crash semantics -----------------------------------------------------------


def test_committed_version_loads_with_peft_and_matches_live_model(make_trainer, database, tiny_model_dir, tmp_path):
    from peft import PeftModel

    _labels(database, 8)
    trainer = make_trainer()
    stats = trainer.run()
    assert stats.steps == 2 and stats.versions == [1, 2] and stats.exit_reason == "idle"
    rows = _adapters(database)
    assert rows[2].parent == 1 and rows[1].parent == 0 and rows[2].step == 2
    assert set(_consumed(database).values()) == {(1, 1), (2, 2)}
    base, _ = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path / "m2"))
    loaded = PeftModel.from_pretrained(base, rows[2].path)
    ids = torch.tensor([[3, 17, 42, 99, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits,
                                   rtol=0, atol=1e-6)
    with database.sessions() as s:
        steps = list(s.scalars(select(TrainStep).order_by(TrainStep.step)))
    assert [st.committed for st in steps] == [True, True]
    assert steps[0].metrics["ref_logps_chosen"] < 0 and "logps_rejected" in steps[0].metrics
    assert steps[1].version_lag == 1.0  # pairs from v0 trained while holding v1


def test_resume_restores_weights_and_optimizer_state(make_trainer, database):
    _labels(database, 8)
    first = make_trainer(max_steps=2)
    first.run()
    param = next(p for p in first.model.parameters() if p.requires_grad)
    exp_avg = first.optimizer.state[param]["exp_avg"].clone()
    weights = _lora(first.model)
    first.close()

    second = make_trainer()
    assert (second.version, second.step) == (2, 2)
    param2 = next(p for p in second.model.parameters() if p.requires_grad)
    assert torch.equal(second.optimizer.state[param2]["exp_avg"], exp_avg)
    assert float(second.optimizer.state[param2]["step"]) == 2 * first.cfg.passes  # two steps of `passes` updates
    assert all(torch.equal(v, weights[k]) for k, v in _lora(second.model).items())
    _labels(database, 4, version=2)
    assert second.run().versions == [3]
    assert _adapters(database)[3].parent == 2


def test_a_resumed_trainer_continues_exactly_like_one_that_never_stopped(make_trainer, database, tmp_path,
                                                                       tiny_model_dir):
    """LoRA dropout draws from torch's generator: saved with each version, a resume gives the same
    masks and so the same weights, bit for bit, as an uninterrupted run (on a twin database)."""
    from odpo.db.engine import Database

    dropout = LoraSettings(r=4, alpha=8, dropout=0.3)
    twin = Database(f"sqlite:///{tmp_path / 'twin.sqlite3'}")
    try:
        _labels(twin, 8)
        straight = DPOTrainer(_config(tiny_model_dir, lora=dropout), db=twin, adapters_dir=tmp_path / "twin",
                              model_cache_dir=tmp_path / "models")
        straight.start()
        assert straight.run().versions == [1, 2]
        expected = _lora(straight.model)
        straight.close()
    finally:
        twin.close()
    _labels(database, 8)
    first = make_trainer(lora=dropout, max_steps=1)
    assert first.run().versions == [1]
    torch.manual_seed(1234)  # whatever else this process draws in between must not matter
    torch.rand(100)
    first.close()
    second = make_trainer(lora=dropout)
    assert second.run().versions == [2]
    assert all(torch.equal(expected[name], w) for name, w in _lora(second.model).items())


def test_two_trainers_on_one_run_are_refused(make_trainer):
    make_trainer()
    with pytest.raises(TrainerBusyError, match="already training"):
        make_trainer()


def test_save_every_commits_later_and_uncommitted_steps_replay(make_trainer, database):
    ids = _labels(database, 12)
    crashed = make_trainer(save_every=2)
    assert crashed.train_available() is True
    assert _adapters(database) == {} and all(v == (None, None) for v in _consumed(database).values())
    crashed.close()  # "killed": its pending step is lost, its labels were never consumed

    trainer = make_trainer(save_every=2)
    stats = trainer.run()
    assert stats.steps == 3 and stats.versions == [1, 2]  # step 3 flushed on the clean exit
    consumed = _consumed(database)
    assert all(consumed[i][0] in (1, 2) for i in ids)
    with database.sessions() as s:
        steps = list(s.scalars(select(TrainStep).order_by(TrainStep.id)))
    committed = [st for st in steps if st.committed]
    assert [st.committed for st in steps] == [False, True, True, True]
    flat = [lid for st in committed for lid in st.label_ids]
    assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))
    assert steps[0].label_ids == committed[0].label_ids  # the lost step's labels were retrained first


def test_a_vote_undone_inside_a_pending_step_is_never_committed(make_trainer, database):
    """save_every=2: step 1 trains a vote, its labeler takes it back, step 2 ends the version. The
    version would hold a retracted vote, so both steps are dropped and replayed without it."""
    ids = _labels(database, 12)
    trainer = make_trainer(save_every=2)
    before = _lora(trainer.model)
    assert trainer.train_available() is True
    in_step = trainer.pending[0].label_ids
    with database.sessions.begin() as s:
        store.undo_label(s, label_id=in_step[0], labeler="alice")
    assert trainer.train_available() is True  # the second step, then a refused commit
    assert _adapters(database) == {} and trainer.version == 0 and trainer.pending == []
    assert all(torch.equal(before[n], p) for n, p in _lora(trainer.model).items())  # back to v0's weights
    stats = trainer.run()
    assert stats.versions == [1]
    consumed = _consumed(database)
    assert consumed[in_step[0]] == (None, None)
    assert sorted(i for i in ids if consumed[i][0] == 1) == sorted(i for i in ids if i != in_step[0])[:8]
    with database.sessions.begin() as s, pytest.raises(store.StoreError, match="too late to undo"):
        store.undo_label(s, label_id=next(i for i in ids if consumed[i][0] == 1), labeler="alice")


def test_leftover_dirs_are_cleaned_on_start(make_trainer, database, tmp_path):
    adapters = tmp_path / "runs" / "default" / "adapters"
    for name in ("v1.tmp", "v1", "v7"):
        (adapters / name).mkdir(parents=True)
        (adapters / name / "adapter_model.safetensors").write_text("half written")
    trainer = make_trainer()
    assert sorted(p.name for p in adapters.iterdir()) == []
    _labels(database, 4)
    assert trainer.run().versions == [1]
    assert ckpt.is_complete_version_dir(adapters / "v1")


def test_failed_db_commit_removes_the_directory(make_trainer, database, monkeypatch):
    _labels(database, 4)
    trainer = make_trainer()

    def broken(*_a, **_k):
        raise RuntimeError("database went away")

    monkeypatch.setattr(store, "commit_adapter_version", broken)
    with pytest.raises(RuntimeError, match="went away"):
        trainer.train_available()
    assert not (trainer.adapters_dir / "v1").exists()
    assert all(v == (None, None) for v in _consumed(database).values())


# --- which labels are trained --------------------------------------------------------------------


def test_ties_both_bad_and_skips_are_not_trained(make_trainer, database):
    pairs = make_pairs(database, 8)
    choices = ["tie", "a", "both_bad", "b", "skip", "a", "tie", "b"]
    with database.sessions.begin() as s:
        ids = [store.add_direct_label(s, pair_id=p, labeler="alice", choice=c, source="human").id
               for p, c in zip(pairs, choices, strict=True)]
    trainer = make_trainer()
    assert trainer.run().steps == 1
    consumed = _consumed(database)
    trained = {i for i, c in zip(ids, choices, strict=True) if c in ("a", "b")}
    assert {i for i, v in consumed.items() if v[0] == 1} == trained
    assert all(consumed[i] == (None, None) for i in set(ids) - trained)


def test_stale_pairs_are_skipped_and_counted(make_trainer, database):
    _labels(database, 8, version=5)  # from a "future" version: lag < 0, never stale
    trainer = make_trainer(max_staleness_train=1, max_steps=2)
    trainer.run()
    assert trainer.version == 2
    stale = _labels(database, 4, version=0)  # lag 2 > 1
    fresh = _labels(database, 4, version=1)  # lag 1
    trainer.cfg = dataclasses.replace(trainer.cfg, max_steps=None)
    stats = trainer.run()
    assert stats.stale_skipped == 4 and stats.versions == [1, 2, 3]
    consumed = _consumed(database)
    assert all(consumed[i] == (2, STALE_STEP) for i in stale)
    assert all(consumed[i] == (3, 3) for i in fresh)
    with database.sessions() as s:
        assert count_stale_skipped(s) == 4


def test_pause_switch_is_honoured(make_trainer, database):
    _labels(database, 4)
    trainer = make_trainer()
    with database.sessions.begin() as s:
        store.set_control(s, key="train.paused", value={"paused": True})
    assert trainer.train_available() is False
    stats = trainer.run()
    assert stats.steps == 0 and stats.exit_reason == "idle"
    with database.sessions.begin() as s:
        store.set_control(s, key="train.paused", value={"paused": False})
    assert trainer.train_available() is True


def test_rollback_reloads_that_version_and_branches_from_it(make_trainer, database):
    ids = _labels(database, 12)
    trainer = make_trainer()
    assert trainer.run().versions == [1, 2, 3]
    v1_path = _adapters(database)[1].path
    with database.sessions.begin() as s:
        assert store.rollback_to(s, version=1) == 8
    assert trainer.sync_with_db() is True
    assert (trainer.version, trainer.step) == (1, 1)
    fresh = make_optimizer(trainer.model, trainer.cfg)
    ckpt.load_optimizer_state(fresh, v1_path)
    param = next(p for p in trainer.model.parameters() if p.requires_grad)
    assert torch.equal(trainer.optimizer.state[param]["exp_avg"], fresh.state[param]["exp_avg"])
    from safetensors.torch import load_file

    saved = load_file(f"{v1_path}/adapter_model.safetensors")
    live = {n.replace(".default", ""): p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert saved.keys() == live.keys()
    assert all(torch.equal(live[n], saved[n]) for n in saved)

    assert trainer.run().versions == [1, 2, 3, 4, 5]
    rows = _adapters(database)
    assert (rows[4].parent, rows[4].step, rows[5].parent) == (1, 2, 4)
    assert rows[2].rolled_back and rows[3].rolled_back and not rows[5].rolled_back
    assert {_consumed(database)[i][0] for i in ids} == {1, 4, 5}


def test_rollback_to_base_resets_the_adapter(make_trainer, database):
    _labels(database, 4)
    trainer = make_trainer()
    trainer.run()
    assert ckpt.adapter_weights_norm(trainer.model) > 0
    with database.sessions.begin() as s:
        store.rollback_to(s, version=0)
    trainer.train_available()  # reloads v0, then retrains the released labels into v2
    rows = _adapters(database)
    assert rows[2].parent == 0 and rows[2].step == 1 and rows[1].rolled_back


# --- config and CLI ------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 0, "batch_size"), ("grad_accum", 9, "grad_accum"), ("lr", -1.0, "lr"),
    ("loss_type", "kto", "loss_type"), ("label_smoothing", 0.5, "label_smoothing"),
    ("sources", "robots", "sources"), ("run", "../x", "run"), ("max_staleness_train", -1, "max_staleness"),
    ("passes", 0, "passes"), ("passes", 9, "passes"),
])
def test_train_config_rejects_bad_values(field, value, message):
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig(**{field: value})


def test_cli_train_max_steps(common_config, tiny_model_dir):
    from odpo.app.cli import cli

    db = common_config.open_db()
    try:
        _labels(db, 6)
    finally:
        db.close()
    args = ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url, "train",
            "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32", "--batch-size", "2",
            "--max-steps", "2", "--poll-seconds", "0.05", "--lora-r", "4", "--threads", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "trained 2 step(s); committed v1, v2" in result.output
    assert ckpt.is_complete_version_dir(common_config.adapters_dir() / "v2")
    assert ckpt.read_lora_settings(common_config.adapters_dir() / "v2").r == 4


def test_cli_train_bad_option_is_one_line(common_config):
    from odpo.app.cli import cli

    args = ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url, "train",
            "--batch-size", "2", "--grad-accum", "3"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert "grad_accum must be an integer in 1..batch_size" in result.output
    assert "Traceback" not in result.output


def test_trainer_publishes_its_update_size_for_the_ui(make_trainer, database):
    from odpo.app.config import ServeConfig
    from odpo.app.services.labeling import LabelService

    make_trainer(batch_size=3, save_every=2, sources="human")
    with database.sessions() as s:
        published = store.get_control(s, key="train.config")
    assert published == {"batch_size": 3, "save_every": 2, "sources": "human", "run": "default",
                         "loss_type": "sigmoid", "beta": 0.1, "max_prompt_tokens": 256,
                         "max_completion_tokens": published["max_completion_tokens"]}  # the sampler's selectors
    counters = LabelService(db=database, config=ServeConfig(), sampler=None).counters()
    assert counters.per_update == 6 and counters.until_update == 6


def test_auto_eval_every_k_versions_scores_exactly_that_version(make_trainer, database):
    from odpo.db.models import Eval
    from odpo.trainer.evaluation.win_rate import DEFAULT_PARAMS, run_eval

    with database.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text=t, held_out=True)
                                      for t in ("Name a colour.", "Say hi.", "Count to three.")])
    _labels(database, 8)
    trainer = make_trainer(batch_size=2, eval_every=2, eval_judge="rule:shorter", eval_n=3, eval_max_new_tokens=12)
    assert trainer.run().versions == [1, 2, 3, 4]
    with database.sessions() as s:
        evals = {e.version_a: e for e in s.scalars(select(Eval))}
    assert sorted(evals) == [2, 4] and {e.version_b for e in evals.values()} == {0}
    assert {e.judge for e in evals.values()} == {"rule:shorter"} and evals[4].n == 3
    # the same eval, re-run from the v4 files on disk, gives the same verdicts: the auto-eval saw v4
    again = run_eval(database, policy=trainer.model, tokenizer=trainer.tokenizer, version_a=4, version_b=0,
                     judge="rule:shorter", n=3, record=False,
                     params=dataclasses.replace(DEFAULT_PARAMS, max_new_tokens=12))
    assert evals[4].details["params"]["max_new_tokens"] == 12
    assert again.details["examples"] == evals[4].details["examples"]  # same texts, same verdicts
    assert trainer.base_answers.reused == 1  # v4's eval took the base's answers from v2's


def test_auto_eval_needs_a_judge_and_a_valid_spec(make_trainer):
    from odpo.trainer.judges import JudgeError

    with pytest.raises(TrainConfigError, match="eval_every needs eval_judge"):
        TrainConfig(eval_every=2)
    with pytest.raises(JudgeError, match="nonsense"):
        make_trainer(eval_every=1, eval_judge="nonsense:x")


def test_cli_train_eval_every_without_a_judge_is_one_line(common_config):
    from odpo.app.cli import cli

    args = ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url, "train", "--eval-every", "2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0 and "eval_every needs eval_judge" in result.output
    assert "Traceback" not in result.output


def test_passes_repeat_the_update_on_the_same_pairs_and_report_the_first_look(tiny_model_dir, tmp_path):
    """--passes 2 is two optimizer updates on one batch: the weights equal two single-pass steps on
    that batch, and the metrics are those of the first pass (the loss before any update)."""
    weights, first = [], []
    for passes, calls in ((2, 1), (1, 2)):
        model, tokenizer = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path / "m"))
        torch.manual_seed(0)
        model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
        cfg = _config(tiny_model_dir, passes=passes)
        optimizer = make_optimizer(model, cfg)
        history = [dpo_step(model=model, tokenizer=tokenizer, optimizer=optimizer, examples=EXAMPLES, cfg=cfg)
                   for _ in range(calls)]
        weights.append(_lora(model))
        first.append(history[0])
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-6)
    assert first[0]["loss"] == pytest.approx(0.6931, abs=1e-3) == first[1]["loss"]  # before any update
    assert _config(tiny_model_dir, passes=2).hyperparameters()["passes"] == 2
    assert "passes" not in _config(tiny_model_dir, passes=1).hyperparameters()  # older runs keep their hash


def test_two_passes_is_the_default_where_labels_are_scarce_and_offline_keeps_one():
    """Online and iterative labels come one by one, so each batch is trained twice by default (the
    learn bench's measurement, trainer/training/train_config.py); an imported dataset has --epochs."""
    assert TrainConfig().passes == 2 == TrainConfig(mode="iterative", round_labels=8).passes
    assert TrainConfig(mode="offline").passes == 1 and TrainConfig(mode="offline", passes=3).passes == 3
    assert TrainConfig().hyperparameters()["passes"] == 2  # the version records how it was trained


def test_a_stop_request_skips_the_later_passes_and_still_commits_the_step(make_trainer, database, monkeypatch):
    """`odpo up`'s grace period waits for the step in hand: with a stop requested during the first
    pass the step ends there (the labels are trained once, recorded once, committed), instead of
    running the optional passes and perhaps being killed mid-write."""
    from odpo.trainer.training import step

    _labels(database, 4)
    trainer = make_trainer(passes=3)
    original, updates = step._update, []

    def stop_during_the_first(*args, **kwargs):
        updates.append(1)
        trainer.request_stop()
        return original(*args, **kwargs)

    monkeypatch.setattr(step, "_update", stop_during_the_first)
    stats = trainer.run()
    assert stats.steps == 1 and stats.versions == [1] and len(updates) == 1
    with database.sessions() as s:
        row = s.scalars(select(TrainStep)).one()
    assert row.committed and row.metrics["passes"] == 1.0
    assert set(_consumed(database).values()) == {(1, 1)}


def test_should_stop_ends_a_step_after_its_first_pass(tiny_model_dir, tmp_path):
    """Stopped after one pass, the weights are a one-pass step's; unstopped, all passes run."""
    weights, ran = [], []
    for passes, stop in ((3, lambda: True), (1, None), (3, None)):
        model, tokenizer = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path / "m"))
        torch.manual_seed(0)
        model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
        cfg = _config(tiny_model_dir, passes=passes)
        metrics = dpo_step(model=model, tokenizer=tokenizer, optimizer=make_optimizer(model, cfg), examples=EXAMPLES,
                           cfg=cfg, should_stop=stop)
        weights.append(_lora(model))
        ran.append(metrics["passes"])
    assert ran == [1.0, 1.0, 3.0]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=0)
    assert any(not torch.equal(weights[2][n], v) for n, v in weights[0].items())


def test_later_passes_reuse_the_reference_log_probs(tiny_model_dir, tmp_path, monkeypatch):
    """The reference (adapter off) does not change between passes: one reference forward per
    micro-batch, however many passes; the policy forward runs once per pass."""
    from odpo.trainer.training import step

    calls = {"reference": 0, "policy": 0}
    for name, key in (("_reference_logps", "reference"), ("_policy_logps", "policy")):
        original = getattr(step, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(step, name, counted)
    model, tokenizer = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path / "m"))
    model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    cfg = _config(tiny_model_dir, passes=3, grad_accum=2)
    dpo_step(model=model, tokenizer=tokenizer, optimizer=make_optimizer(model, cfg), examples=EXAMPLES, cfg=cfg)
    assert calls == {"reference": 2, "policy": 6}
