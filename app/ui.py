"""The odpo web app: `build_app(ctx)` makes the Gradio Blocks, `launch_kwargs(ctx)` says how to
launch it (theme, CSS/JS from static/, auth), so app/serve.py needs to know neither.

    demo = build_app(ctx)
    demo.launch(server_name=cfg.host, server_port=cfg.port, **launch_kwargs(ctx))

The named HTTP API (`next_pair`, `vote`, `undo`, `ask_prompt`, `counters`) is declared here with
gr.api, so a script labels through gradio_client exactly like the page does:

    c = Client("http://127.0.0.1:7860/")
    pair = c.predict("alice", api_name="/next_pair")["pair"]
    c.predict(pair["assignment_id"], "left", "alice", "", api_name="/vote")
"""
from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any, Callable, Optional

import gradio as gr

from odpo.app.admin_service import AdminService
from odpo.app.auth import AuthConfig, load_auth
from odpo.app.context import AppContext
from odpo.app.label_service import LabelService, load_guidelines
from odpo.app.ui_admin import build_admin_tab, wire_admin_load
from odpo.app.ui_common import INTERNAL_ERROR, STATIC_DIR, Identity, header_html
from odpo.app.ui_dashboard import build_dashboard_tab
from odpo.app.ui_label import build_label_tab, wire_page_load
from odpo.db.errors import OdpoError

log = logging.getLogger(__name__)

API = {"queue": True, "concurrency_limit": None}


def build_app(ctx: AppContext, *, auth: Optional[AuthConfig] = None) -> gr.Blocks:
    """The whole UI for one serve process. `auth` defaults to what ctx.config/ODPO_AUTH_FILE say."""
    auth = auth if auth is not None else load_auth(ctx.config.auth_file)
    identity = Identity(auth_on=auth is not None)
    labels = LabelService(db=ctx.db, config=ctx.config, sampler=ctx.sampler)
    admin = AdminService(db=ctx.db, config=ctx.config, labels=labels, auth=auth,
                         extra_admins=frozenset(ctx.admins), data_dir=ctx.common.data_dir)
    with gr.Blocks(title="odpo · Online DPO studio", analytics_enabled=False) as demo:
        with gr.Row(elem_classes="odpo-top"):
            gr.HTML(header_html(auth_on=identity.auth_on))
            counters = gr.HTML(elem_id="odpo-counters")
        with gr.Tabs(elem_id="odpo-tabs"):
            with gr.Tab("Label", id="label", elem_id="odpo-tab-label") as label_tab:
                lt, handlers = build_label_tab(svc=labels, identity=identity, counters=counters,
                                               guidelines=load_guidelines(ctx.config.guidelines),
                                               name_secret=browser_secret(ctx))
            with gr.Tab("Dashboard", id="dashboard", elem_id="odpo-tab-dashboard") as dash_tab:
                dash = build_dashboard_tab(admin=admin, tab=dash_tab, other_tabs=[label_tab])
            with gr.Tab("Admin", id="admin", elem_id="odpo-tab-admin") as admin_tab:
                at = build_admin_tab(admin=admin, identity=identity, tab=admin_tab)
        admin_tab.select(lambda: gr.Timer(active=False), None, dash.timer, api_visibility="private", queue=False)
        wire_page_load(demo, lt, handlers)
        wire_admin_load(demo, at, admin, identity)
        register_api(labels, identity)
    return demo


def browser_secret(ctx: AppContext) -> str:
    """Key for the name remembered in the browser (gr.BrowserState). Stable per data directory so
    a restart does not make browsers forget it; not a credential (without auth, names are trusted)."""
    return hashlib.sha256(f"odpo-labeler:{ctx.common.data_dir}".encode()).hexdigest()[:32]


def register_api(labels: LabelService, identity: Identity) -> None:
    """Named endpoints for scripts. With auth on, `labeler` is ignored: the login decides."""

    @_api_guard
    def next_pair(labeler: str = "", request: gr.Request = None) -> dict:
        """The pair to label now (the one already on your screen, else the next queued pair);
        {"pair": null} while the sampler is still filling the queue."""
        view = labels.current_pair(labeler=identity.labeler(labeler, request))
        return {"pair": view.to_dict() if view else None}

    @_api_guard
    def vote(assignment_id: int, choice: str, labeler: str = "", reason: str = "",
             request: gr.Request = None) -> dict:
        """Vote on the pair with this assignment_id. choice: left | right | tie | both_bad | skip
        (left/right as returned by next_pair). Returns the label id and the next pair."""
        res = labels.vote(labeler=identity.labeler(labeler, request), assignment_id=assignment_id,
                          side=choice, reason=reason)
        return {"label_id": res.label_id, "choice": res.choice, "judge": res.judge_note,
                "pair": res.next.to_dict() if res.next else None}

    @_api_guard
    def undo(labeler: str = "", request: gr.Request = None) -> dict:
        """Take back your last vote not yet used by training; returns that pair to label again."""
        return {"pair": labels.undo(labeler=identity.labeler(labeler, request)).to_dict()}

    @_api_guard
    def ask_prompt(prompt: str, labeler: str = "", request: gr.Request = None) -> dict:
        """Queue a pair for your own prompt; it is returned by next_pair once sampled."""
        prompt_id = labels.ask(labeler=identity.labeler(labeler, request), text=prompt)
        return {"prompt_id": prompt_id, "status": "sampling"}

    @_api_guard
    def counters() -> dict:
        """Queue size, serving version, labels until the next adapter update."""
        c = labels.counters()
        return {"queue": c.queue, "serving_version": c.serving_version, "unconsumed": c.unconsumed,
                "until_update": c.until_update, "paused": c.paused}

    for fn in (next_pair, vote, undo, ask_prompt, counters):
        gr.api(fn, api_name=fn.__name__, **API)


def _api_guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """API errors as gr.Error with the one-line message; never a traceback."""
    @functools.wraps(fn)
    def endpoint(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OdpoError as exc:
            raise gr.Error(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                           print_exception=False) from None
        except Exception:  # noqa: BLE001
            log.exception("API %s failed", fn.__name__)
            raise gr.Error(INTERNAL_ERROR, print_exception=False) from None
    return endpoint


def theme() -> gr.themes.Base:
    """System fonts only: the default theme would fetch Google fonts, and the page must work
    with no external network at all."""
    return gr.themes.Default(primary_hue="indigo", neutral_hue="slate",
                             font=[gr.themes.Font("system-ui"), gr.themes.Font("-apple-system"),
                                   gr.themes.Font("Segoe UI"), "sans-serif"],
                             font_mono=[gr.themes.Font("ui-monospace"), gr.themes.Font("SFMono-Regular"),
                                        gr.themes.Font("Menlo"), "monospace"])


def head_html() -> str:
    """odpo.js inline (keyboard shortcuts, latency probe): no extra request, no external script."""
    js = (STATIC_DIR / "odpo.js").read_text(encoding="utf-8")
    return f'<meta name="color-scheme" content="light dark">\n<script>\n{js}\n</script>'


def launch_kwargs(ctx: AppContext, *, auth: Optional[AuthConfig] = None) -> dict[str, Any]:
    """Everything `.launch()` needs besides host and port."""
    auth = auth if auth is not None else load_auth(ctx.config.auth_file)
    kwargs: dict[str, Any] = {
        "theme": theme(),
        "css_paths": [STATIC_DIR / "odpo.css"],
        "head": head_html(),
        "allowed_paths": [str(STATIC_DIR)],
        "favicon_path": str(STATIC_DIR / "logo.svg"),
        "show_error": False,
        "run_history": False,  # would store every vote in the browser; nobody replays votes
        "footer_links": ["api"],
        "max_file_size": "200mb",
    }
    if auth is not None:
        kwargs["auth"] = auth.verify
        kwargs["auth_message"] = "Sign in to label with odpo."
    return kwargs
