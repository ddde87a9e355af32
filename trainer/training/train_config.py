"""What `odpo train` trains with: one validated dataclass, so a bad flag fails before a model loads.

Torch-free (its facts come from trainer/options.py), so the command line builds its options from
these fields (`odpo.app.cli.flags`) instead of copying them. The LoRA shape (rank, alpha,
targets) given here only applies to a *fresh* adapter (version 0): once a version exists, its own
adapter_config.json is the truth and the trainer resumes with it, so the sampler, eval and trainer
can never disagree about what an adapter looks like.

The default learning rate, measured: AdamW on the LoRA weights (r=16, all-linear) of SmolLM2-135M,
sigmoid loss, beta 0.1, batch 8, a fixed synthetic preference ("the shorter answer wins"), 10 steps,
then 16 held-out pairs:   lr    held-out loss  margin  seq-KL to ref  train acc 1.0 from step
                          5e-5      0.46        0.55       -5            7
                          1e-4      0.14        1.95      -19            3 (steady from 5)
                          2e-4      0.003       6.3       -58            3
                          5e-4      0.000      22.9      -200            2 (loss 0 by step 7: collapse)
1e-4 learns the preference as early as 2e-4 with a third of the drift; online labels arrive slowly
and noisily, so the default stays at the careful end of the usual LoRA range (1e-4..5e-4).

`length_cut` "keep" (the default), measured on SmolLM2-135M: with the starter prompts, 56 % of
samples are cut at max_new_tokens 96 (69 % at 64) and a pair holds a cut answer in 69 % / 79 % of
cases, so "drop" throws most labels away; the learn bench's online arm (96 labels, 64 tokens,
rule:finished_and_short) reached 1.00 [0.89, 1.00] vs the base with keep, 0.73 [0.56, 0.86] with drop.

`passes` 2 by default, measured: in the learn bench (SmolLM2-135M, DPO, lr 5e-4, 200 labels of a rule
judge, three seeds each, docs/benchmarks.md) the online arm with two updates per batch beat the same
arm with one, head to head at 200 labels: finished_and_short 0.67 [0.60, 0.73], on_topic 0.58 [0.52,
0.63], say_the_early 0.64 [0.60, 0.67]. Labels from people are the scarce thing, a step is not.
--mode offline keeps 1: an imported dataset is large, and --epochs already repeat it.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from odpo.db.errors import OdpoError
from odpo.trainer.options import (
    DEFAULT_AGREEMENT_MIN_N,
    DEFAULT_LENGTH_CUT,
    DEFAULT_LR,
    DEFAULT_MODEL,
    DEFAULT_PASSES,
    DEVICE_HELP,
    LENGTH_CUT_MODES,
    LOSS_TYPES,
    MAX_PROMPT_TOKENS,
    MODEL_HELP,
    MODES,
    SIMPO_DEFAULT_GAMMA,
    SOURCES,
    LoraSettings,
    default_beta,
    nested,
    option,
)
from odpo.trainer.training.tracking import LOGGING_DIR_HELP, REPORT_TO_HELP, valid_report_to

# The sources a user picks; "dataset" follows from --mode offline.
TRAIN_SOURCES = tuple(s for s in SOURCES if s != "dataset")


class TrainConfigError(OdpoError, ValueError):
    """A training option out of range; the message names the option and what it accepts."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters and loop limits of one `odpo train` process.

    `batch_size` pairs make one optimizer step; `grad_accum` splits them into that many
    micro-batches (same update, less activation memory). `save_every` steps make one version.
    `max_steps` counts steps of this process; `until_version` exits once that version is committed.
    """

    model: str = option(DEFAULT_MODEL, help=MODEL_HELP)
    run: str = option("default", help="Run name: adapters go to runs/<run>/adapters.")
    batch_size: int = option(8, min=1, help="Pairs per optimizer step.")
    grad_accum: int = option(1, min=1, help="Split each batch into this many micro-batches (same update, less "
                                            "memory).")
    lr: float = option(DEFAULT_LR, min=0, min_open=True, cli_default=None,
                       help="AdamW learning rate of the LoRA weights. [default: 1e-4]")
    weight_decay: float = 0.0
    # None: the loss's own default (options.default_beta), filled in by __post_init__
    beta: Optional[float] = option(None, kind=float, min=0, min_open=True,
                                   help="DPO beta: strength of the pull towards the reference (base) model; for "
                                        "simpo, the scale of the length-normalised reward. [default: 0.1; 2.0 "
                                        "with --loss simpo]")
    loss_type: str = option("sigmoid", names=("--loss",), choices=LOSS_TYPES,
                            help="sigmoid (DPO), ipo, hinge, robust (rDPO), apo_zero (anchored: chosen up, rejected "
                                 "down) or simpo (reference-free: no reference forward pass, a faster step).")
    simpo_gamma: Optional[float] = option(None, kind=float, min=0,
                                          help="SimPO target reward margin gamma (absolute, as TRL's simpo_gamma; "
                                               "keep gamma/beta near 0.5). Only with --loss simpo. [default: 1.0]")
    label_smoothing: float = option(0.0, min=0, max=0.5, max_open=True,
                                    help="Assumed label-flip rate (sigmoid = cDPO, robust = rDPO).")
    max_staleness_train: Optional[int] = option(None, names=("--max-staleness",), kind=int, min=0,
                                                help="Skip labels of pairs sampled more than this many versions "
                                                     "ago. [default: no limit]")
    passes: Optional[int] = option(None, kind=int, min=1, max=8,
                                   help="Optimizer updates on each batch of fresh labels (a second pass over the "
                                        "newest labels; the ledger still records each label once, for the version "
                                        "its step made). [default: 2; 1 with --mode offline, whose --epochs "
                                        "repeat the dataset]")
    save_every: int = option(1, min=1, help="Commit a new adapter version every N steps (online and offline; a "
                                            "round of --mode iterative is always one version).")
    max_prompt_tokens: int = option(MAX_PROMPT_TOKENS, min=1,
                                    help="A prompt keeps its last this many tokens (the sampler's rule too).")
    max_completion_tokens: int = option(256, min=1, help="A completion is scored on its first this many tokens.")
    shared_prompt: bool = option(True, secondary="--no-shared-prompt",
                                 help="Run each pair's prompt through the model once for both answers (same loss "
                                      "and gradient up to rounding, a faster step); --no-shared-prompt scores "
                                      "prompt+answer rows as TRL does.")
    length_cut: str = option(DEFAULT_LENGTH_CUT, choices=LENGTH_CUT_MODES,
                             help="Pairs with an answer cut at the sampler's max_new_tokens: keep trains them as cut "
                                  "(no end-of-text token: the model did not stop there), drop leaves them out.")
    sources: Optional[str] = option(None, choices=TRAIN_SOURCES,
                                    help="Which labels to learn from (a person's label of a pair always overrides a "
                                         "judge's); imported datasets are trained only by --mode offline. "
                                         "[default: all]")
    mode: str = option("online", choices=MODES,
                       help="online: train labels as they come. iterative: rounds of --round-labels labels of the "
                            "serving version, one new version per round. offline: the datasets `odpo import "
                            "dataset` stored, then exit.")
    round_labels: Optional[int] = option(None, kind=int, min=1, metavar="N",
                                         help="--mode iterative: labels of pairs sampled from the serving version "
                                              "that make a round.")
    epochs: int = option(1, names=("--epochs", "--round-epochs"), min=1,
                         help="--mode iterative: passes over each round's labels; --mode offline: over the dataset.")
    # Leave out the labels of people whose agreement (gold, else other people, else judges, the first
    # with >= agreement_min_n comparisons) is below this; None = off (db/store/quality.py).
    min_labeler_agreement: Optional[float] = option(
        None, kind=float, min=0, max=1, metavar="R",
        help="Do not train on the labels of people whose agreement is below R (0..1): with gold answers if they "
             "have >= --agreement-min-n gold comparisons, else with other people, else with judges; people with "
             "fewer comparisons on every basis are kept. Left-out labels stay unused (a lower R later trains "
             "them). Only a/b labels are compared. [default: off]")
    agreement_min_n: int = option(DEFAULT_AGREEMENT_MIN_N, min=1, metavar="N",
                                  help="Comparisons a person needs on a basis before --min-labeler-agreement judges "
                                       "them on it.")
    poll_seconds: float = option(2.0, min=0, min_open=True, help="Seconds between looks for new labels.")
    max_grad_norm: Optional[float] = option(1.0, min=0, min_open=True, help="Clip the LoRA gradient to this L2 norm.")
    max_steps: Optional[int] = option(None, kind=int, min=1,
                                      help="Exit after this many steps of this process (pending steps are "
                                           "committed).")
    until_version: Optional[int] = option(None, kind=int, min=1, help="Exit once this version is committed.")
    exit_when_idle: Optional[float] = option(None, kind=float, min=0, metavar="SECONDS",
                                             help="Exit after this long without a step (no labels, or paused).")
    seed: int = option(0, help="Seed of the LoRA initialisation, dropout and batch order.")
    device: str = option("auto", help=DEVICE_HELP)
    dtype: str = option("auto", help="auto (bf16 on GPU, bf16 autocast on capable CPUs), fp32, bf16 or fp16.")
    load_in_4bit: bool = option(False, help="QLoRA: train the LoRA on a base whose linear layers are 4-bit NF4 "
                                            "(bitsandbytes; CUDA and CPU).")
    lora: LoraSettings = nested(LoraSettings)
    eval_every: int = option(0, min=0, metavar="K",
                             help="Every K-th committed version, its win rate against the base on held-out prompts "
                                  "(needs --eval-judge; the dashboard plots it). 0 = off.")
    eval_judge: Optional[str] = option(None, kind=str, metavar="SPEC",
                                       help="Judge spec for --eval-every, e.g. hf:smollm2-135m.")
    eval_n: int = option(32, min=1, help="Held-out prompts per auto-eval.")
    eval_max_new_tokens: int = option(128, min=1, help="Answer length in auto-evals (as `odpo eval "
                                                       "--max-new-tokens`).")
    # Copies of the metrics for TensorBoard / W&B / trackio (trainer/training/tracking.py); not hyperparameters.
    report_to: Optional[str] = option(None, kind=str, metavar="LIST", help=REPORT_TO_HELP)
    logging_dir: Optional[str] = option(None, kind=str, metavar="DIR", help=LOGGING_DIR_HELP)

    def __post_init__(self) -> None:
        # Defaults that depend on the loss are filled in here, so every reader sees plain numbers.
        # (dataclasses.replace() passes the resolved beta on: give beta anew when changing loss.)
        if self.beta is None and self.loss_type in LOSS_TYPES:
            object.__setattr__(self, "beta", default_beta(self.loss_type))
        if self.simpo_gamma is None and self.loss_type == "simpo":
            object.__setattr__(self, "simpo_gamma", SIMPO_DEFAULT_GAMMA)
        if self.sources is None:
            object.__setattr__(self, "sources", "dataset" if self.mode == "offline" else "all")
        if self.passes is None:
            object.__setattr__(self, "passes", 1 if self.mode == "offline" else DEFAULT_PASSES)
        for ok, message in self._checks() + self._mode_checks():
            if not ok:
                raise TrainConfigError(message)

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            (bool(self.model.strip()), "model must be a non-empty spec"),
            (_is_run_name(self.run), f"run must be letters, digits, '-', '_' or '.', got {self.run!r}"),
            (_pos_int(self.batch_size), f"batch_size must be an integer >= 1, got {self.batch_size!r}"),
            (_pos_int(self.grad_accum) and self.grad_accum <= self.batch_size,
             f"grad_accum must be an integer in 1..batch_size ({self.batch_size}), got {self.grad_accum!r}"),
            (_finite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr!r}"),
            (_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.max_grad_norm is None or (_finite(self.max_grad_norm) and self.max_grad_norm > 0),
             "max_grad_norm must be > 0 (or None for no clipping)"),
            (self.loss_type in LOSS_TYPES, f"loss_type must be one of {', '.join(LOSS_TYPES)}, "
                                           f"got {self.loss_type!r}"),
            (_finite(self.beta) and self.beta > 0, f"beta must be > 0, got {self.beta!r}"),
            (_finite(self.label_smoothing) and 0 <= self.label_smoothing < 0.5,
             "label_smoothing must be in [0, 0.5)"),
            (self.label_smoothing == 0 or self.loss_type in ("sigmoid", "robust"),
             "label_smoothing only applies to the sigmoid and robust losses"),
            (self.simpo_gamma is None or (_finite(self.simpo_gamma) and self.simpo_gamma >= 0),
             f"simpo_gamma must be >= 0, got {self.simpo_gamma!r}"),
            (self.simpo_gamma is None or self.loss_type == "simpo", "simpo_gamma only applies to the simpo loss"),
            (self.max_staleness_train is None or _nonneg_int(self.max_staleness_train),
             "max_staleness_train must be an integer >= 0 (or None for no limit)"),
            (_pos_int(self.save_every), "save_every must be an integer >= 1"),
            (_pos_int(self.passes) and self.passes <= 8, f"passes must be an integer in [1, 8], got {self.passes!r}"),
            (_pos_int(self.max_prompt_tokens), "max_prompt_tokens must be an integer >= 1"),
            (_pos_int(self.max_completion_tokens), "max_completion_tokens must be an integer >= 1"),
            (self.length_cut in LENGTH_CUT_MODES,
             f"length_cut must be one of {', '.join(LENGTH_CUT_MODES)}, got {self.length_cut!r}"),
            (self.sources in SOURCES, f"sources must be one of {', '.join(SOURCES)}, got {self.sources!r}"),
            (_finite(self.poll_seconds) and self.poll_seconds > 0, "poll_seconds must be > 0"),
            (self.max_steps is None or _pos_int(self.max_steps), "max_steps must be an integer >= 1"),
            (self.until_version is None or _pos_int(self.until_version), "until_version must be an integer >= 1"),
            (self.exit_when_idle is None or (_finite(self.exit_when_idle) and self.exit_when_idle >= 0),
             "exit_when_idle must be >= 0 seconds"),
            (isinstance(self.lora, LoraSettings), "lora must be a LoraSettings"),
            (_nonneg_int(self.eval_every), "eval_every must be an integer >= 0 (0 = no automatic evals)"),
            (self.eval_every == 0 or bool(self.eval_judge and self.eval_judge.strip()),
             "eval_every needs eval_judge: the judge spec that decides the win rate"),
            (_pos_int(self.eval_n), "eval_n must be an integer >= 1"),
            (_pos_int(self.eval_max_new_tokens), "eval_max_new_tokens must be an integer >= 1"),
            (valid_report_to(self.report_to), f"report_to must be tensorboard, wandb or trackio (comma-separated), "
                                              f"all or none, got {self.report_to!r}"),
            (self.min_labeler_agreement is None or (_finite(self.min_labeler_agreement)
                                                   and 0 <= self.min_labeler_agreement <= 1),
             f"min_labeler_agreement must be in [0, 1] (or None for off), got {self.min_labeler_agreement!r}"),
            (_pos_int(self.agreement_min_n), f"agreement_min_n must be an integer >= 1, got {self.agreement_min_n!r}"),
        ]

    def _mode_checks(self) -> list[tuple[bool, str]]:
        """Flags that contradict the mode are refused rather than silently ignored."""
        mode = self.mode
        return [
            (mode in MODES, f"mode must be one of {', '.join(MODES)}, got {mode!r}"),
            (mode != "iterative" or _pos_int(self.round_labels),
             "mode iterative needs round_labels: an integer >= 1 (labels per round)"),
            (mode == "iterative" or self.round_labels is None, "round_labels only applies to mode iterative"),
            (_pos_int(self.epochs), f"epochs must be an integer >= 1, got {self.epochs!r}"),
            (mode != "online" or self.epochs == 1, "epochs only applies to mode iterative or offline"),
            (mode != "iterative" or self.save_every == 1,
             "save_every does not apply to mode iterative: each round commits exactly one version"),
            (mode != "iterative" or self.max_steps is None,
             "max_steps does not apply to mode iterative (a round is never cut short); use until_version"),
            ((mode == "offline") == (self.sources == "dataset"),
             "mode offline trains on imported datasets only (sources 'dataset')" if mode == "offline" else
             "sources 'dataset' (imported datasets) needs mode offline"),
            (mode != "offline" or self.max_staleness_train is None,
             "max_staleness_train does not apply to mode offline: imported pairs were sampled by no version"),
            (mode != "offline" or self.min_labeler_agreement is None,
             "min_labeler_agreement does not apply to mode offline: imported labels have no labeler here"),
        ]

    def model_config(self, cache_dir: Path) -> Any:
        """The ModelConfig to load the policy with; ModelConfig's own errors become ours."""
        from odpo.trainer.policy.loading import ModelConfig

        try:
            return ModelConfig(spec=self.model, cache_dir=cache_dir, device=self.device, dtype=self.dtype,
                               load_in_4bit=self.load_in_4bit)
        except ValueError as exc:
            raise TrainConfigError(str(exc)) from None

    def hyperparameters(self) -> dict[str, Any]:
        """The options that shape an update (not loop limits): saved with every version."""
        keys = ("model", "batch_size", "grad_accum", "lr", "weight_decay", "max_grad_norm", "beta", "loss_type",
                "label_smoothing", "max_staleness_train", "max_prompt_tokens", "max_completion_tokens",
                "sources", "seed")
        out = {k: getattr(self, k) for k in keys}
        out.update(self.loss_options())  # only when set, so older runs keep their hash
        if self.passes != 1:  # only when set, so older runs keep their hash
            out["passes"] = self.passes
        if self.length_cut != DEFAULT_LENGTH_CUT:
            out["length_cut"] = self.length_cut
        if self.min_labeler_agreement is not None:  # only when set, so older runs keep their hash
            out.update(min_labeler_agreement=self.min_labeler_agreement, agreement_min_n=self.agreement_min_n)
        if self.mode != "online":  # only when set, so online runs keep their hash
            out.update(mode=self.mode, epochs=self.epochs)
            if self.round_labels is not None:
                out["round_labels"] = self.round_labels
        lora = asdict(self.lora)
        lora["target_modules"] = (lora["target_modules"] if isinstance(lora["target_modules"], str)
                                  else list(lora["target_modules"]))
        out["lora"] = lora
        return out

    def loss_options(self) -> dict[str, float]:
        """Extra keyword arguments of `dpo_loss` that only some losses take."""
        return {} if self.simpo_gamma is None else {"simpo_gamma": self.simpo_gamma}

    def hyperparameter_hash(self) -> str:
        blob = json.dumps(self.hyperparameters(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _pos_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _nonneg_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_run_name(run: Any) -> bool:
    """Run names become directory names under runs/: keep them to a safe alphabet."""
    return (isinstance(run, str) and 0 < len(run) <= 100 and run not in (".", "..")
            and all(c.isalnum() or c in "-_." for c in run))
