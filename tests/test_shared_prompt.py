"""The shared-prompt layout scores pairs exactly as the concatenated one (TRL's) does.

Both layouts run on the same LoRA model in fp32 with dropout off, so every difference is float
rounding: log-probs, LoRA gradients and one whole DPO step must agree to it.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from odpo.trainer.policy.batching import PairExample, build_pair_batch, concatenated_forward, encode_prompt
from odpo.trainer.policy.loading import load_model_and_tokenizer
from odpo.trainer.policy.lora import LoraSettings, attach_lora
from odpo.trainer.policy.shared_prompt import (
    build_shared_batch,
    can_share_prompt,
    common_prefix_length,
    shared_prompt_forward,
)
from odpo.trainer.training.step import dpo_step, make_optimizer, pair_layout, trainable_parameters
from tests.model_fixtures import tiny_train_config

LIMITS = {"max_prompt_tokens": 256, "max_completion_tokens": 256}


def lora_model(model, seed: int = 0):
    """LoRA with a random (not zero) B, so the adapter changes every logit and carries gradient.
    Seeded: PEFT draws lora_A from the global RNG, and an unseeded draw made the one-step comparison
    flaky (about 1 run in 8: an element whose gradient is near 0, where Adam's g / sqrt(v) turns
    rounding into a visible weight difference)."""
    torch.manual_seed(seed)
    peft = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return peft.eval()


def pairs(tokenizer) -> list[PairExample]:
    """Prompts of different lengths (left padding), answers of different lengths (right padding),
    one with stored ids that include an empty answer, one without ids (re-tokenised)."""
    short, long = encode_prompt(tokenizer, "Hi"), encode_prompt(tokenizer, "Tell me, slowly, about rivers")

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = tokenizer.eos_token_id
    return [
        PairExample("Hi", "Hello there.", "No.", prompt_ids=short, chosen_ids=ids("Hello there.") + [eos],
                    rejected_ids=ids("No.") + [eos]),
        PairExample("long", "Rivers run to the sea, mostly", "", prompt_ids=long,
                    chosen_ids=ids("Rivers run to the sea, mostly"), rejected_ids=[],
                    chosen_finish="length"),
        PairExample("What is two and two?", "Four.", "Two and two make four, as everyone knows."),
    ]


def score(model, fn, batch, *, average: bool):
    model.zero_grad(set_to_none=True)
    chosen, rejected = fn(model, batch, average=average)
    (chosen.sum() - 0.7 * rejected.sum()).backward()
    grads = [p.grad.detach().clone() for p in trainable_parameters(model)]
    return chosen.detach(), rejected.detach(), grads


@pytest.mark.parametrize("average", [False, True])
def test_logps_and_gradients_match_the_concatenated_layout(tiny_model_and_tokenizer, average):
    base, tok = tiny_model_and_tokenizer
    model, examples = lora_model(base), pairs(tok)
    c1, r1, g1 = score(model, concatenated_forward, build_pair_batch(tok, examples, **LIMITS), average=average)
    shared = build_shared_batch(tok, examples, **LIMITS)
    assert shared["prompt_ids"].shape[0] == len(examples) and shared["completion_ids"].shape[0] == 2 * len(examples)
    assert shared["prefix_ids"].shape[1] >= 1, "the chat template's common start runs once, as a prefix"
    assert shared["prompt_mask"][:, -1].all(), "left padding: every prompt ends in the last column"
    c2, r2, g2 = score(model, shared_prompt_forward, shared, average=average)
    torch.testing.assert_close(c2, c1, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(r2, r1, rtol=1e-5, atol=1e-4)
    assert r1[1] == 0 and r2[1] == 0, "an empty answer scores nothing in either layout"
    assert any(g.abs().sum() > 0 for g in g1)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_a_dpo_step_is_the_same_step(tiny_model_dir, tmp_path, tiny_model_and_tokenizer):
    base, tok = tiny_model_and_tokenizer
    cfg = tiny_train_config(tiny_model_dir, batch_size=3)
    first = lora_model(base)
    models = [first, copy.deepcopy(first)]  # one LoRA init (PEFT draws lora_A from the global RNG)
    metrics = []
    for model, shared in zip(models, (True, False), strict=True):
        metrics.append(dpo_step(model=model, tokenizer=tok, optimizer=make_optimizer(model, cfg),
                                examples=pairs(tok), cfg=replace(cfg, shared_prompt=shared)))
    assert metrics[0]["loss"] == pytest.approx(metrics[1]["loss"], rel=1e-5)
    assert metrics[0]["grad_norm"] == pytest.approx(metrics[1]["grad_norm"], rel=1e-4)
    moved = False
    for a, b in zip(*(trainable_parameters(m) for m in models), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        moved = moved or bool((a != 0).any())
    assert moved


def test_the_common_prefix_leaves_every_prompt_a_token():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2, "the shorter prompt keeps its last token"
    assert common_prefix_length([[7, 2], [1, 2]]) == 0
    assert common_prefix_length([[1, 2, 3]]) == 0, "one prompt: no separate prefix pass"


def test_one_pair_and_prefix_free_prompts_score_alike(tiny_model_and_tokenizer):
    """Without a common prefix (one pair; prompts that differ from their first token) the prompt
    pass starts from no cache, and still matches the concatenated layout."""
    base, tok = tiny_model_and_tokenizer
    model = lora_model(base)
    one = pairs(tok)[:1]
    bare = [replace(e, prompt_ids=ids) for e, ids in zip(pairs(tok)[:2], ([5, 6, 7], [9, 8]), strict=True)]
    for examples in (one, bare):
        shared = build_shared_batch(tok, examples, **LIMITS)
        assert "prefix_ids" not in shared
        c1, r1, g1 = score(model, concatenated_forward, build_pair_batch(tok, examples, **LIMITS), average=False)
        c2, r2, g2 = score(model, shared_prompt_forward, shared, average=False)
        torch.testing.assert_close(torch.cat([c2, r2]), torch.cat([c1, r1]), rtol=1e-5, atol=1e-4)
        for a, b in zip(g1, g2, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_layout_falls_back_where_the_cache_cannot_be_shared(tiny_model_dir, tiny_model_and_tokenizer):
    base, tok = tiny_model_and_tokenizer
    model, examples = lora_model(base), pairs(tok)
    cfg = tiny_train_config(tiny_model_dir)
    assert pair_layout(model, tok, examples, cfg, None)[1] is shared_prompt_forward
    assert pair_layout(model, tok, examples, replace(cfg, shared_prompt=False), None)[1] is concatenated_forward
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not can_share_prompt(model)
    assert pair_layout(model, tok, examples, cfg, None)[1] is concatenated_forward
    empty = [replace(examples[0], prompt_ids=[])]
    assert build_shared_batch(tok, empty, **LIMITS) is None


@pytest.mark.default_model
def test_real_model_scores_alike(default_model_config):
    """SmolLM2 in fp32: its chat template, grouped-query attention and 49k vocabulary."""
    base, tok = load_model_and_tokenizer(default_model_config)
    model, examples = lora_model(base), pairs(tok)[:1] + pairs(tok)[2:]
    c1, r1, g1 = score(model, concatenated_forward, build_pair_batch(tok, examples, **LIMITS), average=False)
    shared = build_shared_batch(tok, examples, **LIMITS)
    assert shared["prefix_ids"].shape[1] >= 20, "SmolLM2's system turn and user header"
    c2, r2, g2 = score(model, shared_prompt_forward, shared, average=False)
    torch.testing.assert_close(torch.cat([c2, r2]), torch.cat([c1, r1]), rtol=1e-5, atol=2e-3)
    worst = max(float((a - b).norm() / a.norm().clamp(min=1e-12)) for a, b in zip(g1, g2, strict=True))
    assert worst < 1e-3


@pytest.mark.parametrize("args, shared", [([], True), (["--no-shared-prompt"], False)])
def test_the_train_command_sets_thepair_layout(args, shared):
    from odpo.app.cli.train import build_train_config, train

    params = train.make_context("train", args).params
    params.pop("threads")
    assert build_train_config(params).shared_prompt is shared
