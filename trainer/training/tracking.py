"""Training metrics where ML people look for them (`--report-to`): TensorBoard, Weights & Biases, trackio.

Why: people coming from TRL open TensorBoard or W&B first; odpo's own dashboard reads the database
(`train_steps`, `adapters`, `evals`), which stays the truth. This module only copies the same
numbers out, with the global step as x-axis and TRL's names where TRL logs the same number.

Why the default is "tensorboard when the `tensorboard` package is installed, else none" (TRL's is
every installed integration): TensorBoard writes small local files next to the run
(`<data_dir>/runs/<run>/tensorboard/`), asks for no account and sends nothing anywhere; wandb may
ask for a login or upload to a service, and trackio writes outside the data dir (its own
`TRACKIO_DIR`) or to a Space, so a self-hosted trainer never picks those just because some other
project installed them: they are used when asked for.

Each backend is imported only when asked for, and a missing package is one line naming the pip
install when the tracker opens (before the model loads), never a crash mid-run; a backend that
fails while logging is dropped with a warning, since a metrics copy must never stop training.
Only rank 0 reports: the trainer (rank 0) opens the tracker, followers never do.

A step number seen again (a restart or a rollback replays from the committed head) tells
TensorBoard to hide the discarded points at and after it (purge_step); wandb and trackio keep them.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Optional, Protocol

from odpo.db.errors import OdpoError

log = logging.getLogger(__name__)

BACKENDS = ("tensorboard", "wandb", "trackio")  # each is also its package's import and pip name
PROJECT = "odpo"  # the wandb (unless WANDB_PROJECT) and trackio project; runs are named after odpo's run
STEP = "train/global_step"  # wandb's x-axis for every scalar (a replayed step may go back)
REPORT_TO_HELP = ("Also send training metrics to tensorboard, wandb or trackio (comma-separated), all (the "
                  "installed ones) or none. [default: tensorboard if installed, else none]")
LOGGING_DIR_HELP = "Where --report-to tensorboard writes its event files. [default: <data-dir>/runs/<run>/tensorboard]"

# A train_steps metric -> its scalar (TRL's name where TRL logs the same number).
STEP_SCALARS = {
    "loss": "train/loss",
    "reward_accuracy": "train/rewards/accuracies",
    "reward_margin": "train/rewards/margins",
    "reward_chosen": "train/rewards/chosen",
    "reward_rejected": "train/rewards/rejected",
    "logps_chosen": "train/logps/chosen",
    "logps_rejected": "train/logps/rejected",
    "kl": "train/kl",
    "grad_norm": "train/grad_norm",
    "seconds": "train/step_seconds",
    "version_lag": "train/version_lag",
    "lr": "train/learning_rate",
}
VERSION_SCALAR = "train/version"


class TrackingError(OdpoError):
    """A --report-to backend that cannot start (its package missing, a bad name, a login it needs)."""


def report_to_names(text: Optional[str]) -> tuple[str, ...]:
    """'wandb, tensorboard' -> ('wandb', 'tensorboard'); 'none' -> (); 'all' -> every installed one;
    None (not given) -> ('tensorboard',) when it is installed, else (). A bad name: TrackingError."""
    if text is None:
        return ("tensorboard",) if installed("tensorboard") else ()
    names = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    bad = [n for n in names if n not in BACKENDS + ("all", "none")]
    if bad or not names or (len(names) > 1 and ({"all", "none"} & set(names))):
        raise TrackingError(f"--report-to takes {', '.join(BACKENDS)} (comma-separated), all or none; got {text!r}")
    if names == ("none",):
        return ()
    return tuple(n for n in BACKENDS if installed(n)) if names == ("all",) else names


def valid_report_to(text: Optional[str]) -> bool:
    """Whether `text` is a --report-to value (TrainConfig checks it without importing anything)."""
    try:
        report_to_names("none" if text is None else text)
    except TrackingError:
        return False
    return True


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # ValueError: a module stubbed to None in sys.modules
        return False


def _require(package: str) -> Any:
    """The backend's package, or the one line that says how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise TrackingError(f"--report-to {package} needs the {package} package: pip install {package} "
                            "(or pip install 'odpo[tracking]' for all three)") from None


def logging_dir(explicit: Optional[str], run_dir: Path) -> Path:
    """--logging-dir, or the run's own `tensorboard/` next to its adapters."""
    return Path(explicit).expanduser() if explicit else Path(run_dir) / "tensorboard"


class Backend(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...
    def restart(self, step: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class TensorBoard:
    """Event files through torch's SummaryWriter, opened at the first scalar: a first or repeated
    training step opens it with purge_step, which hides the points a replay discards."""

    def __init__(self, log_dir: Path) -> None:
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self._writer_class, self.log_dir = SummaryWriter, Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)  # a directory we may not write fails now, not mid-run
        self._writer: Any = None
        self._purge_from: Optional[int] = None

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self._writer is None:
            self._writer = self._writer_class(str(self.log_dir), purge_step=self._purge_from)
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)

    def restart(self, step: int) -> None:
        self.close()
        self._purge_from = step

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class Wandb:
    """One wandb run per process (name = odpo's run, group = the run, job_type train or eval);
    WANDB_MODE, WANDB_DIR and WANDB_PROJECT apply as wandb reads them."""

    def __init__(self, *, run: str, job: str, config: dict[str, Any]) -> None:
        wandb = _require("wandb")
        try:
            self._run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=_run_name(run, job),
                                   group=run, job_type=job, config=config)
        except Exception as exc:  # noqa: BLE001 - e.g. no API key without a terminal: one line, at start
            raise TrackingError(f"--report-to wandb could not start: {_first_line(exc)} (run `wandb login`, or "
                                "set WANDB_MODE=offline)") from None
        self._run.define_metric(STEP)
        self._run.define_metric("*", step_metric=STEP, step_sync=True)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._run.log({**scalars, STEP: step})

    def restart(self, step: int) -> None:
        """wandb keeps every point; the global-step axis lets a replayed step go back."""

    def flush(self) -> None:
        """wandb sends in the background and flushes on finish."""

    def close(self) -> None:
        self._run.finish()


class Trackio:
    """trackio's local mode (its SQLite under TRACKIO_DIR, `trackio show` to look), one run per process."""

    def __init__(self, *, run: str, job: str, config: dict[str, Any]) -> None:
        trackio = _require("trackio")
        try:
            self._run = trackio.init(project=PROJECT, name=_run_name(run, job), group=run, config=config,
                                     embed=False)
        except Exception as exc:  # noqa: BLE001 - one line, at start
            raise TrackingError(f"--report-to trackio could not start: {_first_line(exc)}") from None

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._run.log(scalars, step=step)

    def restart(self, step: int) -> None:
        """trackio keeps every point."""

    def flush(self) -> None:
        """trackio writes in the background and flushes on finish."""

    def close(self) -> None:
        self._run.finish()


class Tracker:
    """The backends one trainer (or one `odpo eval`) reports to; with none, every call does nothing."""

    def __init__(self, backends: Optional[dict[str, Backend]] = None) -> None:
        self.backends: dict[str, Backend] = dict(backends or {})
        self._last_step: Optional[int] = None

    def step(self, step: int, metrics: dict[str, float]) -> None:
        """One optimizer step's metrics (what its train_steps row holds)."""
        if self._last_step is None or step <= self._last_step:  # this process's first step, or a replay
            self._each("restart", step)
        self._last_step = step
        self._each("log", step_scalars(metrics), step)

    def version(self, step: int, version: int) -> None:
        """A committed version, at the step it ends on; a commit is also when the files are flushed, so
        a kill loses only uncommitted steps, which replay."""
        self._each("log", {VERSION_SCALAR: float(version)}, step)
        self._each("flush")

    def win_rate(self, result: Any, *, step: int) -> None:
        """An eval's win rate (EvalResult, None = no eval ran) at the step of the version it scored."""
        if result is not None:
            self._each("log", eval_scalars(result), step)
            self._each("flush")

    def close(self) -> None:
        self._each("close")
        self.backends = {}

    def _each(self, method: str, *args: Any) -> None:
        for name, backend in list(self.backends.items()):
            try:
                getattr(backend, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a metrics copy never stops training
                log.warning("--report-to %s stopped: %s failed: %s", name, method, _first_line(exc))
                self.backends.pop(name, None)


def step_scalars(metrics: dict[str, float]) -> dict[str, float]:
    """A step's metrics as scalars; a reference-free loss's KL is a placeholder and left out."""
    skip = {"kl"} if metrics.get("reference_free") else set()
    return {tag: float(metrics[key]) for key, tag in STEP_SCALARS.items() if key in metrics and key not in skip}


def eval_scalars(result: Any) -> dict[str, float]:
    """`eval/win_rate_vs_base` (or `_vs_v3`, `_vs_<run>_v3`) and its 95% interval."""
    run_b = result.details.get("run_b")
    against = "base" if result.version_b == 0 else f"{run_b}_v{result.version_b}" if run_b else f"v{result.version_b}"
    w, name = result.win_rate, f"eval/win_rate_vs_{against}"
    return {name: float(w.rate), f"{name}_low": float(w.low), f"{name}_high": float(w.high)}


def open_tracker(report_to: Optional[str], *, run: str, job: str, log_dir: Path,
                 config: Optional[dict[str, Any]] = None) -> Tracker:
    """Start the backends `report_to` names (see report_to_names); any that cannot start closes
    the ones already started and raises TrackingError, before any work is done."""
    opened: dict[str, Backend] = {}
    try:
        for name in report_to_names(report_to):
            opened[name] = (TensorBoard(log_dir) if name == "tensorboard" else
                            (Wandb if name == "wandb" else Trackio)(run=run, job=job, config=dict(config or {})))
    except BaseException:
        Tracker(opened).close()
        raise
    if opened:
        where = f" (TensorBoard: {log_dir})" if "tensorboard" in opened else ""
        log.info("%s metrics also go to %s%s", job, ", ".join(opened), where)
    return Tracker(opened)


def trainer_tracker(cfg: Any, *, run_dir: Path, dist: Any = None) -> Tracker:
    """The trainer's tracker (`cfg` a TrainConfig): rank 0 only, so N processes report once."""
    if dist is not None and not dist.is_leader:
        return Tracker()
    config = {"run": cfg.run, "mode": cfg.mode, **cfg.hyperparameters(),
              "hyperparameter_hash": cfg.hyperparameter_hash()}
    return open_tracker(cfg.report_to, run=cfg.run, job="train", log_dir=logging_dir(cfg.logging_dir, run_dir),
                        config=config)


def _run_name(run: str, job: str) -> str:
    return run if job == "train" else f"{run}-{job}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
