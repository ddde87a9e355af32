"""Model fixtures (a pytest plugin, registered in conftest): a tiny random Llama with a real
tokenizer for fast tests, and the real default model for the few tests where quality matters.

The tiny model is built offline from nothing: a byte-level BPE tokenizer trained on embedded text
and a seeded random LlamaForCausalLM, saved as a normal checkpoint directory, so every loading
path odpo uses on real models runs on it in milliseconds.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from odpo.trainer.policy.loading import ModelConfig, load_model_and_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_CACHE_ENV = "ODPO_TEST_MODEL_CACHE"
DEFAULT_MODEL_FIXTURES = ("default_model", "default_model_config")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

_SUBJECTS = ["The cat", "A small robot", "My teacher", "The river", "Every student", "The old man",
             "A bright star", "The train", "Our garden", "The capital of France"]
_VERBS = ["runs across", "looks at", "talks about", "waits near", "writes to", "thinks of",
          "answers", "follows", "opens", "remembers"]
_OBJECTS = ["the green hill.", "a quiet morning.", "the long question.", "her best friend.",
            "the open window.", "a cup of tea.", "the last page.", "Paris in spring.",
            "the blue sky.", "a simple answer."]


_PARAGRAPH = (
    "Online preference optimisation asks people which of two answers they like better. "
    "Each vote nudges the model a little, and the next answers are sampled from the updated model. "
    "Good answers are short, correct and polite; bad answers ramble, guess or refuse without reason. "
    "Why is the sky blue? Sunlight scatters off the air, and blue light scatters the most. "
    "How many legs does a spider have? Eight. Which planet is the largest? Jupiter. "
    "Write a haiku about winter: cold wind on the lake, footprints fading in the snow, "
    "a kettle whistles."
)


def _corpus(seed: int, n_sentences: int = 400) -> list[str]:
    """A few KB of plain English so BPE learns real merges ("the", " a", ...)."""
    rng = random.Random(seed)
    lines = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}" for _ in range(n_sentences)]
    return lines + _PARAGRAPH.split(". ") * 4


def _train_tokenizer(seed: int, vocab_size: int) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|pad|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_llama(out_dir: Path, seed: int = 0, *, vocab_size: int = 512) -> Path:
    """Write a deterministic tiny Llama checkpoint (≈100k parameters) with tokenizer to out_dir."""
    out_dir = Path(out_dir)
    tokenizer = _train_tokenizer(seed, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_model_config(model_dir: Path, cache_dir: Path) -> ModelConfig:
    """CPU and fp32 so tiny-model numbers are exact and identical on every machine."""
    return ModelConfig(spec=str(model_dir), cache_dir=cache_dir, device="cpu", dtype="fp32")


def tiny_train_config(model_dir: Path, **overrides):
    """A TrainConfig for trainer tests on the tiny model: CPU, fp32, a small LoRA, quick polling."""
    from odpo.trainer.options import LoraSettings
    from odpo.trainer.training.train_config import TrainConfig

    base = dict(model=str(model_dir), device="cpu", dtype="fp32", batch_size=4, lr=1e-3, poll_seconds=0.02,
                exit_when_idle=0.0, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture
def tiny_model_and_tokenizer(tiny_model_dir, tmp_path):
    """A fresh copy per test, so tests may attach adapters or train it freely."""
    return load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path / "models"))


@pytest.fixture(scope="session")
def default_model_cache_dir() -> Path:
    """Shared across runs (inside the git-ignored .venv) so the ~20 s GGUF conversion happens once
    per machine; ODPO_TEST_MODEL_CACHE moves it elsewhere."""
    path = Path(os.environ.get(TEST_CACHE_ENV) or REPO_ROOT / ".venv" / "odpo-test-model-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def default_model_config(default_model_cache_dir) -> ModelConfig:
    return ModelConfig(cache_dir=default_model_cache_dir)


@pytest.fixture(scope="session")
def default_model(default_model_config):
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, loaded once per session.

    Shared by every test that asks: do not attach adapters to it or change its weights; load your
    own copy from `default_model_config` for that (about a second from the cache).
    """
    return load_model_and_tokenizer(default_model_config)


def pytest_collection_modifyitems(items) -> None:
    """Tests using the real model carry the default_model mark, so `-m "not default_model"` skips
    them, even when the author forgot to add it."""
    for item in items:
        uses = set(getattr(item, "fixturenames", ())) & set(DEFAULT_MODEL_FIXTURES)
        if uses and item.get_closest_marker("default_model") is None:
            item.add_marker(pytest.mark.default_model)
