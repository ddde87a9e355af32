"""Adapter versions on disk: written atomically, cleaned up after crashes, loaded in place.

A version is `<adapters_dir>/v<N>/`: a plain PEFT directory (adapter_config.json +
adapter_model.safetensors, loadable by `PeftModel.from_pretrained` and vLLM) plus optimizer.pt and
trainer_state.json so training resumes exactly. It is written as `v<N>.tmp/`, every file and the
directory are fsynced, then it is renamed to `v<N>/` and the parent directory fsynced. Only after
that does the trainer insert the `adapters` row, and the row is the commit point: readers follow
rows, never directory listings, so they can never see a half-written version.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from odpo.db.errors import OdpoError
from odpo.trainer.options import LoraSettings

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_STATE = "optimizer.pt"
TRAINER_STATE = "trainer_state.json"
RNG_STATE = "rng_state.pt"  # torch's generators: LoRA dropout masks continue exactly on resume
VERSION_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, OPTIMIZER_STATE, TRAINER_STATE)
_VERSION_DIR_RE = re.compile(r"^v(\d+)(\.tmp)?$")


class AdapterLoadError(OdpoError):
    """An adapter directory that is missing, incomplete, or does not fit the live model."""


def version_dir(adapters_dir: Path, version: int) -> Path:
    return Path(adapters_dir) / f"v{version}"


def is_complete_version_dir(path: Path) -> bool:
    """All four files present and non-empty: what every committed row must point at."""
    path = Path(path)
    return path.is_dir() and all((path / f).is_file() and (path / f).stat().st_size > 0 for f in VERSION_FILES)


# --- writing -----------------------------------------------------------------------------------


def write_version(*, model: Any, optimizer: torch.optim.Optimizer, adapters_dir: Path, version: int,
                  state: dict[str, Any]) -> Path:
    """Write version `version` atomically and return its final directory (not yet committed).

    A leftover `v<N>.tmp/` or uncommitted `v<N>/` of the same number is replaced: the caller took
    N from `next_version_number`, so no row can point at it.
    """
    adapters_dir = Path(adapters_dir)
    adapters_dir.mkdir(parents=True, exist_ok=True)
    final, tmp = version_dir(adapters_dir, version), adapters_dir / f"v{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model.save_pretrained(str(tmp))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_STATE)
        torch.save(_rng_snapshot(), tmp / RNG_STATE)
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
        fsync_tree(tmp)
    except BaseException:  # a full disk mid-write: no half-written v<N>.tmp stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        log.warning("replacing %s: a version directory that was never committed", final)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(adapters_dir)
    return final


class DiskFull(OdpoError):
    """Not enough free space to write a version: transient (the trainer pauses until there is)."""

    transient = True
    fault_what = "disk"


def check_free_space(adapters_dir: Path, *, need_bytes: int) -> None:
    """Raise DiskFull when the adapters' filesystem has less than `need_bytes` free: checked before
    a version is written, so a full disk pauses training instead of failing mid-write."""
    adapters_dir = Path(adapters_dir)
    probe = adapters_dir if adapters_dir.exists() else adapters_dir.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise DiskFull(f"disk full: {free / 2**20:.0f} MB free in {adapters_dir}, a version needs about "
                       f"{need_bytes / 2**20:.0f} MB")


def version_bytes(model: Any, optimizer: torch.optim.Optimizer) -> int:
    """What writing a version takes on disk, about: the trainable weights, the optimizer's moments
    (two per weight for AdamW) and a margin of 25 % plus 8 MB for the rest."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                  if torch.is_tensor(t))
    return int((weights + max(moments, 2 * weights)) * 1.25) + (8 << 20)


def check_room(model: Any, optimizer: torch.optim.Optimizer, adapters_dir: Path) -> None:
    """DiskFull unless a version of this model and optimizer fits in `adapters_dir` now."""
    check_free_space(adapters_dir, need_bytes=version_bytes(model, optimizer))


def remove_version_dir(path: Path) -> None:
    """Undo a write whose DB commit failed, so no directory without a row survives."""
    shutil.rmtree(path, ignore_errors=True)
    if Path(path).parent.is_dir():
        fsync_dir(Path(path).parent)


def clean_adapters_dir(adapters_dir: Path, *, committed: Iterable[int]) -> list[Path]:
    """Remove `v<N>.tmp/` dirs and `v<N>/` dirs without an adapters row; return what was removed.

    Rows of rolled-back versions count as committed: their directories stay (a later rollback may
    return to them). Other names in the directory are left alone.
    """
    adapters_dir = Path(adapters_dir)
    if not adapters_dir.is_dir():
        return []
    keep = set(committed)
    removed = []
    for child in sorted(adapters_dir.iterdir()):
        match = _VERSION_DIR_RE.match(child.name)
        if not match or not child.is_dir():
            continue
        if match.group(2) or int(match.group(1)) not in keep:
            log.info("removing %s: left over by an interrupted save, never committed", child)
            shutil.rmtree(child)
            removed.append(child)
    if removed:
        fsync_dir(adapters_dir)
    return removed


def fsync_tree(root: Path) -> None:
    """fsync every file, then every directory bottom-up, so the rename publishes no holes."""
    root = Path(root)
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file():
            _fsync_path(path, directory=False)
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


def fsync_dir(path: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):
        return  # directories cannot be opened for fsync off POSIX; the rename is still atomic
    _fsync_path(Path(path), directory=True)


def _fsync_path(path: Path, *, directory: bool) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading -----------------------------------------------------------------------------------


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def read_lora_settings(path: Path) -> LoraSettings:
    """The LoRA shape a version was trained with, from its adapter_config.json (the truth)."""
    from peft import LoraConfig

    try:
        cfg = LoraConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"cannot read {Path(path) / ADAPTER_CONFIG}: {exc}") from None
    targets = cfg.target_modules
    targets = targets if isinstance(targets, str) else tuple(sorted(targets))
    return LoraSettings(r=cfg.r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets)


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Restore AdamW moments and step counts saved with a version (tensors only, no pickle code)."""
    device = _first_param_device(optimizer)
    state = torch.load(Path(path) / OPTIMIZER_STATE, map_location=device, weights_only=True)
    optimizer.load_state_dict(state)


def _rng_snapshot() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def load_rng_state(path: Path) -> bool:
    """Continue the random stream a version was saved with, so a resumed trainer draws the same
    dropout masks as one that never stopped. False when the version has none (older versions)."""
    file = Path(path) / RNG_STATE
    if not file.exists():
        return False
    state = torch.load(file, map_location="cpu", weights_only=True)
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return True


def _first_param_device(optimizer: torch.optim.Optimizer) -> torch.device:
    for group in optimizer.param_groups:
        for param in group["params"]:
            return param.device
    return torch.device("cpu")


def load_adapter_into(peft_model: Any, path: Path, *, adapter_name: str = "default") -> None:
    """Copy a version's LoRA weights into the live adapter, in place: no base reload, no new modules.

    The parameters keep their identity (copied under no_grad), so an optimizer or a compiled graph
    holding them stays valid. The file-key -> parameter map is built once per model and adapter
    (peft's set_peft_model_state_dict re-walks all ~2500 modules each call: ~10x slower). Raises
    AdapterLoadError when the directory does not fit the live adapter (other rank or targets)
    instead of silently loading part of it.
    """
    from safetensors import safe_open

    weights = Path(path) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterLoadError(f"{path} holds no {ADAPTER_WEIGHTS}; not an adapter version directory")
    params = _adapter_params(peft_model, adapter_name)
    with safe_open(str(weights), framework="pt") as handle:
        keys = set(handle.keys())
        if keys != set(params):
            raise AdapterLoadError(f"adapter {path} does not fit the loaded model: "
                                   f"{len(set(params) - keys)} LoRA weights missing, "
                                   f"{len(keys - set(params))} unexpected")
        with torch.no_grad():
            for key, param in params.items():
                tensor = handle.get_tensor(key)
                if tensor.shape != param.shape:
                    raise AdapterLoadError(f"adapter {path} does not fit the loaded model: {key} has shape "
                                           f"{tuple(tensor.shape)}, the live adapter {tuple(param.shape)}")
                param.copy_(tensor)


_PARAM_MAP_ATTR = "_odpo_adapter_param_map"


def _adapter_params(peft_model: Any, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """Saved key (as save_pretrained writes it) -> live parameter, cached on the model object.

    Built from peft's own get_peft_model_state_dict, whose tensors share storage with the
    parameters, so peft's key renaming rules are reused rather than re-implemented.
    """
    cache = getattr(peft_model, _PARAM_MAP_ATTR, None)
    if cache is None:
        cache = {}
        setattr(peft_model, _PARAM_MAP_ATTR, cache)
    if adapter_name not in cache:
        from peft import get_peft_model_state_dict

        by_storage = {p.data_ptr(): p for n, p in peft_model.named_parameters()
                      if "lora_" in n and f".{adapter_name}." in n}
        if not by_storage:
            raise AdapterLoadError(f"the model has no LoRA adapter named {adapter_name!r} to load into")
        state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
        mapping = {key: by_storage.get(t.data_ptr()) for key, t in state.items()}
        unmatched = [k for k, v in mapping.items() if v is None]
        if unmatched:
            raise AdapterLoadError(f"cannot map saved adapter keys onto the live model (e.g. {unmatched[0]})")
        cache[adapter_name] = mapping
    return cache[adapter_name]


def reset_adapter(peft_model: Any, *, seed: int, adapter_name: str = "default") -> None:
    """Re-initialise the LoRA weights as a fresh adapter (A random, B zero): version 0, the base
    policy. Seeded, so a fresh start and a rollback to v0 begin from the same A matrices."""
    from peft.tuners.lora import LoraLayer

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                module.reset_lora_parameters(adapter_name, True)


def adapter_weights_norm(peft_model: Any) -> float:
    """L2 norm of all LoRA B matrices: zero exactly for version 0 (used in tests and logs)."""
    total = 0.0
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            total += float(param.detach().float().pow(2).sum())
    return math.sqrt(total)


def committed_dir_problem(path: Optional[str]) -> Optional[str]:
    """Why a committed row's path is unusable, or None when it is a complete version directory."""
    if not path:
        return "the row has no path"
    if Path(path).name.endswith(".tmp"):
        return f"{path} is a temporary directory"
    if not is_complete_version_dir(Path(path)):
        return f"{path} is missing or incomplete"
    return None
