"""Fixtures for UI tests: a fake sampler and the real app launched in-process on a free port.

Import the fixtures you need into a test module (`from tests.ui_fixtures import live_app`).
"""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

from odpo.db import store
from odpo.db.engine import Database
from tests.db_helpers import sample

CHROMIUM = os.environ.get("ODPO_CHROMIUM", "/usr/bin/chromium")


class FakeSampler:
    """The SamplerHandle protocol without a model: a typed prompt gets a pair at once (or after
    `delay_s`, from a thread, like the real background sampler)."""

    def __init__(self, db: Database, *, delay_s: float = 0.0, serving_version: int = 0) -> None:
        self.db, self.delay_s, self.serving_version = db, delay_s, serving_version
        self.requests: list[tuple[int, str]] = []

    def request_typed(self, *, prompt_id: int, labeler: str) -> None:
        self.requests.append((prompt_id, labeler))
        if self.delay_s:
            threading.Timer(self.delay_s, self._insert, (prompt_id, labeler)).start()
        else:
            self._insert(prompt_id, labeler)

    def _insert(self, prompt_id: int, labeler: str) -> None:
        with self.db.sessions.begin() as s:
            store.add_pair(s, prompt_id=prompt_id, version=self.serving_version, a=sample("typed answer A"),
                           b=sample("typed answer B"), purpose="typed", requested_by=labeler)

    def state(self) -> dict[str, Any]:
        with self.db.sessions() as s:
            queue = store.count_pairs(s, status="queued")
        return {"serving_version": self.serving_version, "queue": queue, "generating": False,
                "last_batch_seconds": 1.5, "pairs_per_minute": 12.0, "last_error": None, "swap_ms": 40.0,
                "commit_to_serving_ms": 900.0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveApp:
    url: str
    db: Database
    sampler: FakeSampler
    ctx: Any
    demo: Any
    auth_file: Optional[Path] = None
    users: dict[str, str] = field(default_factory=dict)


def launch_app(ctx, *, port: Optional[int] = None):
    """Build and launch the real app without blocking; returns (demo, url)."""
    from odpo.app.ui.app import build_app, launch_kwargs

    port = port or free_port()
    demo = build_app(ctx)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, **launch_kwargs(ctx))
    return demo, f"http://127.0.0.1:{port}/"


def write_users(path: Path, users: dict[str, tuple[str, bool]]) -> Path:
    """A users file as `odpo users add` writes it, with a cheap scrypt cost (n 2**10: tests sign in
    often; odpo warns about such entries, and its own default is 2**17)."""
    from odpo.app.services.passwords import hash_password

    lines = []
    for name, (password, admin) in users.items():
        lines += ["[[users]]", f'name = "{name}"', f'password_hash = "{hash_password(password, n=2**10)}"',
                  f"admin = {str(admin).lower()}", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    path.chmod(0o600)
    return path


def _live(common_config, database, *, serve_kwargs: dict, users: Optional[dict] = None):
    from odpo.app.config import ServeConfig
    from odpo.app.web import AppContext

    sampler = FakeSampler(database)
    auth_file = None
    if users is not None:
        auth_file = write_users(common_config.data_dir.parent / "users.toml", users)
        serve_kwargs = {**serve_kwargs, "auth_file": auth_file}
    ctx = AppContext(common=common_config, db=database, config=ServeConfig(**serve_kwargs), sampler=sampler)
    demo, url = launch_app(ctx)
    return LiveApp(url=url, db=database, sampler=sampler, ctx=ctx, demo=demo, auth_file=auth_file,
                   users={k: v[0] for k, v in (users or {}).items()})


@pytest.fixture
def live_app(common_config, database, monkeypatch):
    """The app with no auth and a fake sampler, on a free port."""
    monkeypatch.delenv("ODPO_AUTH_FILE", raising=False)
    app = _live(common_config, database, serve_kwargs={"show_judge_after_vote": True})
    yield app
    app.demo.close()


@pytest.fixture
def live_auth_app(common_config, database, monkeypatch):
    """The app with users.toml auth: alice (admin) and bob (labeler)."""
    monkeypatch.delenv("ODPO_AUTH_FILE", raising=False)
    app = _live(common_config, database, serve_kwargs={},
                users={"alice": ("wonderland", True), "bob": ("builder", False)})
    yield app
    app.demo.close()


SHOWCASE_PROMPT = "What is the difference between a list and a tuple in Python? When should I use each?"
SHOWCASE_A = """A **list** is mutable: you can append, remove or change items after creating it. \
A **tuple** is immutable: once created, its contents cannot change.

```python
point = (3, 4)        # tuple: a fixed record
names = ["ada", "bo"]  # list: a growing collection
names.append("cy")
```

Use a tuple for fixed groups of values (coordinates, dictionary keys, function returns) \
and a list when the collection changes size or order."""
SHOWCASE_B = """Lists and tuples are both sequences. The main difference is that lists use square \
brackets and tuples use parentheses.

- Lists: `[1, 2, 3]`
- Tuples: `(1, 2, 3)`

Tuples are slightly faster, so it is usually better to always use tuples unless you have a \
reason not to."""


def add_showcase_pair(db: Database) -> int:
    """One realistic pair (markdown + code) for the README screenshot; returns the pair id."""
    with db.sessions.begin() as s:
        pid = store.add_typed_prompt(s, text=SHOWCASE_PROMPT, source="starter").id
        return store.add_pair(s, prompt_id=pid, version=3, a=sample(SHOWCASE_A), b=sample(SHOWCASE_B)).id


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium under Playwright, one per test module; skipped (reason printed) without it."""
    if not Path(CHROMIUM).exists():
        reason = f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM,
                               args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture
def wide_page(browser):
    """A fresh 1280x900 page (its own context: cookies and storage start empty)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    yield page
    ctx.close()
