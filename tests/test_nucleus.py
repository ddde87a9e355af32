"""The nucleus odpo samples from is exactly transformers' TopPLogitsWarper's, and NucleusSampler
draws from softmax over it, as transformers' multinomial would (not the same ids for a seed: the
same distribution, checked on many draws)."""
from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from odpo.trainer.sampling.generation import SamplingParams, _warpers, generate
from odpo.trainer.sampling.nucleus import NucleusSampler, nucleus

IDS = torch.zeros(1, 1, dtype=torch.long)


def logits(rows: int, vocab: int, *, spread: float, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * spread


def hf_nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """[rows, vocab] bool: the tokens transformers' top-p keeps."""
    return torch.isfinite(TopPLogitsWarper(top_p=top_p)(IDS.expand(len(scores), 1), scores))


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("spread", [8.0, 2.0, 0.1])  # peaked (nucleus among the candidates) .. flat (wide)
def test_keeps_what_transformers_keeps(top_p, spread):
    scores = logits(6, 5000, spread=spread, seed=int(top_p * 1000) + int(spread * 10))
    values, indices, keep, wide = nucleus(scores, top_p, 64)
    theirs = hf_nucleus(scores, top_p)
    for row in range(len(scores)):
        if wide[row]:  # decided on the full row: transformers' nucleus is indeed wider than the candidates
            assert int(theirs[row].sum()) > int(keep[row].sum())
            continue
        assert set(indices[row][keep[row]].tolist()) == set(theirs[row].nonzero().flatten().tolist())
        assert torch.equal(values[row], scores[row][indices[row]])


def test_both_paths_are_exercised():
    """The parametrised cases above cover a row decided by the candidates and a row that falls back."""
    peaked, flat = logits(1, 5000, spread=8.0, seed=1), logits(1, 5000, spread=0.1, seed=2)
    for scores, wide in ((peaked, False), (flat, True)):
        assert bool(nucleus(scores, 0.95, 64)[3][0]) is wide


def draw_counts(scores: torch.Tensor, top_p: float, candidates: int, n: int = 40_000) -> torch.Tensor:
    torch.manual_seed(0)
    out = NucleusSampler(top_p, candidates=candidates)(IDS.expand(n, 1), scores.expand(n, -1))
    assert torch.equal((out == 0).sum(-1), torch.ones(n, dtype=torch.long)), "one token per row, 0 there"
    assert bool(torch.isinf(out).sum(-1).eq(scores.shape[-1] - 1).all()), "-inf everywhere else"
    return torch.bincount(out.argmax(-1), minlength=scores.shape[-1]).float()


@pytest.mark.parametrize("top_p, candidates", [(0.9, 64), (0.9, 3), (1.0, 64)],
                         ids=["candidates", "wider-than-candidates", "no-nucleus"])
def test_draws_follow_the_nucleus_distribution(top_p, candidates):
    scores = logits(1, 40, spread=1.5, seed=3)
    kept = hf_nucleus(scores, top_p)[0]
    assert 3 < int(kept.sum()) <= 40
    expected = torch.where(kept, scores[0], float("-inf")).softmax(-1)
    freq = draw_counts(scores, top_p, candidates) / 40_000
    assert freq[~kept].sum() == 0, "never a token outside the nucleus"
    assert float((freq - expected).abs().max()) < 0.01  # the standard error is <= 0.0025 here


def test_one_token_always_survives_and_bad_settings_are_refused():
    scores = torch.tensor([[10.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    values, indices, keep, _ = nucleus(scores, 0.01, 2)
    assert keep[0].tolist() == [True, False] and indices[0, 0] == 0
    assert keep[1].sum() == 1
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError):
            NucleusSampler(bad)
    with pytest.raises(ValueError):
        NucleusSampler(0.5, candidates=0)


def test_temperature_comes_before_the_nucleus_as_in_transformers():
    scores = logits(1, 3000, spread=3.0, seed=7)
    hf_order = torch.isfinite(TopPLogitsWarper(0.8)(IDS, TemperatureLogitsWarper(0.5)(IDS, scores)))
    reversed_order = hf_nucleus(scores, 0.8)  # the nucleus before temperature: wider at T = 0.5 < 1
    assert int(hf_order.sum()) < int(reversed_order.sum()), "the order must matter here"
    warpers = _warpers(SamplingParams(temperature=0.5, top_p=0.8))
    torch.manual_seed(1)
    drawn = warpers(IDS.expand(20_000, 1), scores.expand(20_000, -1)).argmax(-1)
    assert bool(hf_order[0][drawn].all())
    assert len(_warpers(SamplingParams(temperature=0))) == 0


def test_generate_samples_from_the_nucleus(tiny_model_and_tokenizer):
    """A seed reproduces the draws and another seed changes them; a nucleus of one token is greedy."""
    model, tok = tiny_model_and_tokenizer
    prompts = ["The cat looks at the green hill.", "Hi"]

    def ids(**kw):
        params = SamplingParams(max_new_tokens=10, **kw)
        return [g.token_ids for row in generate(model, tok, prompts, params=params, n_per_prompt=2) for g in row]

    sampled = ids(temperature=0.8, top_p=0.7, seed=5)
    assert sampled == ids(temperature=0.8, top_p=0.7, seed=5) != ids(temperature=0.8, top_p=0.7, seed=6)
    assert len(set(sampled)) > 1, "the samples should differ (a real draw, not greedy)"
    assert ids(temperature=1.0, top_p=1e-6, seed=5) == ids(temperature=0)
