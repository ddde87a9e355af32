"""Score a pair's two completions with one pass over their common prompt.

The two answers of a pair share the prompt, and in odpo the prompt is usually the longer part (the
chat template's system turn alone is ~30 tokens of SmolLM2's; completions are cut at a few dozen).
``concatenated_forward`` (trainer/batching.py, TRL's layout) runs every token of
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

Not used under gradient checkpointing (which turns the cache off) nor under DDP (a second forward
of the wrapped model before backward breaks its gradient hooks); train_step falls back there.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from odpo.trainer.batching import (
    PairExample,
    left_pad,
    left_padded_positions,
    pad_id_of,
    pair_token_rows,
    token_logps,
)


def build_shared_batch(
    tokenizer: Any,
    examples: Sequence[PairExample],
    *,
    max_prompt_tokens: int,
    max_completion_tokens: int,
) -> Optional[dict[str, torch.Tensor]]:
    """B pairs -> ``prompt_ids``/``prompt_mask`` [B, P] (left padded) and ``completion_ids``/
    ``completion_mask`` [2B, C] (right padded; chosen rows first, as build_pair_batch).

    None when a prompt has no tokens: there is nothing to share, and no logits to score the first
    completion token by (the concatenated layout leaves that token unscored; the caller uses it)."""
    triples = pair_token_rows(tokenizer, list(examples), max_prompt_tokens=max_prompt_tokens,
                              max_completion_tokens=max_completion_tokens)
    pad = pad_id_of(tokenizer)
    prompts = [t[0] for t in triples]
    if not all(prompts):
        return None
    completions = [t[1] for t in triples] + [t[2] for t in triples]
    prompt_ids, prompt_mask = left_pad(prompts, pad_id=pad)
    span = max(1, max(len(c) for c in completions))
    completion_ids = torch.full((len(completions), span), pad, dtype=torch.long)
    completion_mask = torch.zeros((len(completions), span), dtype=torch.long)
    for i, row in enumerate(completions):
        if row:
            completion_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            completion_mask[i, : len(row)] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask}


def shared_prompt_forward(model: Any, batch: dict[str, torch.Tensor], *,
                          average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_logps, rejected_logps), B fp32 values each: sums (or per-token means with
    ``average``) of the completion tokens' log-probs, as ``concatenated_forward`` returns them."""
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
    rows, span = completion_ids.shape
    twice = torch.arange(prompt_ids.shape[0], device=prompt_ids.device).repeat(2)
    prompt_out = model(input_ids=prompt_ids, attention_mask=prompt_mask,
                       position_ids=left_padded_positions(prompt_mask), use_cache=True, logits_to_keep=1)
    name = cache_name(prompt_out)
    cache = prompt_out[name]
    cache.reorder_cache(twice)  # index_select: differentiable, the gradient of both halves adds up
    prompt_len = prompt_mask.sum(-1)[twice]
    out = model(input_ids=completion_ids,
                attention_mask=torch.cat([prompt_mask[twice], torch.ones_like(completion_mask)], dim=1),
                position_ids=prompt_len[:, None] + torch.arange(span, device=completion_ids.device)[None],
                use_cache=True, logits_to_keep=span, **{name: cache})
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
