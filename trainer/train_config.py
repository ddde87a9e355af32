"""What `odpo train` trains with: one validated dataclass, so a bad flag fails before a model loads.

The LoRA shape (rank, alpha, targets) given here only applies to a *fresh* adapter (version 0).
Once a version exists, its own adapter_config.json is the truth and the trainer resumes with it,
so the sampler, eval and trainer can never disagree about what an adapter looks like.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from odpo.db.errors import OdpoError
from odpo.trainer.batching import LENGTH_CUT_MODES, MAX_PROMPT_TOKENS
from odpo.trainer.dpo import LOSS_TYPES, SIMPO_DEFAULT_GAMMA, default_beta
from odpo.trainer.lora import LoraSettings
from odpo.trainer.models import DEFAULT_SPEC, ModelConfig

# AdamW learning rate for the LoRA weights (r=16, all-linear), measured on SmolLM2-135M with the
# sigmoid loss, beta 0.1, batch 8, a fixed synthetic preference ("the shorter answer wins"), 10 steps,
# then 16 held-out pairs:   lr    held-out loss  margin  seq-KL to ref  train acc 1.0 from step
#                           5e-5      0.46        0.55       -5            7
#                           1e-4      0.14        1.95      -19            3 (steady from 5)
#                           2e-4      0.003       6.3       -58            3
#                           5e-4      0.000      22.9      -200            2 (loss 0 by step 7: collapse)
# 1e-4 learns the preference as early as 2e-4 with a third of the drift; online labels arrive slowly
# and noisily, so the default stays at the careful end of the usual LoRA range (1e-4..5e-4).
DEFAULT_LR = 1e-4
SOURCES = ("human", "judge", "all", "dataset")  # "dataset": imported files, only with mode "offline"
# online: stream labels as they come (a version every save_every steps); iterative: rounds of
# round_labels labels of the serving version, one version per round; offline: an imported dataset.
# The modes themselves are trainer/modes.py.
MODES = ("online", "iterative", "offline")
# Pairs with a completion cut at max_new_tokens: "keep" trains them as cut (no EOS: the model did
# not stop there), "drop" leaves them out. Keep, measured on SmolLM2-135M, 2 loaded CPU cores:
# - starter prompts, 48 prompts x 2 samples, temperature 0.9, top_p 0.95: 56% of samples are cut at
#   max_new_tokens 96 (serve's default), 69% at 64; a pair holds a cut answer in 69% / 79% of cases,
#   so "drop" throws most labels away, and with them the finished-vs-unfinished contrast people judge.
# - the learn bench's online arm (quick: 96 labels, 64 tokens, rule:finished_and_short, seed 0), win
#   rate vs the base on 32 held-out prompts: keep 1.00 [0.89, 1.00] after 11 steps; drop 0.73
#   [0.56, 0.86] after 2 steps (80 of 96 labels left out).
DEFAULT_LENGTH_CUT = "keep"
# Comparisons a person needs on a basis (gold / people / judges) before their agreement can exclude
# them: at 20, one unlucky disagreement moves the rate by 5 points, not 50.
DEFAULT_AGREEMENT_MIN_N = 20


class TrainConfigError(OdpoError, ValueError):
    """A training option out of range; the message names the option and what it accepts."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters and loop limits of one `odpo train` process.

    `batch_size` pairs make one optimizer step; `grad_accum` splits them into that many
    micro-batches (same update, less activation memory). `save_every` steps make one version.
    `max_steps` counts steps of this process; `until_version` exits once that version is committed.
    """

    model: str = DEFAULT_SPEC
    run: str = "default"
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = DEFAULT_LR
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    beta: Optional[float] = None  # None: the loss's own default (trainer.dpo.default_beta)
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: Optional[float] = None  # SimPO's target margin; None: SIMPO_DEFAULT_GAMMA with simpo
    max_staleness_train: Optional[int] = None
    save_every: int = 1
    max_prompt_tokens: int = MAX_PROMPT_TOKENS  # the sampler's rule too (trainer.batching.cut_prompt)
    max_completion_tokens: int = 256
    length_cut: str = DEFAULT_LENGTH_CUT
    shared_prompt: bool = True  # one pass over a pair's prompt for both answers (trainer/shared_prompt.py)
    sources: Optional[str] = None  # None: "dataset" with mode offline, else "all"
    poll_seconds: float = 2.0
    max_steps: Optional[int] = None
    until_version: Optional[int] = None
    exit_when_idle: Optional[float] = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    load_in_4bit: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)
    eval_every: int = 0  # evaluate every K-th committed version against the base (0 = never)
    eval_judge: Optional[str] = None
    eval_n: int = 32
    eval_max_new_tokens: int = 128
    mode: str = "online"
    round_labels: Optional[int] = None  # iterative: labels per round (each round makes one version)
    epochs: int = 1  # iterative: passes over a round's labels; offline: over the dataset's labels
    # Leave out the labels of people whose agreement (gold, else other people, else judges, the first
    # with >= agreement_min_n comparisons) is below this; None = off (db/store/quality.py).
    min_labeler_agreement: Optional[float] = None
    agreement_min_n: int = DEFAULT_AGREEMENT_MIN_N

    def __post_init__(self) -> None:
        # Defaults that depend on the loss are filled in here, so every reader sees plain numbers.
        # (dataclasses.replace() passes the resolved beta on: give beta anew when changing loss.)
        if self.beta is None:
            object.__setattr__(self, "beta", default_beta(self.loss_type))
        if self.simpo_gamma is None and self.loss_type == "simpo":
            object.__setattr__(self, "simpo_gamma", SIMPO_DEFAULT_GAMMA)
        if self.sources is None:
            object.__setattr__(self, "sources", "dataset" if self.mode == "offline" else "all")
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
            (_finite(self.beta) and self.beta > 0, f"beta must be > 0, got {self.beta!r}"),
            (self.loss_type in LOSS_TYPES, f"loss_type must be one of {', '.join(LOSS_TYPES)}, "
                                           f"got {self.loss_type!r}"),
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

    def model_config(self, cache_dir: Path) -> ModelConfig:
        """The ModelConfig to load the policy with; ModelConfig's own errors become ours."""
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
