"""The sampler (trainer/sampling/sampler.py) and hot reload (trainer/sampling/hotreload.py) on the tiny model and a
real SQLite database: queue filling, typed prompts, staleness, in-place adapter swaps, rollback."""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from sqlalchemy import select

from odpo.db import store
from odpo.db.models import Pair, Prompt, Reload, Sample
from odpo.trainer.options import MAX_PROMPT_TOKENS
from odpo.trainer.policy.batching import prompt_token_ids
from odpo.trainer.policy.loading import load_model_and_tokenizer
from odpo.trainer.policy.lora import LoraSettings, attach_lora
from odpo.trainer.sampling.generation import SamplingParams
from odpo.trainer.sampling.sampler import Sampler, SamplerSettings
from tests.concurrency import wait_until
from tests.db_helpers import rows
from tests.model_fixtures import tiny_model_config

TRAIN_PROMPTS = [f"Question {i}: what does the cat think of the river?" for i in range(10)]
HELD_OUT = ["Held out: the old man writes to the train."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def add_prompts(db, texts=TRAIN_PROMPTS, held_out=HELD_OUT) -> None:
    with db.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text=t) for t in texts]
                          + [store.NewPrompt(text=t, held_out=True) for t in held_out])


def make_sampler(db, model, tok, **overrides) -> Sampler:
    params = overrides.pop("params", SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=6, seed=0))
    settings = SamplerSettings(**{"queue_size": 4, "prompts_per_batch": 2, "poll_s": 0.05, "params": params,
                                  **overrides})
    peft_model = attach_lora(model)
    peft_model.eval()
    return Sampler(db=db, model=peft_model, tokenizer=tok, settings=settings)


def fill(sampler: Sampler, limit: int = 20) -> int:
    made = 0
    for _ in range(limit):
        n = sampler.step()
        if not n:
            return made
        made += n
    raise AssertionError("the sampler never stopped")


def write_adapter(model_dir: Path, out: Path, *, seed: int, r: int = 16) -> Path:
    """A trained-looking version: a fresh LoRA on a separate copy of the model with random B."""
    model, _ = load_model_and_tokenizer(tiny_model_config(model_dir, out.parent / "models"))
    peft_model = attach_lora(model, LoraSettings(r=r))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(str(out))
    return out


def commit(db, path: Path, version: int, run: str = "default") -> None:
    with db.sessions.begin() as s:
        store.commit_adapter_version(s, run=run, version=version, path=str(path), parent=version - 1, step=version,
                                     label_steps={}, metrics={})


def pairs(db, **where) -> list[Pair]:
    return rows(db, Pair, **where)


def label(db, labeler: str, n: int) -> None:
    for _ in range(n):
        with db.sessions.begin() as s:
            claimed = store.claim_next_pair(s, labeler=labeler)
            store.record_label(s, assignment_id=claimed.assignment_id, labeler=labeler, choice="a")


def logits(peft_model, tok) -> torch.Tensor:
    ids = tok("The cat looks at the green hill.", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return peft_model(input_ids=ids).logits


def base_weight(peft_model) -> torch.Tensor:
    return peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight


def test_fills_the_queue_to_queue_size_and_stops(database, tiny_model_and_tokenizer):
    tokenizer = tiny_model_and_tokenizer[1]
    add_prompts(database)
    sampler = make_sampler(database, *tiny_model_and_tokenizer, overlap=2)
    assert fill(sampler) == 4
    assert sampler.step() == 0  # full: no more generation
    queued = pairs(database, status="queued")
    assert len(queued) == 4 and {p.created_version for p in queued} == {0}
    assert {p.labels_wanted for p in queued} == {2}
    with database.sessions() as s:
        samples = list(s.scalars(select(Sample)))
        held = {p.id for p in store.held_out_prompts(s, limit=10)}
    assert len(samples) == 8 and not held & {p.prompt_id for p in queued}
    assert len({p.prompt_id for p in queued}) == 4  # least recently used: no prompt twice
    for smp in samples:
        assert smp.adapter_version == 0 and smp.tokens == 6 and smp.finish_reason == "length"
        assert smp.gen_seconds > 0
        assert smp.params == {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 6, "batch_rows": 4,
                              "seed": smp.params["seed"], "max_prompt_tokens": MAX_PROMPT_TOKENS}
        # the exact ids it was drawn with: the prompt as fed, the 6 tokens emitted (cut: no eos)
        with database.sessions() as s:
            prompt_text = s.get(Prompt, smp.prompt_id).text
        assert smp.prompt_token_ids == prompt_token_ids(tokenizer, prompt_text)
        assert len(smp.token_ids) == 6 and tokenizer.eos_token_id not in smp.token_ids
        assert smp.text == tokenizer.decode(smp.token_ids, skip_special_tokens=True)
    assert sorted({smp.params["seed"] for smp in samples}) == [0, 1]  # one seed per batch, as recorded
    by_pair = {(a.text, b.text) for a, b in zip(samples[0::2], samples[1::2], strict=True)}
    assert all(a != b for a, b in by_pair)  # two different draws per pair
    state = sampler.state()
    assert state["queue"] == 4 and state["serving_version"] == 0 and not state["generating"]
    assert state["last_batch_seconds"] > 0 and state["pairs_per_minute"] > 0 and state["last_error"] is None


def test_resumes_when_pairs_are_labeled(database, tiny_model_and_tokenizer):
    add_prompts(database)
    sampler = make_sampler(database, *tiny_model_and_tokenizer)
    fill(sampler)
    label(database, "alice", 3)
    assert fill(sampler) == 3
    assert len(pairs(database, status="queued")) == 4
    assert len(pairs(database, status="labeled")) == 3


def test_typed_prompt_is_sampled_next_and_offered_to_its_requester_first(database, tiny_model_and_tokenizer):
    add_prompts(database)
    sampler = make_sampler(database, *tiny_model_and_tokenizer)
    fill(sampler)  # queue full: only the typed request makes work
    with database.sessions.begin() as s:
        prompt_id = store.add_typed_prompt(s, text="Write a poem about a bright star.").id
    sampler.request_typed(prompt_id=prompt_id, labeler="alice")
    assert sampler.state()["typed_pending"] == 1
    assert sampler.step() == 1
    [typed] = pairs(database, purpose="typed")
    assert (typed.prompt_id, typed.requested_by, typed.labels_wanted) == (prompt_id, "alice", 1)
    with database.sessions.begin() as s:
        bob = store.claim_next_pair(s, labeler="bob")
        alice = store.claim_next_pair(s, labeler="alice")
    assert alice.pair_id == typed.id and alice.prompt == "Write a poem about a bright star."
    assert bob.pair_id != typed.id


def test_hot_reload_swaps_weights_in_place_and_retires_stale_pairs(database, tiny_model_and_tokenizer,
                                                                    tiny_model_dir, tmp_path):
    add_prompts(database)
    model, tok = tiny_model_and_tokenizer
    sampler = make_sampler(database, model, tok, max_staleness=0)
    sampler.watcher.load_initial()
    weight = base_weight(sampler.model)
    ptr, before, base_logits = weight.data_ptr(), weight.detach().clone(), logits(sampler.model, tok)
    fill(sampler)
    label(database, "alice", 1)  # one answered v0 pair: labels are never retired
    commit(database, write_adapter(tiny_model_dir, tmp_path / "runs/default/adapters/v1", seed=1), 1)

    result = sampler.watcher.poll_once()

    assert (result.from_version, result.to_version, result.retired_pairs) == (0, 1, 3)
    assert base_weight(sampler.model) is weight and weight.data_ptr() == ptr
    assert torch.equal(weight, before)  # the base model was not touched, let alone reloaded
    assert not torch.allclose(logits(sampler.model, tok), base_logits)  # but the policy changed
    assert sampler.watcher.poll_once() is None  # nothing new
    with database.sessions() as s:
        [row] = s.scalars(select(Reload)).all()
    assert row.version == 1 and row.retired_pairs == 3 and row.swap_ms >= 0
    assert row.commit_to_serving_ms >= 0
    state = sampler.state()
    assert state["serving_version"] == 1 and state["swap_ms"] == row.swap_ms
    assert fill(sampler) == 4
    fresh = pairs(database, status="queued")
    assert {p.created_version for p in fresh} == {1}
    with database.sessions() as s:
        assert {smp.adapter_version for smp in s.scalars(select(Sample).where(Sample.id > 8))} == {1}


def test_rollback_to_base_restores_base_logits_and_retires_newer_pairs(database, tiny_model_and_tokenizer,
                                                                       tiny_model_dir, tmp_path):
    add_prompts(database)
    model, tok = tiny_model_and_tokenizer
    sampler = make_sampler(database, model, tok)
    base_logits = logits(sampler.model, tok)
    commit(database, write_adapter(tiny_model_dir, tmp_path / "v1", seed=1), 1)
    sampler.watcher.load_initial()  # a serve started after v1 was committed serves v1 at once
    assert sampler.watcher.serving_version == 1
    fill(sampler)
    with database.sessions.begin() as s:
        store.rollback_to(s, version=0)

    result = sampler.watcher.poll_once()

    assert (result.from_version, result.to_version, result.retired_pairs) == (1, 0, 4)
    assert torch.equal(logits(sampler.model, tok), base_logits)
    assert fill(sampler) == 4
    assert {p.created_version for p in pairs(database, status="queued")} == {0}


def test_queued_pairs_within_max_staleness_survive_a_reload(database, tiny_model_and_tokenizer, tiny_model_dir,
                                                            tmp_path):
    add_prompts(database)
    sampler = make_sampler(database, *tiny_model_and_tokenizer, max_staleness=1)
    fill(sampler)
    commit(database, write_adapter(tiny_model_dir, tmp_path / "v1", seed=1), 1)
    assert sampler.watcher.poll_once().retired_pairs == 0
    commit(database, write_adapter(tiny_model_dir, tmp_path / "v2", seed=2), 2)
    assert sampler.watcher.poll_once().retired_pairs == 4  # v0 pairs are now 2 versions behind


def test_an_adapter_of_another_rank_is_swapped_in_by_reshaping_only_the_lora(database, tiny_model_and_tokenizer,
                                                                            tiny_model_dir, tmp_path):
    model, tok = tiny_model_and_tokenizer
    sampler = make_sampler(database, model, tok)  # serving a fresh r=16 adapter
    weight = base_weight(sampler.model)
    base_logits = logits(sampler.model, tok)
    commit(database, write_adapter(tiny_model_dir, tmp_path / "v1", seed=1, r=4), 1)
    assert sampler.watcher.poll_once().to_version == 1
    ranks = {tuple(p.shape) for n, p in sampler.model.named_parameters() if "q_proj.lora_A" in n}
    assert ranks == {(4, 64)}
    assert base_weight(sampler.model) is weight
    assert not torch.allclose(logits(sampler.model, tok), base_logits)


def test_a_broken_version_keeps_the_old_one_serving(database, tiny_model_and_tokenizer, tiny_model_dir, tmp_path):
    model, tok = tiny_model_and_tokenizer
    sampler = make_sampler(database, model, tok)
    commit(database, write_adapter(tiny_model_dir, tmp_path / "v1", seed=1), 1)
    sampler.watcher.poll_once()
    v1_logits = logits(sampler.model, tok)
    broken = write_adapter(tiny_model_dir, tmp_path / "v2", seed=2)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    commit(database, broken, 2)
    with pytest.raises(SafetensorError):
        sampler.watcher.poll_once()
    assert sampler.state()["serving_version"] == 1
    assert torch.equal(logits(sampler.model, tok), v1_logits)


def test_threads_swap_a_new_version_mid_batch(database, tiny_model_and_tokenizer, tiny_model_dir, tmp_path):
    # Latency targets live in `odpo bench reload`; here: the swap must not wait for a running batch.
    add_prompts(database)
    model, tok = tiny_model_and_tokenizer
    # Long, slowed-down batches: a commit lands while one is running and must not wait for it.
    sampler = make_sampler(database, model, tok, params=SamplingParams(temperature=1.0, max_new_tokens=300, seed=0),
                           release_every_s=0.1)  # the watcher's first pass may come before the claim expires
    model.register_forward_pre_hook(lambda *_: time.sleep(0.02))
    with database.sessions.begin() as s:  # a labeler who closed the tab: claim already expired
        store.add_pair(s, prompt_id=1, version=0, a=_sample("x"), b=_sample("y"))
        store.claim_next_pair(s, labeler="gone", timeout_s=0.01)
    sampler.start()
    try:
        wait_until(lambda: sampler.state()["generating"], 10)
        commit(database, write_adapter(tiny_model_dir, tmp_path / "v1", seed=1), 1)
        wait_until(lambda: sampler.state()["serving_version"] == 1, 30)
        wait_until(lambda: sampler.state()["commit_to_serving_ms"] is not None, 5)  # recorded just after the swap
        wait_until(lambda: sampler.interrupted_batches >= 1, 1)  # the slow batch was dropped, not waited for
        wait_until(lambda: pairs(database, status="queued", prompt_id=1), 5)  # the expired claim came back
    finally:
        sampler.stop()
    assert not any(t.is_alive() for t in sampler._threads)


def test_batches_give_way_to_reloads_but_not_forever(database, tiny_model_and_tokenizer):
    add_prompts(database)
    sampler = make_sampler(database, *tiny_model_and_tokenizer, max_interrupts_in_a_row=2)
    sampler.watcher.swap_wanted.set()  # a swap waiting for the lock, over and over
    assert [sampler.step(), sampler.step()] == [0, 0]
    assert sampler.interrupted_batches == 2
    assert sampler.step() == 2  # the third batch in a row is allowed to finish
    assert sampler.step() == 0 and sampler.interrupted_batches == 3  # and the count starts again


def test_a_failing_batch_is_reported_and_the_sampler_carries_on(database, tiny_model_and_tokenizer, monkeypatch):
    import odpo.trainer.sampling.sampler as sampler_module

    add_prompts(database)
    sampler = make_sampler(database, *tiny_model_and_tokenizer, error_backoff_s=0.05, nice=2)
    real, calls = sampler_module.generate, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(sampler_module, "generate", flaky)
    sampler.start()
    try:
        wait_until(lambda: sampler.state()["last_error"] == "RuntimeError: out of memory", 5)
        wait_until(lambda: sampler.state()["queue"] == 4, 20)
        assert sampler.state()["last_error"] is None
        if sys.platform.startswith("linux"):  # the sampling thread, and only it, yields the CPU
            sampling, watching = sampler._threads
            mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            assert os.getpriority(os.PRIO_PROCESS, sampling.native_id) == min(19, mine + 2)
            assert os.getpriority(os.PRIO_PROCESS, watching.native_id) == mine
    finally:
        sampler.stop()


def test_nul_in_a_sample_is_stripped_counted_and_stored(database, tiny_model_and_tokenizer, monkeypatch, caplog):
    """A model can emit a token that decodes to NUL; PostgreSQL text cannot hold it (the insert
    failed the whole batch). The sampler drops it from the text, counts it and logs it; the ids,
    which the trainer uses, stay exactly as emitted."""
    import odpo.trainer.sampling.sampler as sampler_module

    add_prompts(database)
    sampler = make_sampler(database, *tiny_model_and_tokenizer)
    real = sampler_module.generate

    def with_nul(*args, **kwargs):
        out = real(*args, **kwargs)
        first = out[0][0]
        out[0][0] = dataclasses.replace(first, text="\x00" + first.text + "\x00 end")
        return out

    monkeypatch.setattr(sampler_module, "generate", with_nul)
    with caplog.at_level("WARNING", logger="odpo.trainer.sampling.sampler"):
        assert sampler.step() == 2 and sampler.step() == 2
    assert sampler.state()["nul_stripped"] == 2  # one sample per batch
    assert "stripped 2 NUL character(s)" in caplog.text
    with database.sessions() as s:
        samples = list(s.scalars(select(Sample).order_by(Sample.id)))
    assert len(samples) == 8 and not any("\x00" in smp.text for smp in samples)
    for smp in (samples[0], samples[4]):
        assert smp.text.endswith(" end") and len(smp.token_ids) == 6


def test_a_pair_of_samples_from_different_prompt_ids_is_refused(database):
    add_prompts(database)
    with database.sessions.begin() as s:
        prompt = store.pick_prompts_for_sampling(s, n=1)[0]
        a = store.NewSample(text="a", tokens=1, finish_reason="stop", params={}, gen_seconds=0.0,
                            prompt_token_ids=[1, 2, 3], token_ids=[7, 2])
        with pytest.raises(store.StoreError, match="different prompt token ids"):
            store.add_pair(s, prompt_id=prompt.id, version=0, a=a, b=dataclasses.replace(a, prompt_token_ids=[2, 3]))
        with pytest.raises(store.StoreError, match="different prompt token ids"):
            store.add_pair(s, prompt_id=prompt.id, version=0, a=a, b=dataclasses.replace(a, prompt_token_ids=None))
    assert pairs(database) == []


def _sample(text: str) -> store.NewSample:
    return store.NewSample(text=text, tokens=1, finish_reason="stop", params={}, gen_seconds=0.0)

