"""Several training processes under `accelerate launch`: rank 0 leads, every other rank follows.

Why this shape: the database is odpo's only data channel and a run's head moves by conditional
writes, so two processes writing versions would race. Rank 0 therefore stays the ordinary
DPOTrainer (trainer lock, label reads, train_steps and adapters rows, version directories) and
the other ranks never open the database: before every change to the weights rank 0 broadcasts
one small Command (accelerate.utils.broadcast_object_list) and the followers do the same:

- ``init``  (the LoRA shape): load the base and attach the adapter (sent after rank 0 loaded the
  base, so a model cache is converted once, by rank 0);
- ``load``  (a committed version's directory, or None for a fresh adapter): the weights, AdamW
  state and RNG become that version's; rank 0 sends it on start, after a rollback and after a
  commit refused because the head moved, so every decision rank 0 takes is mirrored as weights;
- ``step``  (the global batch's examples, its step number): one DPO step; rank r trains its
  contiguous slice;
- ``wait``  (nothing): rank 0 is idle (no labels, paused); keeps the followers' collective alive;
- ``stop``: leave.

The step is data parallel through accelerate: the policy is `accelerator.prepare`d (DDP), each
rank's loss is its pairs' summed loss over (global pairs / world size), so DDP's gradient mean is
exactly the 1-process gradient of the global batch, however unevenly the batch splits. Every rank
then clips and steps the same averaged gradient, so all hold the same LoRA weights. A rank whose
slice is empty (a batch smaller than the world) runs one pair with weight 0 so DDP's all-reduce
still meets. Metrics are computed from the gathered log-probs of all ranks: the global batch's.
LoRA dropout: every rank would hold the same RNG state (same seed, same version files), so rank
r > 0 draws its step's masks from a generator seeded by (seed, step, rank) instead: the slices get
independent masks, and a resumed run draws the same ones. With dropout > 0 a 2-process run is
therefore equivalent to, not bit-identical with, a 1-process run (with dropout 0 it matches).

Only DDP-style configs (multi-CPU/GPU) are supported; DeepSpeed and FSDP are refused with one
line (see `UNSUPPORTED`), because odpo's step, clipping and version files assume whole LoRA
weights and optimizer on every rank.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from odpo.db.errors import OdpoError
from odpo.trainer.options import LoraSettings
from odpo.trainer.training.train_config import TrainConfig

log = logging.getLogger(__name__)

# accelerate / torchrun tell each worker the size of the world through the environment.
WORLD_SIZE_ENV = "WORLD_SIZE"
# How long a follower waits in a collective for rank 0: rank 0 may evaluate (--eval-every) or write
# a version meanwhile, and NCCL's default (10 min) would kill a slow eval. A crashed rank ends the
# whole launch through torchrun anyway, so a long wait never hides a failure.
COLLECTIVE_TIMEOUT = timedelta(hours=1)
UNSUPPORTED = ("DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA")


class DistributedConfigError(OdpoError):
    """An `accelerate launch` setup odpo cannot train with (the message says what to use)."""


@dataclass(frozen=True)
class Command:
    """What rank 0 tells the followers to do next (see the module docstring)."""

    kind: str
    examples: tuple = ()
    step: int = 0  # the lineage step number a "step" command makes (seeds the follower's dropout)
    path: Optional[str] = None
    lora: Optional[LoraSettings] = None


def launched_world_size() -> int:
    """Processes in this launch: 1 for a plain `odpo train` (and a 1-process accelerate launch)."""
    try:
        return max(1, int(os.environ.get(WORLD_SIZE_ENV, "1")))
    except ValueError:
        return 1


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous slice of n items: sizes differ by at most one, lower
    ranks take the extra ones, and the slices in rank order are the whole list in order."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class Distributed:
    """This process's place in the launch and the collectives odpo uses, all through accelerate."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.rank: int = accelerator.process_index
        self.world: int = accelerator.num_processes
        self.policy: Any = None  # the prepared (DDP) model after `wrap`; forwards with gradients use it
        self._stopped = False
        self._mid_step = False  # rank 0 sent a step whose collectives have not all met yet

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    # --- the protocol ---------------------------------------------------------------------------

    def send(self, command: Command) -> None:
        """Rank 0: broadcast the next command (every follower is waiting in `receive`)."""
        from accelerate.utils import broadcast_object_list

        broadcast_object_list([command], from_process=0)
        self._stopped = command.kind == "stop"
        self._mid_step = command.kind == "step"

    def receive(self) -> Command:
        from accelerate.utils import broadcast_object_list

        box: list[Any] = [None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def finish(self) -> None:
        """Rank 0, on every way out (also after an error): release the followers exactly once.
        Not after a failure inside a step: the followers wait in the step's all-reduce, where a
        broadcast would never meet them; rank 0's exit makes the launcher end them instead."""
        if not self.is_leader or self._stopped:
            return
        if self._mid_step:
            log.error("rank 0 failed inside a step; the launcher stops the other ranks")
            return
        self.send(Command("stop"))
        self.end()

    def end(self) -> None:
        """Every rank, after `stop` went out or came in: meet once more, then tear the process
        group down while the interpreter is whole. Left to interpreter exit, gloo's worker threads
        can abort the process (SIGABRT, "terminate called without an active exception") after a
        run that succeeded. Never after a failed step: there the ranks are not in step, a barrier
        would hang, and the launcher ends the survivors anyway."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    # --- the data-parallel step (called by train_step.dpo_step) --------------------------------

    def wrap(self, model: Any) -> None:
        """DDP-wrap the PEFT model for the policy forward; the reference forward (adapter
        disabled, no grad), saving and generation keep using the unwrapped model."""
        import warnings

        with warnings.catch_warnings():  # torch >= 2.12 renames broadcast_buffers; accelerate still passes it
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            self.policy = self.accelerator.prepare(model)

    def share(self, examples: Sequence[Any]) -> tuple[list[Any], Optional[float]]:
        """(this rank's pairs, the divisor of their summed loss); divisor None = weight 0 (an
        empty slice runs the first pair only so the gradient all-reduce has a partner)."""
        start, stop = shard_bounds(len(examples), self.rank, self.world)
        if start == stop:
            return list(examples[:1]), None
        return list(examples[start:stop]), len(examples) / self.world

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are all-reduced on the last micro-batch only (DDP no_sync before it)."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.policy)

    def backward(self, loss: Any) -> None:
        self.accelerator.backward(loss)

    def gather(self, parts: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """Every rank's log-probs in rank order (= the global batch's order), on the CPU."""
        import torch
        from accelerate.utils import gather_object

        mine = {k: [torch.cat(v).cpu()] if v else [] for k, v in parts.items()}
        everyone = gather_object([mine])
        self._mid_step = False  # the step's last collective: the ranks are in step again
        return {k: [t for rank_parts in everyone for t in rank_parts[k]] for k in parts}


def start_distributed(cfg: TrainConfig) -> Optional[Distributed]:
    """The Accelerator of a multi-process launch, or None for one process (then nothing of
    accelerate runs and `odpo train` is exactly the single-process trainer)."""
    if launched_world_size() <= 1:
        return None
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        log.warning("ignoring accelerate's mixed precision: odpo's --dtype decides the precision")
    # broadcast_buffers=False: the only buffers are constants (rotary tables); their per-forward
    # broadcast would be a collective that ranks with different micro-batch counts never match.
    # cpu=True for a CPU run (also --device auto without a GPU): accelerate forms a CPU (gloo)
    # process group only when told; otherwise every process would think it is alone.
    wanted = _wanted_device(cfg)
    accelerator = Accelerator(cpu=wanted.type == "cpu", mixed_precision="no", kwargs_handlers=[
        DistributedDataParallelKwargs(broadcast_buffers=False), InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)])
    kind = str(accelerator.distributed_type).split(".")[-1]
    if kind in UNSUPPORTED:
        raise DistributedConfigError(f"odpo train runs data parallel (DDP) only; the accelerate config asks for "
                                     f"{kind}: use a multi-GPU/multi-CPU config without it")
    if accelerator.num_processes != launched_world_size():
        raise DistributedConfigError(f"{launched_world_size()} processes were launched but accelerate joined "
                                     f"{accelerator.num_processes} (distributed type {kind}); check the launch")
    if ":" in cfg.device or wanted.type != accelerator.device.type:
        raise DistributedConfigError(f"--device {cfg.device} does not fit this launch (accelerate placed process "
                                     f"{accelerator.device}): use --device auto, or --device cpu")
    log.info("process %d of %d (%s on %s)%s", accelerator.process_index, accelerator.num_processes, kind,
             accelerator.device, "" if accelerator.is_main_process else ": following rank 0, no database")
    return Distributed(accelerator)


def _wanted_device(cfg: TrainConfig) -> Any:
    """The device --device resolves to here. accelerate gives each process its own device, so a
    device with an index (cuda:1) or of another kind than accelerate's is refused by the caller."""
    from odpo.trainer.policy.loading import pick_device_dtype

    try:
        return pick_device_dtype(cfg.device, cfg.dtype)[0]
    except ValueError as exc:
        raise DistributedConfigError(str(exc)) from None


def restore_weights(model: Any, cfg: TrainConfig, path: Optional[Path]) -> Any:
    """Make the live adapter, a new AdamW and the RNG exactly those of a committed version
    (None = a fresh adapter); returns the optimizer. The one way weights are restored, used by
    rank 0 (DPOTrainer) and by every follower, so all ranks hold the same bits afterwards."""
    import torch

    from odpo.trainer.policy import checkpoint as ckpt
    from odpo.trainer.training.step import apply_hyperparameters, make_optimizer

    optimizer = make_optimizer(model, cfg)
    if path is None:
        ckpt.reset_adapter(model, seed=cfg.seed)
        torch.manual_seed(cfg.seed)  # a fresh start draws what the first start drew
        return optimizer
    ckpt.load_adapter_into(model, path)
    ckpt.load_optimizer_state(optimizer, path)
    ckpt.load_rng_state(path)
    apply_hyperparameters(optimizer, cfg)
    return optimizer


@contextlib.contextmanager
def own_dropout_stream(seed: int, step: int, rank: int) -> Iterator[None]:
    """Run a follower's step on a generator of its own (seed, step, rank), leaving the shared
    stream (restored from each version) untouched: see the module docstring."""
    import random

    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(random.Random(f"{seed}:{step}:{rank}").getrandbits(63))
        yield


class Follower:
    """A rank > 0: holds a copy of the policy and does what rank 0's commands say, nothing else."""

    def __init__(self, dist: Distributed, cfg: TrainConfig, *, model_cache_dir: Path) -> None:
        self.dist, self.cfg, self.model_cache_dir = dist, cfg, Path(model_cache_dir)
        self.model: Any = None
        self.tokenizer: Any = None
        self.optimizer: Any = None
        self.steps = 0
        self._autocast: Any = contextlib.nullcontext

    def run(self) -> int:
        """Receive and apply commands until `stop`; returns the steps taken."""
        while True:
            command = self.dist.receive()
            if command.kind == "stop":
                log.info("rank %d: stopping after %d step(s)", self.dist.rank, self.steps)
                self.dist.end()
                return self.steps
            self.apply(command)

    def apply(self, command: Command, *, model: Any = None, tokenizer: Any = None) -> None:
        """Do one command (`model`/`tokenizer`: a plain base for `init`, for tests)."""
        if command.kind == "init":
            self._init(command.lora, model=model, tokenizer=tokenizer)
        elif command.kind == "load":
            self.optimizer = restore_weights(self.model, self.cfg, None if command.path is None else Path(command.path))
        elif command.kind == "step":
            from odpo.trainer.training.step import dpo_step

            with own_dropout_stream(self.cfg.seed, command.step, self.dist.rank):
                dpo_step(model=self.model, tokenizer=self.tokenizer, optimizer=self.optimizer,
                         examples=list(command.examples), cfg=self.cfg, autocast=self._autocast, dist=self.dist)
            self.steps += 1
        elif command.kind != "wait":
            raise ValueError(f"unknown command from rank 0: {command.kind!r}")

    def _init(self, lora: Optional[LoraSettings], *, model: Any, tokenizer: Any) -> None:
        import torch

        from odpo.trainer.policy.loading import autocast_context, load_model_and_tokenizer, pick_device_dtype
        from odpo.trainer.policy.lora import attach_lora

        torch.manual_seed(self.cfg.seed)  # as DPOTrainer.start: the same draws on every rank
        if model is None:
            model, tokenizer = load_model_and_tokenizer(self.cfg.model_config(self.model_cache_dir))
        device, _, autocast_dtype = pick_device_dtype(self.cfg.device, self.cfg.dtype)
        self._autocast = lambda: autocast_context(device, autocast_dtype)
        self.model, self.tokenizer = attach_lora(model, lora or self.cfg.lora), tokenizer
        self.dist.wrap(self.model)


@contextlib.contextmanager
def leading(dist: Optional[Distributed]) -> Iterator[None]:
    """Rank 0's whole run: however it ends, the followers are released (`Distributed.finish`)."""
    try:
        yield
    finally:
        if dist is not None:
            dist.finish()


def lead(dist: Optional[Distributed], model: Any, lora: LoraSettings) -> None:
    """Rank 0, once the adapter is attached: let the followers load and attach theirs, then wrap
    the policy for DDP on every rank together (no-op in a single process)."""
    if dist is None:
        return
    dist.send(Command("init", lora=lora))
    dist.wrap(model)


def mirror_load(dist: Optional[Distributed], path: Optional[Path]) -> None:
    """Rank 0 is about to restore `path` (None = fresh): the followers restore it too."""
    if dist is not None:
        dist.send(Command("load", path=None if path is None else str(path)))


def mirror_step(dist: Optional[Distributed], examples: Sequence[Any], *, step: int) -> None:
    """Rank 0 is about to take step `step` on `examples`: the followers step on the same batch."""
    if dist is not None:
        dist.send(Command("step", examples=tuple(examples), step=step))


def heartbeat(dist: Optional[Distributed]) -> None:
    """Rank 0 idles one poll: the followers hear from it instead of timing out."""
    if dist is not None:
        dist.send(Command("wait"))
