"""The Content-Security-Policy middleware (app/ui/csp.py): the header on every response, a fresh
nonce in every script tag of a page, no remote origin in the policy. That the real page works
under it, with no violation, is checked in Chromium by tests/test_security_xss.py."""
from __future__ import annotations

import re

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from odpo.app.ui.csp import ContentSecurityPolicy, policy, script_hash
from tests import ui_fixtures

live_app = ui_fixtures.live_app  # fixture, requested by name

PAGE = '<html><head><script>var a = 1;</script><SCRIPT type="module" src="./x.js"></SCRIPT></head></html>'


def app() -> Starlette:
    async def chunks():
        yield b"<html><script>var "
        yield b"b = 2;</script></html>"

    routes = [
        Route("/page", lambda r: HTMLResponse(PAGE)),
        Route("/json", lambda r: JSONResponse({"html": "<script>x</script>"})),
        Route("/stream", lambda r: StreamingResponse(chunks(), media_type="text/html")),
        Route("/own", lambda r: HTMLResponse(PAGE, headers={"Content-Security-Policy": "default-src 'none'"})),
    ]
    return Starlette(routes=routes, middleware=[Middleware(ContentSecurityPolicy, script_hashes=["'sha256-abc='"])])


def nonce_of(header: str) -> str:
    return re.search(r"'nonce-([^']+)'", header).group(1)


def test_every_script_tag_of_a_page_gets_the_responses_nonce():
    with TestClient(app()) as client:
        first, second = client.get("/page"), client.get("/page")
    nonce = nonce_of(first.headers["content-security-policy"])
    assert first.text.count(f'<script nonce="{nonce}"') == 2  # <SCRIPT too: tag names know no case
    assert int(first.headers["content-length"]) == len(first.content)
    assert nonce != nonce_of(second.headers["content-security-policy"])  # fresh per response
    assert "'sha256-abc='" in first.headers["content-security-policy"]


def test_other_responses_get_the_header_and_their_body_untouched():
    with TestClient(app()) as client:
        json_resp, streamed, own, head = (client.get("/json"), client.get("/stream"), client.get("/own"),
                                          client.head("/page"))
    assert json_resp.json() == {"html": "<script>x</script>"} and "content-security-policy" in json_resp.headers
    assert streamed.text.startswith("<html><script nonce=") and streamed.text.endswith("b = 2;</script></html>")
    assert own.headers["content-security-policy"] == "default-src 'none'" and "nonce=" not in own.text
    assert "content-security-policy" in head.headers and head.content == b""


def test_the_policy_names_no_other_origin():
    sources = {s for directive in policy("N", ["'sha256-abc='"]).split(";") for s in directive.split()[1:]}
    assert sources <= {"'self'", "'none'", "'nonce-N'", "'sha256-abc='", "'unsafe-eval'", "'unsafe-inline'",
                       "data:", "blob:"}
    assert "'unsafe-inline'" not in policy("N").split("script-src ")[1].split(";")[0]  # scripts: never inline
    assert script_hash("x").startswith("'sha256-") and script_hash("x") != script_hash("y")


@pytest.mark.timeout(60)
def test_the_web_app_sends_it_on_pages_and_api_answers(live_app):
    page = httpx.get(live_app.url)
    nonce = nonce_of(page.headers["content-security-policy"])
    tags = re.findall(r"<script[^>]*>", page.text, re.IGNORECASE)
    assert tags and all(f'nonce="{nonce}"' in tag for tag in tags)
    assert "content-security-policy" in httpx.get(live_app.url + "config").headers
