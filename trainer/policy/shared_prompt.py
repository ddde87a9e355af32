"""Score a pair's two completions with one pass over their common prompt.

The two answers of a pair share the prompt, and in odpo the prompt is usually the longer part (the
chat template's system turn alone is ~30 tokens of SmolLM2's; completions are cut at a few dozen).
``concatenated_forward`` (trainer/policy/batching.py, TRL's layout) runs every token of
``prompt + chosen`` and ``prompt + rejected``: the prompt twice, forward and backward, for the
policy and again for the reference. Here the prompts go through the model once, left padded so
they end in the same column; their key/value cache is duplicated for the two halves and the
completions run on top of it. Gradients flow through the cache into the prompt positions, so the
loss, the log-probs and the LoRA gradients are those of the concatenated layout up to float
rounding (tests/test_shared_prompt.py compares both on a real model).

Positions are explicit: a left-padded prompt's first real token is position 0, as in the
right-padded layout, and a completion continues from its own prompt's length. The first completion
token is scored by the prompt pass's last logits (every prompt ends in the last column), the
others by the completion pass.

The prompts of a batch share a prefix too: a chat template's system turn and the user header (24
of SmolLM2's ~40 prompt tokens). That prefix runs once, as one row, before the prompts (as vLLM's
prefix caching would keep it); its cache is repeated for every prompt, and each prompt's own
tokens follow it, left padded, so a row's padding sits between the prefix and its prompt (masked,
positions continue from the prefix). At least one token of every prompt stays out of the prefix:
its logits score the first answer token.

Not used under gradient checkpointing (which turns the cache off) nor under DDP (a second forward
of the wrapped model before backward breaks its gradient hooks); train_step falls back there.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch

from odpo.trainer.policy.batching import (
    PairExample,
    left_pad,
    left_padded_positions,
    pad_id_of,
    pair_token_rows,
    right_pad,
    token_logps,
)


def build_shared_batch(
    tokenizer: Any,
    examples: Sequence[PairExample],
    *,
    max_prompt_tokens: int,
    max_completion_tokens: int,
) -> Optional[dict[str, torch.Tensor]]:
    """B pairs -> ``prefix_ids`` [1, S] (the prompts' common prefix, absent when there is none),
    ``prompt_ids``/``prompt_mask`` [B, P] (the rest of each prompt, left padded) and
    ``completion_ids``/``completion_mask`` [2B, C] (right padded; chosen rows first, as
    build_pair_batch).

    None when a prompt has no tokens: there is nothing to share, and no logits to score the first
    completion token by (the concatenated layout leaves that token unscored; the caller uses it)."""
    triples = pair_token_rows(tokenizer, list(examples), max_prompt_tokens=max_prompt_tokens,
                              max_completion_tokens=max_completion_tokens)
    pad = pad_id_of(tokenizer)
    prompts = [t[0] for t in triples]
    if not all(prompts):
        return None
    completions = [t[1] for t in triples] + [t[2] for t in triples]
    shared = common_prefix_length(prompts)
    prompt_ids, prompt_mask = left_pad([p[shared:] for p in prompts], pad_id=pad)
    completion_ids, completion_mask = right_pad(completions, pad_id=pad)
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
             "completion_mask": completion_mask}
    if shared:
        batch["prefix_ids"] = torch.tensor([prompts[0][:shared]], dtype=torch.long)
    return batch


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, short of each prompt's last (whose logits score the first
    answer token); 0 for a single prompt, where a separate prefix pass saves nothing."""
    if len(prompts) < 2:
        return 0
    return min(len(os.path.commonprefix([list(p) for p in prompts])), min(len(p) for p in prompts) - 1)


def shared_prompt_forward(model: Any, batch: dict[str, torch.Tensor], *,
                          average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_logps, rejected_logps), B fp32 values each: sums (or per-token means with
    ``average``) of the completion tokens' log-probs, as ``concatenated_forward`` returns them."""
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
    rows, span = completion_ids.shape
    twice = torch.arange(prompt_ids.shape[0], device=prompt_ids.device).repeat(2)
    cache, past = prefix_cache(model, batch.get("prefix_ids"), prompt_ids.shape[0])
    prompt_mask = torch.cat([prompt_mask.new_ones(prompt_mask.shape[0], past), prompt_mask], dim=1)
    prompt_out = model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True,
                       logits_to_keep=logit_positions(prompt_ids, last=True),
                       position_ids=left_padded_positions(prompt_mask)[:, past:], **cache)
    name = cache_name(prompt_out)
    prompt_out[name].reorder_cache(twice)  # index_select: differentiable, the gradient of both halves adds up
    prompt_len = prompt_mask.sum(-1)[twice]
    out = model(input_ids=completion_ids,
                attention_mask=torch.cat([prompt_mask[twice], torch.ones_like(completion_mask)], dim=1),
                position_ids=prompt_len[:, None] + torch.arange(span, device=completion_ids.device)[None],
                use_cache=True, logits_to_keep=span, **{name: prompt_out[name]})
    first = token_logps(prompt_out.logits[twice], completion_ids[:, :1])[:, 0]
    # As in sequence_logps: shift the labels, not the logits (a logits slice would double backward's memory).
    labels = torch.cat([completion_ids[:, 1:], completion_ids.new_zeros(rows, 1)], dim=1)
    scored = torch.cat([completion_mask[:, 1:], completion_mask.new_zeros(rows, 1)], dim=1).bool()
    sums = torch.where(scored, token_logps(out.logits, labels), 0.0).sum(dim=1)
    sums = sums + torch.where(completion_mask[:, 0].bool(), first, 0.0)
    if average:
        sums = sums / completion_mask.sum(dim=1).clamp(min=1)
    chosen, rejected = sums.chunk(2, dim=0)
    return chosen, rejected


def prefix_cache(model: Any, prefix_ids: Optional[torch.Tensor], rows: int) -> tuple[dict[str, Any], int]:
    """The common prefix's cache repeated for ``rows`` prompts, as the keyword the next forward
    takes it by, and the prefix's length ({} and 0 without a prefix). The trainer's prompt pass and
    the sampler's prefill both start from it."""
    if prefix_ids is None:
        return {}, 0
    out = model(input_ids=prefix_ids, use_cache=True, logits_to_keep=logit_positions(prefix_ids, last=False))
    name = cache_name(out)
    out[name].reorder_cache(prefix_ids.new_zeros(rows))  # one row -> rows; the gradients add up
    return {name: out[name]}, prefix_ids.shape[1]


def logit_positions(input_ids: torch.Tensor, *, last: bool) -> torch.Tensor:
    """``logits_to_keep`` for a pass that needs only its last position's logits (``last``) or none
    (a prefix pass, run for its cache). Given as indices rather than the int 1: transformers slices
    the hidden states with it, and the int's strided [rows, 1, hidden] view made the lm_head's
    matmul 2.5x slower here (117 vs 45 ms for 8 rows of SmolLM2's 49k vocabulary); indices give a
    contiguous copy, and no indices skip the lm_head altogether."""
    wanted = [input_ids.shape[1] - 1] if last else []
    return torch.tensor(wanted, dtype=torch.long, device=input_ids.device)


def cache_name(outputs: Any) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` during 5.x (the old name still works, with
    a warning): hand the cache back under the name this version returned it by."""
    return "cache" if "cache" in outputs else "past_key_values"


def can_share_prompt(model: Any) -> bool:
    """False where the second pass could not see the prompt's cache: gradient checkpointing turns
    ``use_cache`` off in transformers' models (``is_activation_checkpointing`` since 5.x; the
    older name warns there, so it is only asked where the new one is missing)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        try:
            return not bool(getattr(model, name))
        except AttributeError:
            continue
    return True
