"""`odpo train`: the background DPO trainer as a command (see trainer/train_loop.py).

Everything heavy (torch, transformers, peft) is imported inside the command, so `odpo --help`
stays fast. SIGTERM/SIGINT ask the trainer to stop after the current step and commit what it has;
a kill -9 instead loses only uncommitted steps, whose labels the next start trains again.
"""
from __future__ import annotations

import logging
import signal
import sys
from typing import Any, Optional

import click

from odpo.app.config import CommonConfig

log = logging.getLogger(__name__)

# Kept in step with trainer.dpo.LOSS_TYPES (a test checks): importing it here would pull torch into `odpo --help`.
LOSS_CHOICES = ("sigmoid", "ipo", "hinge", "robust", "apo_zero", "simpo")


@click.command()
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Base model: smollm2-135m (bundled), a checkpoint dir, a .gguf file or a hub id.")
@click.option("--run", default="default", show_default=True, help="Run name: adapters go to runs/<run>/adapters.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True, help="Pairs per optimizer step.")
@click.option("--grad-accum", type=click.IntRange(1), default=1, show_default=True,
              help="Split each batch into this many micro-batches (same update, less memory).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None,
              help="AdamW learning rate of the LoRA weights. [default: 1e-4]")
@click.option("--beta", type=click.FloatRange(0, min_open=True), default=None,
              help="DPO beta: strength of the pull towards the reference (base) model; for simpo, the "
                   "scale of the length-normalised reward. [default: 0.1; 2.0 with --loss simpo]")
@click.option("--loss", "loss_type", type=click.Choice(LOSS_CHOICES), default="sigmoid", show_default=True,
              help="sigmoid (DPO), ipo, hinge, robust (rDPO), apo_zero (anchored: chosen up, rejected down) "
                   "or simpo (reference-free: no reference forward pass, a faster step).")
@click.option("--simpo-gamma", type=click.FloatRange(0), default=None,
              help="SimPO target reward margin gamma (absolute, as TRL's simpo_gamma; keep gamma/beta near "
                   "0.5). Only with --loss simpo. [default: 1.0]")
@click.option("--label-smoothing", type=click.FloatRange(0, 0.5, max_open=True), default=0.0, show_default=True,
              help="Assumed label-flip rate (sigmoid = cDPO, robust = rDPO).")
@click.option("--max-staleness", "max_staleness_train", type=click.IntRange(0), default=None,
              help="Skip labels of pairs sampled more than this many versions ago. [default: no limit]")
@click.option("--save-every", type=click.IntRange(1), default=1, show_default=True,
              help="Commit a new adapter version every N steps (online and offline; a round of "
                   "--mode iterative is always one version).")
@click.option("--max-prompt-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--max-completion-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--shared-prompt/--no-shared-prompt", default=True, show_default=True,
              help="Run each pair's prompt through the model once for both answers (same loss and gradient "
                   "up to rounding, a faster step); --no-shared-prompt scores prompt+answer rows as TRL does.")
@click.option("--length-cut", type=click.Choice(("keep", "drop")), default="keep", show_default=True,
              help="Pairs with an answer cut at the sampler's max_new_tokens: keep trains them as cut (no "
                   "end-of-text token: the model did not stop there), drop leaves them out.")
@click.option("--sources", type=click.Choice(("human", "judge", "all")), default=None,
              help="Which labels to learn from (a person's label of a pair always overrides a judge's); "
                   "imported datasets are trained only by --mode offline. [default: all]")
@click.option("--mode", type=click.Choice(("online", "iterative", "offline")), default="online", show_default=True,
              help="online: train labels as they come. iterative: rounds of --round-labels labels of the "
                   "serving version, one new version per round. offline: the datasets `odpo import "
                   "dataset` stored, then exit.")
@click.option("--round-labels", type=click.IntRange(1), default=None, metavar="N",
              help="--mode iterative: labels of pairs sampled from the serving version that make a round.")
@click.option("--epochs", "--round-epochs", "epochs", type=click.IntRange(1), default=1, show_default=True,
              help="--mode iterative: passes over each round's labels; --mode offline: over the dataset.")
@click.option("--min-labeler-agreement", type=click.FloatRange(0, 1), default=None, metavar="R",
              help="Do not train on the labels of people whose agreement is below R (0..1): with gold answers "
                   "if they have >= --agreement-min-n gold comparisons, else with other people, else with "
                   "judges; people with fewer comparisons on every basis are kept. Left-out labels stay "
                   "unused (a lower R later trains them). Only a/b labels are compared. [default: off]")
@click.option("--agreement-min-n", type=click.IntRange(1), default=20, show_default=True, metavar="N",
              help="Comparisons a person needs on a basis before --min-labeler-agreement judges them on it.")
@click.option("--poll-seconds", type=click.FloatRange(0, min_open=True), default=2.0, show_default=True)
@click.option("--max-grad-norm", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="Clip the LoRA gradient to this L2 norm.")
@click.option("--max-steps", type=click.IntRange(1), default=None,
              help="Exit after this many steps of this process (pending steps are committed).")
@click.option("--until-version", type=click.IntRange(1), default=None, help="Exit once this version is committed.")
@click.option("--exit-when-idle", type=click.FloatRange(0), default=None, metavar="SECONDS",
              help="Exit after this long without a step (no labels, or paused).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for torch. When the sampler shares the CPU, give each process its share: "
                   "oversubscribed threads made a step 2-5x slower on 2 cores. [default: torch's choice]")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--dtype", default="auto", show_default=True,
              help="auto (bf16 on GPU, bf16 autocast on capable CPUs), fp32, bf16 or fp16.")
@click.option("--load-in-4bit", is_flag=True,
              help="QLoRA: train the LoRA on a base whose linear layers are 4-bit NF4 (bitsandbytes; CUDA and CPU).")
@click.option("--lora-r", type=click.IntRange(1), default=16, show_default=True,
              help="LoRA rank of a fresh adapter (an existing version keeps its own).")
@click.option("--lora-alpha", type=click.FloatRange(0, min_open=True), default=32, show_default=True)
@click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.05, show_default=True)
@click.option("--lora-targets", default="all-linear", show_default=True,
              help="'all-linear' or comma-separated module names, e.g. q_proj,v_proj.")
@click.option("--eval-every", type=click.IntRange(0), default=0, show_default=True, metavar="K",
              help="Every K-th committed version, its win rate against the base on held-out prompts "
                   "(needs --eval-judge; the dashboard plots it). 0 = off.")
@click.option("--eval-judge", default=None, metavar="SPEC", help="Judge spec for --eval-every, e.g. hf:smollm2-135m.")
@click.option("--eval-n", type=click.IntRange(1), default=32, show_default=True, help="Held-out prompts per auto-eval.")
@click.option("--eval-max-new-tokens", type=click.IntRange(1), default=128, show_default=True,
              help="Answer length in auto-evals (as `odpo eval --max-new-tokens`).")
@click.pass_obj
def train(cfg: CommonConfig, **options: Any) -> None:
    """Train the policy with DPO on new labels, committing adapter versions as it goes.

    Under `accelerate launch` (several processes) rank 0 is this trainer and the other ranks follow
    it without opening the database (trainer/distributed.py).
    """
    from odpo.trainer.distributed import Follower, leading, start_distributed
    from odpo.trainer.train_loop import DPOTrainer

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


def build_train_config(options: dict[str, Any]) -> Any:
    """Click options -> a validated TrainConfig (TrainConfigError names a bad value)."""
    from odpo.trainer.lora import LoraSettings
    from odpo.trainer.train_config import DEFAULT_LR, TrainConfig, TrainConfigError

    opts = dict(options)
    targets = opts.pop("lora_targets").strip()
    target_modules: Any = targets if targets == "all-linear" else tuple(
        t.strip() for t in targets.split(",") if t.strip())
    alpha = opts.pop("lora_alpha")
    try:
        lora = LoraSettings(r=opts.pop("lora_r"), alpha=int(alpha) if float(alpha).is_integer() else alpha,
                            dropout=opts.pop("lora_dropout"), target_modules=target_modules)
    except ValueError as exc:
        raise TrainConfigError(str(exc)) from None
    if opts.get("lr") is None:
        opts["lr"] = DEFAULT_LR
    return TrainConfig(lora=lora, **opts)


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
