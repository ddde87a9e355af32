"""What a trainer records as it goes: its pending (uncommitted) steps, its stats, the one log line
a step gets and the metrics a version keeps (the mean of its steps')."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PendingStep:
    step: int
    row_id: int
    label_ids: list[int]
    metrics: dict[str, float]


@dataclass
class TrainerStats:
    """What this process did; `exit_reason` is max_steps, until_version, idle, stopped or done
    (offline: the imported labels are trained and no --exit-when-idle asks to wait for more)."""

    steps: int = 0
    versions: list[int] = field(default_factory=list)
    stale_skipped: int = 0
    reloads: int = 0
    exit_reason: str = ""


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = set().union(*rows) if rows else set()
    return {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in sorted(keys)}


def format_step_line(step: int, version: int, m: dict[str, float]) -> str:
    """The one-line per-step summary in the log."""
    return (f"step {step} -> v{version} | loss {m['loss']:.4f} acc {m['reward_accuracy']:.2f} "
            f"margin {m['reward_margin']:+.3f} kl {m['kl']:+.3f} | grad {m['grad_norm']:.3f} | "
            f"{int(m['pairs'])} pairs {m['seconds']:.2f}s lag {m.get('version_lag', 0.0):.1f}")
