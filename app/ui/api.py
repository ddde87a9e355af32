"""The named HTTP API: `next_pair`, `vote`, `undo`, `ask_prompt`, `counters`.

A public interface (scripts and the labelers bench drive it; the README documents it): names and
arguments stay stable. Each endpoint calls the same LabelService methods as the page, so a script
labels exactly like a person does. The client key is the caller's Gradio session (one per `Client`
object): `next_pair` takes the labeler's open pair over from their other clients (a restarted script
gets it back), and only the client holding a pair may vote on it, so two scripts sharing one name
never both answer one pair (they should use a name each, or they take pairs from one another):

    c = Client("http://127.0.0.1:7860/")
    pair = c.predict("alice", api_name="/next_pair")["pair"]
    c.predict(pair["assignment_id"], "left", "alice", "", api_name="/vote")
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional

import gradio as gr

from odpo.app.services.labeling import DEFAULT_CLIENT, LabelService
from odpo.app.services.status import trainer_state, waiting_message
from odpo.app.ui.shared import INTERNAL_ERROR, Identity, outage_message
from odpo.db.errors import OdpoError

log = logging.getLogger(__name__)

API = {"queue": True, "concurrency_limit": None}


def register_api(labels: LabelService, identity: Identity) -> None:
    """Named endpoints for scripts. With auth on, `labeler` is ignored: the login decides."""

    @_api_guard
    def next_pair(labeler: str = "", request: gr.Request = None) -> dict:
        """The pair to label now (the one already on your screen, else the next queued pair);
        {"pair": null, "waiting": "<what for>"} while the sampler is still filling the queue. A
        pair's `context` lists a conversation's earlier turns ({"role", "content"}, oldest first;
        null for a single-turn prompt); `prompt` is always the final user message."""
        view = labels.current_pair(labeler=identity.labeler(labeler, request), client=client_key(request))
        if view is None:  # what the page would say: the model loading, the first pair sampling, …
            return {"pair": None, "waiting": " ".join(waiting_message(labels.sampler_state()))}
        return {"pair": view.to_dict()}

    @_api_guard
    def vote(assignment_id: int, choice: str, labeler: str = "", reason: str = "",
             request: gr.Request = None) -> dict:
        """Vote on the pair with this assignment_id. choice: left | right | tie | both_bad | skip
        (left/right as returned by next_pair). Returns the label id and the next pair."""
        res = labels.vote(labeler=identity.labeler(labeler, request), assignment_id=assignment_id,
                          side=choice, reason=reason, client=client_key(request))
        return {"label_id": res.label_id, "choice": res.choice, "judge": res.judge_note,
                "pair": res.next.to_dict() if res.next else None}

    @_api_guard
    def undo(labeler: str = "", request: gr.Request = None) -> dict:
        """Take back your last vote not yet used by training; returns that pair to label again."""
        view = labels.undo(labeler=identity.labeler(labeler, request), client=client_key(request))
        return {"pair": view.to_dict()}

    @_api_guard
    def ask_prompt(prompt: str, labeler: str = "", request: gr.Request = None) -> dict:
        """Queue a pair for your own prompt; it is returned by next_pair once sampled."""
        prompt_id = labels.ask(labeler=identity.labeler(labeler, request), text=prompt)
        return {"prompt_id": prompt_id, "status": "sampling"}

    @_api_guard
    def counters() -> dict:
        """Queue size, serving version, labels until the next adapter update, and the trainer's
        state (running, starting, down, unknown: app/services/status.py)."""
        c = labels.counters()
        with labels.db.sessions() as s:
            trainer = trainer_state(s, run=labels.config.run).state
        return {"queue": c.queue, "serving_version": c.serving_version, "unconsumed": c.unconsumed,
                "until_update": c.until_update, "paused": c.paused, "trainer": trainer}

    for fn in (next_pair, vote, undo, ask_prompt, counters):
        gr.api(fn, api_name=fn.__name__, **API)


def client_key(request: Optional[gr.Request]) -> str:
    """Which client asks: its Gradio session hash (stable per page load or gradio_client Client)."""
    return getattr(request, "session_hash", None) or DEFAULT_CLIENT


def _api_guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """API errors as gr.Error with the one-line message; never a traceback."""
    @functools.wraps(fn)
    def endpoint(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OdpoError as exc:
            raise gr.Error(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                           print_exception=False) from None
        except Exception as exc:  # noqa: BLE001
            outage = outage_message(exc)
            if outage is None:
                log.exception("API %s failed", fn.__name__)
            raise gr.Error(outage or INTERNAL_ERROR, print_exception=False) from None
    return endpoint
