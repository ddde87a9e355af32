"""Attaching a LoRA adapter to the policy: the only weights odpo ever trains.

The base weights stay frozen and shared: the reference model of DPO is the same module with the
adapter disabled (`peft_model.disable_adapter()`), so one copy of the base lives in each process.
"""
from __future__ import annotations

import logging

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from odpo.trainer.options import LoraSettings

log = logging.getLogger(__name__)

def peft_config(settings: LoraSettings) -> LoraConfig:
    """The PEFT LoraConfig of odpo's LoRA settings (no bias, a causal LM)."""
    targets = settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    return LoraConfig(task_type="CAUSAL_LM", r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets, bias="none")


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
    peft_model = get_peft_model(model, peft_config(settings))
    trainable, total = _count_params(peft_model)
    log.info("LoRA r=%d attached: %d trainable of %d parameters (%.2f%%)",
             settings.r, trainable, total, 100.0 * trainable / max(total, 1))
    return peft_model


def _count_params(model: PeftModel) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
