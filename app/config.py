"""Settings of the app's processes: CommonConfig (where the data lives, which database) that every
odpo process shares, SampleConfig for `odpo sample` and ServeConfig for `odpo serve`.

The fields are declared with `odpo.trainer.options.option`: their help text and range are the
command line's too (odpo.app.cli.flags builds the click options from them). This is the only
place the data-directory layout is spelled out.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from odpo.db.engine import Database
from odpo.db.settings import masked_url, private_dir, resolve_data_dir, resolve_db_url
from odpo.trainer.options import (
    BACKGROUND_NICE,
    CLAIM_TIMEOUT_S,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_SESSION_HOURS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    DEVICE_HELP,
    KV_CACHES,
    LOAD_IN_4BIT_HELP,
    MODEL_HELP,
    SAMPLER_BACKENDS,
    SELECTORS,
    comma_list,
    join_list,
    option,
)

# The fields a sampler shares with the trainer: `odpo up` gives both the same model and run.
MODEL_FIELDS = ("model", "run", "device", "dtype", "load_in_4bit", "seed")


@dataclass(frozen=True)
class CommonConfig:
    data_dir: Path
    db_url: str

    @classmethod
    def resolve(cls, *, data_dir: Optional[str] = None, db_url: Optional[str] = None) -> "CommonConfig":
        root = resolve_data_dir(data_dir)
        return cls(data_dir=root, db_url=resolve_db_url(db_url, data_dir=root))

    @property
    def model_cache_dir(self) -> Path:
        return self.data_dir / "models"

    def run_dir(self, run: str = "default") -> Path:
        return self.data_dir / "runs" / run

    def adapters_dir(self, run: str = "default") -> Path:
        return self.run_dir(run) / "adapters"

    def open_db(self) -> Database:
        """Open (and migrate) the database; raises db.engine.DatabaseError with a readable line.
        The data directory is made private first (0700): labels, adapters and accounts live there."""
        private_dir(self.data_dir)
        return Database(self.db_url)

    @property
    def shown_db_url(self) -> str:
        """The database URL as printed and logged: its password masked."""
        return masked_url(self.db_url)


@dataclass
class SampleConfig:
    """`odpo sample`: one sampler worker (model, sampling, hot reload). Any number can run, on any
    host that reaches the database and the adapter directories. `odpo serve --inline-sampler`
    runs the same sampler as a thread of the web server (ServeConfig extends this)."""

    model: str = option(DEFAULT_MODEL, help=MODEL_HELP)
    run: str = option("default", help="Run name (runs/<run>/adapters).")
    device: str = option("auto", help=DEVICE_HELP)  # as in trainer.policy.loading.pick_device_dtype
    dtype: str = option("auto", help="auto, fp32, bf16 or fp16.")
    load_in_4bit: bool = option(False, help=LOAD_IN_4BIT_HELP)
    seed: int = option(0, help="Seed of the sampling draws (each batch records its own).")
    queue_size: int = option(8, min=1, help="Unlabeled pairs kept ready; sampling pauses when the queue is full.")
    # measured: 8 prompts x 2 = 1.3-1.4x the pairs/min of 4 on CPU (docs/benchmarks.md)
    prompts_per_batch: int = option(8, min=1, help="Prompts per generate call (x2 samples each).")
    temperature: float = option(DEFAULT_TEMPERATURE, min=0, min_open=True, help="Sampling temperature.")
    top_p: float = option(DEFAULT_TOP_P, min=0, max=1, min_open=True, help="Nucleus (top-p) sampling.")
    max_new_tokens: int = option(DEFAULT_MAX_NEW_TOKENS, min=1, help="Longest answer sampled, in tokens.")
    max_staleness: int = option(1, min=0, help="Retire queued pairs sampled more than this many versions ago.")
    overlap: int = option(1, min=1, help="How many labelers see each pair.")
    kv_cache: str = option("dynamic", choices=KV_CACHES, help="KV cache used while sampling.")
    sample_autocast: bool = option(False, help="bf16 autocast while sampling (see docs/benchmarks.md).")
    sampler_nice: int = option(BACKGROUND_NICE, min=0, max=19,
                               help="Nice increment of the sampler, so votes are answered first on a busy CPU. "
                                    "0 = off.")
    human_eval_share: float = option(0.0, min=0, max=1, max_open=True,
                                     help="Share of the pairs people see that are blind eval pairs (a held-out "
                                          "prompt, the serving version against the base): 0.1 = 1 in 10; 0 = off. "
                                          "Their votes are never trained on.")
    human_eval_reference: int = option(0, min=0, metavar="VERSION",
                                       help="What eval pairs compare the serving version against: 0 = the base, "
                                            "N = committed version N.")
    backend: str = option("hf", names=("--sampler",), choices=SAMPLER_BACKENDS,
                          help="hf: transformers in the worker; vllm: OpenAI-compatible vLLM servers (--vllm-url), "
                               "which load each version as a LoRA adapter.")
    vllm_urls: tuple[str, ...] = option((), names=("--vllm-url",), kind=str, cli_default="", metavar="URL[,URL...]",
                                        parse=comma_list, render=join_list,
                                        help="vLLM servers (started with --enable-lora and "
                                             "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True).")
    candidates: int = option(2, min=2, metavar="K",
                             help="Completions drawn per prompt in the one batched call; --selector picks the two "
                                  "a person sees (the others are stored, never trained).")
    selector: str = option("random", choices=SELECTORS,
                           help="Which two candidates a person sees: random; margin (largest gap in the policy's "
                                "implicit reward); uncertain (smallest gap); diverse (most different tokens); "
                                "judge-uncertain (the pair --selector-judge is least sure of).")
    selector_judge: Optional[str] = option(None, kind=str, metavar="SPEC",
                                           help="The judge of --selector judge-uncertain (rule:, py:, hf:, openai:, "
                                                "rm: specs).")
    auto_label_confident: bool = option(False, help="With --selector judge-uncertain: the pair the judge is surest "
                                                    "of is labeled by the judge and trained, beside the one people "
                                                    "see.")
    name: Optional[str] = option(None, kind=str, help="This worker's name on the dashboard (default: host-pid).")
    reload_poll_s: float = 0.5  # a committed version must be serving within 2 s

    def __post_init__(self) -> None:
        self.vllm_urls = comma_list(self.vllm_urls)
        checks = [(self.queue_size >= 1, "queue_size must be >= 1"),
                  (self.max_staleness >= 0, "max_staleness must be >= 0"),
                  (self.temperature > 0, "temperature must be > 0 (pairs need two different samples)"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
                  (self.prompts_per_batch >= 1, "prompts_per_batch must be >= 1"),
                  (self.overlap >= 1, "overlap must be >= 1"),
                  (0 < self.reload_poll_s <= 2, "reload_poll_s must be in (0, 2]"),
                  (self.kv_cache in KV_CACHES, "kv_cache must be dynamic or static"),
                  (0 <= self.sampler_nice <= 19, "sampler_nice must be 0..19"),
                  (0 <= self.human_eval_share < 1, "human_eval_share must be in [0, 1): 0.1 = 1 pair in 10"),
                  (self.human_eval_reference >= 0, "human_eval_reference must be a version number >= 0"),
                  (self.backend in SAMPLER_BACKENDS, "backend must be hf or vllm"),
                  (self.backend != "vllm" or bool(self.vllm_urls), "the vllm backend needs --vllm-url URL[,URL...]"),
                  (self.backend != "vllm" or not self.human_eval_share,
                   "blind eval pairs (--human-eval-share) need the hf backend (the reference is the base model)"),
                  (self.candidates >= 2, "candidates must be >= 2: a pair needs two"),
                  (self.selector in SELECTORS, f"selector must be one of {', '.join(SELECTORS)}"),
                  (self.selector != "judge-uncertain" or bool(self.selector_judge),
                   "--selector judge-uncertain needs --selector-judge SPEC"),
                  (not self.auto_label_confident or self.selector == "judge-uncertain",
                   "--auto-label-confident needs --selector judge-uncertain")]
        _check(checks)

    def worker_name(self) -> str:
        import os
        import socket

        return self.name or f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class ServeConfig(SampleConfig):
    """`odpo serve`: the web app. By default it holds no model: pairs come from `odpo sample`
    workers through the database. `inline_sampler` runs one sampler thread in this process
    instead (the SampleConfig fields configure it), as `--headless` does without the web app."""

    host: str = option("127.0.0.1", help="Interface to bind; 0.0.0.0 exposes the app to your network.")
    port: int = option(7860, min=1, max=65535, help="Port to listen on.")
    headless: bool = option(False, help="No web app: an inline sampler only (prefer `odpo sample`).")
    claim_timeout_s: float = option(CLAIM_TIMEOUT_S, names=("--claim-timeout",), min=0, min_open=True,
                                    help="Seconds before an unanswered pair goes back to the queue.")
    guidelines: Optional[Path] = option(None, kind=Path, help="Markdown file shown next to the pair.")
    auth_file: Optional[Path] = option(None, kind=Path,
                                       help="Sign-in accounts (`odpo users add`). [default: ODPO_AUTH_FILE, else "
                                            "users.toml in the data directory when it exists]")
    insecure_no_auth: bool = option(False, help="Serve a non-loopback --host without sign-in (anyone who reaches "
                                                "the port can label and administer).")
    max_typed_pending: int = option(3, min=1, help="Typed prompts one labeler may have waiting to be sampled.")
    session_hours: float = option(DEFAULT_SESSION_HOURS, min=0, min_open=True,
                                  help="Sign-in sessions end after this many hours.")
    show_judge_after_vote: bool = option(False, help="Show a judge's verdict once a person voted.")
    admins: tuple[str, ...] = option((), names=("--admin",), kind=str, multiple=True, metavar="NAME",
                                     help="Labeler name with admin rights.")
    inline_sampler: bool = option(False, help="Sample in the web server's process (one program; no `odpo sample` "
                                              "workers needed).")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.admins = tuple(self.admins)
        self.inline_sampler = self.inline_sampler or self.headless  # headless without a sampler does nothing
        _check([(1 <= self.port <= 65535, "port must be 1..65535"),
                (self.claim_timeout_s > 0, "claim_timeout_s must be > 0"),
                (self.session_hours > 0, "session_hours must be > 0")])


def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
