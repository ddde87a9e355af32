"""Pair batching and sequence log-probs on a tiny in-memory tokenizer and a tiny random Llama."""
from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from odpo.trainer.options import MAX_PROMPT_TOKENS
from odpo.trainer.policy import batching
from odpo.trainer.policy.batching import (
    PairExample,
    build_pair_batch,
    concatenated_forward,
    cut_prompt,
    encode_prompt,
    prompt_token_ids,
    render_prompt,
    sequence_logps,
    token_logps,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a haiku about autumn leaves falling slowly.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "user assistant system: answer briefly and politely, please.",
]
EXAMPLES = [
    PairExample("Name a capital.", "Paris is the capital of France.", "Dog."),
    PairExample("Write a haiku about autumn, please, with leaves falling", "Leaves falling slowly", "The lazy fox"),
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes) with a BOS post-processor, ChatML template, EOS and PAD."""
    specials = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", chat_template=CHATML
    )


@pytest.fixture(scope="module")
def raw_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    raw = copy.deepcopy(tokenizer)
    raw.chat_template = None
    return raw


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_row(batch, row: int) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, completion ids, padding ids) of one row, read back through the masks."""
    ids, att, comp = (batch[k][row].tolist() for k in ("input_ids", "attention_mask", "completion_mask"))
    n = sum(att)
    assert att == [1] * n + [0] * (len(att) - n), "right padding: attention is a prefix"
    prompt = [i for i, a, c in zip(ids, att, comp, strict=True) if a and not c]
    completion = [i for i, a, c in zip(ids, att, comp, strict=True) if a and c]
    assert comp[: len(prompt)] == [0] * len(prompt) and comp[len(prompt) : n] == [1] * (n - len(prompt))
    return prompt, completion, ids[n:]


def test_render_prompt_uses_chat_template_or_raw_text(tokenizer, raw_tokenizer):
    assert render_prompt(tokenizer, "Hi there") == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(raw_tokenizer, "Hi there") == "Hi there"


def test_encode_prompt_adds_bos_only_to_raw_text(tokenizer, raw_tokenizer):
    chat_ids = encode_prompt(tokenizer, "Hi there")
    assert chat_ids == ids_of(tokenizer, render_prompt(tokenizer, "Hi there"))
    assert chat_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert encode_prompt(raw_tokenizer, "Hi there") == [tokenizer.bos_token_id] + ids_of(tokenizer, "Hi there")


def test_batch_layout_and_completion_mask(tokenizer):
    batch = build_pair_batch(tokenizer, EXAMPLES)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}
    assert batch["input_ids"].shape[0] == 2 * len(EXAMPLES)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for row in range(2 * len(EXAMPLES)):
        ex = EXAMPLES[row % len(EXAMPLES)]
        response = ex.chosen if row < len(EXAMPLES) else ex.rejected  # chosen rows first
        prompt, completion, padding = split_row(batch, row)
        assert prompt == encode_prompt(tokenizer, ex.prompt)
        assert completion == ids_of(tokenizer, response) + [eos]
        assert set(padding) <= {pad}
    assert any(len(split_row(batch, r)[2]) for r in range(4)), "the examples should exercise padding"
    assert batch["completion_mask"].sum().item() == sum(len(split_row(batch, r)[1]) for r in range(4))


def test_eos_already_in_text_is_not_doubled(tokenizer):
    batch = build_pair_batch(tokenizer, [PairExample("Q", "Paris.<|im_end|>", "Dog.")])
    assert split_row(batch, 0)[1] == ids_of(tokenizer, "Paris.") + [tokenizer.eos_token_id]


def test_truncation_keeps_prompt_end_and_completion_start(tokenizer):
    batch = build_pair_batch(tokenizer, EXAMPLES, max_prompt_tokens=3, max_completion_tokens=4)
    for row in range(4):
        ex = EXAMPLES[row % 2]
        response = ex.chosen if row < 2 else ex.rejected
        prompt, completion, _ = split_row(batch, row)
        assert prompt == encode_prompt(tokenizer, ex.prompt)[-3:]
        assert completion == (ids_of(tokenizer, response) + [tokenizer.eos_token_id])[:4]
    # "Paris is the capital of France." is longer than 4 tokens: cut, so it loses its EOS
    assert tokenizer.eos_token_id not in split_row(batch, 0)[1]


def test_stored_ids_are_used_exactly_not_retokenised(tokenizer):
    """Ids a re-tokenisation would never produce (" Paris" split into bytes, a completion that
    ends in the middle of a word) survive as they are: the batch holds the sampled ids."""
    prompt_ids = encode_prompt(tokenizer, "Name a capital.")
    chosen = [tokenizer.convert_tokens_to_ids(t) for t in ["Ġ", "P", "a", "r", "i", "s"]] + [tokenizer.eos_token_id]
    rejected = ids_of(tokenizer, "Dog")[:1] + ids_of(tokenizer, " fox")
    ex = PairExample("Name a capital.", "text is ignored", "so is this", prompt_ids=prompt_ids,
                     chosen_ids=chosen, rejected_ids=rejected, chosen_finish="stop", rejected_finish="length")
    assert ids_of(tokenizer, " Paris") != chosen[:-1]  # re-tokenising would differ
    batch = build_pair_batch(tokenizer, [ex, EXAMPLES[0]])
    assert split_row(batch, 0)[:2] == (prompt_ids, chosen)
    assert split_row(batch, 2)[:2] == (prompt_ids, rejected)  # length-cut: no EOS added
    assert split_row(batch, 1)[1] == ids_of(tokenizer, EXAMPLES[0].chosen) + [tokenizer.eos_token_id]


@pytest.mark.parametrize("finish", ["stop", "length"])
def test_retokenised_completion_gets_an_eos_only_if_the_model_stopped(tokenizer, finish):
    """Samples stored before ids were: an EOS is appended for finish_reason "stop" only."""
    ex = PairExample("Q", "Paris is the capital", "Dog.", chosen_finish=finish, rejected_finish="stop")
    batch = build_pair_batch(tokenizer, [ex])
    eos = [tokenizer.eos_token_id] if finish == "stop" else []
    assert split_row(batch, 0)[1] == ids_of(tokenizer, "Paris is the capital") + eos
    assert split_row(batch, 1)[1] == ids_of(tokenizer, "Dog.") + [tokenizer.eos_token_id]
    assert ex.length_cut == (finish == "length") and not ex.exact


def test_stored_prompt_ids_follow_the_same_prompt_cut(tokenizer):
    """Stored and re-tokenised prompts go through one rule, `cut_prompt` (the sampler's too)."""
    long_prompt = EXAMPLES[1].prompt
    full = encode_prompt(tokenizer, long_prompt)
    exact = PairExample(long_prompt, "", "", prompt_ids=full, chosen_ids=[5], rejected_ids=[6])
    for ex in (exact, EXAMPLES[1]):
        assert split_row(build_pair_batch(tokenizer, [ex], max_prompt_tokens=4), 0)[0] == full[-4:]
    assert cut_prompt(full, 4) == full[-4:] and prompt_token_ids(tokenizer, long_prompt, max_tokens=4) == full[-4:]
    assert prompt_token_ids(tokenizer, long_prompt) == full[-MAX_PROMPT_TOKENS:]
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        cut_prompt(full, 0)


def test_right_pad_and_left_pad_mirror_each_other():
    from odpo.trainer.policy.batching import left_pad, right_pad

    rows = [[5, 6, 7], [], [8]]
    ids, mask = right_pad(rows, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 0], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0]]
    left_ids, left_mask = left_pad(rows, pad_id=0)
    assert left_ids.flip(-1).tolist() == [list(reversed(r)) + [0] * (3 - len(r)) for r in rows]
    assert left_mask.flip(-1).tolist() == mask.tolist()
    # every row empty (answers that were only a cut EOS): still one column to index, all masked
    ids, mask = right_pad([[], []], pad_id=9)
    assert ids.tolist() == [[9], [9]] and mask.sum() == 0


def test_bad_inputs_raise(tokenizer):
    with pytest.raises(ValueError, match="at least one"):
        build_pair_batch(tokenizer, [])
    with pytest.raises(ValueError, match=">= 1"):
        build_pair_batch(tokenizer, EXAMPLES, max_completion_tokens=0)
    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="eos"):
        build_pair_batch(no_eos, EXAMPLES)


def brute_force_logps(model, batch, row: int, *, average=False) -> float:
    """Unpadded row alone through the model; fp64 log_softmax; loop over completion tokens."""
    n = int(batch["attention_mask"][row].sum())
    ids, comp = batch["input_ids"][row, :n], batch["completion_mask"][row, :n]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), dim=-1)
    terms = [logp[j - 1, ids[j]].item() for j in range(1, n) if comp[j]]
    return sum(terms) / len(terms) if average else sum(terms)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_match_brute_force(model, tokenizer, average):
    batch = build_pair_batch(tokenizer, EXAMPLES)
    with torch.no_grad():
        got = sequence_logps(model, batch, average=average)
    assert got.shape == (4,) and got.dtype == torch.float32
    expected = torch.tensor([brute_force_logps(model, batch, r, average=average) for r in range(4)])
    torch.testing.assert_close(got.double(), expected.double(), atol=1e-5, rtol=0)


def test_padding_does_not_change_logps(model, tokenizer):
    short = PairExample("Hi", "Dog.", "Fox.")
    long = PairExample("A much longer prompt about autumn leaves and capitals", "The quick brown fox jumps.", "No")
    with torch.no_grad():
        alone = sequence_logps(model, build_pair_batch(tokenizer, [short]))
        padded_batch = build_pair_batch(tokenizer, [long, short])
        padded = sequence_logps(model, padded_batch)
    assert padded_batch["attention_mask"][1].sum() < padded_batch["input_ids"].shape[1]  # really padded
    torch.testing.assert_close(padded[[1, 3]], alone, atol=1e-5, rtol=0)


def test_logits_are_only_computed_from_the_first_completion_token(model, tokenizer):
    """Prompt positions need no [rows, vocab] logits; the earliest completion needs its predecessor's."""
    batch = build_pair_batch(tokenizer, EXAMPLES)
    shortest_prompt = int((batch["completion_mask"].argmax(dim=1)).min())
    seen = []
    hook = model.register_forward_hook(lambda _m, _a, out: seen.append(out.logits.shape[1]))
    try:
        with torch.no_grad():
            sequence_logps(model, batch)
    finally:
        hook.remove()
    assert seen == [batch["input_ids"].shape[1] - (shortest_prompt - 1)]


def test_concatenated_forward_splits_chosen_and_rejected(model, tokenizer):
    batch = build_pair_batch(tokenizer, EXAMPLES)
    with torch.no_grad():
        chosen, rejected = concatenated_forward(model, batch)
        everything = sequence_logps(model, batch)
    torch.testing.assert_close(chosen, everything[:2])
    torch.testing.assert_close(rejected, everything[2:])


def test_gradients_match_naive_log_softmax(model, tokenizer):
    """Our custom backward must give the same parameter gradients as autograd through log_softmax."""
    batch = build_pair_batch(tokenizer, EXAMPLES)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    model.zero_grad()
    (sequence_logps(model, batch) * weights).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    per_token = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    (per_token * batch["completion_mask"][:, 1:] * weights[:, None]).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert ours["lm_head.weight"].abs().sum() > 0
    model.zero_grad()


@pytest.mark.parametrize("chunk_elements", [None, 23])  # 23 // vocab 11 = 2 positions: 3 chunks
def test_token_logps_values_and_gradcheck(monkeypatch, chunk_elements):
    if chunk_elements:
        monkeypatch.setattr(batching, "_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 3))
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logps(logits, labels), expected)
    assert torch.autograd.gradcheck(lambda x: token_logps(x, labels), (logits,))


def test_token_logps_upcasts_bf16_and_returns_bf16_grads():
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 1000) * 4).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 1000, (3, 5))
    got = token_logps(logits, labels)
    assert got.dtype == torch.float32
    expected = torch.log_softmax(logits.detach().float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(got.detach(), expected)
    got.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    reference = logits.detach().float().requires_grad_(True)
    torch.log_softmax(reference, -1).gather(-1, labels[..., None]).sum().backward()
    torch.testing.assert_close(logits.grad.float(), reference.grad, atol=1e-2, rtol=1e-2)
