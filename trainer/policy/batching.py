"""Preference pairs -> padded token tensors -> sequence log-probs.

Exact on-policy data: a sample stores the prompt ids the sampler fed the model and the ids the
model emitted (trainer/sampling/generation.py), and a pair built from them is scored on exactly those ids.
An EOS is part of a completion only when the model emitted it (finish_reason "stop"); a completion
cut at max_new_tokens ("length") has none, so DPO never teaches the model to stop where it did
not. Whether such pairs are trained at all is the trainer's `length_cut` setting.

Samples stored before the ids were (no ids in the row) go through the old path: the prompt and
each completion text are tokenised *separately* and their ids concatenated, which makes the
prompt/completion boundary exact but may give other ids than the model produced (decode then
re-encode is not the identity); an EOS is appended only for finish_reason "stop".

``render_prompt``/``encode_prompt`` are the single source of truth for prompt formatting and
``cut_prompt``/``MAX_PROMPT_TOKENS`` the single prompt-length rule; sampling uses both through
``prompt_token_ids``, so training never scores a context the policy never saw. A prompt is either
a string (one user turn) or a conversation (``Conversation``: message dicts ending in a user turn,
``Prompt.conditioning()``); both go through the same functions, so a multi-turn prompt is sampled,
re-tokenised and judged with all of its earlier turns.

Batch layout (as TRL's DPO collator): rows ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]``
so one forward pass serves both halves, right padded (training never generates from these rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch.autograd.function import once_differentiable

# A prompt keeps its last MAX_PROMPT_TOKENS tokens, when sampled and when trained (its end, the
# question and the generation prompt, matters most).
from odpo.trainer.options import MAX_PROMPT_TOKENS

# Logit entries handled at once by the log-prob maths: bounds the transient fp32 [chunk, vocab]
# tensors to 16 MB, small enough to stay in cache on CPU (measured faster than 100 MB chunks).
_CHUNK_ELEMENTS = 1 << 22

FINISH_STOP = "stop"      # the model ended the completion itself (its EOS, if any, is in the ids)
FINISH_LENGTH = "length"  # cut at max_new_tokens: no EOS belongs to it
# What a model is conditioned on: a user message, or a whole conversation ending in a user turn.
Conversation = Sequence[Mapping[str, str]]
PromptInput = Union[str, Conversation]
_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass
class PairExample:
    """One labelled comparison: ``chosen`` was preferred over ``rejected`` for ``prompt``.

    With ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` (what the sampler stored) the batch
    holds exactly those ids; without them the texts are re-tokenised (samples from before ids were
    stored, hand-made examples). The finish reasons decide the EOS on the re-tokenising path and
    which pairs count as length-cut.
    """

    prompt: PromptInput
    chosen: str
    rejected: str
    prompt_ids: Optional[Sequence[int]] = None
    chosen_ids: Optional[Sequence[int]] = None
    rejected_ids: Optional[Sequence[int]] = None
    chosen_finish: str = FINISH_STOP
    rejected_finish: str = FINISH_STOP

    @property
    def exact(self) -> bool:
        """Whether this pair carries the sampled ids (else it is re-tokenised)."""
        return self.prompt_ids is not None and self.chosen_ids is not None and self.rejected_ids is not None

    @property
    def length_cut(self) -> bool:
        """Whether either completion was cut at max_new_tokens."""
        return FINISH_LENGTH in (self.chosen_finish, self.rejected_finish)


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def as_messages(prompt: PromptInput) -> list[dict[str, str]]:
    """A prompt as chat messages: a string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a conversation prompt must end with a user message")
    return messages


def transcript(prompt: PromptInput) -> str:
    """A conversation as readable plain text ("User: ...", "Assistant: ..." blocks); a string or a
    lone user turn stays its bare text. What a model without a chat template is fed (before its
    generation cue) and what judges read as the request, so both see the earlier turns."""
    messages = as_messages(prompt)
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{_ROLE_NAMES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)


def render_prompt(tokenizer: Any, prompt: PromptInput) -> str:
    """The exact text the model is conditioned on: chat-formatted when the tokenizer has a template.

    The generation prompt (e.g. ``<|im_start|>assistant\\n``) is included so the completion starts
    right after it, both when sampling and when training. Without a template a string is fed as is
    and a conversation as its ``transcript`` followed by an "Assistant:" cue.
    """
    messages = [{**m, "content": inert_text(tokenizer, m["content"])} for m in as_messages(prompt)]
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if len(messages) == 1:
        return messages[0]["content"]
    return transcript(messages) + "\n\nAssistant:"


ZERO_WIDTH_SPACE = "\u200b"


def inert_text(tokenizer: Any, text: str) -> str:
    """`text` with the tokenizer's special tokens made plain text: a zero-width space after each
    one's first character, so "<|im_start|>system" typed into a prompt is read as characters, not
    as the control token that opens a forged turn. Only the template writes control tokens."""
    for token in _special_tokens(tokenizer):
        if token in text:
            text = text.replace(token, token[0] + ZERO_WIDTH_SPACE + token[1:])
    return text


def _special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens (declared and added ones), longest first, two characters or more."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            found.add(str(added))
    return sorted((t for t in found if len(t) > 1), key=len, reverse=True)


def encode_prompt(tokenizer: Any, prompt: PromptInput) -> list[int]:
    """Token ids of ``render_prompt``, uncut (judges use it with templates of their own).

    A chat template already writes any BOS it wants, so special tokens are added only for raw
    text (where e.g. Llama tokenizers need their BOS); this matches ``apply_chat_template(tokenize=True)``.
    """
    return _encode_prompts(tokenizer, [prompt])[0]


def cut_prompt(ids: Sequence[int], max_tokens: int = MAX_PROMPT_TOKENS) -> list[int]:
    """The prompt-length rule, shared by sampling and training: keep the last `max_tokens` ids."""
    if max_tokens < 1:
        raise ValueError("max_prompt_tokens must be >= 1")
    return list(ids[-max_tokens:])


def prompt_token_ids(tokenizer: Any, prompt: PromptInput, *, max_tokens: int = MAX_PROMPT_TOKENS) -> list[int]:
    """The ids a prompt is sampled with: ``encode_prompt`` cut by ``cut_prompt``."""
    return cut_prompt(encode_prompt(tokenizer, prompt), max_tokens)


def _encode_prompts(tokenizer: Any, prompts: Sequence[PromptInput]) -> list[list[int]]:
    texts = [render_prompt(tokenizer, p) for p in prompts]
    add_special = not _has_chat_template(tokenizer)
    return tokenizer(texts, add_special_tokens=add_special)["input_ids"]


def _retokenise(tokenizer: Any, text: str, finish_reason: str) -> list[int]:
    """Old samples without stored ids: response ids, plus one EOS only if the model stopped itself."""
    eos_id, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    if finish_reason != FINISH_LENGTH and eos_id is None:
        raise ValueError("the tokenizer has no eos_token; a completion that stopped must end with one")
    # A sampler that kept special tokens may hand us text that already ends with EOS: don't double it.
    if eos_text and text.endswith(eos_text):
        text = text[: -len(eos_text)]
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids if finish_reason == FINISH_LENGTH else ids + [eos_id]


def _example_rows(tokenizer: Any, ex: PairExample, prompt_ids: list[int],
                  max_prompt_tokens: int) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids of one pair: the stored ids when it has them."""
    if ex.exact:
        return (cut_prompt(ex.prompt_ids, max_prompt_tokens), list(ex.chosen_ids),  # type: ignore[arg-type]
                list(ex.rejected_ids))  # type: ignore[arg-type]
    return (cut_prompt(prompt_ids, max_prompt_tokens), _retokenise(tokenizer, ex.chosen, ex.chosen_finish),
            _retokenise(tokenizer, ex.rejected, ex.rejected_finish))


def _pad_right(rows: list[list[int]], masks: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = right_pad(rows, pad_id=pad_id)
    completion_mask = right_pad(masks, pad_id=0)[0]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def build_pair_batch(
    tokenizer: Any,
    examples: list[PairExample],
    *,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    max_completion_tokens: int = 256,
) -> dict[str, torch.Tensor]:
    """Tokenise B pairs into one right-padded batch of 2B rows (chosen rows first).

    Returns ``input_ids``, ``attention_mask`` and ``completion_mask`` (1 on response tokens and
    the EOS that ends them, when there is one). Prompts are cut by ``cut_prompt`` (a no-op on
    stored ids, which the sampler cut by the same rule, unless ``max_prompt_tokens`` is set lower
    than the sampler's); completions from the right, since the model produced them left to right
    (a cut completion loses its EOS, which is right: it did not end there).
    """
    triples = pair_token_rows(tokenizer, examples, max_prompt_tokens=max_prompt_tokens,
                              max_completion_tokens=max_completion_tokens)
    rows, masks = [], []
    for side in (1, 2):  # chosen rows, then rejected rows
        for triple in triples:
            rows.append(triple[0] + triple[side])
            masks.append([0] * len(triple[0]) + [1] * len(triple[side]))
    return _pad_right(rows, masks, pad_id_of(tokenizer))


def pair_token_rows(tokenizer: Any, examples: list[PairExample], *, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
                    max_completion_tokens: int = 256) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids per pair, cut to the limits: what every batch layout holds."""
    if not examples:
        raise ValueError("a pair batch needs at least one example")
    if max_prompt_tokens < 1 or max_completion_tokens < 1:
        raise ValueError("max_prompt_tokens and max_completion_tokens must be >= 1")
    retokenise = [e for e in examples if not e.exact]
    encoded = iter(_encode_prompts(tokenizer, [e.prompt for e in retokenise]) if retokenise else [])
    triples = [_example_rows(tokenizer, e, [] if e.exact else next(encoded), max_prompt_tokens) for e in examples]
    return [(p, c[:max_completion_tokens], r[:max_completion_tokens]) for p, c, r in triples]


def pad_id_of(tokenizer: Any) -> int:
    """The id padding positions hold (never scored nor attended): pad, else eos."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; cannot pad a batch")
    return int(pad_id)


def left_pad(rows: Sequence[Sequence[int]], *, pad_id: int,
             device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded on the left so every row ends in the last column: where
    generation appends the next token, and where a shared prompt's last logits sit."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
    return input_ids.to(device), attention_mask.to(device)


def right_pad(rows: Sequence[Sequence[int]], *, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded on the right; at least one column wide, so a batch whose
    rows are all empty (answers that are nothing but a cut EOS) is still a tensor to index."""
    width = max(1, max(len(r) for r in rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
            attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as transformers' generate derives them: a row's first
    real token is position 0 (pads get 0 too; they are never attended)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _maths_dtype(logits: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16 logits (log-sum-exp over 49k entries needs it), fp64 stays fp64."""
    return torch.promote_types(logits.dtype, torch.float32)


def _chunk_positions(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // vocab)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """``log_softmax(logits)[label]`` that keeps nothing of size vocab alive between passes.

    Autograd through ``log_softmax(x).gather`` saves the full fp32 log-softmax; through
    ``x.gather - logsumexp(x)`` it saves an fp32 copy of bf16 logits and its backward adds up
    full-size gradients. Here only the logits (alive anyway) are saved, and backward recomputes
    ``softmax`` a cache-sized chunk at a time, writing straight into the one gradient tensor that
    must exist anyway. Measured on a (busy, 2-core) CPU, vocab 49152, 8 rows x 129 scored
    positions, forward+backward of ``sequence_logps`` (best of 7; peak RSS growth):

    =========  ======================  ====================  ==================
    logits     gather - logsumexp      log_softmax.gather    this
    fp32       1.79 s, +824 MB         1.24 s, +628 MB       1.10 s, +569 MB
    bf16       2.42 s, +802 MB         1.88 s, +607 MB       0.89 s, +455 MB
    =========  ======================  ====================  ==================

    Forward only (no_grad, the reference pass): gather - logsumexp ~15% slower, the others equal.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1, 1)
        step = _chunk_positions(logits.shape[-1])
        picked = [
            torch.log_softmax(lg.to(_maths_dtype(lg)), dim=-1).gather(-1, lb).squeeze(-1)
            for lg, lb in zip(flat.split(step), flat_labels.split(step), strict=True)
        ]
        ctx.save_for_backward(logits, labels)
        return torch.cat(picked).view(labels.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, labels = ctx.saved_tensors
        vocab, step = logits.shape[-1], _chunk_positions(logits.shape[-1])
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        chunks = zip(
            grad.view(-1, vocab).split(step),
            logits.reshape(-1, vocab).split(step),
            labels.reshape(-1, 1).split(step),
            grad_out.reshape(-1, 1).split(step),
            strict=True,
        )
        # d/dx log_softmax(x)[label] = onehot(label) - softmax(x), scaled by the incoming gradient
        for grad_chunk, lg, lb, g in chunks:
            g = g.to(_maths_dtype(lg))
            part = torch.softmax(lg.to(g.dtype), dim=-1).mul_(-g)
            grad_chunk.copy_(part.scatter_add_(-1, lb, g))
        return grad, None


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position ``log softmax(logits)[labels]`` (at least fp32); logits [..., V], labels [...]."""
    return _SelectiveLogSoftmax.apply(logits, labels)


def sequence_logps(model: Any, batch: dict[str, torch.Tensor], *, average: bool = False) -> torch.Tensor:
    """Sum (or per-token mean) of the completion tokens' log-probs, one fp32 value per row.

    Logits at position t score token t+1, so labels and mask are shifted by one. Logits are only
    computed from the earliest completion token of the batch onwards (``logits_to_keep``): prompt
    positions would otherwise cost a [rows, prompt, vocab] tensor for nothing.
    """
    input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]
    has_completion = completion_mask.bool().any(dim=0).nonzero()
    first = int(has_completion[0]) if len(has_completion) else input_ids.shape[1]
    start = max(first - 1, 0)
    outputs = model(
        input_ids=input_ids,
        attention_mask=batch["attention_mask"],
        # Indices, not the int: a strided slice of the hidden states slows the lm_head's matmul
        # (1.5 vs 2.1 s forward and backward for 16 rows x 30 positions here; shared_prompt.logit_positions).
        logits_to_keep=torch.arange(start, input_ids.shape[1], device=input_ids.device),
        use_cache=False,
    )
    # Shift labels rather than slicing logits: a slice's backward would allocate a second
    # full-size gradient. The last position predicts nothing; label it 0 and mask it out.
    labels = input_ids[:, start + 1 :]
    mask = completion_mask[:, start + 1 :].bool()
    labels = torch.cat([labels, labels.new_zeros(labels.shape[0], 1)], dim=1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], 1)], dim=1)
    per_token = torch.where(mask, token_logps(outputs.logits, labels), 0.0)
    sums = per_token.sum(dim=1)
    if average:
        return sums / mask.sum(dim=1).clamp(min=1)
    return sums


def concatenated_forward(
    model: Any, batch: dict[str, torch.Tensor], *, average: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the 2B-row batch; returns (chosen_logps, rejected_logps), B values each."""
    logps = sequence_logps(model, batch, average=average)
    chosen, rejected = logps.chunk(2, dim=0)
    return chosen, rejected
