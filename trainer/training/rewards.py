"""The policy's implicit reward of sampled completions, computed the way a DPO step computes it.

DPO's reward of a completion y is beta * (log pi(y|x) - log ref(y|x)) (SimPO's: beta * the mean
token log-prob, no reference); a pair's margin is the difference of its two rewards. The sampler's
`margin` and `uncertain` selectors (trainer/sampling/selection.py) rank a prompt's candidates by it,
so it is computed here with the trainer's own batch layout and forward functions (step._layout and
the loss's length normalisation), in eval mode: for the same pair it is the number a DPO step's
metrics report (with LoRA dropout off), not a re-derivation that could drift from it. The policy's
half is taken from the generate call when it recorded it (`generate(record_logps=True)`: the same
weights and ids, scored one decode step at a time, equal to the forward's to rounding), which
leaves one forward, the reference's, to score K candidates.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import torch

from odpo.trainer.policy.batching import PairExample
from odpo.trainer.sampling.generation import Generated
from odpo.trainer.training.losses import is_reference_free, needs_length_normalisation
from odpo.trainer.training.step import pair_layout
from odpo.trainer.training.train_config import TrainConfig


def reward_scorer(db: Any, model: Any, tokenizer: Any, *, autocast: Callable[[], Any] = contextlib.nullcontext
                  ) -> Callable[[Sequence[Any], Sequence[Sequence[Generated]]], list[list[float]]]:
    """The sampler's scoring function: implicit rewards under the loss and beta the running trainer
    published (control row train.config), or DPO's defaults before a trainer ever ran."""
    from odpo.db import store

    def score(prompts: Sequence[Any], candidates: Sequence[Sequence[Generated]]) -> list[list[float]]:
        with db.sessions() as s:
            published = store.get_control(s, key="train.config") or {}
        keys = ("loss_type", "beta", "max_prompt_tokens", "max_completion_tokens")
        cfg = TrainConfig(**{k: published[k] for k in keys if published.get(k) is not None})
        return implicit_rewards(model, tokenizer, prompts, candidates, cfg, autocast=autocast)

    return score


def _paired_rows(candidates: Sequence[Generated]) -> list[Generated]:
    """The candidates in pair order (0, 1), (2, 3), ...: an odd one out is paired with itself."""
    return list(candidates) + ([candidates[-1]] if len(candidates) % 2 else [])


def candidate_examples(prompt: Any, candidates: Sequence[Generated]) -> list[PairExample]:
    """A prompt's candidates as pairs (0, 1), (2, 3), ... so the pair layout scores every one once."""
    rows = _paired_rows(candidates)
    return [PairExample(prompt=prompt, chosen=a.text, rejected=b.text, prompt_ids=a.prompt_token_ids,
                        chosen_ids=a.token_ids, rejected_ids=b.token_ids, chosen_finish=a.finish_reason,
                        rejected_finish=b.finish_reason) for a, b in zip(rows[::2], rows[1::2], strict=True)]


@torch.no_grad()
def implicit_rewards(model: Any, tokenizer: Any, prompts: Sequence[Any], candidates: Sequence[Sequence[Generated]],
                     cfg: TrainConfig, *, autocast: Callable[[], Any] = contextlib.nullcontext) -> list[list[float]]:
    """Each candidate's implicit reward under `cfg`'s loss and beta, per prompt, in candidate order.
    `model` is the PeftModel serving the policy (the reference is it with the adapter off)."""
    examples, spans = [], []
    for prompt, cands in zip(prompts, candidates, strict=True):
        made = candidate_examples(prompt, cands)
        spans.append((len(examples), len(made), len(cands)))
        examples += made
    if not examples:
        return []
    policy = (_generated_logps(candidates, cfg)
              or _logps(model, tokenizer, examples, cfg, autocast=autocast, reference=False))
    reference = None if is_reference_free(cfg.loss_type) else _logps(model, tokenizer, examples, cfg,
                                                                      autocast=autocast, reference=True)
    scores = policy if reference is None else [p - r for p, r in zip(policy, reference, strict=True)]
    flat = [cfg.beta * float(s) for s in scores]
    return [flat[2 * start:2 * start + n] for start, _, n in spans]


def _generated_logps(candidates: Sequence[Sequence[Generated]], cfg: TrainConfig) -> Optional[list[float]]:
    """The policy's log-probs the generate call recorded, in `_logps`'s order, when the trainer would
    score exactly those ids: every candidate has one, and no prompt or answer is longer than `cfg`
    keeps. None otherwise: then a forward computes them."""
    flat: list[float] = []
    for cands in candidates:
        for c in _paired_rows(cands):
            if (c.logp is None or not c.token_ids or len(c.token_ids) > cfg.max_completion_tokens
                    or len(c.prompt_token_ids) > cfg.max_prompt_tokens):
                return None
            flat.append(c.logp / len(c.token_ids) if needs_length_normalisation(cfg.loss_type) else c.logp)
    return flat


def _logps(model: Any, tokenizer: Any, examples: list[PairExample], cfg: TrainConfig, *,
           autocast: Callable[[], Any], reference: bool) -> list[float]:
    """Sequence log-probs of every completion, in example order: chosen, rejected, chosen, ..."""
    was_training = model.training
    model.eval()
    try:
        batch, forward = pair_layout(model, tokenizer, examples, cfg, None)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        off = model.disable_adapter() if reference else contextlib.nullcontext()
        with off, autocast():
            chosen, rejected = forward(model, batch, average=needs_length_normalisation(cfg.loss_type))
    finally:
        model.train(was_training)
    return [float(x) for pair in zip(chosen.tolist(), rejected.tolist(), strict=True) for x in pair]
