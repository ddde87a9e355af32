"""Pieces every UI tab shares: the handler guard, labeler identity, rendering of pairs/counters.

The guard is the reason no Python traceback ever reaches a browser: OdpoError becomes a warning
toast with its one line, anything else is logged with its traceback on the server and shown as a
generic warning, and the handler's outputs are left untouched (gr.skip()).
"""
from __future__ import annotations

import functools
import html
import logging
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr

from odpo.app.services.label_text import conversation_html
from odpo.app.services.labeling import Counters, PairView, normalise_labeler
from odpo.app.services.rendering import clean_html, render_markdown
from odpo.app.services.status import TrainerState, update_chip
from odpo.db.errors import OdpoError
from odpo.db.transient import classify

log = logging.getLogger(__name__)

INTERNAL_ERROR = "Something went wrong on the server (details are in its log). Please try again."
SAMPLING_TITLE = "Sampling new pairs…"
SAMPLING_LINE = "The next pair appears here by itself as soon as it is ready."
WAITING_RESPONSE = "<p><em>…</em></p>"


def static_dir() -> Path:
    """odpo/static on disk (a checkout's static/ or the installed package's): gradio serves files by path."""
    return Path(str(resources.files("odpo.static")))


class NotSignedInError(OdpoError):
    """Auth is on but the request carries no user (should not happen behind Gradio's login)."""


def skips(n: int) -> Any:
    """gr.skip() for n outputs, in the shape gradio expects (bare value for one output)."""
    return gr.skip() if n == 1 else tuple(gr.skip() for _ in range(n))


def guarded(*, outputs: int, on_error: Optional[Callable[..., Any]] = None, ticking: bool = False) -> Callable:
    """Decorate a gradio handler so errors become toasts, never tracebacks.

    `on_error(*args, **kwargs)` may return replacement outputs after a user error (e.g. reload
    the pair after a vote on an expired claim); by default every output is skipped. `ticking`: a
    timer's handler, which stays quiet through an outage (a toast a second helps nobody: the next
    vote says it); a user error still shows.
    """
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def handler(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except OdpoError as exc:
                gr.Warning(html.escape(_one_line(exc)))
            except Exception as exc:  # noqa: BLE001 - the browser must never see a traceback
                outage = outage_message(exc)
                if outage is None:
                    log.exception("UI handler %s failed", fn.__name__)
                if outage is None or not ticking:
                    gr.Warning(outage or INTERNAL_ERROR)
            if on_error is not None:
                try:
                    return on_error(*args, **kwargs)
                except Exception:  # noqa: BLE001
                    log.exception("UI error fallback of %s failed", fn.__name__)
            return skips(outputs)
        return handler
    return wrap


def outage_message(exc: BaseException) -> Optional[str]:
    """What a person is told when a transient fault (the database away, its disk full) stopped their
    request: that nothing was saved and to try again; None for anything else (a bug). A vote is
    acknowledged only after its transaction committed, so "not recorded" is the truth."""
    fault = classify(exc)
    if not fault.transient:
        return None
    log.warning("a request failed on a transient fault: %s", fault.line)
    if fault.what == "disk":
        return "The server's disk is full: your vote was not recorded. Try again once an admin has made room."
    return f"The {fault.what} is unreachable: your vote was not recorded. Try again in a moment."


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Identity:
    """Who is labeling: the signed-in user when auth is on, else the name typed in the page."""

    def __init__(self, *, auth_on: bool) -> None:
        self.auth_on = auth_on

    def labeler(self, name: Optional[str], request: Optional[gr.Request]) -> str:
        if self.auth_on:
            user = getattr(request, "username", None) if request is not None else None
            if not user:
                raise NotSignedInError("please sign in again (your session has no user)")
            return str(user)
        return normalise_labeler(name)

    def username(self, request: Optional[gr.Request]) -> Optional[str]:
        """The signed-in user for admin checks (None when auth is off)."""
        return getattr(request, "username", None) if (self.auth_on and request is not None) else None


def waiting_html(waiting: Optional[tuple[str, str]] = None) -> str:
    """An empty slot's text: what the page waits for (app/services/status.py `waiting_message`)."""
    title, line = waiting or (SAMPLING_TITLE, SAMPLING_LINE)
    return render_markdown(f"### ⏳ {title}") + render_markdown(line)


def pair_outputs(view: Optional[PairView], waiting: Optional[tuple[str, str]] = None) -> tuple[str, str, str]:
    """(prompt, left, right) HTML for one slot of the Label tab (what it waits for when None):
    the prompt is the pair's header line, a conversation's earlier turns collapsed, then the final
    user message (what the two candidates reply to). All of it comes out of app/services/rendering.py,
    so the page's gr.HTML components show it as it is."""
    if view is None:
        return waiting_html(waiting), WAITING_RESPONSE, WAITING_RESPONSE
    badge = "<strong>Your prompt</strong> · " if view.typed else ""
    head = f"<p>{badge}<small>pair {int(view.pair_id)} · policy v{int(view.version)}</small></p>"
    prompt = clean_html(head + conversation_html(view.context) + render_markdown(view.prompt))
    return prompt, render_markdown(view.left, breaks=True), render_markdown(view.right, breaks=True)


def counters_html(c: Optional[Counters], *, session_labels: int, labeler: Optional[str],
                  trainer: Optional[TrainerState] = None) -> str:
    """The live counters strip. Everything interpolated is escaped. "Until next update" tells the
    truth about the trainer (`trainer`: what the database says about it; None = not known)."""
    chips = []
    if c is not None:
        update = update_chip(until_update=c.until_update, paused=c.paused, trainer=trainer)
        chips += [("Queue", str(c.queue)), ("Serving", f"v{c.serving_version}"),
                  ("Until next update", update)]
        if c.generating:
            chips.append(("Sampler", "generating"))
        if c.sampler_error:
            chips.append(("Sampler error", c.sampler_error[:120]))
    chips.append(("Labels this session", str(session_labels)))
    if labeler:
        chips.append(("Labeler", labeler))
    body = "".join(f'<span class="odpo-chip"><span class="odpo-chip-k">{html.escape(k)}</span>'
                   f'<span class="odpo-chip-v">{html.escape(v)}</span></span>' for k, v in chips)
    return f'<div class="odpo-counters" id="odpo-counters-inner">{body}</div>'


def logo_svg() -> str:
    try:
        return (static_dir() / "logo.svg").read_text(encoding="utf-8")
    except OSError:
        return ""


def header_html(*, auth_on: bool) -> str:
    logout = '<a class="odpo-logout" href="logout">Sign out</a>' if auth_on else ""
    return (f'<div class="odpo-header"><span class="odpo-logo">{logo_svg()}</span>'
            f'<span class="odpo-title">odpo</span><span class="odpo-sub">Online DPO studio</span>{logout}</div>')
