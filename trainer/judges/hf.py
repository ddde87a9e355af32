"""`hf:<model spec>`: a local causal LM as pairwise judge.

The model sees the judge template (chat-formatted, generation prompt appended) and we read the
next-token distribution: P(A) vs P(B), summed over the letter's single-token spellings ("A", " A").
No text is generated, so one forward pass per ordering decides, and it is exact and deterministic.
Both orderings go into the same batch (trainer/judges/pairwise.py cancels position bias).
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from odpo.trainer.judges import JudgeError, JudgeOptions
from odpo.trainer.judges.pairwise import BothOrdersJudge, fill_template, load_template
from odpo.trainer.policy.batching import encode_prompt
from odpo.trainer.policy.loading import autocast_context
from odpo.trainer.sampling.generation import left_pad

log = logging.getLogger(__name__)


def letter_token_ids(tokenizer: Any, letter: str) -> list[int]:
    """Token ids that spell `letter` on their own, with and without a leading space."""
    ids: list[int] = []
    for text in (letter, " " + letter):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(int(encoded[0]))
    if not ids:
        raise JudgeError(f"the judge tokenizer has no single token for {letter!r}; use another judge model")
    return ids


def _device_of(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


class HFJudge(BothOrdersJudge):
    """Pairwise judging with a local causal LM; order-free thanks to both-orders scoring."""

    order_free = True

    def __init__(self, model: Any, tokenizer: Any, *, spec: str, options: Optional[JudgeOptions] = None,
                 autocast_dtype: Optional[torch.dtype] = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.spec = spec
        self.options = options or JudgeOptions()
        self.template = load_template(self.options.template)
        self.autocast_dtype = autocast_dtype
        self.ids_a = letter_token_ids(tokenizer, "A")
        self.ids_b = letter_token_ids(tokenizer, "B")

    @classmethod
    def from_spec(cls, model_spec: str, *, spec: str, options: JudgeOptions) -> "HFJudge":
        from odpo.trainer.policy.loading import ModelConfig, load_model_and_tokenizer, pick_device_dtype

        try:
            model, tokenizer = load_model_and_tokenizer(ModelConfig.for_spec(
                model_spec, cache_dir=options.cache_dir, device=options.device, dtype=options.dtype,
                load_in_4bit=options.load_in_4bit))
        except (OSError, ValueError) as exc:  # ModelNotFoundError is an OSError
            raise JudgeError(f"cannot load judge model {model_spec!r}: {exc}") from None
        _, _, autocast_dtype = pick_device_dtype(options.device, options.dtype)
        return cls(model, tokenizer, spec=spec, options=options, autocast_dtype=autocast_dtype)

    def score_first(self, prompts: Sequence[str], firsts: Sequence[str],
                    seconds: Sequence[str]) -> list[Optional[float]]:
        """P(the first response is better) = P(A) / (P(A) + P(B)) at the answer position."""
        rows = [encode_prompt(self.tokenizer, fill_template(self.template, prompt=p, first=f, second=s,
                                                            max_chars=self.options.max_response_chars))
                for p, f, s in zip(prompts, firsts, seconds, strict=True)]
        # Similar lengths share a forward pass: less padding, same answers (rows are independent).
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out: list[Optional[float]] = [None] * len(rows)
        step = self.options.batch_size
        for start in range(0, len(order), step):
            chunk = order[start:start + step]
            for i, p in zip(chunk, self._letter_probs([rows[i] for i in chunk]), strict=True):
                out[i] = p
        return out

    def _letter_probs(self, rows: list[list[int]]) -> list[float]:
        device = _device_of(self.model)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids, attention_mask = left_pad(rows, pad_id=int(pad), device=device)
        with torch.inference_mode(), autocast_context(device, self.autocast_dtype):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1,
                                use_cache=False).logits[:, -1, :]
        logps = torch.log_softmax(logits.float(), dim=-1)
        log_a = torch.logsumexp(logps[:, self.ids_a], dim=-1)
        log_b = torch.logsumexp(logps[:, self.ids_b], dim=-1)
        return torch.sigmoid(log_a - log_b).tolist()

    def close(self) -> None:
        self.model = None
