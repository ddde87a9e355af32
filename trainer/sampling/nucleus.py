"""Top-p (nucleus) sampling without sorting, or drawing over, the whole vocabulary.

transformers' ``TopPLogitsWarper`` sorts every row's full vocabulary at every decode step. On
SmolLM2 (49,152 entries, 16 rows) that sort was 15 % of a sampling call on this CPU (torch
profiler: 146 ms of ~1 s per step), more than the attention. The nucleus is almost always a few
dozen tokens, and the ``k`` largest logits come from ``topk`` in one pass: when those ``k`` tokens
already hold ``top_p`` of the probability, every token outside them is filtered anyway, so the
top-``k`` alone decide the row. Rows whose nucleus is wider (a very flat distribution) go through
transformers' own warper. Either way a row keeps exactly the tokens ``TopPLogitsWarper`` keeps
(tests/test_nucleus.py compares the two). The draw that follows needs random variates for the kept
tokens only (``NucleusSampler``), so sampling still draws from the policy's own truncated
distribution, at a fraction of the cost.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor, TopPLogitsWarper

# Candidates looked at before falling back to the full sort; measured on SmolLM2 at temperature 0.9,
# the 0.95 nucleus of a step is rarely wider (and the fallback keeps a wider one exact).
DEFAULT_CANDIDATES = 256


def nucleus(scores: torch.Tensor, top_p: float, candidates: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, indices, keep, wide): the ``candidates`` largest logits of each row (descending),
    which of them ``TopPLogitsWarper(top_p)`` keeps, and which rows' nucleus reaches past them
    (decide those on the full row)."""
    k = min(candidates, scores.shape[-1])
    values, indices = scores.topk(k, dim=-1)  # descending
    probs = (values.float() - torch.logsumexp(scores.float(), dim=-1, keepdim=True)).exp()
    # transformers' rule, in ascending order: a token goes when the mass of the tokens up to and
    # including it is <= 1 - top_p. That mass is the non-candidates' (1 - `held`) plus the
    # candidates' from this one down.
    held = probs.sum(-1, keepdim=True)  # the candidates' mass
    keep = (1.0 - held) + probs.flip(-1).cumsum(-1).flip(-1) > 1.0 - top_p
    keep[..., 0] = True  # min_tokens_to_keep=1
    return values, indices, keep, held.squeeze(-1) < top_p


class NucleusSampler(LogitsProcessor):
    """The nucleus and the draw from it, in one processor; `generate` then runs greedy (argmax).

    transformers samples with ``torch.multinomial`` over the whole vocabulary, which draws one
    exponential variate per vocabulary entry: 31 ms of a ~270 ms decode step here (49,152 x 16
    rows), for a nucleus of a few dozen tokens. The Gumbel-max trick draws from the same
    distribution, softmax over the kept logits, as ``argmax(logit - log E)``, E ~ Exp(1) i.i.d.
    (which is also how ``multinomial`` draws one sample), so it only needs variates for the
    candidates. The returned row is 0 at the drawn token and -inf elsewhere. Rows whose nucleus is
    wider than the candidates, and every row at top_p = 1, draw over the full (filtered) row.
    The draws come from torch's global generator, so a seed reproduces them; they are not
    multinomial's ids for that seed (tests/test_nucleus.py checks the distribution instead).
    """

    def __init__(self, top_p: float, *, candidates: int = DEFAULT_CANDIDATES) -> None:
        _check(top_p, candidates)
        self.top_p, self.candidates = float(top_p), int(candidates)
        self._full = TopPLogitsWarper(top_p=self.top_p) if top_p < 1.0 else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self._full is None:
            drawn = _gumbel_argmax(scores)[:, None]
        else:
            values, indices, keep, wide = nucleus(scores, self.top_p, self.candidates)
            drawn = indices.gather(-1, _gumbel_argmax(values.masked_fill(~keep, float("-inf")))[:, None])
            if bool(wide.any()):
                drawn[wide] = _gumbel_argmax(self._full(input_ids[wide], scores[wide]))[:, None]
        return torch.full_like(scores, float("-inf")).scatter_(-1, drawn, 0.0)


def _gumbel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """One index per row drawn from softmax(logits) (-inf entries never: a variate of exactly 0, which
    a float32 draw gives about once in 2**24, would make -inf - log 0 a NaN that argmax picks)."""
    noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_()
    noise = noise.clamp_(min=torch.finfo(torch.float32).tiny).log_()
    return (logits.float() - noise).argmax(-1)


def _check(top_p: float, candidates: int) -> None:
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if candidates < 1:
        raise ValueError("candidates must be >= 1")
