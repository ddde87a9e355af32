"""NucleusFilter keeps exactly the tokens transformers' TopPLogitsWarper keeps, and sampling through
odpo's generate draws the same ids as transformers' own temperature + top-p for the same seed."""
from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, TemperatureLogitsWarper, TopPLogitsWarper

from odpo.trainer.batching import prompt_token_ids
from odpo.trainer.generation import SamplingParams, _warpers, generate, left_pad
from odpo.trainer.nucleus import NucleusFilter


def logits(rows: int, vocab: int, *, spread: float, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * spread


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("spread", [8.0, 2.0, 0.1])  # peaked (nucleus among the candidates) .. flat (fallback)
def test_keeps_what_transformers_keeps(top_p, spread):
    scores = logits(6, 5000, spread=spread, seed=int(top_p * 1000) + int(spread * 10))
    ours = NucleusFilter(top_p, candidates=64)(torch.zeros(6, 1, dtype=torch.long), scores)
    theirs = TopPLogitsWarper(top_p=top_p)(torch.zeros(6, 1, dtype=torch.long), scores)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours[~torch.isinf(ours)], scores[~torch.isinf(theirs)])


def test_both_paths_are_exercised():
    """The parametrised cases above cover a row decided by the candidates and a row that falls back."""
    peaked, flat = logits(1, 5000, spread=8.0, seed=1), logits(1, 5000, spread=0.1, seed=2)
    for scores, wide in ((peaked, False), (flat, True)):
        top = scores.softmax(-1).topk(64).values.sum()
        assert bool(top < 0.95) is wide


def test_one_token_always_survives_and_top_p_one_is_a_no_op():
    scores = torch.tensor([[10.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    out = NucleusFilter(0.01, candidates=2)(torch.zeros(2, 1, dtype=torch.long), scores)
    assert torch.isfinite(out[0]).tolist() == [True, False, False]
    assert torch.isfinite(out[1]).sum() == 1
    assert NucleusFilter(1.0)(torch.zeros(2, 1, dtype=torch.long), scores) is scores
    with pytest.raises(ValueError):
        NucleusFilter(0.0)


def test_temperature_comes_before_the_nucleus_as_in_transformers():
    ids, scores = torch.zeros(4, 1, dtype=torch.long), logits(4, 3000, spread=3.0, seed=7)
    params = SamplingParams(temperature=0.5, top_p=0.8)
    hf_order = TopPLogitsWarper(0.8)(ids, TemperatureLogitsWarper(0.5)(ids, scores))
    reversed_order = TemperatureLogitsWarper(0.5)(ids, TopPLogitsWarper(0.8)(ids, scores))
    assert not torch.equal(torch.isinf(hf_order), torch.isinf(reversed_order)), "the order must matter here"
    torch.testing.assert_close(_warpers(params)(ids, scores), hf_order)
    assert len(_warpers(SamplingParams(temperature=0))) == 0


def test_generate_draws_what_transformers_draws(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    prompts = ["The cat looks at the green hill.", "Hi"]
    params = SamplingParams(temperature=0.8, top_p=0.7, max_new_tokens=10, seed=5)
    ours = [g.token_ids for row in generate(model, tok, prompts, params=params, n_per_prompt=2) for g in row]
    rows = [prompt_token_ids(tok, p) for p in prompts for _ in range(2)]
    input_ids, mask = left_pad(rows, pad_id=tok.pad_token_id, device=torch.device("cpu"))
    config = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.7, top_k=0,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(5)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    theirs = [tuple(i for i in row if i != tok.pad_token_id) for row in out[:, input_ids.shape[1]:].tolist()]
    assert [tuple(i for i in ids if i != tok.pad_token_id) for ids in ours] == theirs
    assert len(set(theirs)) > 1, "the samples should differ (a real draw, not greedy)"
