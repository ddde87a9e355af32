"""Exact on-policy data, end to end: what the sampler drew is what the trainer scores.

The tiny model samples through the real Sampler, a labeler votes, the real DPOTrainer takes a
step, and the batch it built is read back row by row and compared with the stored ids. Also: an
EOS only where the model stopped, --length-cut keep/drop, one prompt cut for sampling and
training, and the re-tokenising path for samples stored without ids.
"""
from __future__ import annotations

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from odpo.db import store
from odpo.db.models import Label, Pair, Prompt, Sample, TrainStep
from odpo.trainer.options import LENGTH_CUT_MODES
from odpo.trainer.policy.batching import encode_prompt, prompt_token_ids
from odpo.trainer.policy.lora import attach_lora
from odpo.trainer.sampling.generation import SamplingParams
from odpo.trainer.sampling.sampler import Sampler, SamplerSettings
from odpo.trainer.training import step as train_step
from odpo.trainer.training.loop import DPOTrainer
from odpo.trainer.training.train_config import DEFAULT_LENGTH_CUT, TrainConfig, TrainConfigError
from tests.db_helpers import make_pairs
from tests.model_fixtures import tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [f"Question {i}: what does the old man think of the river and the green hill?" for i in range(6)]
PROMPT_CUT = 12  # shorter than every rendered prompt: the cut really happens
STOP_IDS = list(range(100, 140))  # extra eos ids of the sampling model: some samples stop, some are cut


@pytest.fixture
def make_trainer(database, tmp_path, tiny_model_dir):
    trainers = []

    def build(**overrides) -> DPOTrainer:
        trainer = DPOTrainer(tiny_train_config(tiny_model_dir, **overrides), db=database,
                             adapters_dir=tmp_path / "runs" / "default" / "adapters",
                             model_cache_dir=tmp_path / "models")
        trainer.start()
        trainers.append(trainer)
        return trainer

    yield build
    for trainer in trainers:
        trainer.close()


@pytest.fixture
def batches(monkeypatch) -> list[tuple[list, dict]]:
    """Every (examples, batch) the trainer's DPO step builds, in either layout (shared prompt, the
    default, or concatenated)."""
    seen: list[tuple[list, dict]] = []

    def spy_on(name: str) -> None:
        real = getattr(train_step, name)

        def spy(tokenizer, examples, **kwargs):
            batch = real(tokenizer, examples, **kwargs)
            if batch is not None:
                seen.append((list(examples), batch))
            return batch

        monkeypatch.setattr(train_step, name, spy)

    spy_on("build_pair_batch")
    spy_on("build_shared_batch")
    return seen


def rows_of(batch: dict) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of every row (2B: chosen rows first), read back through the masks."""
    if "prompt_ids" in batch:  # shared prompt: [common prefix +] B left-padded prompts, 2B right-padded completions
        prefix = batch["prefix_ids"][0].tolist() if "prefix_ids" in batch else []
        prompts = [prefix + [i for i, m in zip(ids, mask, strict=True) if m]
                   for ids, mask in zip(batch["prompt_ids"].tolist(), batch["prompt_mask"].tolist(), strict=True)]
        completions = [[i for i, m in zip(ids, mask, strict=True) if m] for ids, mask in
                       zip(batch["completion_ids"].tolist(), batch["completion_mask"].tolist(), strict=True)]
        return [(prompts[r % len(prompts)], c) for r, c in enumerate(completions)]
    out = []
    for ids, att, comp in zip(*(batch[k].tolist() for k in ("input_ids", "attention_mask", "completion_mask")),
                              strict=True):
        out.append(([i for i, a, c in zip(ids, att, comp, strict=True) if a and not c],
                    [i for i, a, c in zip(ids, att, comp, strict=True) if a and c]))
    return out


def vote_alternating(db) -> list[int]:
    """Answer every queued pair, a, b, a, ...: both sides of the chosen/rejected mapping get used."""
    ids = []
    while True:
        with db.sessions.begin() as s:
            claimed = store.claim_next_pair(s, labeler="alice")
            if claimed is None:
                return ids
            ids.append(store.record_label(s, assignment_id=claimed.assignment_id, labeler="alice",
                                          choice="ab"[len(ids) % 2]).id)


def stored_pair(db, label_id: int) -> tuple[Label, Sample, Sample, str]:
    """The label, its chosen and rejected samples, and the prompt text."""
    with db.sessions() as s:
        label = s.get(Label, label_id)
        pair = s.get(Pair, label.pair_id)
        a, b = s.get(Sample, pair.sample_a_id), s.get(Sample, pair.sample_b_id)
        prompt = s.get(Prompt, pair.prompt_id).text
    return (label, a, b, prompt) if label.choice == "a" else (label, b, a, prompt)


def sample_with_tiny_model(db, model, tokenizer, *, stop_ids: list[int]) -> Sampler:
    """Fill a queue of 4 pairs. `stop_ids` become end-of-sequence tokens of the sampling model, so
    some samples stop (emitting one of them) and some are cut at max_new_tokens."""
    with db.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text=t) for t in PROMPTS])
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *stop_ids]
    peft_model = attach_lora(model)
    peft_model.eval()
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3, max_prompt_tokens=PROMPT_CUT)
    sampler = Sampler(db=db, model=peft_model, tokenizer=tokenizer,
                      settings=SamplerSettings(queue_size=4, prompts_per_batch=2, params=params))
    while sampler.step():
        pass
    return sampler


def test_the_ids_trained_are_the_ids_sampled(database, tiny_model_and_tokenizer, make_trainer, batches):
    model, tokenizer = tiny_model_and_tokenizer
    sample_with_tiny_model(database, model, tokenizer, stop_ids=STOP_IDS)
    label_ids = vote_alternating(database)
    assert len(label_ids) == 4
    trainer = make_trainer(max_prompt_tokens=PROMPT_CUT)
    assert trainer.train_available()
    [(examples, batch)] = batches
    assert all(e.exact for e in examples)
    rows = rows_of(batch)
    finishes = set()
    for i, label_id in enumerate(label_ids):
        _, chosen, rejected, prompt = stored_pair(database, label_id)
        # sampling and training cut the prompt by one rule: both hold its last PROMPT_CUT ids
        assert chosen.prompt_token_ids == rejected.prompt_token_ids == encode_prompt(tokenizer, prompt)[-PROMPT_CUT:]
        assert rows[i] == (chosen.prompt_token_ids, chosen.token_ids)
        assert rows[i + 4] == (rejected.prompt_token_ids, rejected.token_ids)
        for smp in (chosen, rejected):
            finishes.add(smp.finish_reason)
            ends_with_stop = smp.token_ids[-1] in STOP_IDS or smp.token_ids[-1] == tokenizer.eos_token_id
            assert ends_with_stop == (smp.finish_reason == "stop")  # an EOS only where the model emitted one
            assert tokenizer.eos_token_id not in smp.token_ids[:-1]
    assert finishes == {"stop", "length"}, "the seed should give both kinds of samples"


def _pair_with_ids(db, *, prompt: str, finish_b: str) -> None:
    """A stored pair with hand-made ids: sample a stopped (its last id an EOS), sample b `finish_b`."""
    with db.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text=prompt)])
        prompt_id = s.scalar(select(Prompt.id).where(Prompt.text == prompt))
        ids = [1, 2, 3]
        a = store.NewSample(text="a", tokens=2, finish_reason="stop", params={}, gen_seconds=0.0,
                            prompt_token_ids=ids, token_ids=[40, 41, 6])
        b = store.NewSample(text="b", tokens=3, finish_reason=finish_b, params={}, gen_seconds=0.0,
                            prompt_token_ids=ids, token_ids=[50, 51, 52])
        store.add_pair(s, prompt_id=prompt_id, version=0, a=a, b=b)


@pytest.mark.parametrize("mode", ["keep", "drop"])
def test_length_cut_pairs_train_without_eos_or_are_left_out(database, make_trainer, batches, mode):
    for i in range(5):
        _pair_with_ids(database, prompt=f"prompt {i}", finish_b="length" if i == 0 else "stop")
    label_ids = vote_alternating(database)
    trainer = make_trainer(length_cut=mode)
    assert trainer.train_available()
    [(examples, batch)] = batches
    rows = rows_of(batch)
    with database.sessions() as s:
        [trained] = s.scalars(select(TrainStep.label_ids)).all()
    if mode == "keep":
        assert trained == label_ids[:4]
        # label 0 chose a: its rejected row is the cut sample, exactly as emitted, no EOS added
        assert rows[0] == ([1, 2, 3], [40, 41, 6]) and rows[4] == ([1, 2, 3], [50, 51, 52])
        assert examples[0].length_cut
    else:
        assert trained == label_ids[1:]
        assert not any(e.length_cut for e in examples)
        with database.sessions() as s:  # recorded as skipped by this run, like a too-stale label
            assert label_ids[0] not in {lb.label_id for lb in store.unconsumed_labels(s, limit=10, run="default")}
            assert store.count_stale_skipped(s, run="default") == 1
        assert trainer.next_batch() is None  # the dropped label is not fetched again


def test_samples_stored_without_ids_still_train_by_retokenising(database, tiny_model_and_tokenizer,
                                                                 make_trainer, batches):
    """Samples from before revision 0004 (no ids): prompt and texts re-tokenised, EOS for "stop"."""
    tokenizer = tiny_model_and_tokenizer[1]
    make_pairs(database, 4)  # db_helpers' samples: texts only, finish_reason "stop"
    label_ids = vote_alternating(database)
    trainer = make_trainer()
    assert trainer.train_available()
    [(examples, batch)] = batches
    assert not any(e.exact for e in examples)
    for i, label_id in enumerate(label_ids):
        _, chosen, rejected, prompt = stored_pair(database, label_id)
        assert chosen.token_ids is None and chosen.prompt_token_ids is None
        expected = tokenizer(chosen.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert rows_of(batch)[i] == (prompt_token_ids(tokenizer, prompt), expected)


def test_samples_of_one_pair_from_different_prompt_ids_are_refused_when_read(database):
    """add_pair refuses such a pair; one made by hand in the database is refused when trained."""
    _pair_with_ids(database, prompt="p", finish_b="stop")
    [label_id] = vote_alternating(database)
    with database.sessions.begin() as s:
        pair = s.get(Pair, s.get(Label, label_id).pair_id)
        s.get(Sample, pair.sample_b_id).prompt_token_ids = [9, 9]
    with database.sessions() as s, pytest.raises(store.StoreError, match="different prompt token ids"):
        store.sampled_ids(s, label_ids=[label_id])


def test_length_cut_option(tmp_path):
    from odpo.app.cli import train as cli_train

    assert DEFAULT_LENGTH_CUT == "keep" and LENGTH_CUT_MODES == ("keep", "drop")
    option = next(p for p in cli_train.train.params if p.name == "length_cut")
    assert tuple(option.type.choices) == LENGTH_CUT_MODES and option.default == DEFAULT_LENGTH_CUT
    with pytest.raises(TrainConfigError, match="length_cut"):
        TrainConfig(length_cut="truncate")
    keep, drop = TrainConfig(), TrainConfig(length_cut="drop")
    assert "length_cut" not in keep.hyperparameters()  # older runs keep their hash
    assert drop.hyperparameters()["length_cut"] == "drop"
    result = CliRunner().invoke(cli_train.train, ["--length-cut", "sometimes"], obj=None)
    assert result.exit_code == 2 and "sometimes" in result.output
