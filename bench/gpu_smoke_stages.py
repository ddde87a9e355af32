"""The stages of the GPU smoke (bench/gpu_smoke.py), each guarded: ok, skipped (one reason) or failed.

Only database-free odpo modules are imported (models, lora, generation, batching, train_step,
checkpoint): the smoke must run where SQLAlchemy, gradio and vLLM are not installed. For the same
reason two small pieces are done here rather than through their odpo homes, which import odpo.db at
the top: the hot swap is trainer/sampling/hotreload.py's load_version_into minus its database-era extras
(version 0, reshaping), i.e. checkpoint.load_adapter_into; and the exports do what
trainer/export/exporters.py's export_adapter / export_merged do to the files, without the adapters row and
model card (merge on a CPU fp32 base, as odpo export does).
"""
from __future__ import annotations

import gc
import importlib
import importlib.util
import logging
import platform
import shutil
import statistics
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

# Prompts of everyday length; completions are cut to max_new_tokens, so every row trains that long.
PROMPTS = ("Why is the sky blue?", "Write a haiku about winter.", "How many legs does a spider have?",
           "Explain what a hash table is in two sentences.", "Give me three tips for a job interview.",
           "What is the capital of Australia?", "Summarise the plot of Hamlet.", "How do vaccines work?")
CHOSEN = "Here is a short, correct and polite answer that stays on the question and stops. "
REJECTED = "Well, it depends, and there are many things one could say about this, so let me ramble on. "
PROBE = "The cat looks at the green hill, and the river runs across the valley."
DB_DEPENDENCIES = ("sqlalchemy", "alembic")
TRAIN_STAGES = ("lora_dpo", "qlora_dpo")

log = logging.getLogger(__name__)


class StageSkipped(Exception):
    """A stage that cannot run here (a missing optional package, no version to reload): its reason."""


@dataclass(frozen=True)
class SmokeSettings:
    """What every stage runs with (sizes already resolved for the device)."""

    device: str
    dtype: str
    model_dir: Path
    work_dir: Path
    batch: int
    max_new_tokens: int
    steps: int = 3
    rounds: int = 3
    swaps: int = 5
    lr: float = 1e-3
    seed: int = 0


@dataclass
class StageRow:
    """One row of the table (and of the JSON)."""

    key: str
    title: str
    status: str = "ok"
    reason: Optional[str] = None
    seconds: Optional[float] = None  # per step (training) or per call (sampling, export)
    peak_gpu_mib: Optional[float] = None
    pairs_per_min: Optional[float] = None
    swap_ms: Optional[float] = None
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class SmokeState:
    """What later stages take from earlier ones: the version directories the training stages wrote."""

    versions: dict[str, Path] = field(default_factory=dict)


# --- imports -----------------------------------------------------------------------------------

def import_train_step() -> types.ModuleType:
    """odpo.trainer.training.step: it imports nothing of the database (the tests check that with
    SQLAlchemy hidden), so it loads where only torch, transformers and peft are installed."""
    return importlib.import_module("odpo.trainer.training.step")


def importable(name: str) -> bool:
    """Whether `import name` would find something (a finder that refuses it counts as missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --- helpers -----------------------------------------------------------------------------------

def _sync(device: str) -> None:
    """Wait for queued CUDA work, so a stopwatch around it measures the work and not the launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _timed(device: str, fn: Callable[[], Any]) -> tuple[Any, float]:
    _sync(device)
    started = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - started


def _steady(times: list[float]) -> float:
    """The median after the first (warm-up: kernel selection, allocator growth), or the only one."""
    return statistics.median(times[1:] or times)


def _load(s: SmokeSettings, *, device: Optional[str] = None, dtype: Optional[str] = None,
          four_bit: bool = False) -> tuple[Any, Any]:
    from odpo.trainer.policy.loading import ModelConfig, load_model_and_tokenizer

    cfg = ModelConfig(spec=str(s.model_dir), cache_dir=s.work_dir / "model-cache", device=device or s.device,
                      dtype=dtype or s.dtype, load_in_4bit=four_bit)
    return load_model_and_tokenizer(cfg)


def _lora_model(s: SmokeSettings, **load: Any) -> tuple[Any, Any]:
    from odpo.trainer.policy.lora import LoraSettings, attach_lora

    model, tokenizer = _load(s, **load)
    peft_model = attach_lora(model, LoraSettings())
    peft_model.eval()
    return peft_model, tokenizer


def _probe_logits(model: Any, tokenizer: Any) -> torch.Tensor:
    device = next(model.parameters()).device
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"].to(device)
    with torch.inference_mode():
        return model(input_ids=ids).logits.float().cpu()


def _prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


# --- stages ------------------------------------------------------------------------------------

def stage_train(s: SmokeSettings, state: SmokeState, row: StageRow, *, four_bit: bool) -> None:
    """`steps` DPO steps of odpo's own dpo_step on `batch` pairs, then the version written as the
    trainer writes it (checkpoint.write_version) for the reload and export stages."""
    from odpo.trainer.policy.checkpoint import write_version
    from odpo.trainer.policy.loading import QLoRAUnavailableError, autocast_context, pick_device_dtype

    train_step = import_train_step()  # first: it may register the database-free on_policy stand-in
    from odpo.trainer.policy.batching import PairExample
    from odpo.trainer.training.train_config import TrainConfig

    try:
        model, tokenizer = _lora_model(s, four_bit=four_bit)
    except QLoRAUnavailableError as exc:
        if importable("bitsandbytes"):
            raise  # installed but unable to run NF4 here: a broken install is a failure, not a skip
        raise StageSkipped(str(exc)) from None
    device, weights, autocast_dtype = pick_device_dtype(s.device, s.dtype)
    cfg = TrainConfig(model=str(s.model_dir), batch_size=s.batch, lr=s.lr, max_completion_tokens=s.max_new_tokens,
                      device=s.device, dtype=s.dtype, load_in_4bit=four_bit, seed=s.seed,
                      passes=1)  # a step here is one update, comparable across cards and earlier runs
    optimizer = train_step.make_optimizer(model, cfg)
    examples = [PairExample(prompt=p, chosen=CHOSEN * 20, rejected=REJECTED * 20) for p in _prompts(s.batch)]
    times, metrics = [], {}
    for _ in range(s.steps):
        metrics, seconds = _timed(s.device, lambda: train_step.dpo_step(
            model=model, tokenizer=tokenizer, optimizer=optimizer, examples=examples, cfg=cfg,
            autocast=lambda: autocast_context(device, autocast_dtype)))
        times.append(seconds)
    path = write_version(model=model, optimizer=optimizer, adapters_dir=s.work_dir / f"adapters-{row.key}",
                         version=1, state={"step": s.steps, "metrics": metrics,
                                           "hyperparameters": cfg.hyperparameters()})
    state.versions[row.key] = path
    kind = "NF4" if four_bit else str(weights).removeprefix("torch.")
    row.seconds = _steady(times)
    row.note = f"{kind}, {s.batch} pairs x {s.max_new_tokens} tok, loss {metrics['loss']:.3f}"
    row.details = {"step_seconds": times, "weights": kind, "autocast": str(autocast_dtype), "version_dir": str(path),
                   "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                   "pairs_per_second": s.batch / row.seconds}


def stage_sampler(s: SmokeSettings, state: SmokeState, row: StageRow) -> None:
    """The `hf` sampler's work: `batch` prompts x 2 samples in one batched generate, `rounds` times."""
    from odpo.trainer.sampling.generation import SamplingParams, generate

    model, tokenizer = _lora_model(s)
    prompts, times, tokens = _prompts(s.batch), [], []
    for i in range(s.rounds):
        params = SamplingParams(max_new_tokens=s.max_new_tokens, seed=s.seed + i)
        out, seconds = _timed(s.device, lambda p=params: generate(model, tokenizer, prompts, params=p, n_per_prompt=2))
        times.append(seconds)
        tokens.append(sum(g.tokens for pair in out for g in pair))
    row.seconds = _steady(times)
    row.pairs_per_min = 60.0 * len(prompts) / row.seconds
    row.note = f"{len(prompts)} prompts x 2 samples, <= {s.max_new_tokens} tok"
    row.details = {"call_seconds": times, "generated_tokens": tokens, "tokens_per_second": tokens[-1] / times[-1]}


def stage_reload(s: SmokeSettings, state: SmokeState, row: StageRow) -> None:
    """Copy the trained version into a live sampler model in place, time the swaps, check that the
    served weights are now exactly the version's and that the policy changed, then sample again."""
    from odpo.trainer.policy.checkpoint import adapter_weights_norm, load_adapter_into
    from odpo.trainer.sampling.generation import SamplingParams, generate

    version = _trained_version(state)
    model, tokenizer = _lora_model(s)
    before, norm_before = _probe_logits(model, tokenizer), adapter_weights_norm(model)
    times = [_timed(s.device, lambda: load_adapter_into(model, version))[1] for _ in range(s.swaps)]
    after = _probe_logits(model, tokenizer)
    out = generate(model, tokenizer, _prompts(1), params=SamplingParams(max_new_tokens=s.max_new_tokens,
                                                                        seed=s.seed), n_per_prompt=2)
    delta, exact = float((after - before).abs().max()), _matches_version(model, version)
    row.swap_ms = 1000.0 * _steady(times)
    row.seconds = row.swap_ms / 1000.0
    row.note = f"logits max|d| {delta:.3g}, weights {'match' if exact else 'DIFFER FROM'} {version.name}"
    row.details = {"swap_ms": [1000.0 * t for t in times], "version_dir": str(version),
                   "logits_max_abs_delta": delta, "weights_match_version": exact,
                   "lora_b_norm_before": norm_before, "lora_b_norm_after": adapter_weights_norm(model),
                   "sampled_after_swap_tokens": sum(g.tokens for g in out[0])}
    if not exact or delta == 0.0:
        raise RuntimeError(f"the swap did not change the served policy ({row.note})")


def _trained_version(state: SmokeState) -> Path:
    for key in TRAIN_STAGES:
        if key in state.versions:
            return state.versions[key]
    raise StageSkipped("no trained version to load: both DPO stages were skipped or failed")


def _matches_version(model: Any, version: Path) -> bool:
    """Every live LoRA tensor equal to the file's: what was saved is exactly what is served."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from odpo.trainer.policy.checkpoint import ADAPTER_WEIGHTS

    saved = load_file(str(version / ADAPTER_WEIGHTS))
    live = get_peft_model_state_dict(model)
    return set(saved) == set(live) and all(torch.equal(saved[k], live[k].detach().cpu()) for k in saved)


def stage_export_adapter(s: SmokeSettings, state: SmokeState, row: StageRow) -> None:
    """The PEFT directory odpo export writes (config + weights), then loaded back with PEFT."""
    from peft import PeftModel

    from odpo.trainer.policy.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    version, out = _trained_version(state), s.work_dir / "export-adapter"
    started = time.perf_counter()
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.mkdir(parents=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copyfile(version / name, tmp / name)
    tmp.rename(out)
    base, _ = _load(s, device="cpu", dtype="fp32")
    loaded = PeftModel.from_pretrained(base, str(out))
    row.seconds = time.perf_counter() - started
    exact = _matches_version(loaded, version)
    row.note = f"loads with PEFT, weights {'match' if exact else 'DIFFER FROM'} {version.name}"
    row.details = {"dir": str(out), "loads_with_peft": True, "weights_match_version": exact}
    if not exact:
        raise RuntimeError(f"the exported adapter does not hold {version.name}'s weights")


def stage_export_merged(s: SmokeSettings, state: SmokeState, row: StageRow) -> None:
    """LoRA merged into the full-precision base (CPU fp32, as odpo export), saved with its tokenizer,
    loaded back with transformers and compared with the unmerged adapter's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    version, out = _trained_version(state), s.work_dir / "export-merged"
    started = time.perf_counter()
    base, tokenizer = _load(s, device="cpu", dtype="fp32")
    peft_model = PeftModel.from_pretrained(base, str(version))
    unmerged = _probe_logits(peft_model, tokenizer)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    row.seconds = time.perf_counter() - started
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    delta = float((_probe_logits(reloaded, tokenizer) - unmerged).abs().max())
    row.note = f"reloads; logits vs unmerged max|d| {delta:.2g}"
    row.details = {"dir": str(out), "logits_max_abs_delta_vs_unmerged": delta}
    if not delta < 1e-2:
        raise RuntimeError(f"the merged model's logits differ from the adapter's by {delta:.3g}")


STAGES: tuple[tuple[str, str, Callable[..., None]], ...] = (
    ("lora_dpo", "LoRA DPO step", lambda s, st, r: stage_train(s, st, r, four_bit=False)),
    ("qlora_dpo", "QLoRA DPO step (4-bit NF4)", lambda s, st, r: stage_train(s, st, r, four_bit=True)),
    ("hf_sampler", "hf sampler (pairs)", stage_sampler),
    ("hot_reload", "hot reload (swap)", stage_reload),
    ("export_adapter", "export adapter", stage_export_adapter),
    ("export_merged", "export merged", stage_export_merged),
)


# --- running and reporting ---------------------------------------------------------------------

def run_stage(key: str, title: str, fn: Callable[..., None], s: SmokeSettings, state: SmokeState) -> StageRow:
    """One stage, guarded: a skip or a failure becomes the row's status and one-line reason."""
    row, cuda = StageRow(key=key, title=title), s.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(s.device)
    try:
        fn(s, state, row)
    except StageSkipped as exc:
        row.status, row.reason = "skipped", str(exc)
    except Exception as exc:  # noqa: BLE001 - one line here, the traceback with --verbose
        log.info("stage %s failed", key, exc_info=True)
        first = (str(exc).strip().splitlines() or [""])[0]
        row.status, row.reason = "failed", f"{type(exc).__name__}: {first}".rstrip(": ")
    finally:
        gc.collect()
        if cuda:
            row.peak_gpu_mib = torch.cuda.max_memory_allocated(s.device) / 2**20
            torch.cuda.empty_cache()
    return row


def run_all(s: SmokeSettings, *, announce: Callable[[str], None]) -> dict[str, Any]:
    """Every stage in order; `announce` gets one line per finished stage (with the reason, if any)."""
    torch.manual_seed(s.seed)
    state, rows = SmokeState(), []
    announce(f"gpu-smoke on {describe_device(s.device)}: model {s.model_dir}, batch {s.batch}, "
             f"{s.max_new_tokens} new tokens")
    for key, title, fn in STAGES:
        row = run_stage(key, title, fn, s, state)
        rows.append(row)
        announce(f"{title}: {row.status}" + (f": {row.reason}" if row.reason else ""))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()}
    return {"device": describe_device(s.device), "settings": settings, "packages": package_versions(),
            "stages": [asdict(r) for r in rows]}


def skipped_report(reason: str) -> dict[str, Any]:
    """The JSON of a run that found no device: every stage skipped for the same reason."""
    rows = [asdict(StageRow(key=k, title=t, status="skipped", reason=reason)) for k, t, _ in STAGES]
    return {"device": None, "settings": {}, "packages": package_versions(), "stages": rows}


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def package_versions() -> dict[str, Optional[str]]:
    """Installed versions (None = missing) of what the smoke uses or may skip for."""
    from importlib import metadata

    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "gguf", "sqlalchemy", "vllm"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
