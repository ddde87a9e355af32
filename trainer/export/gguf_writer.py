"""Writing llama.cpp GGUF files: a full model from a transformers checkpoint, and a PEFT LoRA
adapter as a llama.cpp LoRA adapter. The Llama family only (model_type llama and mistral, which
llama.cpp runs as one architecture).

The file format itself is gguf-py's (`gguf`, from llama.cpp); what goes into it follows what
llama.cpp's own converters write: its tensor names (`gguf.get_tensor_name_map`), its rotary layout
of the q/k projections (`permute_qk`; transformers' GGUF loader undoes exactly this), its
hyper-parameter keys, 1-D tensors always in F32, and for an adapter `<base tensor>.lora_a` /
`.lora_b` with `adapter.lora.alpha`, so llama.cpp scales B·A by alpha/rank as PEFT does.

Tensors are streamed: the header is written from shapes alone and each tensor is read, converted
and written one at a time, so exporting a model never holds a second copy of it in memory.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import gguf
import numpy as np
import torch
from safetensors import safe_open

from odpo.trainer.export.exporters import ExportError

log = logging.getLogger(__name__)

ARCHITECTURES = {"llama": "llama", "mistral": "llama"}  # transformers model_type -> llama.cpp arch
Q = gguf.GGMLQuantizationType
OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
_NUMPY = {Q.F32: np.dtype(np.float32), Q.F16: np.dtype(np.float16), Q.BF16: np.dtype(np.uint16)}
ROPE_SCALINGS = ("default", "linear", "llama3")


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor known by name, shape and type before its data is read (`load` reads it)."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    load: Callable[[], torch.Tensor]


# --- architecture, names and layout ------------------------------------------------------------

def gguf_arch(config: Any) -> str:
    """The llama.cpp architecture for a transformers config, or one line saying what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ExportError(f"GGUF export supports the Llama family (model types {', '.join(sorted(ARCHITECTURES))}), "
                          f"not {model_type!r}; `odpo export merged` writes any model as a transformers checkpoint")
    return ARCHITECTURES[model_type]


def tensor_namer(config: Any) -> Callable[[str], Optional[str]]:
    """llama.cpp's name for a transformers parameter (`model.layers.3.self_attn.q_proj.weight` ->
    `blk.3.attn_q.weight`), or None when llama.cpp has no such tensor."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    return lambda hf_name: names.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def qk_heads(hf_name: str, config: Any) -> Optional[int]:
    """The head count whose rotary layout llama.cpp permutes in this tensor's rows, or None."""
    module = hf_name.removesuffix(".weight").removesuffix(".bias")
    if module.endswith("q_proj"):
        return config.num_attention_heads
    if module.endswith("k_proj"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def permute_qk(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' rotary layout (halves) -> llama.cpp's (interleaved pairs), per head, on dim 0.

    Only rows move, so it applies to a weight, a bias, and a LoRA B (out x r) alike: permuting B
    permutes B·A the same way, and A is left as it is."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_qk(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_qk` (what transformers' GGUF loader does when reading a file)."""
    shape = rows.shape
    return rows.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


# --- hyper-parameters --------------------------------------------------------------------------

def rope_parameters(config: Any) -> dict[str, Any]:
    """rope_theta and scaling, from transformers 5's `rope_parameters` or 4.x's `rope_scaling`."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if params["rope_type"] not in ROPE_SCALINGS:
        raise ExportError(f"GGUF export supports rope scaling {', '.join(ROPE_SCALINGS)}, "
                          f"not {params['rope_type']!r}")
    return params


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_llama_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
    """The `llama.*` keys llama.cpp reads (and transformers' GGUF loader maps back to a config)."""
    n_head = config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // n_head:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def llama3_rope_factors(config: Any) -> torch.Tensor:
    """Llama 3.1's frequency-dependent rope scaling as the per-frequency divisors llama.cpp reads
    from `rope_freqs.weight`: 1 for short wavelengths, `factor` for long ones, smooth between."""
    rope = rope_parameters(config)
    dim = head_dim(config)
    freqs = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = 1.0 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelen < old_context / high, torch.ones_like(factors), factors)
    factors = torch.where(wavelen > old_context / low, torch.full_like(factors, factor), factors)
    return factors.to(torch.float32)


# --- streaming tensors into a file -------------------------------------------------------------

def to_numpy(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The bytes GGUF stores for `qtype` (bf16 as raw uint16: numpy has no bfloat16)."""
    tensor = tensor.detach().cpu().contiguous()
    if qtype == Q.BF16:
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return tensor.to(torch.float16 if qtype == Q.F16 else torch.float32).numpy()


def write_gguf(writer: gguf.GGUFWriter, path: Path, tensors: list[PlannedTensor]) -> None:
    """Header and metadata first (shapes only), then each tensor read and written in turn."""
    for t in tensors:
        dtype = _NUMPY[t.qtype]
        writer.add_tensor_info(t.name, t.shape, dtype, math.prod(t.shape) * dtype.itemsize, raw_dtype=t.qtype)
    try:
        writer.write_header_to_file(Path(path))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            data = t.load()
            if tuple(data.shape) != t.shape:
                raise ExportError(f"tensor {t.name} has shape {tuple(data.shape)}, expected {t.shape}")
            writer.write_tensor_data(to_numpy(data, t.qtype))
    finally:
        writer.close()


def _read(file: Path, key: str) -> torch.Tensor:
    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(key)


def _shapes(file: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(file), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def _qtype(shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    return Q.F32 if len(shape) <= 1 else OUTTYPES[outtype][0]


# --- tokenizer metadata ------------------------------------------------------------------------

def copy_gguf_fields(writer: gguf.GGUFWriter, source: Path, *, prefix: str) -> None:
    """Every metadata key under `prefix` of another GGUF. Values are decoded from the reader's raw
    parts (as transformers does) rather than `ReaderField.contents()`, which older gguf lacks;
    arrays are re-typed from their values (str, int32, float32: all a tokenizer uses)."""
    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
        if not key.startswith(prefix):
            continue
        values = [_part_value(field.parts[index], field.types[-1]) for index in field.data]
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, values)
        elif values:
            writer.add_key_value(key, values[0], field.types[0])


def _part_value(part: np.ndarray, vtype: gguf.GGUFValueType) -> Any:
    if vtype == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return bool(part[0]) if vtype == gguf.GGUFValueType.BOOL else part[0].item()


def add_hf_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """llama.cpp's `gpt2` (byte-level BPE) vocabulary from a transformers tokenizer: tokens by id
    (padded to the model's vocab size, as its embedding rows are), token types, merges, special
    token ids, whether BOS/EOS are added, and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise ExportError("GGUF export writes byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM, Qwen); this "
                          f"model's tokenizer is {model.get('type') or type(tokenizer).__name__} without byte-level "
                          "decoding (e.g. sentencepiece), which is not supported yet")
    tokens, types = _vocab_table(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    probe = list(tokenizer("a")["input_ids"])  # what the tokenizer adds, rather than what it says
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def _vocab_table(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has token id {max(by_id)} but the model only {vocab_size} embeddings")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        tokens.append(f"[PAD{index}]" if token is None else token)
        if token is None:
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def pre_tokenizer_name(pre: Optional[dict[str, Any]]) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for how a byte-level tokenizer splits text before
    its merges apply; llama.cpp hard-codes each split by name, so an unknown one falls back to
    "default", which tokenizes some text (digits, punctuation) differently."""
    pre = pre or {}
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = _known_splits().get((steps[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    log.warning("unknown pre-tokenizer %s: writing 'default'; llama.cpp may split some text differently", kinds)
    return "default"


def _known_splits() -> dict[str, str]:
    """Split regex -> llama.cpp pre-tokenizer name, from the table transformers' GGUF reader uses
    to go the other way (its names come from llama.cpp); empty where transformers lacks it."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return {}
    known: dict[str, str] = {}
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        known.setdefault(regex, name)
    return known


# --- a full model ------------------------------------------------------------------------------

def plan_model_tensors(checkpoint: Path, config: Any, outtype: str) -> list[PlannedTensor]:
    """Every weight of a (possibly sharded) safetensors checkpoint under its llama.cpp name and
    layout; lm_head is left out when tied (llama.cpp then reuses token_embd, as transformers does)."""
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensor_name = tensor_namer(config)
    planned = []
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        for key, shape in _shapes(file).items():
            if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                continue
            name = tensor_name(key)
            if name is None:
                raise ExportError(f"{key} of {checkpoint.name} has no place in a llama.cpp {gguf_arch(config)} GGUF")
            heads = qk_heads(key, config)
            load = ((lambda f=file, k=key, h=heads: permute_qk(_read(f, k), h)) if heads
                    else (lambda f=file, k=key: _read(f, k)))
            planned.append(PlannedTensor(name, shape, _qtype(shape, outtype), load))
    if not planned:
        raise ExportError(f"{checkpoint} holds no safetensors weights")
    if rope_parameters(config)["rope_type"] == "llama3":
        factors = llama3_rope_factors(config)
        planned.append(PlannedTensor("rope_freqs.weight", tuple(factors.shape), Q.F32, lambda: factors))
    return planned


def write_model_gguf(checkpoint: Path, path: Path, *, outtype: str, name: str,
                     tokenizer_gguf: Optional[Path] = None) -> None:
    """A llama.cpp model GGUF from a transformers checkpoint directory (config, safetensors,
    tokenizer). `tokenizer_gguf`: take the tokenizer metadata from this GGUF instead (the file
    the checkpoint was converted from, whose vocabulary llama.cpp already reads right)."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(checkpoint))
    writer = gguf.GGUFWriter(None, gguf_arch(config))
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    add_llama_hparams(writer, config)
    writer.add_file_type(OUTTYPES[outtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer_gguf is not None:
        copy_gguf_fields(writer, tokenizer_gguf, prefix="tokenizer.")
    else:
        add_hf_tokenizer(writer, AutoTokenizer.from_pretrained(str(checkpoint)), config.vocab_size)
    write_gguf(writer, path, plan_model_tensors(Path(checkpoint), config, outtype))


# --- a LoRA adapter ----------------------------------------------------------------------------

def lora_alpha(lora: dict[str, Any]) -> float:
    """adapter.lora.alpha such that llama.cpp's alpha/rank is PEFT's scale; refuses what one alpha
    cannot say (DoRA, per-module ranks or alphas) with a pointer to --merged."""
    if lora.get("use_dora") or lora.get("rank_pattern") or lora.get("alpha_pattern"):
        what = "DoRA" if lora.get("use_dora") else "per-module ranks or alphas"
        raise ExportError(f"a llama.cpp LoRA GGUF cannot express {what}; export with --merged instead")
    rank, alpha = int(lora["r"]), float(lora["lora_alpha"])
    return alpha * math.sqrt(rank) if lora.get("use_rslora") else alpha  # rsLoRA scales alpha/sqrt(r)


def plan_lora_tensors(weights: Path, config: Any, outtype: str) -> list[PlannedTensor]:
    """`<llama.cpp name>.lora_a` (r x in) and `.lora_b` (out x r, rows permuted for q/k) per module."""
    shapes = _shapes(weights)
    tensor_name = tensor_namer(config)
    planned = []
    for key in sorted(k for k in shapes if k.endswith(".lora_A.weight")):
        module = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        b_key = key.replace(".lora_A.weight", ".lora_B.weight")
        name = tensor_name(module + ".weight")
        if b_key not in shapes or name is None or (module == "lm_head" and config.tie_word_embeddings):
            raise ExportError(f"LoRA module {module} cannot be written to a llama.cpp adapter; export with --merged")
        heads = qk_heads(module, config)
        load_b = ((lambda k=b_key, h=heads: permute_qk(_read(weights, k), h)) if heads
                  else (lambda k=b_key: _read(weights, k)))
        planned.append(PlannedTensor(f"{name}.lora_a", shapes[key], OUTTYPES[outtype][0],
                                     lambda k=key: _read(weights, k)))
        planned.append(PlannedTensor(f"{name}.lora_b", shapes[b_key], OUTTYPES[outtype][0], load_b))
    others = [k for k in shapes if ".lora_A." not in k and ".lora_B." not in k]
    if others or not planned:
        what = f"weights other than LoRA A/B ({others[0]})" if others else "no LoRA weights"
        raise ExportError(f"the adapter has {what}; a llama.cpp LoRA GGUF cannot hold it, export with --merged")
    return planned


def write_lora_gguf(adapter_dir: Path, path: Path, *, config: Any, outtype: str, name: str) -> None:
    """A llama.cpp LoRA adapter GGUF (`llama-cli --lora`, Ollama's ADAPTER) from a PEFT directory
    trained on a model with `config`."""
    lora = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    writer = gguf.GGUFWriter(None, gguf_arch(config))
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora_alpha(lora))
    writer.add_name(name)
    write_gguf(writer, path, plan_lora_tensors(Path(adapter_dir) / "adapter_model.safetensors", config, outtype))
