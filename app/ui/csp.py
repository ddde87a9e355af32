"""A Content-Security-Policy on every response of the web app, with a fresh nonce per response.

Why: the server cleans every text it renders (app/services/rendering.py), and the policy is the
layer that still holds if a cleaning bug ever lets markup through: no script runs unless odpo or
Gradio put it there, and nothing is fetched from, sent to or framed by another origin.

How: `ContentSecurityPolicy` is a pure ASGI middleware (no buffering of streams: Gradio's event
stream and file downloads pass through untouched, with the header added). For an HTML response it
reads the page, adds `nonce="<fresh>"` to each of its `<script>` tags (the page comes from Gradio's
template and odpo's routes, never from user text: Gradio writes its config into the page as JSON
with `<` escaped, so no `<script` from user text can appear there), and names that nonce in the
header. A response that sets its own policy keeps it.

What Gradio 6 (6.31) needed, measured in Chromium with `securitypolicyviolation` events recorded
through the Label, Dashboard and Admin tabs, sign-in, votes and typed prompts
(tests/test_security_xss.py keeps checking that none fire):

- script-src 'self' 'nonce-…': index.html has four inline scripts (config, API info, mode,
  iframe-resizer loader) and one after <gradio-app>; they get the nonce. Everything else Gradio
  loads (its module bundle, lazily imported chunks, the iframe resizer) is same-origin: 'self'.
  No 'strict-dynamic': it would let a nonced script load from any origin, and 'self' covers all.
- script-src 'sha256-…' of odpo.js: `launch(head=…)` is not in the HTML; Gradio's client copies
  it into <head> from the config, so a per-response nonce cannot reach it. Its text is fixed, so
  its hash allows exactly that script (app/ui/app.py passes `script_hash(head_script())`).
- script-src 'unsafe-eval': unavoidable. Gradio compiles every event's `js=` code (odpo's
  VOTE_JS, and Gradio's own for gr.BrowserState) with `new AsyncFunction(...)` when the page
  starts, and draws every gr.HTML component (header, counters, sync element, the rendered pair)
  by evaluating its `html_template` with Handlebars and `new Function(...)`. Without it the page
  never gets past "Loading..." (two eval violations from Gradio's Blocks bundle). It allows no
  inline script and no event handler attribute: an injected `<script>` or `onerror=` still
  does not run, and nothing passes user text to those evaluations (the template is "${value}").
- style-src 'self' 'unsafe-inline': unavoidable. index.html has an inline <style>, Gradio writes
  the theme and custom CSS into <style> elements at run time, and Svelte sets `style="…"`
  attributes on most components (a nonce cannot cover attributes, and would turn 'unsafe-inline'
  off). Styles cannot run code; `img-src` and `font-src` stop a style from fetching elsewhere.
- img-src 'self' data: blob: (Gradio's icons are data: SVGs; the logo and favicon are files),
  font-src 'self' data:, media-src 'self' data: blob:, worker-src 'self' blob:.
- connect-src 'self': Gradio 6 talks to the server with fetch and server-sent events on the same
  origin; CSP level 3 counts ws:/wss: on the same host as 'self', so no scheme-wide `ws:` source
  (which would allow every host) is needed.
- frame-ancestors 'self', base-uri 'self' (index.html has `<base href="./">`), form-action 'self'
  (sign-in), object-src 'none', manifest-src 'self'.
No remote origin appears anywhere: the page works with no external network (app/ui/app.py's
theme uses system fonts, so Gradio never asks for Google's).
"""
from __future__ import annotations

import base64
import hashlib
import logging
import re
import secrets
from typing import Any, Awaitable, Callable, Iterable, MutableMapping

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

HEADER = "content-security-policy"
_SCRIPT_TAG = re.compile(rb"<script(?=[\s>/])", re.IGNORECASE)


def script_hash(text: str) -> str:
    """The CSP source that allows one inline script whose text is exactly `text`."""
    digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
    return f"'sha256-{digest}'"


def policy(nonce: str, script_hashes: Iterable[str] = ()) -> str:
    """The header's value for one response (see the module docstring for why each source is there)."""
    scripts = " ".join(["'self'", f"'nonce-{nonce}'", *script_hashes, "'unsafe-eval'"])
    return "; ".join([
        "default-src 'self'",
        f"script-src {scripts}",
        "script-src-attr 'none'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "media-src 'self' data: blob:",
        "connect-src 'self'",
        "worker-src 'self' blob:",
        "manifest-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'self'",
    ])


def add_nonce(body: bytes, nonce: str) -> bytes:
    """Every `<script` tag of a page we serve, with the response's nonce."""
    return _SCRIPT_TAG.sub(b'<script nonce="' + nonce.encode("ascii") + b'"', body)


class ContentSecurityPolicy:
    """ASGI middleware: the policy on every HTTP response, the nonce in every HTML page's scripts.

    Use with Starlette: `Middleware(ContentSecurityPolicy, script_hashes=[script_hash(text)])`.
    """

    def __init__(self, app: ASGIApp, *, script_hashes: Iterable[str] = ()) -> None:
        self.app = app
        self.script_hashes = tuple(script_hashes)

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = secrets.token_urlsafe(18)
        held: dict[str, Any] = {}  # the start message of an HTML page, and its body so far

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if any(k.lower() == HEADER.encode() for k, _ in headers):
                    await send(message)  # the route set its own policy: leave it
                    return
                headers.append((HEADER.encode(), policy(nonce, self.script_hashes).encode()))
                message = {**message, "headers": headers}
                if scope.get("method") != "HEAD" and _is_plain_html(headers):
                    held.update(start=message, body=[])
                    return
                await send(message)
                return
            if message["type"] == "http.response.body" and "start" in held:
                held["body"].append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                await _send_page(send, held["start"], add_nonce(b"".join(held.pop("body")), nonce))
                return
            await send(message)

        await self.app(scope, receive, send_with_policy)


def _is_plain_html(headers: list) -> bool:
    """An uncompressed HTML page: the only kind whose script tags we rewrite."""
    kinds = {k.lower(): v.lower() for k, v in headers if k.lower() in (b"content-type", b"content-encoding")}
    return kinds.get(b"content-type", b"").startswith(b"text/html") and b"content-encoding" not in kinds


async def _send_page(send, start: Message, body: bytes) -> None:
    """The held page, its length corrected for the added nonces."""
    headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode("ascii")))
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
