"""What every bench shares: the context it runs in, its result JSON, the printed table, and the
arithmetic (percentiles, ratios, target checks) that tests pin down exactly.

A result file is `<out_dir>/<bench>[-quick].json` with this schema (SCHEMA names its version):

    {"schema", "bench", "quick", "status": ok|unavailable|failed, "started_at", "seconds",
     "machine": {...}, "params": {...}, "metrics": {...},
     "targets": [{"name", "metric", "op", "threshold", "value", "met"}], "rows": [[what, value]],
     "notes": [...]}

"unavailable" is for a comparison that cannot run here (e.g. TRL missing): the reason goes in
notes, and no number is made up.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from odpo.app.config import CommonConfig
from odpo.trainer.options import DEFAULT_MODEL

log = logging.getLogger(__name__)

SCHEMA = "odpo-bench/1"
BENCH_NAMES = ("sampling", "train-step", "reload", "labelers", "learn", "memory", "first-pair")
STATUSES = ("ok", "unavailable", "failed")
OPS = ("<=", ">=")
RESULTS_DIR_NAME = "results"  # bench/results/ in a checkout, beside this module; never package data
_VERSIONED = ("torch", "transformers", "peft", "trl", "accelerate", "gradio", "gradio_client", "sqlalchemy")


def default_out_dir() -> Path:
    """Where result files go unless --out says otherwise.

    In a checkout that is bench/results/ beside this module (the README's table is built from it),
    whatever the working directory. An installed wheel has no such folder (results are not package
    data, and site-packages is no place to write), so there it is ./bench/results.
    """
    checkout = Path(__file__).resolve().parent / RESULTS_DIR_NAME
    return checkout if checkout.is_dir() else Path("bench") / RESULTS_DIR_NAME


# --- arithmetic --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default), so p50 of [1, 2, 3, 4] is 2.5; None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    data = sorted(float(v) for v in values)
    if not data:
        return None
    pos = (len(data) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def summarize(values: Sequence[float]) -> dict[str, Optional[float]]:
    """n, mean, p50, p95, min, max of a sample (None entries when it is empty)."""
    data = [float(v) for v in values]
    n = len(data)
    return {"n": n, "mean": sum(data) / n if n else None, "p50": percentile(data, 50),
            "p95": percentile(data, 95), "min": min(data) if n else None, "max": max(data) if n else None}


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator) / float(denominator)


def per_minute(count: float, seconds: float) -> Optional[float]:
    return None if seconds <= 0 else 60.0 * count / seconds


# --- targets -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A budget from DESIGN.md: metrics[metric] op threshold."""

    name: str
    metric: str
    op: str
    threshold: float

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"target op must be one of {OPS}, got {self.op!r}")

    def check(self, value: Optional[float]) -> Optional[bool]:
        """True/False, or None when the value was not measured."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        return value <= self.threshold if self.op == "<=" else value >= self.threshold

    def evaluate(self, metrics: dict[str, Any]) -> dict[str, Any]:
        value = metrics.get(self.metric)
        return {"name": self.name, "metric": self.metric, "op": self.op, "threshold": self.threshold,
                "value": value, "met": self.check(value)}


# --- context -----------------------------------------------------------------------------------


@dataclass
class BenchContext:
    """How a bench runs: the user's config (for the model cache), size, model and output."""

    common: CommonConfig
    quick: bool = False
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    out_dir: Path = field(default_factory=default_out_dir)
    seed: int = 0
    keep_scratch: bool = False
    threads: Optional[int] = None  # torch CPU threads here and in child processes (None: torch's default)

    def model_config(self) -> Any:
        from odpo.trainer.policy.loading import ModelConfig

        return ModelConfig(spec=self.model, cache_dir=self.common.model_cache_dir, device=self.device,
                           dtype=self.dtype)

    @contextlib.contextmanager
    def scratch(self, name: str) -> Iterator[CommonConfig]:
        """A fresh data directory and SQLite database for one bench, never the user's own data.
        Its models/ links to the user's model cache, so a converted GGUF is not converted again."""
        root = Path(tempfile.mkdtemp(prefix=f"odpo-bench-{name}-"))
        data = root / "data"
        data.mkdir()
        cache = self.common.model_cache_dir
        cache.mkdir(parents=True, exist_ok=True)
        (data / "models").symlink_to(cache.resolve(), target_is_directory=True)
        try:
            yield CommonConfig.resolve(data_dir=str(data), db_url=f"sqlite:///{data / 'odpo.sqlite3'}")
        finally:
            if self.keep_scratch:
                log.info("kept scratch data of %s in %s", name, root)
            else:
                shutil.rmtree(root, ignore_errors=True)


# --- results -----------------------------------------------------------------------------------


@dataclass
class BenchResult:
    bench: str
    quick: bool
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    status: str = "ok"
    started_at: str = ""
    seconds: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)

    def check(self, targets: Sequence[Target]) -> None:
        self.targets = [t.evaluate(self.metrics) for t in targets]

    def row(self, what: str, value: Any, unit: str = "") -> None:
        self.rows.append([what, fmt(value, unit)])

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "bench": self.bench, "quick": self.quick, "status": self.status,
                "started_at": self.started_at, "seconds": round(self.seconds, 3), "machine": self.machine,
                "params": self.params, "metrics": self.metrics, "targets": self.targets, "rows": self.rows,
                "notes": self.notes}

    def write(self, out_dir: Path) -> Path:
        """Write atomically (tmp + rename): a half-written result must never look committed."""
        path = result_path(out_dir, self.bench, quick=self.quick)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False, default=_json_default) + "\n")
        os.replace(tmp, path)
        return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    return str(value)


def result_path(out_dir: Path, bench: str, *, quick: bool) -> Path:
    return Path(out_dir) / f"{bench}{'-quick' if quick else ''}.json"


def utc_now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def validate_result(data: dict[str, Any]) -> list[str]:
    """Schema problems of a result dict (empty list = valid); what the tests and `report` check."""
    problems = []
    expected = {"schema": str, "bench": str, "quick": bool, "status": str, "started_at": str,
                "seconds": (int, float), "machine": dict, "params": dict, "metrics": dict, "targets": list,
                "rows": list, "notes": list}
    for key, kind in expected.items():
        if key not in data:
            problems.append(f"missing key {key!r}")
        elif not isinstance(data[key], kind):
            problems.append(f"{key!r} has type {type(data[key]).__name__}")
    if problems:
        return problems
    if data["schema"] != SCHEMA:
        problems.append(f"schema is {data['schema']!r}, expected {SCHEMA!r}")
    if data["bench"] not in BENCH_NAMES:
        problems.append(f"unknown bench {data['bench']!r}")
    if data["status"] not in STATUSES:
        problems.append(f"status {data['status']!r} not in {STATUSES}")
    for key in ("cpu_model", "cores", "device", "versions"):
        if key not in data["machine"]:
            problems.append(f"machine lacks {key!r}")
    for t in data["targets"]:
        if set(t) != {"name", "metric", "op", "threshold", "value", "met"} or t.get("op") not in OPS:
            problems.append(f"malformed target {t!r}")
    if any(not (isinstance(r, list) and len(r) == 2) for r in data["rows"]):
        problems.append("rows must be [what, value] pairs")
    return problems


def load_results(out_dir: Path) -> list[dict[str, Any]]:
    """Every valid result file in out_dir, in BENCH_NAMES order (quick after full)."""
    found = []
    for path in sorted(Path(out_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            log.warning("skipping unreadable %s", path)
            continue
        if isinstance(data, dict) and not validate_result(data):
            found.append(data)
    order = {name: i for i, name in enumerate(BENCH_NAMES)}
    return sorted(found, key=lambda d: (order.get(d["bench"], 99), d["quick"]))


# --- machine -----------------------------------------------------------------------------------


def machine_description() -> dict[str, Any]:
    """Enough to interpret a number later: CPU, cores, memory, load, versions, device."""
    info: dict[str, Any] = {"cpu_model": _cpu_model(), "cores": os.cpu_count(),
                            "usable_cores": _usable_cores(), "memory_gib": _mem_total_gib(),
                            "load_average_1m": _load_average(), "python": platform.python_version(),
                            "platform": platform.platform(), "versions": _versions(), "code": code_commit()}
    info.update(_device_info())
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usable_cores() -> Optional[int]:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def _mem_total_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {}
    for name in ("odpo", *_VERSIONED):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def code_commit() -> Optional[dict[str, Any]]:
    """The git commit odpo ran from, and whether its tracked files had edits: a number measured on
    a branch is only comparable with one from the same code. None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        edits = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(edits.stdout.strip())}


def _device_info() -> dict[str, Any]:
    import torch

    from odpo.trainer.policy.loading import cpu_has_native_bf16

    info: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "cpu_native_bf16": cpu_has_native_bf16()}
    if torch.cuda.is_available():
        info["device"] = f"cuda: {torch.cuda.get_device_name(0)}"
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        info["device"] = "cpu"
    return info


# --- tables ------------------------------------------------------------------------------------


def fmt(value: Any, unit: str = "") -> str:
    """A table cell: 3 significant figures for floats, '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def met_text(met: Optional[bool]) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[met]


def result_table(result: dict[str, Any]) -> str:
    """The short table a bench prints: its rows, then its targets."""
    title = f"odpo bench {result['bench']}{' --quick' if result['quick'] else ''} ({result['status']})"
    parts = [title, "", markdown_table(["measure", "value"], result["rows"])]
    if result["targets"]:
        rows = [[t["name"], fmt(t["value"]), f"{t['op']} {fmt(t['threshold'])}", met_text(t["met"])]
                for t in result["targets"]]
        parts += ["", markdown_table(["target", "measured", "budget", "met"], rows)]
    if result["notes"]:
        parts += [""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(parts)


def readme_table(results: Sequence[dict[str, Any]]) -> str:
    """One Markdown table over all results, ready for the README's benchmarks section."""
    rows = []
    for r in results:
        name = f"{r['bench']}{' (quick)' if r['quick'] else ''}"
        if not r["targets"]:  # a bench without a budget (memory): its own rows
            extra = r["rows"] if r["status"] == "ok" else [[r["status"], "-"]]
            rows += [[name, what, value, "-", "-"] for what, value in extra]
        for t in r["targets"]:
            rows.append([name, t["name"], fmt(t["value"]), f"{t['op']} {fmt(t['threshold'])}", met_text(t["met"])])
    return markdown_table(["bench", "metric", "measured", "target", "met"], rows)
