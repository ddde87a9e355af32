"""One DPO optimizer step on a list of preference pairs: the maths of the trainer, no database.

Reference log-probs come from the *same* PeftModel under `disable_adapter()` and `no_grad` (one
copy of the base weights); policy log-probs from the adapter in train mode (LoRA dropout on).
Only completion tokens are summed. By default each pair's prompt runs once for both answers
(trainer/policy/shared_prompt.py: same log-probs and gradients, fewer tokens); `shared_prompt=False`, a
gradient-checkpointed model or several processes use TRL's concatenated prompt+answer rows
(`build_pair_batch`). A reference-free loss (SimPO) skips the reference forward altogether: one
no-grad forward beside the policy's forward and backward (about twice a forward), so roughly a
quarter of the step's FLOPs.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from odpo.trainer.policy.batching import PairExample, build_pair_batch, concatenated_forward
from odpo.trainer.policy.shared_prompt import build_shared_batch, can_share_prompt, shared_prompt_forward
from odpo.trainer.training.losses import (
    DPOLossOutput,
    dpo_loss,
    dpo_metrics,
    is_reference_free,
    needs_length_normalisation,
)
from odpo.trainer.training.train_config import TrainConfig

if TYPE_CHECKING:
    from odpo.trainer.training.distributed import Distributed

AutocastFactory = Callable[[], contextlib.AbstractContextManager]
Forward = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The LoRA weights, in module order: the same order every time, so optimizer state saved by
    one process maps onto the parameters of the next."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters; attach a LoRA adapter first")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """A restored optimizer keeps its moments but takes this run's lr/weight decay: changing --lr
    on restart must take effect."""
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
        group["weight_decay"] = cfg.weight_decay


def _micro_batches(examples: Sequence[PairExample], parts: int) -> list[list[PairExample]]:
    size = math.ceil(len(examples) / parts)
    return [list(examples[i:i + size]) for i in range(0, len(examples), size)]


def _reference_logps(model: Any, batch: dict[str, torch.Tensor], *, forward: Forward, average: bool,
                     autocast: AutocastFactory) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad(), model.disable_adapter(), autocast():
        return forward(model, batch, average=average)


def _policy_logps(model: Any, batch: dict[str, torch.Tensor], *, forward: Forward, average: bool,
                  autocast: AutocastFactory) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()  # only for this forward: LoRA dropout; the base has no dropout of its own
    try:
        with autocast():
            return forward(model, batch, average=average)
    finally:
        model.eval()


def pair_layout(model: Any, tokenizer: Any, chunk: list[PairExample], cfg: TrainConfig,
            dist: Optional[Distributed]) -> tuple[dict[str, torch.Tensor], Forward]:
    """The micro-batch's tensors and the forward that scores them: the shared-prompt layout
    (trainer/policy/shared_prompt.py, each prompt run once) unless it is switched off or cannot apply."""
    limits = {"max_prompt_tokens": cfg.max_prompt_tokens, "max_completion_tokens": cfg.max_completion_tokens}
    if cfg.shared_prompt and dist is None and can_share_prompt(model):
        batch = build_shared_batch(tokenizer, chunk, **limits)
        if batch is not None:
            return batch, shared_prompt_forward
    return build_pair_batch(tokenizer, chunk, **limits), concatenated_forward


def dpo_step(*, model: Any, tokenizer: Any, optimizer: torch.optim.Optimizer,
             examples: Sequence[PairExample], cfg: TrainConfig,
             autocast: AutocastFactory = contextlib.nullcontext,
             dist: Optional[Distributed] = None,
             should_stop: Optional[Callable[[], bool]] = None) -> dict[str, float]:
    """Forward both models on the pairs, backprop the DPO loss, clip, step; return plain metrics.

    The loss of each micro-batch is scaled by its share of the pairs, so grad_accum > 1 gives the
    same gradient as one big batch. A non-finite gradient skips the update (reported as
    `skipped_update`) rather than poisoning the adapter. With `dist` (several processes,
    trainer/training/distributed.py) `examples` is the global batch: this rank trains its slice through the
    DDP-wrapped policy, weighted so the all-reduced gradient is the global batch's mean, and the
    metrics are the global batch's. `cfg.passes` > 1 repeats the update on the same pairs (each
    pass scores them afresh with the policy; the reference's log-probs are the first pass's, as they
    cannot have changed); the metrics are those of the first pass, what the labels said to the
    policy before it learnt from them. `should_stop()` true before a later pass ends the step there
    (a stop request should not wait for the optional passes; the first is the step); `passes` in the
    metrics says how many ran.
    """
    started = time.perf_counter()
    prepared: list[_Prepared] = []  # filled by the first pass, reused by the others
    parts, grad_norm, skipped = _update(model, tokenizer, optimizer, examples, cfg, autocast=autocast, dist=dist,
                                        prepared=prepared)
    done = 1
    while done < cfg.passes and not (should_stop is not None and should_stop()):
        _update(model, tokenizer, optimizer, examples, cfg, autocast=autocast, dist=dist, prepared=prepared)
        done += 1  # the same pairs again: the metrics stay those of the first look
    metrics = _metrics(parts, cfg, grad_norm=grad_norm, skipped=skipped, n_pairs=len(examples),
                       seconds=time.perf_counter() - started)
    metrics["passes"] = float(done)
    return metrics


@dataclass
class _Prepared:
    """One micro-batch as the first pass left it: its tensors, its forward, and the reference
    log-probs, which no update changes (the adapter is off for them), so later passes reuse them
    instead of running the reference forward again."""
    batch: dict[str, torch.Tensor]
    forward: Forward
    ref: tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


def _update(model: Any, tokenizer: Any, optimizer: torch.optim.Optimizer, examples: Sequence[PairExample],
            cfg: TrainConfig, *, autocast: AutocastFactory, dist: Optional[Distributed],
            prepared: list[_Prepared]) -> tuple[dict[str, list[torch.Tensor]], float, bool]:
    """One optimizer update on `examples`: the log-probs it saw, the gradient norm, whether skipped.
    An empty `prepared` is filled with the micro-batches; a filled one is trained again as it is."""
    device = trainable_parameters(model)[0].device
    optimizer.zero_grad(set_to_none=True)
    local, divisor = (list(examples), len(examples)) if dist is None else dist.share(examples)
    if not prepared:
        prepared.extend(_prepare(model, tokenizer, chunk, cfg, dist=dist, device=device, autocast=autocast)
                        for chunk in _micro_batches(local, cfg.grad_accum))
    parts: dict[str, list[torch.Tensor]] = {"pc": [], "pr": [], "rc": [], "rr": []}
    for i, mb in enumerate(prepared):
        with contextlib.nullcontext() if dist is None else dist.sync(last=i == len(prepared) - 1):
            _micro_step(model, mb, cfg, autocast=autocast, divisor=divisor, dist=dist,
                        parts=parts if divisor is not None else None)
    if dist is not None:
        parts = dist.gather(parts)
    grad_norm = _clip(model, cfg)
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return parts, grad_norm, skipped


def _prepare(model: Any, tokenizer: Any, chunk: list[PairExample], cfg: TrainConfig, *,
             dist: Optional[Distributed], device: torch.device, autocast: AutocastFactory) -> _Prepared:
    batch, forward = pair_layout(model, tokenizer, chunk, cfg, dist)
    batch = {k: v.to(device) for k, v in batch.items()}
    average = needs_length_normalisation(cfg.loss_type)
    ref = ((None, None) if is_reference_free(cfg.loss_type)
           else _reference_logps(model, batch, forward=forward, average=average, autocast=autocast))
    return _Prepared(batch=batch, forward=forward, ref=ref)


def _micro_step(model: Any, mb: _Prepared, cfg: TrainConfig, *, autocast: AutocastFactory,
                divisor: Optional[float], dist: Optional[Distributed],
                parts: Optional[dict[str, list[torch.Tensor]]]) -> None:
    """Forward and backward of one micro-batch; its log-probs go into `parts` (None: a weight-0
    stand-in of an empty slice, which only keeps the all-reduce company)."""
    average = needs_length_normalisation(cfg.loss_type)
    ref_c, ref_r = mb.ref
    policy = model if dist is None else dist.policy
    pol_c, pol_r = _policy_logps(policy, mb.batch, forward=mb.forward, average=average, autocast=autocast)
    out = _loss(pol_c, pol_r, ref_c, ref_r, cfg)
    loss = out.losses.sum() / divisor if divisor is not None else out.losses.sum() * 0.0
    if dist is None:
        loss.backward()
    else:
        dist.backward(loss)
    if parts is None:
        return
    for key, value in zip(("pc", "pr", "rc", "rr"), (pol_c, pol_r, ref_c, ref_r), strict=True):
        if value is not None:
            parts[key].append(value.detach().float())


def _loss(pol_c: torch.Tensor, pol_r: torch.Tensor, ref_c: Optional[torch.Tensor], ref_r: Optional[torch.Tensor],
          cfg: TrainConfig) -> DPOLossOutput:
    return dpo_loss(policy_chosen_logps=pol_c, policy_rejected_logps=pol_r, ref_chosen_logps=ref_c,
                    ref_rejected_logps=ref_r, beta=cfg.beta, loss_type=cfg.loss_type,
                    label_smoothing=cfg.label_smoothing, **cfg.loss_options())


def _clip(model: Any, cfg: TrainConfig) -> float:
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
    norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(model), max_norm)
    return float(norm)


def _metrics(parts: dict[str, list[torch.Tensor]], cfg: TrainConfig, *, grad_norm: float, skipped: bool,
             n_pairs: int, seconds: float) -> dict[str, float]:
    pc, pr, rc, rr = (torch.cat(parts[k]) if parts[k] else None for k in ("pc", "pr", "rc", "rr"))
    out = _loss(pc, pr, rc, rr, cfg)
    metrics = dpo_metrics(out, policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc,
                          ref_rejected_logps=rr)
    metrics.update(grad_norm=grad_norm if math.isfinite(grad_norm) else -1.0, seconds=seconds,
                   pairs=float(n_pairs), pairs_per_second=n_pairs / max(seconds, 1e-9), lr=cfg.lr,
                   skipped_update=float(skipped))
    return metrics
