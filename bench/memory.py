"""`odpo bench memory`: peak RSS (and GPU memory on a GPU) of each odpo process on the bench model.

Runs `odpo up` (the web app, which holds no model, a sampler worker, the trainer, and a rule judge
auto-labeling so the trainer really trains) as a child process until the trainer has taken `steps`
steps, sampling every process of its tree: VmHWM (the kernel's own peak RSS) and VmRSS from
/proc/<pid>/status, per role, plus the peak of their sum at one instant.
resource.getrusage(RUSAGE_CHILDREN) cross-checks the largest single process after they exit. On a
GPU, nvidia-smi's per-process memory is sampled too.

With `load_in_4bit`, the same run is repeated with `odpo up --load-in-4bit` (the worker and
the trainer on a 4-bit NF4 base) and its peaks are reported beside the full-precision ones.
"""
from __future__ import annotations

import logging
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from odpo.bench.common import BenchContext, BenchResult, Target
from odpo.bench.workspace import Child, free_port

log = logging.getLogger(__name__)

SIZES = {"full": (4, 96, 16), "quick": (2, 32, 4)}  # train steps, max_new_tokens, prompts_per_batch
ROLES = ("serve", "sample", "train", "judge", "up")
SERVE_TARGET = Target("memory: peak RSS of odpo serve (MiB)", "serve_peak_rss_mib", "<=", 400.0)
TIMEOUT_S = {"full": 1800.0, "quick": 900.0}


def read_status_kib(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process in KiB ({} once it is gone)."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def descendants(pid: int) -> list[int]:
    """pid and every process below it (Linux /proc/<pid>/task/<tid>/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except (OSError, ValueError):
                continue
    return found


def role_of(argv: list[str]) -> str:
    """Which odpo command a process runs: the first role word after the global options."""
    for arg in argv[1:]:
        if arg in ROLES:
            return arg
    return "other"


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class TreeSampler:
    """Peak memory per role over the life of a process tree."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak_kib: dict[str, int] = {}
        self.last_kib: dict[str, int] = {}  # VmRSS when last seen: the steady state, not a load transient
        self.peak_total_kib = 0
        self.gpu_peak_mib: dict[str, int] = {}
        self.samples = 0
        self._roles: dict[int, str] = {}

    def sample(self) -> None:
        total = 0
        gpu = gpu_memory_by_pid()
        for pid in descendants(self.root):
            st = read_status_kib(pid)
            if not st:  # gone between listing and reading: nothing to file under any role
                continue
            role = self._role(pid)
            total += st.get("VmRSS", 0)
            peak = max(st.get("VmHWM", 0), st.get("VmRSS", 0))
            self.peak_kib[role] = max(self.peak_kib.get(role, 0), peak)
            if st.get("VmRSS"):
                self.last_kib[role] = st["VmRSS"]
            if pid in gpu:
                self.gpu_peak_mib[role] = max(self.gpu_peak_mib.get(role, 0), gpu[pid])
        self.peak_total_kib = max(self.peak_total_kib, total)
        self.samples += 1

    def _role(self, pid: int) -> str:
        """A process caught between fork and exec still shows its parent's argv (the trainer shows
        `up`'s, the root this bench's): only a role that cannot be such a leftover is remembered;
        the rest are read again at the next sample."""
        role = self._roles.get(pid)
        if role is None:
            role = role_of(_argv(pid))
            if role in ("serve", "sample", "train", "judge") or (role == "up" and pid == self.root):
                self._roles[pid] = role
        return role


def gpu_memory_by_pid() -> dict[int, int]:
    """pid -> MiB used on the GPU, from nvidia-smi; {} without a GPU."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    usage = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            usage[int(parts[0])] = int(parts[1])
    return usage


def run(ctx: BenchContext, *, steps: Optional[int] = None, max_new_tokens: Optional[int] = None,
        prompts_per_batch: Optional[int] = None, rule: str = "rule:shorter", load_in_4bit: bool = False) -> BenchResult:
    size = "quick" if ctx.quick else "full"
    size_s, size_t, size_b = SIZES[size]
    steps, tokens, batch = steps or size_s, max_new_tokens or size_t, prompts_per_batch or size_b
    result = BenchResult(bench="memory", quick=ctx.quick,
                         params={"model": ctx.model, "train_steps": steps, "train_batch_size": 8,
                                 "max_new_tokens": tokens, "prompts_per_batch": batch, "judge": rule,
                                 "app": "odpo up --judge RULE --auto-label --max-steps N",
                                 "load_in_4bit": "also measured" if load_in_4bit else "no"})
    for four_bit in ((False, True) if load_in_4bit else (False,)):
        mode = ("4bit" if four_bit else "full") if load_in_4bit else ""
        measure_up(ctx, result, steps=steps, tokens=tokens, batch=batch, rule=rule, mode=mode)
    return result


def measure_up(ctx: BenchContext, result: BenchResult, *, steps: int, tokens: int, batch: int, rule: str,
               mode: str = "") -> None:
    """One `odpo up` run (with --load-in-4bit when mode is "4bit") until its trainer's last step."""
    size = "quick" if ctx.quick else "full"
    with ctx.scratch("memory") as cfg:
        args = ["up", "--port", str(free_port()), "--model", ctx.model, "--device", ctx.device, "--dtype", ctx.dtype,
                "--judge", rule, "--auto-label", "--max-steps", str(steps), "--batch-size", "8",
                "--max-new-tokens", str(tokens), "--prompts-per-batch", str(batch), "--queue-size", str(2 * 8),
                "--grace", "15", "--train-args", f"--max-completion-tokens {tokens} --poll-seconds 0.5",
                "--judge-args", "--poll-seconds 0.5", *(["--load-in-4bit"] if mode == "4bit" else [])]
        child = Child.start(cfg, args, log_path=cfg.data_dir.parent / "up.log", threads=ctx.threads)
        tree = TreeSampler(child.proc.pid)
        started = time.monotonic()
        try:
            while child.alive() and time.monotonic() - started < TIMEOUT_S[size]:
                tree.sample()
                time.sleep(0.25)
        finally:
            finished = not child.alive()
            code = child.stop()
            tail = child.tail(8)
    fill(result, tree, seconds=time.monotonic() - started, finished=finished, code=code, tail=tail, mode=mode)


MODE_NAMES = {"full": "full precision", "4bit": "4-bit NF4"}


def fill(result: BenchResult, tree: TreeSampler, *, seconds: float, finished: bool, code: Optional[int],
         tail: str, mode: str = "") -> None:
    """Peaks of one run. mode "" is the only run; "full"/"4bit" label the rows of a run measured
    beside the other, and the 4-bit run's metrics go under metrics["load_in_4bit"]."""
    mib = {role: round(kib / 1024, 1) for role, kib in sorted(tree.peak_kib.items())}
    children_max = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux, bytes on macOS
    children_mib = children_max / (2**20 if sys.platform == "darwin" else 1024)
    metrics = {"peak_rss_mib": mib, "peak_total_rss_mib": round(tree.peak_total_kib / 1024, 1),
               "serve_peak_rss_mib": mib.get("serve"), "sample_peak_rss_mib": mib.get("sample"),
               "train_peak_rss_mib": mib.get("train"),
               "serve_last_rss_mib": round(tree.last_kib["serve"] / 1024, 1) if "serve" in tree.last_kib else None,
               "getrusage_children_max_rss_mib": round(children_mib, 1), "gpu_peak_mib": tree.gpu_peak_mib,
               "samples": tree.samples, "seconds": seconds, "finished": finished, "exit_code": code}
    if mode == "4bit":
        result.metrics["load_in_4bit"] = metrics  # getrusage is per bench process: the max over both runs
    else:
        result.metrics.update(metrics)
    label = f" ({MODE_NAMES[mode]})" if mode else ""
    for role, value in mib.items():
        if value or role != "other":  # "other": a pid caught before it exec'd, nothing of its own
            result.row(f"peak RSS {role}{label}", value, "MiB")
    result.row(f"peak RSS of the whole tree at one instant{label}", metrics["peak_total_rss_mib"], "MiB")
    result.row(f"RSS serve when last seen, after sampling{label}", metrics["serve_last_rss_mib"], "MiB")
    if not mode or mode == "full":
        result.check([SERVE_TARGET])
    for role, value in sorted(tree.gpu_peak_mib.items()):
        result.row(f"peak GPU memory {role}{label}", value, "MiB")
    if not finished or code not in (0, None):
        result.status = "failed" if not tree.peak_kib else result.status
        result.notes.append(f"odpo up{label} did not finish its train steps cleanly (exit {code}); "
                            f"last log lines: {tail}")
