"""Settings of the app's processes: CommonConfig (where the data lives, which database) that every
odpo process shares, and ServeConfig for `odpo serve`.

The trainer and judge processes keep their config dataclasses beside their code (trainer/); this is
the only place the data-directory layout is spelled out.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from odpo.db.engine import Database
from odpo.db.settings import resolve_data_dir, resolve_db_url
from odpo.trainer.priority import BACKGROUND_NICE


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
        """Open (and migrate) the database; raises db.engine.DatabaseError with a readable line."""
        return Database(self.db_url)


@dataclass
class SampleConfig:
    """`odpo sample`: one sampler worker (model, sampling, hot reload). Any number can run, on any
    host that reaches the database and the adapter directories. `odpo serve --sampler inline`
    runs the same sampler as a thread of the web server (ServeConfig extends this)."""

    model: str = "smollm2-135m"
    run: str = "default"
    queue_size: int = 8
    max_staleness: int = 1
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 96
    prompts_per_batch: int = 8  # measured: 8 prompts x 2 = 1.3-1.4x the pairs/min of 4 on CPU (README)
    load_in_4bit: bool = False
    overlap: int = 1  # how many labelers see each pair
    seed: int = 0
    # device/dtype as in trainer.models.pick_device_dtype.
    device: str = "auto"
    dtype: str = "auto"
    reload_poll_s: float = 0.5  # a committed version must be serving within 2 s
    sample_autocast: bool = False  # bf16 autocast for generation (measured slower on CPU; see README)
    kv_cache: str = "dynamic"  # or "static" (transformers' StaticCache)
    sampler_nice: int = BACKGROUND_NICE  # the sampler yields the CPU to web requests (trainer/priority.py)
    human_eval_share: float = 0.0  # share of queued pairs that are blind eval pairs (trainer/human_eval.py); 0 = off
    human_eval_reference: int = 0  # the version those eval pairs compare against; 0 = the base
    backend: str = "hf"  # hf: transformers in this process; vllm: OpenAI-compatible vLLM servers (vllm_urls)
    vllm_urls: tuple[str, ...] = ()
    name: Optional[str] = None  # the worker's name on the dashboard and in its claims (default host-pid)

    def __post_init__(self) -> None:
        checks = [(self.queue_size >= 1, "queue_size must be >= 1"),
                  (self.max_staleness >= 0, "max_staleness must be >= 0"),
                  (self.temperature > 0, "temperature must be > 0 (pairs need two different samples)"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
                  (self.prompts_per_batch >= 1, "prompts_per_batch must be >= 1"),
                  (self.overlap >= 1, "overlap must be >= 1"),
                  (0 < self.reload_poll_s <= 2, "reload_poll_s must be in (0, 2]"),
                  (self.kv_cache in ("dynamic", "static"), "kv_cache must be dynamic or static"),
                  (0 <= self.sampler_nice <= 19, "sampler_nice must be 0..19"),
                  (0 <= self.human_eval_share < 1, "human_eval_share must be in [0, 1): 0.1 = 1 pair in 10"),
                  (self.human_eval_reference >= 0, "human_eval_reference must be a version number >= 0"),
                  (self.backend in ("hf", "vllm"), "backend must be hf or vllm"),
                  (self.backend != "vllm" or bool(self.vllm_urls), "the vllm backend needs --vllm-url URL[,URL...]"),
                  (self.backend != "vllm" or not self.human_eval_share,
                   "blind eval pairs (--human-eval-share) need the hf backend (the reference is the base model)")]
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

    host: str = "127.0.0.1"
    port: int = 7860
    claim_timeout_s: float = 600.0
    guidelines: Optional[Path] = None
    auth_file: Optional[Path] = None
    show_judge_after_vote: bool = False
    headless: bool = False  # the inline sampler only, no web app (prefer `odpo sample`)
    inline_sampler: bool = False  # sample in this process (one program, no workers)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.inline_sampler = self.inline_sampler or self.headless  # headless without a sampler does nothing
        _check([(1 <= self.port <= 65535, "port must be 1..65535"),
                (self.claim_timeout_s > 0, "claim_timeout_s must be > 0")])


def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
