"""Every option odpo's processes take, their defaults and allowed values: one torch-free home.

Why one module without torch: the command line (`odpo --help` must answer in a blink), the web app
(it holds no model) and the trainer all need the same facts: the default model, the sampling
defaults, the loss names, the training modes, the label sources, the limits. Written once here,
each config dataclass declares its fields with `option(...)`, and `odpo.app.cli.flags` turns
those fields into click options and back into a child's command line, so nothing is copied.

`Flag` is the command-line face of one field: its help text, flag names and allowed range. It is
plain data, so this module needs neither click nor torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from odpo.db.vocabulary import (
    CLAIM_TIMEOUT_S,  # noqa: F401 - re-exported: the ledger owns this fact
    LABEL_SOURCES,
)

# -- the model ----------------------------------------------------------------------------------
DEFAULT_MODEL = "smollm2-135m"  # the bundled SmolLM2-135M-Instruct GGUF (trainer/policy/loading.py)
MODEL_HELP = "Base model: smollm2-135m (bundled), a checkpoint dir, a .gguf file or a hub id."
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps."
LOAD_IN_4BIT_HELP = "QLoRA: the base model's linear layers in 4-bit NF4 (bitsandbytes; CUDA and CPU)."

# -- prompts --------------------------------------------------------------------------------------
MAX_PROMPT_CHARS = 8000  # an imported or typed prompt longer than this is refused
MAX_PROMPT_TOKENS = 256  # a prompt keeps its last this many tokens, in sampling and training alike

# -- sampling -------------------------------------------------------------------------------------
DEFAULT_TEMPERATURE = 0.9
DEFAULT_TOP_P = 0.95
DEFAULT_MAX_NEW_TOKENS = 96
# `odpo eval` and the learn bench: cooler than sampling for labels, and long enough to finish
EVAL_TEMPERATURE = 0.7
EVAL_TOP_P = 0.95
EVAL_MAX_NEW_TOKENS = 128
SAMPLER_BACKENDS = ("hf", "vllm")
VLLM_PORT = 8000  # `odpo vllm-serve` and the server `odpo up --sampler vllm` starts (vLLM's own default)
# How the sampler picks the pair a person sees from a prompt's candidates (trainer/sampling/selection.py)
SELECTORS = ("random", "margin", "uncertain", "diverse", "judge-uncertain")
SCORING_SELECTORS = ("margin", "uncertain")  # rank candidates by the policy's implicit reward
AUTO_LABEL_SURENESS = 0.9  # --auto-label-confident: the judge labels a pair it is at least this sure of
KV_CACHES = ("dynamic", "static")
# Background work (sampler, trainer, judge) runs at this nice increment: CFS weight ~1/10 of a nice-0
# thread, so votes are answered first on a busy CPU (trainer/priority.py has the measurement).
BACKGROUND_NICE = 10

# -- the web app --------------------------------------------------------------------------------
DEFAULT_SESSION_HOURS = 12.0  # a sign-in session ends after this long (a stolen cookie stops working)

# -- labeling: CLAIM_TIMEOUT_S, how long a claimed pair stays with its labeler, is the ledger's own
# fact (db/vocabulary.py), imported above.
# -- losses ---------------------------------------------------------------------------------------
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "apo_zero", "simpo")
DEFAULT_BETA = 0.1
_DEFAULT_BETAS = {"simpo": 2.0}  # SimPO's beta scales a length-normalised log-prob, not a log-ratio
SIMPO_DEFAULT_GAMMA = 1.0


def default_beta(loss_type: str) -> float:
    """The beta a loss uses when none is given: 0.1 for the DPO family, 2.0 for SimPO. Their scales
    differ by an order of magnitude: DPO's beta multiplies a summed log-ratio, SimPO's a per-token
    average log-prob (the SimPO paper tunes it in 2.0..10)."""
    return _DEFAULT_BETAS.get(loss_type, DEFAULT_BETA)


# -- training -------------------------------------------------------------------------------------
DEFAULT_LR = 1e-4  # measured: trainer/training/train_config.py explains the choice
# online: stream labels as they come; iterative: rounds of the serving version's labels; offline: an
# imported dataset (trainer/training/modes.py).
MODES = ("online", "iterative", "offline")
# Optimizer updates on each batch of labels where labels are scarce (online, iterative): a second
# pass beat one on every rule of the learn bench (trainer/training/train_config.py). --mode offline
# keeps 1: its --epochs already repeat an imported dataset, as TRL's one update per batch does.
DEFAULT_PASSES = 2
SOURCES = LABEL_SOURCES  # human, judge, all, dataset: the ledger's words (db/vocabulary.py)
LENGTH_CUT_MODES = ("keep", "drop")
DEFAULT_LENGTH_CUT = "keep"
# Comparisons a person needs on a basis (gold / people / judges) before their agreement can exclude
# them: at 20, one unlucky disagreement moves the rate by 5 points, not 50.
DEFAULT_AGREEMENT_MIN_N = 20

# -- the command-line face of a field ------------------------------------------------------------
OPTION_KEY = "odpo.option"
SAME = object()  # Flag.cli_default: the field's own default


@dataclass(frozen=True)
class Flag:
    """How one config field appears on the command line. `kind` is int, float, str or bool (derived
    from the default when that is not None); `choices` or a `min`/`max` range make click check it;
    `parse` turns the typed text into the field's value and `render` back (lists given as "a,b")."""

    help: str
    names: tuple[str, ...] = ()  # default: --field-name
    secondary: Optional[str] = None  # an on/off pair: "--no-shared-prompt"
    kind: Optional[type] = None
    choices: Optional[tuple[str, ...]] = None
    min: Optional[float] = None
    max: Optional[float] = None
    min_open: bool = False
    max_open: bool = False
    metavar: Optional[str] = None
    cli_default: Any = SAME  # what click shows and passes when the flag is absent (None: "resolved later")
    show_default: bool = True
    multiple: bool = False
    parse: Optional[Callable[[Any], Any]] = None
    render: Optional[Callable[[Any], str]] = None


def option(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
           **flag: Any) -> Any:
    """A dataclass field that is also a command-line option (see Flag for the keywords)."""
    return field(default=default, default_factory=default_factory, metadata={OPTION_KEY: Flag(help=help, **flag)})


def nested(factory: Callable[[], Any]) -> Any:
    """A field holding another config dataclass whose own options appear flat (e.g. --lora-r)."""
    return field(default_factory=factory, metadata={OPTION_KEY: "nested"})


def comma_list(text: Any) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c'): how list options are typed."""
    if isinstance(text, (tuple, list)):
        return tuple(text)
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def join_list(value: Any) -> str:
    return value if isinstance(value, str) else ",".join(value)


# -- two small configs shared by the sampler, the trainer and the CLI --------------------------------
TargetModules = Union[str, tuple[str, ...]]


def _targets(text: Any) -> TargetModules:
    text = text.strip() if isinstance(text, str) else text
    return text if text == "all-linear" else comma_list(text)


def _alpha(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters of a fresh adapter. target_modules="all-linear" adapts every linear
    layer but lm_head, which is what QLoRA found necessary to match full fine-tuning."""

    r: int = option(16, names=("--lora-r",), min=1, help="LoRA rank of a fresh adapter (an existing version "
                                                           "keeps its own).")
    alpha: Union[int, float] = option(32, names=("--lora-alpha",), kind=float, min=0, min_open=True, parse=_alpha,
                                      help="LoRA alpha of a fresh adapter (its update is scaled by alpha / r).")
    dropout: float = option(0.05, names=("--lora-dropout",), min=0, max=1, max_open=True,
                             help="Dropout on the LoRA input while training.")
    target_modules: TargetModules = option("all-linear", names=("--lora-targets",), parse=_targets,
                                           render=join_list,
                                           help="'all-linear' or comma-separated module names, e.g. q_proj,v_proj.")

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, list):
            targets = tuple(targets)
            object.__setattr__(self, "target_modules", targets)
        ok = bool(targets.strip()) if isinstance(targets, str) else bool(targets) and all(
            isinstance(t, str) and t for t in targets)
        if not ok:
            raise ValueError(
                f"target_modules must be 'all-linear' or a non-empty list of module names, got {targets!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 means greedy decoding (tests, eval); pairs need > 0.

    top_k is deliberately not a knob: on-policy DPO wants samples from the policy's own
    distribution, so only the nucleus (top_p) truncates it, and transformers' default top_k=50 is
    switched off. `max_prompt_tokens` is the prompt-length rule shared with training (a prompt
    keeps its last that many tokens, `trainer.policy.batching.cut_prompt`): a completion is sampled
    in exactly the context it is trained in.
    """

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: Optional[int] = None
    max_prompt_tokens: int = MAX_PROMPT_TOKENS

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.max_prompt_tokens < 1:
            raise ValueError("max_prompt_tokens must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_dict(self) -> dict[str, Any]:
        """What a stored sample records about how it was drawn."""
        return dataclasses.asdict(self)
