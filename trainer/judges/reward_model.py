"""`rm:<model spec>`: a sequence-classification reward model as judge.

Each response is scored on its own (prompt + response as a chat when the tokenizer has a template),
so the verdict cannot depend on position. P(a better) = sigmoid(r_a - r_b), the Bradley-Terry
model reward models are trained under. The reward is the single logit of a one-label head, or
logit[last] - logit[0] for a classifier with more labels ("good" minus "bad").
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from odpo.trainer.judges import JudgeError, JudgeOptions, Verdict, check_batch
from odpo.trainer.policy.loading import autocast_context


def _format(tokenizer: Any, prompt: str, response: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(chat, tokenize=False)
    return f"{prompt}\n\n{response}"


class RewardModelJudge:
    """Scores every response with a reward model and compares the scores."""

    order_free = True

    def __init__(self, model: Any, tokenizer: Any, *, spec: str, options: Optional[JudgeOptions] = None,
                 autocast_dtype: Optional[torch.dtype] = None) -> None:
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.options = options or JudgeOptions()
        self.autocast_dtype = autocast_dtype
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def from_spec(cls, model_spec: str, *, spec: str, options: JudgeOptions) -> "RewardModelJudge":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from odpo.trainer.policy.loading import pick_device_dtype, resolve_model_spec

        try:
            source = resolve_model_spec(model_spec)
        except (OSError, ValueError) as exc:
            raise JudgeError(f"cannot resolve reward model {model_spec!r}: {exc}") from None
        if source.kind == "gguf":
            raise JudgeError(f"rm:{model_spec} is a GGUF causal LM; a reward model must be a sequence-"
                             "classification checkpoint (directory or hub id)")
        device, dtype, autocast_dtype = pick_device_dtype(options.device, options.dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.location)
            model = AutoModelForSequenceClassification.from_pretrained(source.location, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise JudgeError(f"cannot load reward model {model_spec!r}: {exc}") from None
        model.to(device).eval()
        return cls(model, tokenizer, spec=spec, options=options, autocast_dtype=autocast_dtype)

    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """One scalar reward per (prompt, response), batched by `options.batch_size`."""
        clip = self.options.max_response_chars
        texts = [_format(self.tokenizer, p[:clip], r[:clip]) for p, r in zip(prompts, responses, strict=True)]
        device = next(self.model.parameters()).device
        out: list[float] = []
        for start in range(0, len(texts), self.options.batch_size):
            enc = self.tokenizer(texts[start:start + self.options.batch_size], return_tensors="pt",
                                 padding=True, add_special_tokens=False).to(device)
            with torch.inference_mode(), autocast_context(device, self.autocast_dtype):
                logits = self.model(**enc).logits.float()
            reward = logits[:, 0] if logits.shape[-1] == 1 else logits[:, -1] - logits[:, 0]
            out.extend(reward.tolist())
        return out

    def judge(self, prompts: Sequence[str], responses_a: Sequence[str],
              responses_b: Sequence[str]) -> list[Verdict]:
        check_batch(prompts, responses_a, responses_b)
        n = len(prompts)
        scores = self.rewards(list(prompts) * 2, list(responses_a) + list(responses_b))
        return [self._verdict(scores[i] - scores[n + i]) for i in range(n)]

    def _verdict(self, margin: float) -> Verdict:
        p_a = 1.0 / (1.0 + math.exp(-max(min(margin, 50.0), -50.0)))
        if abs(p_a - 0.5) < self.options.tie_margin:
            return Verdict("tie", confidence=1.0 - 2.0 * abs(p_a - 0.5), p_a=p_a)
        return Verdict("a" if p_a > 0.5 else "b", confidence=max(p_a, 1.0 - p_a), p_a=p_a)

    def close(self) -> None:
        self.model = None
