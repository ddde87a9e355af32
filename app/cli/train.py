"""`odpo train`: the background DPO trainer as a command (see trainer/training/loop.py).

Its options are TrainConfig's fields (odpo.app.cli.flags builds them), so defaults and help live
in one place. Everything heavy (torch, transformers, peft) is imported inside the command, so
`odpo --help` stays fast. SIGTERM/SIGINT ask the trainer to stop after the current step and commit
what it has; a kill -9 instead loses only uncommitted steps, whose labels the next start trains again.
"""
from __future__ import annotations

import logging
import signal
import sys
from typing import Any, Optional

import click

from odpo.app.cli.flags import apply_options, click_options, config_values
from odpo.app.config import CommonConfig
from odpo.trainer.training.train_config import TrainConfig, TrainConfigError

log = logging.getLogger(__name__)


@click.command()
@apply_options(click_options(TrainConfig))
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for torch. When the sampler shares the CPU, give each process its share: "
                   "oversubscribed threads made a step 2-5x slower on 2 cores. [default: torch's choice]")
@click.pass_obj
def train(cfg: CommonConfig, **options: Any) -> None:
    """Train the policy with DPO on new labels, committing adapter versions as it goes.

    Under `accelerate launch` (several processes) rank 0 is this trainer and the other ranks follow
    it without opening the database (trainer/distributed.py).
    """
    from odpo.trainer.training.distributed import Follower, leading, start_distributed
    from odpo.trainer.training.loop import DPOTrainer

    threads = options.pop("threads")
    train_cfg = build_train_config(options)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    dist = start_distributed(train_cfg)  # None for a plain `odpo train`
    if dist is not None and not dist.is_leader:
        previous = _install_stop_handlers(None)  # rank 0 decides when to stop; its "stop" ends this one
        try:
            Follower(dist, train_cfg, model_cache_dir=cfg.model_cache_dir).run()
        finally:
            _restore_handlers(previous)
        return
    with leading(dist):  # rank 0 of several: the followers are released however this ends
        db = cfg.open_db()
        trainer = DPOTrainer(train_cfg, db=db, adapters_dir=cfg.adapters_dir(train_cfg.run),
                             model_cache_dir=cfg.model_cache_dir, dist=dist)
        previous = _install_stop_handlers(trainer)
        try:
            trainer.start()
            stats = _run_with_progress(trainer, train_cfg.max_steps)
        finally:
            _restore_handlers(previous)
            trainer.close()
            db.close()
    versions = ", ".join(f"v{v}" for v in stats.versions) or "none"
    if train_cfg.mode != "online":
        click.echo(f"mode {train_cfg.mode}: " + (f"{len(stats.versions)} round(s) of {train_cfg.round_labels} labels"
                                                 if train_cfg.mode == "iterative" else f"{train_cfg.epochs} epoch(s)"))
    click.echo(f"trained {stats.steps} step(s); committed {versions}; now at v{trainer.version}; "
               f"stale labels skipped {stats.stale_skipped}; exit: {stats.exit_reason}")


def build_train_config(options: dict[str, Any]) -> TrainConfig:
    """Click options -> a validated TrainConfig (TrainConfigError names a bad value)."""
    try:
        values = config_values(TrainConfig, options)
    except ValueError as exc:  # the LoRA settings' own checks
        raise TrainConfigError(str(exc)) from None
    return TrainConfig(**values)


def _run_with_progress(trainer: Any, max_steps: Optional[int]) -> Any:
    """A tqdm bar when a step budget is known and stderr is a terminal; log lines go above it."""
    if max_steps is None or not sys.stderr.isatty():
        return trainer.run()
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with tqdm(total=max_steps, unit="step", desc="odpo train") as bar, logging_redirect_tqdm():
        def on_step(step: int, version: int, metrics: dict[str, float]) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['reward_accuracy']:.2f}")

        trainer.on_step = on_step
        return trainer.run()


def _install_stop_handlers(trainer: Any) -> dict[int, Any]:
    """SIGTERM (from `odpo up` or a service manager) and Ctrl-C stop after the current step.

    `trainer` None (a follower rank): the signal is only logged; the launcher signals every rank,
    and a follower leaving mid-collective would hang rank 0's step instead of letting it commit.
    """
    previous: dict[int, Any] = {}

    def handler(signum: int, _frame: Any) -> None:
        if trainer is None:
            log.info("received %s: waiting for rank 0 to stop", signal.Signals(signum).name)
            return
        log.warning("received %s: finishing the current step, committing, exiting",
                    signal.Signals(signum).name)
        trainer.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. inside a test runner's worker)
            pass
    return previous


def _restore_handlers(previous: dict[int, Any]) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)
