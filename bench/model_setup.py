"""Model set-up shared by the benches: the policy exactly as `odpo serve` and `odpo train` build
it, and the prompts they sample (the bundled starter prompts)."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from odpo.bench.common import BenchContext

log = logging.getLogger(__name__)


@dataclass
class Policy:
    """A base model with a fresh LoRA attached (version 0), its tokenizer and device choices."""

    model: Any
    tokenizer: Any
    device: Any
    autocast_dtype: Any

    def autocast(self) -> Callable[[], contextlib.AbstractContextManager]:
        """The trainer's autocast factory (bf16 on CPUs with native bf16, see trainer.policy.loading)."""
        from odpo.trainer.policy.loading import autocast_context

        return lambda: autocast_context(self.device, self.autocast_dtype)


def load_policy(ctx: BenchContext, *, lora: Optional[Any] = None, load_in_4bit: bool = False) -> Policy:
    """Load the bench model and attach LoRA (odpo's defaults unless `lora` is given); on a 4-bit
    NF4 base with `load_in_4bit`, as `--load-in-4bit` builds it."""
    from dataclasses import replace

    from odpo.trainer.policy.loading import load_model_and_tokenizer, pick_device_dtype
    from odpo.trainer.policy.lora import LoraSettings, attach_lora

    base, tokenizer = load_model_and_tokenizer(replace(ctx.model_config(), load_in_4bit=load_in_4bit))
    model = attach_lora(base, lora or LoraSettings())
    model.eval()
    device, _, autocast_dtype = pick_device_dtype(ctx.device, ctx.dtype)
    return Policy(model=model, tokenizer=tokenizer, device=device, autocast_dtype=autocast_dtype)


def starter_prompts(*, held_out: Optional[bool] = None) -> list[str]:
    """The bundled starter prompts (the same ones `odpo up` imports), optionally only the training
    or only the held-out part of the deterministic 10% split."""
    from odpo.app.services.prompt_files import held_out_split, read_starter_prompts

    texts = [r.text for r in read_starter_prompts()]
    if held_out is None:
        return texts
    return [t for t in texts if held_out_split(t, 0.1) == held_out]


def cycle(items: list[str], start: int, n: int) -> list[str]:
    """n items from `items` starting at `start`, wrapping around (rounds draw fresh prompts)."""
    if not items:
        raise ValueError("no prompts to draw from")
    return [items[(start + i) % len(items)] for i in range(n)]
