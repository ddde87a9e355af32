"""Attaching a LoRA adapter to the policy: the only weights odpo ever trains.

The base weights stay frozen and shared: the reference model of DPO is the same module with the
adapter disabled (`peft_model.disable_adapter()`), so one copy of the base lives in each process.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Union

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

log = logging.getLogger(__name__)

TargetModules = Union[str, tuple[str, ...]]


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters. target_modules="all-linear" adapts every linear layer but lm_head,
    which is what QLoRA found necessary to match full fine-tuning."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: TargetModules = "all-linear"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, list):
            targets = tuple(targets)
            object.__setattr__(self, "target_modules", targets)
        if isinstance(targets, str):
            ok = bool(targets.strip())
        else:
            ok = bool(targets) and all(isinstance(t, str) and t for t in targets)
        if not ok:
            raise ValueError(
                f"target_modules must be 'all-linear' or a non-empty list of module names, got {targets!r}"
            )

    def to_peft_config(self) -> LoraConfig:
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            task_type="CAUSAL_LM",
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            bias="none",
        )


def attach_lora(
    model: PreTrainedModel, settings: LoraSettings | None = None, *, gradient_checkpointing: bool = False
) -> PeftModel:
    """Wrap `model` (in place) in a fresh LoRA adapter; only the adapter's parameters train.

    A 4-bit base is wrapped exactly like a full-precision one; peft's
    `prepare_model_for_kbit_training` is deliberately not called. What it does is already done or
    not wanted here: get_peft_model freezes the base; the weights bitsandbytes leaves unquantized
    (embeddings, norms, lm_head) are already fp32 on CPU, and on a GPU it would upcast them from
    bf16 to fp32 (for a 128k vocabulary that is GBs, in the sampler too, where nothing trains)
    while the full-precision LoRA path trains on those same bf16 weights; the LoRA weights are
    fp32 either way (peft's default) and log-probs are taken in fp32. Its other job, gradient
    checkpointing, is the `gradient_checkpointing` switch below, with non-reentrant checkpoints,
    which need no input-grad hook. Gradient checkpointing trades ~30% more compute for activation
    memory; it is off by default because odpo's default model is small.
    """
    settings = settings or LoraSettings()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, settings.to_peft_config())
    trainable, total = _count_params(peft_model)
    log.info("LoRA r=%d attached: %d trainable of %d parameters (%.2f%%)",
             settings.r, trainable, total, 100.0 * trainable / max(total, 1))
    return peft_model


def _count_params(model: PeftModel) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
