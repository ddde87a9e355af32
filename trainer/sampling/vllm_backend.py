"""The `vllm` sampler backend: sample pairs with one or more OpenAI-compatible vLLM servers.

The watcher side follows the `adapters` rows exactly as trainer.sampling.hotreload.ReloadWatcher does (it is
a subclass: `latest()` and `_record()` are the watcher's own, so reloads rows and the retiring of
stale pairs are the same code), but a version change means HTTP instead of copying tensors: the
committed directory is loaded into every up server under the versioned name `<run>-v<N>`
(`/v1/load_lora_adapter`), then `serving_version` switches, then names outside the staleness window
are unloaded. Version 0 is the base model's own name, no adapter. Loading happens before the
switch and outside `lock`, so sampling never waits for it and `swap_wanted` is never set.

The generation side has `trainer.sampling.generation.generate`'s contract. Prompts are rendered by odpo
(`prompt_token_ids`) and sent as token ids, so the context is exactly the one the trainer scores;
the ids the server emitted come back with `return_token_ids` and become `Generated.token_ids`
unchanged (the text is decoded from them the way generation.py does). A batch is spread over the
up servers; a server that fails is marked down, retried after a backoff (retry_base_s doubling
up to retry_max_s) and gets the serving version loaded before it samples again; its share of the
batch goes to the others at once.

Version stamps: the sampler holds `backend.lock` while it reads `serving_version` and calls
`generate` (as it does with ReloadWatcher's lock); the switch takes the same lock, so every sample
is stamped with the adapter that produced it. `generate` never takes `lock` itself.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from odpo.db.engine import Database
from odpo.db.models import utcnow
from odpo.trainer.policy.batching import FINISH_LENGTH, prompt_token_ids
from odpo.trainer.sampling.generation import Generated, GenerationInterrupted, SamplingParams, _decode, _eos_ids
from odpo.trainer.sampling.hotreload import ReloadResult, ReloadWatcher, _Target, resolve_adapter_path
from odpo.trainer.sampling.vllm_client import VllmClient, VllmError, VllmRequestError, VllmServerDown

log = logging.getLogger(__name__)

__all__ = ["VllmBackend", "VllmError", "VllmUnavailable"]  # starting vLLM: trainer/sampling/vllm_launch.py


class VllmUnavailable(VllmError):
    """No vLLM server is up right now: transient (db/transient.py), so the sampler says so in one line
    and tries again after its backoff; the servers' own retries go on meanwhile."""

    transient = True
    fault_what = "vLLM server"


class _Server:
    """One server's bookkeeping: up or down, why, when to try again, which of our names it holds."""

    def __init__(self, client: VllmClient) -> None:
        self.client = client
        self.up = False  # only once it has the serving version loaded
        self.last_error: Optional[str] = None
        # this run's versioned names the server holds; replaced, never mutated, so the dashboard
        # thread can read it while the watcher changes it
        self.loaded: frozenset[str] = frozenset()
        self.failures = 0
        self.retry_at = 0.0  # time.monotonic() of the next attempt while down


class VllmBackend(ReloadWatcher):
    """Samples with vLLM servers and keeps them on the run's committed adapter version."""

    def __init__(self, *, db: Database, urls: list[str], run: str, tokenizer: Any, base_model: str,
                 max_staleness: int = 1, base_dir: Optional[Path] = None, timeout_s: float = 60.0,
                 retry_base_s: float = 1.0, retry_max_s: float = 30.0) -> None:
        if not urls:
            raise VllmError("the vllm sampler needs at least one server: --vllm-url URL[,URL…]")
        super().__init__(db=db, peft_model=None, lock=threading.Lock(), run=run, max_staleness=max_staleness,
                         base_dir=base_dir)
        self.tokenizer, self.base_model = tokenizer, base_model
        self.retry_base_s, self.retry_max_s = retry_base_s, retry_max_s
        self.servers = [_Server(VllmClient(url, timeout_s=timeout_s)) for url in dict.fromkeys(urls)]
        self._eos = _eos_ids(None, tokenizer)
        self._names = re.compile(rf"^{re.escape(run)}-v(\d+)$")
        self._sync_lock = threading.Lock()  # revivals and version loads, one at a time
        # seeded batches send one request per prompt, concurrently (see _sample)
        self._pool = ThreadPoolExecutor(max_workers=max(16, 2 * len(self.servers)), thread_name_prefix="odpo-vllm")
        self._turn = 0

    def model_name(self, version: int) -> str:
        """What a version is called on the servers: the base model's name for version 0."""
        return self.base_model if version == 0 else f"{self.run}-v{version}"

    # --- the watcher side ---------------------------------------------------------------------

    def load_initial(self) -> int:
        """Serve the committed head: load it into every server that answers. Servers that don't
        (still starting, say) get it when they come up; nothing here waits for them."""
        target = self.latest()
        with self._sync_lock:
            self.serving_version, self._serving_path = target.version, target.path
            list(self._pool.map(self._bring_up, self.servers))  # side by side: a dead host costs one timeout
        up = sum(s.up for s in self.servers)
        log.info("serving adapter v%d as %r on %d of %d vLLM server(s)", target.version,
                 self.model_name(target.version), up, len(self.servers))
        return target.version

    def poll_once(self) -> Optional[ReloadResult]:
        """Bring back servers whose backoff ran out; if the committed version moved (forward or,
        after a rollback, back), load it everywhere, switch, unload what fell out of the window."""
        with self._sync_lock:
            self._revive_due()
            noticed = utcnow()
            target = self.latest()
            if target.version == self.serving_version:
                return None
            started = time.perf_counter()
            self._load_everywhere(target)
            swap_ms = (time.perf_counter() - started) * 1000
            with self.lock:
                previous, self.serving_version, self._serving_path = self.serving_version, target.version, target.path
            self._unload_stale()
        result = self._record(previous, target, swap_ms=swap_ms, noticed=noticed)
        self.last, self.last_error = result, None
        log.info("vLLM reload v%d -> v%d: loaded in %.0f ms, commit-to-serving %.0f ms, %d stale pairs retired",
                 previous, target.version, swap_ms, result.commit_to_serving_ms, result.retired_pairs)
        return result

    def _adapter_dir(self, target: _Target) -> Optional[str]:
        if target.version == 0 or target.path is None:
            return None
        return str(resolve_adapter_path(target.path, self.base_dir).resolve())

    def _load_everywhere(self, target: _Target) -> None:
        """Load `target` into every up server. Raises (nothing switches) when no server took it."""
        up = [s for s in self.servers if s.up]
        if not up:
            raise VllmUnavailable(f"no vLLM server is up to load v{target.version} into; retrying")
        path = self._adapter_dir(target)
        if path is None:
            return  # the base model: always there
        name = self.model_name(target.version)
        outcomes = list(self._pool.map(lambda s: _attempt(lambda: self._load(s, name, path)), up))
        refused = [e for e in outcomes if isinstance(e, VllmRequestError)]
        if len(refused) == len(up):
            raise VllmError(f"vLLM refused adapter v{target.version} ({path}): {refused[0]}")
        for server, error in zip(up, outcomes, strict=True):
            if error is not None:  # it cannot serve the new version: out until it can
                self._mark_down(server, error)
        if not any(s.up for s in up):
            raise VllmUnavailable(f"every vLLM server failed while loading v{target.version}; retrying")

    def _load(self, server: _Server, name: str, path: str) -> None:
        server.client.load_lora(name, path)
        server.loaded = server.loaded | {name}

    def _unload_stale(self) -> None:
        for server in [s for s in self.servers if s.up]:
            self._unload_stale_on(server)

    def _unload_stale_on(self, server: _Server) -> None:
        """Unload this run's names outside [serving - max_staleness, serving]: older versions, and
        versions newer than the serving one (a rollback retired them for good); marks the server
        down when it stops answering."""
        low, high = self.serving_version - self.max_staleness, self.serving_version
        for name in sorted(server.loaded):
            match = self._names.match(name)
            if match and low <= int(match.group(1)) <= high:
                continue
            try:
                server.client.unload_lora(name)
            except VllmServerDown as exc:
                self._mark_down(server, exc)
                return
            except VllmRequestError as exc:
                log.warning("could not unload %s from %s: %s", name, server.client.url, exc)
            server.loaded = server.loaded - {name}

    def _revive_due(self) -> None:
        now = time.monotonic()
        list(self._pool.map(self._bring_up, [s for s in self.servers if not s.up and s.retry_at <= now]))

    def _bring_up(self, server: _Server) -> None:
        """Check the server serves our base, learn which of our names it holds, load the serving
        version if it lacks it; only then is it up."""
        try:
            models = server.client.models()
            if self.base_model not in models:
                raise VllmRequestError(f"vLLM at {server.client.url} serves {models[:1]}, not {self.base_model!r}: "
                                       f"start it with --served-model-name {self.base_model}", status=404)
            server.loaded = frozenset(m for m in models if self._names.match(m))
            path = self._adapter_dir(_Target(self.serving_version, self._serving_path, None))
            name = self.model_name(self.serving_version)
            if path is not None and name not in server.loaded:
                self._load(server, name, path)
        except VllmError as exc:
            self._mark_down(server, exc)
            return
        server.up = True
        self._unload_stale_on(server)  # leftovers of an earlier process or of versions it missed
        if not server.up:
            return
        if server.failures or server.last_error:
            log.info("vLLM at %s is up again, serving %r", server.client.url, self.model_name(self.serving_version))
        server.last_error, server.failures = None, 0

    def _mark_down(self, server: _Server, error: BaseException) -> None:
        """Out until its backoff runs out: one line per failed try, saying when the next is. While
        no other server is up, a repeated reason is logged at debug: the sampler's own line for the
        VllmUnavailable that follows (transient: one line per its retry) says it then."""
        again = server.last_error == str(error) and not any(s.up for s in self.servers if s is not server)
        server.failures += 1
        delay = min(self.retry_base_s * 2 ** (server.failures - 1), self.retry_max_s)
        server.up, server.last_error, server.retry_at = False, str(error), time.monotonic() + delay
        (log.debug if again else log.warning)("vLLM at %s is down (%s); next try in %.1fs", server.client.url,
                                              error, delay)

    # --- the generation side ------------------------------------------------------------------

    def generate(self, prompts: Sequence[Any], *, params: SamplingParams, n_per_prompt: int = 1,
                 should_stop: Optional[Callable[[], bool]] = None) -> list[list[Generated]]:
        """Sample `n_per_prompt` completions of every prompt with the serving version; one list
        per prompt, in prompt order (trainer.sampling.generation.generate's contract). Raises
        VllmUnavailable when no server is up, GenerationInterrupted when `should_stop()` fires."""
        if n_per_prompt < 1:
            raise ValueError("n_per_prompt must be >= 1")
        if not prompts:
            return []
        rows = [prompt_token_ids(self.tokenizer, p, max_tokens=params.max_prompt_tokens) for p in prompts]
        name = self.model_name(self.serving_version)
        started = time.perf_counter()
        choices = self._sample(rows, name=name, n=n_per_prompt, sampling=self._sampling(params),
                               should_stop=should_stop)
        seconds = time.perf_counter() - started
        return [[self._generated(c, row, params=params, seconds=seconds) for c in per_prompt]
                for per_prompt, row in zip(choices, rows, strict=True)]

    def _sampling(self, params: SamplingParams) -> dict[str, Any]:
        """Every knob explicit: vLLM fills unset ones from the model's generation_config (its
        repetition penalty, top_k, …), which would silently change what the policy samples.
        top_k=-1 disables it in every vLLM version; odpo's eos ids are stop ids on top of vLLM's."""
        return {"max_tokens": params.max_new_tokens, "temperature": params.temperature,
                "top_p": 1.0 if params.greedy else params.top_p, "top_k": -1, "min_p": 0.0,
                "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "seed": params.seed, "stop_token_ids": list(self._eos), "ignore_eos": False}

    def _sample(self, rows: list[list[int]], *, name: str, n: int, sampling: dict[str, Any],
                should_stop: Optional[Callable[[], bool]]) -> list[list[dict[str, Any]]]:
        """Spread the prompts over the up servers (turns rotate, so single prompts alternate); a
        server that fails is marked down and its prompts go round again on the others.

        Without a seed each server gets one request with its share. vLLM seeds per request (sample
        j of a prompt draws with seed + j), so with a seed every prompt is its own request with seed
        + i * n: no two samples of a batch share a random stream, and a seeded batch comes out the
        same however it was spread (the server batches concurrent requests anyway)."""
        results: list[Optional[list[dict[str, Any]]]] = [None] * len(rows)
        pending = list(range(len(rows)))
        seed = sampling.get("seed")
        while pending:
            servers = self._up_or_revived()
            self._turn += 1
            shares: dict[int, list[int]] = {}
            for j, i in enumerate(pending):
                shares.setdefault((j + self._turn) % len(servers), []).append(i)
            units = [(servers[k], idx) for k, idx in shares.items()] if seed is None else \
                [(servers[k], [i]) for k, idx in shares.items() for i in idx]
            futures = {self._pool.submit(server.client.complete, model=name, prompts=[rows[i] for i in idx], n=n,
                                         sampling=sampling if seed is None else {**sampling, "seed": seed + i0 * n}):
                       (server, idx) for server, idx in units for i0 in idx[:1]}
            pending = self._collect(futures, results, should_stop)
        return [r for r in results if r is not None]

    def _collect(self, futures: dict[Future, tuple[_Server, list[int]]], results: list[Any],
                 should_stop: Optional[Callable[[], bool]]) -> list[int]:
        """Wait for one round, checking `should_stop` meanwhile; returns the prompts to redo."""
        redo: list[int] = []
        refused: Optional[VllmRequestError] = None
        waiting = set(futures)
        while waiting:
            if should_stop is not None and should_stop():
                raise GenerationInterrupted("generation interrupted")
            done, waiting = wait(waiting, timeout=0.05, return_when=FIRST_COMPLETED)
            for future in done:
                server, idx = futures[future]
                try:
                    for i, per_prompt in zip(idx, future.result(), strict=True):
                        results[i] = per_prompt
                except (VllmServerDown, VllmRequestError) as exc:
                    if isinstance(exc, VllmRequestError) and exc.status != 404:
                        refused = exc  # the request's fault, not the server's: no use retrying it
                        continue
                    self._mark_down(server, exc)  # 404: it lost the adapter (restarted?): reload first
                    redo += idx
        if refused is not None:
            raise refused
        return sorted(redo)

    def _up_or_revived(self) -> list[_Server]:
        up = [s for s in self.servers if s.up]
        if not up and self._sync_lock.acquire(blocking=False):  # never wait on the watcher (lock order)
            try:
                self._revive_due()
            finally:
                self._sync_lock.release()
            up = [s for s in self.servers if s.up]
        if not up:  # the caller says when it tries again (the sampler: one line per retry)
            soonest = min(self.servers, key=lambda s: s.retry_at)
            raise VllmUnavailable(f"no vLLM server is up ({len(self.servers)} configured): {soonest.last_error}")
        return up

    def _generated(self, choice: dict[str, Any], row: list[int], *, params: SamplingParams,
                   seconds: float) -> Generated:
        """A vLLM choice as odpo's Generated: the server's ids as they are, text decoded from them.

        The stop token counts as eos (kept in token_ids, left out of text): odpo's eos ids, the id
        vLLM reports in stop_reason, or, when it stopped on its own eos (stop_reason None), the last id."""
        ids = [int(t) for t in choice["token_ids"]]
        fed = choice.get("prompt_token_ids")
        if fed is not None and [int(t) for t in fed] != row:
            raise VllmError("a vLLM server sampled from other prompt ids than odpo sent; refusing the sample")
        eos, reason, stop = list(self._eos), choice.get("finish_reason"), choice.get("stop_reason")
        if isinstance(stop, int) and not isinstance(stop, bool):
            eos.append(stop)
        elif reason == "stop" and stop is None and ids and ids[-1] not in eos:
            eos.append(ids[-1])
        out = _decode(self.tokenizer, ids, eos_ids=eos, max_new_tokens=params.max_new_tokens, seconds=seconds,
                      prompt_ids=row)
        if reason == FINISH_LENGTH and out.finish_reason != FINISH_LENGTH:  # e.g. cut at max_model_len
            out = dataclasses.replace(out, finish_reason=FINISH_LENGTH)
        return out

    # --- the dashboard and shutdown -------------------------------------------------------------

    def servers_state(self) -> list[dict]:
        """Per server, for the dashboard: up or down, why, what it holds, when the next try is."""
        now = time.monotonic()
        return [{"url": s.client.url, "up": s.up, "last_error": s.last_error, "loaded": sorted(s.loaded),
                 "next_retry_in_s": None if s.up else round(max(s.retry_at - now, 0.0), 1)} for s in self.servers]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for server in self.servers:
            server.client.close()


def _attempt(call: Callable[[], None]) -> Optional[VllmError]:
    try:
        call()
    except VllmError as exc:
        return exc
    return None
