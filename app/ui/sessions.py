"""The sign-in guard in front of Gradio: back-off on failed sign-ins, and sessions that end.

Gradio checks the password (its /login route calls AuthConfig.verify) and keeps the session
tokens it hands out in `app.tokens`, forever. This ASGI middleware wraps that route and every
other request:
- POST /login: refused with 429 and a Retry-After while the name or the client address must wait
  (LoginThrottle); otherwise passed on, and its answer recorded: a failure counts, a success
  starts a session (the token Gradio set in its cookie) in the SessionBook.
- any other request: a session token past its age (or one the book never saw begin) is removed
  from Gradio's tokens before Gradio reads them, so the request is signed out.

The client address is the connection's, as uvicorn reports it: behind a reverse proxy on the
same machine, uvicorn's proxy-headers support (trusted from 127.0.0.1 by default) makes it the
real client's.
"""
from __future__ import annotations

import json
import logging
import math
from http.cookies import CookieError, SimpleCookie
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

from odpo.app.services.signin import LoginThrottle, SessionBook

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
MAX_LOGIN_BODY = 16 * 1024  # a name and a password; anything bigger is not a sign-in
TOKEN_COOKIE = "access-token-"


class SignInGuard:
    def __init__(self, app: Any, *, throttle: LoginThrottle, sessions: SessionBook) -> None:
        self.app, self.throttle, self.sessions = app, throttle, sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/login"):
            await self._login(scope, receive, send)
            return
        if scope["type"] in ("http", "websocket"):
            self._sign_out_expired(scope)
        await self.app(scope, receive, send)

    def _sign_out_expired(self, scope: Scope) -> None:
        tokens = getattr(scope.get("app"), "tokens", None)
        if not tokens:
            return
        for token in _cookie_tokens(scope):
            if token in tokens and self.sessions.expired(token):
                user = tokens.pop(token, None)
                log.info("session of %s ended (older than %.0f h)", user, self.sessions.max_age_s / 3600)

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            await _answer(send, 413, "a sign-in is a name and a password")
            return
        form = parse_qs(body.decode("utf-8", errors="replace"))
        name = (form.get("username") or [""])[0].strip()
        address = (scope.get("client") or ("unknown",))[0]
        wait = self.throttle.wait_s(name, address)
        if wait > 0:
            log.warning("sign-in for %r from %s refused: %d s to wait after failures", name, address, wait)
            await _answer(send, 429, f"too many failed sign-ins: try again in {math.ceil(wait)} s",
                          headers=[(b"retry-after", str(math.ceil(wait)).encode())])
            return
        def outcome(status: int, token: str | None) -> None:
            """Recorded before the answer leaves, so the next attempt already sees it."""
            if status == 200 and token:
                self.throttle.succeeded(name, address)
                self.sessions.started(token, name)
            elif status in (400, 401):
                self.throttle.failed(name, address)
                log.info("failed sign-in for %r from %s", name, address)

        await self.app(scope, _replay(body), _watch(send, outcome))


async def _read_body(receive: Receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_LOGIN_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _watch(send: Send, outcome: Callable[[int, str | None], None]) -> Send:
    async def watched(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            token = None
            for key, value in message.get("headers", []):
                if key.lower() == b"set-cookie" and value.startswith(TOKEN_COOKIE.encode()):
                    token = value.split(b";", 1)[0].split(b"=", 1)[1].decode()
            outcome(message["status"], token)
        await send(message)

    return watched


def _cookie_tokens(scope: Scope) -> list[str]:
    raw = b"; ".join(v for k, v in scope.get("headers", []) if k == b"cookie").decode("latin-1")
    if TOKEN_COOKIE not in raw:
        return []
    try:
        jar = SimpleCookie(raw)
    except CookieError:
        return []
    return [morsel.value for key, morsel in jar.items() if key.startswith(TOKEN_COOKIE)]


async def _answer(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class LocalOnly:
    """Without sign-in the app binds to loopback, trusting the people at this machine; a reverse
    proxy on this machine would hand that trust to the network. A request that came through one
    (it carries X-Forwarded-For or Forwarded) is refused with the fix, unless --insecure-no-auth."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and any(
                key in (b"x-forwarded-for", b"forwarded") for key, _ in scope.get("headers", [])):
            log.warning("refused a request through a reverse proxy: odpo runs without sign-in")
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await _answer(send, 403, "this odpo runs without sign-in, so only this machine may use it: add "
                                     "accounts with `odpo users add NAME --admin` before putting it behind a proxy")
            return
        await self.app(scope, receive, send)
