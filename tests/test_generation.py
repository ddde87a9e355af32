"""Batched generation (trainer/sampling/generation.py) on the tiny model: shapes, finish reasons, left
padding, independent draws, seeds, interruption."""
from __future__ import annotations

import pytest
import torch

from odpo.trainer.options import MAX_PROMPT_TOKENS
from odpo.trainer.policy.batching import cut_prompt, encode_prompt, render_prompt
from odpo.trainer.sampling.generation import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationInterrupted,
    SamplingParams,
    generate,
)

PROMPTS = ["The cat looks at the green hill.", "Tell me about Paris in spring, and the river, and the old man.", "Hi"]
GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's ops are too small for two threads; on a shared 2-core machine they only
    spin against each other (measured 30x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_batched_output_has_n_prompts_times_k_samples(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    out = generate(model, tok, PROMPTS, params=SamplingParams(temperature=1.0, max_new_tokens=7, seed=1),
                   n_per_prompt=2)
    assert [len(row) for row in out] == [2, 2, 2]
    for row in out:
        for g in row:
            # the random tiny model never says eos within 7 tokens: every row hits the budget
            assert g.finish_reason == FINISH_LENGTH
            assert g.tokens == 7
            assert g.seconds > 0
            assert len(tok(g.text, add_special_tokens=False)["input_ids"]) > 0


def test_empty_prompt_list_returns_nothing(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    assert generate(model, tok, [], params=GREEDY) == []


def test_stop_at_eos_counts_tokens_before_it(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    ids = _greedy_ids(model, tok, PROMPTS[0], 12)
    stop_token = ids[4]
    first = ids.index(stop_token)
    # make that token an end-of-sequence token of the model: generation must stop right there
    model.generation_config.eos_token_id = [tok.eos_token_id, stop_token]
    [[g]] = generate(model, tok, [PROMPTS[0]], params=GREEDY)
    assert g.finish_reason == FINISH_STOP
    assert g.tokens == first
    assert g.text == tok.decode(ids[:first], skip_special_tokens=True)


def test_left_padding_does_not_change_greedy_output(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    lengths = {len(encode_prompt(tok, p)) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS)  # the batch really needs padding
    batched = generate(model, tok, PROMPTS, params=GREEDY)
    for prompt, [g] in zip(PROMPTS, batched, strict=True):
        [[alone]] = generate(model, tok, [prompt], params=GREEDY)
        assert (g.text, g.tokens, g.finish_reason) == (alone.text, alone.tokens, alone.finish_reason)


def test_prompts_are_rendered_with_the_chat_template(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    rendered = render_prompt(tok, PROMPTS[0])
    assert rendered.startswith("<|im_start|>user") and rendered.endswith("<|im_start|>assistant\n")
    [[g]] = generate(model, tok, [PROMPTS[0]], params=GREEDY)
    assert g.text == tok.decode(_greedy_ids(model, tok, PROMPTS[0], 12), skip_special_tokens=True)


def test_two_samples_of_one_prompt_are_different_draws(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    [[a, b]] = generate(model, tok, [PROMPTS[0]], params=SamplingParams(temperature=1.0, max_new_tokens=16),
                        n_per_prompt=2)
    assert a.text != b.text


def test_seed_reproduces_a_batch_and_leaves_the_global_rng_alone(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=123)
    state = torch.get_rng_state()
    first = generate(model, tok, PROMPTS, params=params, n_per_prompt=2)
    assert torch.equal(torch.get_rng_state(), state)
    again = generate(model, tok, PROMPTS, params=params, n_per_prompt=2)
    other = generate(model, tok, PROMPTS, params=SamplingParams(temperature=1.0, max_new_tokens=10, seed=124),
                     n_per_prompt=2)
    texts = lambda out: [g.text for row in out for g in row]  # noqa: E731
    assert texts(first) == texts(again)
    assert texts(first) != texts(other)


def test_should_stop_interrupts_within_a_decode_step(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(GenerationInterrupted):
        generate(model, tok, PROMPTS, params=SamplingParams(temperature=1.0, max_new_tokens=50),
                 should_stop=should_stop)
    assert len(calls) == 3  # stopped at the third step, not after 50


def test_static_cache_gives_the_same_greedy_output(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    dynamic = generate(model, tok, PROMPTS, params=GREEDY)
    static = generate(model, tok, PROMPTS, params=GREEDY, cache_implementation="static")
    assert [g.text for [g] in dynamic] == [g.text for [g] in static]


def test_fresh_lora_generates_like_the_base(tiny_model_and_tokenizer):
    from odpo.trainer.policy.lora import attach_lora

    model, tok = tiny_model_and_tokenizer
    base = generate(model, tok, PROMPTS, params=GREEDY)
    peft_model = attach_lora(model)
    peft_model.eval()
    assert [g.text for [g] in generate(peft_model, tok, PROMPTS, params=GREEDY)] == [g.text for [g] in base]


@pytest.mark.parametrize("kwargs", [{"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_new_tokens": 0}])
def test_sampling_params_are_checked(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_sampling_params_record_what_was_used():
    assert SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=5, seed=3).as_dict() == {
        "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 5, "seed": 3, "max_prompt_tokens": MAX_PROMPT_TOKENS}
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        SamplingParams(max_prompt_tokens=0)


def test_generated_carries_the_ids_it_was_fed_and_emitted(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    out = generate(model, tok, PROMPTS, params=SamplingParams(temperature=1.0, max_new_tokens=7, seed=1),
                   n_per_prompt=2)
    for prompt, row in zip(PROMPTS, out, strict=True):
        for g in row:
            assert list(g.prompt_token_ids) == encode_prompt(tok, prompt)  # short prompts: nothing cut
            assert len(g.token_ids) == g.tokens == 7 and g.finish_reason == FINISH_LENGTH
            assert tok.pad_token_id not in g.token_ids  # left padding never leaks into the ids
            assert g.text == tok.decode(list(g.token_ids), skip_special_tokens=True)


def test_a_stopped_sample_keeps_the_eos_it_emitted_in_its_ids(tiny_model_and_tokenizer):
    """The eos the model chose (here a token the model config lists, not the tokenizer's eos) is
    the last id: DPO credits exactly that token, not an eos appended afterwards."""
    model, tok = tiny_model_and_tokenizer
    ids = _greedy_ids(model, tok, PROMPTS[0], 12)
    stop_token = ids[4]
    first = ids.index(stop_token)
    model.generation_config.eos_token_id = [tok.eos_token_id, stop_token]
    [[g]] = generate(model, tok, [PROMPTS[0]], params=GREEDY)
    assert g.finish_reason == FINISH_STOP and g.tokens == first
    assert list(g.token_ids) == ids[:first + 1] and g.token_ids[-1] == stop_token != tok.eos_token_id


def test_sampling_cuts_long_prompts_by_the_rule_training_uses(tiny_model_and_tokenizer):
    """A prompt longer than max_prompt_tokens is sampled with its last max_prompt_tokens ids:
    the same `cut_prompt` the trainer applies, so the context sampled is the context trained."""
    model, tok = tiny_model_and_tokenizer
    long_prompt = " ".join(["The old man writes to the train."] * 12)
    full = encode_prompt(tok, long_prompt)
    assert len(full) > 20
    params = SamplingParams(temperature=0, max_new_tokens=5, max_prompt_tokens=20)
    [[g]] = generate(model, tok, [long_prompt], params=params)
    assert list(g.prompt_token_ids) == cut_prompt(full, 20) == full[-20:]
    reference = torch.tensor([full[-20:]])
    with torch.inference_mode():
        expected = model.generate(input_ids=reference, attention_mask=torch.ones_like(reference), do_sample=False,
                                  max_new_tokens=5, min_new_tokens=5, pad_token_id=tok.pad_token_id)
    assert list(g.token_ids) == expected[0, 20:].tolist()


def _greedy_ids(model, tok, prompt: str, n: int) -> list[int]:
    """Plain transformers greedy decoding of one prompt, as the reference."""
    ids = torch.tensor([encode_prompt(tok, prompt)])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_samples_of_a_prompt_share_its_prefill_and_draw_as_without(tiny_model_and_tokenizer, monkeypatch):
    """The prompts' common prefix run once, each prompt's cache computed once and repeated per
    sample: the ids a full, left-padded prefill gives. Greedy rows equal one-sample-per-prompt
    rows, and seeded samples equal those of plain left padding with no cache handed over."""
    from odpo.trainer.sampling import generation

    model, tok = tiny_model_and_tokenizer
    calls = []
    real = generation._shared_prefix
    monkeypatch.setattr(generation, "_shared_prefix", lambda *a: calls.append(a[3:]) or real(*a))
    twice = generate(model, tok, PROMPTS, params=GREEDY, n_per_prompt=2)
    once = generate(model, tok, PROMPTS, params=GREEDY)
    assert [[g.token_ids for g in row] for row in twice] == [[row[0].token_ids] * 2 for row in once]
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=11)
    shared = [[g.token_ids for g in row] for row in generate(model, tok, PROMPTS, params=sampled, n_per_prompt=3)]
    assert [n for n, _ in calls] == [2, 1, 3] and any(len(set(row)) > 1 for row in shared)
    assert all(prefix > 0 for _, prefix in calls), "the chat template's common start is shared"
    monkeypatch.setattr(generation, "_shared_prefix", lambda *a: {})
    monkeypatch.setattr(generation, "common_prefix_length", lambda rows: 0)
    plain = [[g.token_ids for g in row] for row in generate(model, tok, PROMPTS, params=sampled, n_per_prompt=3)]
    assert shared == plain


def test_the_shared_prefill_gives_the_first_token_the_full_prefills_logits(tiny_model_and_tokenizer):
    """Token ids can hide a small error in positions or masks; the logits of the first generated
    token cannot: continuing from the shared cache must give what a whole left-padded prompt gives."""
    from odpo.trainer.policy.batching import left_pad, left_padded_positions
    from odpo.trainer.sampling import generation

    model, tok = tiny_model_and_tokenizer
    rows = [encode_prompt(tok, p) for p in PROMPTS for _ in range(2)]
    ids, mask, shared = generation._prompt_layout(rows, n_per_prompt=2, pad_id=0, device=None, share=True)
    assert shared > 0 and ids.shape[1] == max(len(r) for r in rows)
    with torch.inference_mode():
        cache = generation._shared_prefix(model, ids, mask, 2, shared)
        assert next(iter(cache.values())).get_seq_length() == ids.shape[1] - 1
        out = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=left_padded_positions(mask)[:, -1:],
                    use_cache=True, **cache).logits[:, -1]
        plain_ids, plain_mask = left_pad(rows, pad_id=0)
        full = model(input_ids=plain_ids, attention_mask=plain_mask,
                     position_ids=left_padded_positions(plain_mask)).logits[:, -1]
    torch.testing.assert_close(out, full, rtol=1e-4, atol=1e-4)
