"""A simulated labeler and a queue monitor, talking to the app's named HTTP endpoints
(`/next_pair`, `/vote`, `/counters`) with plain HTTP: gradio's documented two-request call API
(POST /gradio_api/call/<name> -> event id, GET /gradio_api/call/<name>/<id> -> server-sent events).

Plain HTTP rather than gradio_client because the client's own per-call overhead (measured ~65 ms
on a loaded 2-core machine, against ~20 ms for plain HTTP and ~4 ms for the vote itself) would
otherwise dominate what is meant to be the app's latency; `round_trips_ms` reports both floors.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often a labeler facing an empty queue asks again
_SIDES = {"a": "left", "b": "right", "tie": "tie", "both_bad": "both_bad", "abstain": "skip"}


@dataclass
class LabelerStats:
    """One labeler's record. waits: (seconds from sending a vote until the next pair was in hand,
    whether the queue was empty so it had to poll). empty_seconds also counts a final wait the
    deadline cut short; active_seconds is the time from its first pair to the end."""

    name: str
    waits: list[tuple[float, bool]] = field(default_factory=list)
    votes: int = 0
    errors: list[str] = field(default_factory=list)
    choices: dict[str, int] = field(default_factory=dict)
    empty_seconds: float = 0.0
    active_seconds: float = 0.0


def choose_side(judge: Any, pair: dict[str, Any]) -> str:
    """The judge's verdict on the pair as the labeler saw it (left = a, right = b)."""
    (verdict,) = judge.judge([pair["prompt"]], [pair["left"]], [pair["right"]])
    return _SIDES[verdict.choice]


class ApiError(RuntimeError):
    """The endpoint answered with an error event (the app's one-line message) or no result."""


class ApiClient:
    """`predict(*inputs, api_name="/vote")` over plain HTTP, returning the endpoint's output.

    Sends one session hash on every call, as gradio_client does: odpo keys a labeler's claims by
    client, so a script whose calls each came from a fresh session could not vote on its own pair."""

    def __init__(self, url: str, *, timeout_s: float = 60.0) -> None:
        import uuid

        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=timeout_s)
        self.session_hash = uuid.uuid4().hex[:12]

    def predict(self, *inputs: Any, api_name: str) -> Any:
        name = api_name.strip("/")
        body = {"data": list(inputs), "session_hash": self.session_hash}
        posted = self.http.post(f"{self.url}/gradio_api/call/{name}", json=body)
        posted.raise_for_status()
        event_id = posted.json()["event_id"]
        event = ""
        with self.http.stream("GET", f"{self.url}/gradio_api/call/{name}/{event_id}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    data = json.loads(line[5:])
                    if event == "error":
                        raise ApiError(f"{api_name}: {data}")
                    return data[0]
        raise ApiError(f"{api_name}: the stream ended without a result")

    def close(self) -> None:
        self.http.close()


def _client(url: str) -> ApiClient:
    return ApiClient(url)


def poll_pair(client: Any, name: str, *, deadline: float, stop: threading.Event,
              stats: LabelerStats, poll_s: float = POLL_S) -> Optional[dict[str, Any]]:
    """Ask /next_pair every `poll_s` until it returns a pair, the deadline passes, or `stop` is set."""
    while time.perf_counter() < deadline and not stop.is_set():
        try:
            pair = client.predict(name, api_name="/next_pair")["pair"]
        except Exception as exc:  # noqa: BLE001 - counted, the labeler carries on
            stats.errors.append(f"next_pair: {type(exc).__name__}: {exc}")
            pair = None
        if pair:
            return pair
        stop.wait(poll_s)
    return None


def run_labeler(*, url: str, stats: LabelerStats, decide: Callable[[dict[str, Any]], str], deadline: float,
                think_s: float, stop: threading.Event, client: Any = None, poll_s: float = POLL_S) -> None:
    """Label until `deadline` (a perf_counter time): read for think_s, vote, take the next pair;
    facing an empty queue, ask again every `poll_s`."""
    client = client or _client(url)
    pair = poll_pair(client, stats.name, deadline=deadline, stop=stop, stats=stats, poll_s=poll_s)
    began = time.perf_counter()
    while pair is not None and not stop.is_set():
        if stop.wait(think_s) or time.perf_counter() >= deadline:
            break
        side = decide(pair)
        sent = time.perf_counter()
        try:
            reply = client.predict(pair["assignment_id"], side, stats.name, "", api_name="/vote")
        except Exception as exc:  # noqa: BLE001 - counted; fetch whatever the app shows now
            stats.errors.append(f"vote: {type(exc).__name__}: {exc}")
            pair = poll_pair(client, stats.name, deadline=deadline, stop=stop, stats=stats, poll_s=poll_s)
            continue
        stats.votes += 1
        stats.choices[side] = stats.choices.get(side, 0) + 1
        pair = reply.get("pair")
        if pair is None:
            pair = poll_pair(client, stats.name, deadline=deadline, stop=stop, stats=stats, poll_s=poll_s)
            waited = time.perf_counter() - sent
            stats.empty_seconds += waited
            if pair is not None:
                stats.waits.append((waited, True))
        else:
            stats.waits.append((time.perf_counter() - sent, False))
    stats.active_seconds = max(min(time.perf_counter(), deadline) - began, 0.0)


def round_trips_ms(url: str, *, n: int = 20, gradio_client: bool = False) -> list[float]:
    """n sequential /counters calls from one client: the HTTP + gradio queue floor under which no
    endpoint can answer, to read the vote latencies against (or gradio_client's, to show its cost)."""
    if gradio_client:
        from gradio_client import Client

        client: Any = Client(url, verbose=False, download_files=False)
    else:
        client = _client(url)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.predict(api_name="/counters")
        out.append((time.perf_counter() - t0) * 1000)
    return out


def idle_votes_ms(url: str, *, n: int = 5, name: str = "bench-probe") -> list[float]:
    """n votes (always "skip", so nothing is trained on them) while the app is otherwise idle:
    the vote's own cost through HTTP, to compare with votes made while the sampler and trainer
    are busy."""
    client = _client(url)
    pair = client.predict(name, api_name="/next_pair")["pair"]
    out = []
    for _ in range(n):
        if pair is None:
            break
        t0 = time.perf_counter()
        pair = client.predict(pair["assignment_id"], "skip", name, "", api_name="/vote")["pair"]
        out.append((time.perf_counter() - t0) * 1000)
    client.close()
    return out


class Monitor:
    """Samples /counters once a second: how often the queue was empty, from the app's side."""

    def __init__(self, url: str, *, every_s: float = 1.0) -> None:
        self.url, self.every_s = url, every_s
        self.samples: list[int] = []
        self.errors = 0

    def run(self, *, deadline: float, stop: threading.Event) -> None:
        client = _client(self.url)
        while time.perf_counter() < deadline and not stop.is_set():
            try:
                self.samples.append(int(client.predict(api_name="/counters")["queue"]))
            except Exception:  # noqa: BLE001 - a monitor hiccup is not a labeler error
                self.errors += 1
            stop.wait(self.every_s)

    def zero_share(self) -> Optional[float]:
        if not self.samples:
            return None
        return sum(1 for q in self.samples if q == 0) / len(self.samples)
