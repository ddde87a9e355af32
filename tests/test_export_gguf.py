"""GGUF export round trips: the merged GGUF loads with transformers' GGUF loader and gives the live
policy's logits (within the precision written) and its tokenizer; the adapter GGUF, read back with
GGUFReader and un-permuted by transformers' own code, holds every PEFT LoRA delta under llama.cpp's
names and shapes; bad requests are one line and write nothing. llama.cpp and Ollama themselves are
not run here."""
from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
)

from odpo.app.cli import cli
from odpo.trainer.export.exporters import ExportError
from odpo.trainer.export.gguf import export_gguf
from odpo.trainer.export.gguf_writer import (
    llama3_rope_factors,
    permute_qk,
    pre_tokenizer_name,
    tensor_namer,
    unpermute_qk,
    write_model_gguf,
)
from odpo.trainer.policy.loading import bundled_gguf_path, load_model_and_tokenizer
from odpo.trainer.policy.lora import LoraSettings, attach_lora
from tests.model_fixtures import tiny_model_config
from tests.test_export import commit_version, logits_of, perturb

torch.set_num_threads(1)

CHAT = [{"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Why is the sky blue? Give 3 reasons, 42 words max!"},
        {"role": "assistant", "content": "Sunlight scatters off the air; blue scatters the most."},
        {"role": "user", "content": "And at sunset?"}]
TEXT = "The cat looks at the green hill. 12345 <|im_end|> don't  stop"


@pytest.fixture
def policy_v1(database, tiny_model_dir, tmp_path):
    """The live policy (a PeftModel with non-zero LoRA on every linear layer) committed as v1."""
    model, tokenizer = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path / "models"))
    torch.manual_seed(0)
    peft_model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    perturb(peft_model, 1)
    peft_model.eval()
    commit_version(database, policy=peft_model, adapters_dir=tmp_path / "adapters", version=1,
                   model_spec=str(tiny_model_dir))
    return peft_model, tokenizer


def gguf_ids(tokenizer, chat=CHAT):
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("outtype, atol", [("f32", 1e-4), ("f16", 3e-3), ("bf16", 2e-2)])
def test_merged_gguf_loads_in_transformers_with_the_policys_logits(database, policy_v1, tmp_path, outtype, atol):
    peft_model, tokenizer = policy_v1
    path = export_gguf(database, out=tmp_path / "gguf", merged=True, outtype=outtype, cache_dir=tmp_path / "models")
    assert sorted(p.name for p in path.parent.iterdir()) == ["Modelfile", f"odpo-v1-{outtype}.gguf"]
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    want = logits_of(peft_model, tokenizer, TEXT)
    diff = (logits_of(model, tokenizer, TEXT) - want).abs().max().item()
    assert diff < atol, f"max |logit difference| {diff:.3g} for {outtype} (logits up to {want.abs().max():.3g})"
    loaded = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert gguf_ids(loaded) == gguf_ids(tokenizer)
    assert loaded(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.type") == "model" and field(reader, "general.architecture") == "llama"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2" and field(reader, "tokenizer.ggml.model") == "gpt2"
    assert {t.name: t.tensor_type.name for t in reader.tensors}["blk.0.attn_norm.weight"] == "F32"
    assert {t.name: t.tensor_type.name for t in reader.tensors}["blk.0.attn_q.weight"] == outtype.upper()
    modelfile = (path.parent / "Modelfile").read_text()
    assert f"FROM ./{path.name}\n" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "TEMPLATE" not in modelfile.replace("No TEMPLATE", "")
    assert not list(tmp_path.glob(".gguf*")), "staging directories are cleaned up"


def lora_modules(peft_model):
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model."): module for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer)}


def test_adapter_gguf_holds_every_peft_delta_under_llama_cpp_names(database, policy_v1, tiny_model_dir, tmp_path):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    peft_model, _ = policy_v1
    path = export_gguf(database, out=tmp_path / "lora")
    assert path.name == "odpo-v1-lora-f32.gguf"
    reader = gguf.GGUFReader(path)
    assert (field(reader, "general.type"), field(reader, "adapter.type")) == ("adapter", "lora")
    alpha = field(reader, "adapter.lora.alpha")
    assert alpha == 8.0 and field(reader, "general.architecture") == "llama"
    tensors = {t.name: t for t in reader.tensors}
    model_file = export_gguf(database, out=tmp_path / "model", merged=True, outtype="f32",
                             cache_dir=tmp_path / "models")
    base_shapes = {t.name: [int(n) for n in t.shape] for t in gguf.GGUFReader(model_file).tensors}
    config = peft_model.config
    unpermute = LlamaTensorProcessor(config={"num_attention_heads": config.num_attention_heads,
                                             "num_key_value_heads": config.num_key_value_heads})
    name_of = tensor_namer(config)
    modules = lora_modules(peft_model)
    assert len(modules) == 7 * config.num_hidden_layers  # q k v o gate up down
    for hf_name, module in modules.items():
        name = name_of(hf_name + ".weight")
        a, b = tensors.pop(f"{name}.lora_a"), tensors.pop(f"{name}.lora_b")
        a_ne, b_ne, w_ne = [int(n) for n in a.shape], [int(n) for n in b.shape], base_shapes[name]
        assert a_ne[0] == w_ne[0] and b_ne[1] == w_ne[1] and a_ne[1] == b_ne[0] == 4  # llama.cpp's own checks
        b_rows = unpermute.process(weights=np.array(b.data), name=f"{name}.lora_b").weights
        delta = torch.from_numpy(np.array(b_rows)) @ torch.from_numpy(np.array(a.data)) * (alpha / b_ne[0])
        torch.testing.assert_close(delta, module.get_delta_weight("default"), atol=1e-7, rtol=1e-5)
    assert not tensors, f"unexpected tensors {sorted(tensors)}"
    modelfile = (path.parent / "Modelfile").read_text()
    assert f"FROM {tiny_model_dir.resolve()}\nADAPTER ./{path.name}\n" in modelfile


def test_a_mistral_checkpoint_is_written_as_llama(tiny_model_dir, tmp_path):
    """llama.cpp runs Mistral as its llama architecture; transformers reads the file back as Llama,
    which computes the same as Mistral on sequences shorter than the sliding window."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           sliding_window=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "mistral")
    tokenizer.save_pretrained(tmp_path / "mistral")
    write_model_gguf(tmp_path / "mistral", tmp_path / "m.gguf", outtype="f32", name="tiny mistral")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    assert field(gguf.GGUFReader(tmp_path / "m.gguf"), "general.architecture") == "llama"
    torch.testing.assert_close(logits_of(loaded, tokenizer, TEXT), logits_of(model, tokenizer, TEXT), atol=1e-5, rtol=0)


def test_qk_permutation_is_llama_cpps_and_round_trips():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # 2 heads of dim 4, 3 columns
    permuted = permute_qk(rows, 2)
    assert permuted[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]  # halves interleaved within each head
    assert torch.equal(unpermute_qk(permuted, 2), rows)
    back = LlamaTensorProcessor(config={"num_attention_heads": 2, "num_key_value_heads": 2}).process(
        weights=permuted.numpy(), name="blk.0.attn_q.weight").weights
    assert np.array_equal(back, rows.numpy())


def test_llama3_rope_factors_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 64, 2).float() / 64))
    torch.testing.assert_close(llama3_rope_factors(config), plain / scaled, rtol=1e-5, atol=1e-6)


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}) == "smollm"
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": llama3}}, dict(byte_level, use_regex=False)]}) == "llama3"
    assert pre_tokenizer_name({"type": "Whitespace"}) == "default"


def test_bad_requests_are_one_line_and_write_nothing(database, tiny_model_dir, tmp_path):
    with pytest.raises(ExportError, match="no adapter version yet in run 'default'"):
        export_gguf(database, out=tmp_path / "none")
    model, _ = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path / "models"))
    commit_version(database, policy=attach_lora(model, LoraSettings(r=2, alpha=4, dropout=0.0)),
                   adapters_dir=tmp_path / "adapters", version=1, model_spec=str(tiny_model_dir))
    qwen = tmp_path / "qwen"
    Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512).save_pretrained(qwen)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, qwen / name)
    with pytest.raises(ExportError, match=r"supports the Llama family \(model types llama, mistral\), not 'qwen2'"):
        export_gguf(database, out=tmp_path / "q", merged=True, base_model=str(qwen))
    with pytest.raises(ExportError, match="unknown GGUF outtype 'q4_0'"):
        export_gguf(database, out=tmp_path / "q", outtype="q4_0")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty directory"):
        export_gguf(database, out=busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "none").exists() and not (tmp_path / "q").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_export_gguf(common_config, database, policy_v1, tmp_path):
    base = ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url, "export", "gguf"]
    runner = CliRunner()
    ok = runner.invoke(cli, [*base, "--version", "1", "--outtype", "f16", str(tmp_path / "a")])
    assert ok.exit_code == 0, ok.output
    assert "LoRA adapter GGUF written to" in ok.output and (tmp_path / "a" / "odpo-v1-lora-f16.gguf").is_file()
    missing = runner.invoke(cli, [*base, "--merged", "--version", "9", str(tmp_path / "m")])
    assert missing.exit_code == 1 and "no adapter version v9" in missing.output
    assert "Traceback" not in missing.output and len(missing.output.strip().splitlines()) == 1
    bad = runner.invoke(cli, [*base, "--outtype", "q4_0", str(tmp_path / "m")])
    assert bad.exit_code == 2 and "q4_0" in bad.output


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the model side; the tiny tests cover both databases
def test_default_model_merged_and_adapter_gguf(database, default_model_config, tmp_path):
    """The bundled SmolLM2 (a Q4_1 GGUF, dequantized to fp32 for training): the merged f32 GGUF gives
    the live policy's logits, reuses the source GGUF's tokenizer metadata, and tokenizes a chat the
    same; the adapter's Modelfile builds on the bundled GGUF itself."""
    model, tokenizer = load_model_and_tokenizer(default_model_config)
    torch.manual_seed(0)
    peft_model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    perturb(peft_model, 2)
    peft_model.eval()
    commit_version(database, policy=peft_model, adapters_dir=tmp_path / "adapters", version=1,
                   model_spec="smollm2-135m")
    cache = default_model_config.cache_dir
    path = export_gguf(database, out=tmp_path / "merged", merged=True, outtype="f32", cache_dir=cache)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    want = logits_of(peft_model, tokenizer, TEXT)
    diff = (logits_of(loaded, tokenizer, TEXT) - want).abs().max().item()
    assert diff < 1e-3, f"max |logit difference| {diff:.3g} (logits up to {want.abs().max():.3g})"
    source, written = gguf.GGUFReader(bundled_gguf_path()), gguf.GGUFReader(path)
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.chat_template", "tokenizer.ggml.eos_token_id"):
        assert field(written, key) == field(source, key)
    assert gguf_ids(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)) == gguf_ids(tokenizer)
    adapter = export_gguf(database, out=tmp_path / "adapter", cache_dir=cache)
    modelfile = (adapter.parent / "Modelfile").read_text()
    assert f"FROM {bundled_gguf_path()}\nADAPTER ./{adapter.name}\n" in modelfile and '"<|im_end|>"' in modelfile
    print(f"default model: merged f32 max |logit diff| {diff:.3g}; sizes {path.stat().st_size / 1e6:.1f} MB, "
          f"adapter {adapter.stat().st_size / 1e6:.2f} MB")
