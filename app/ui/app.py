"""The odpo web app: `build_app(ctx)` makes the Gradio Blocks, `launch_kwargs(ctx)` says how to
launch it (theme, CSS/JS from static/, auth), so app/web.py needs to know neither.

    demo = build_app(ctx)
    demo.launch(server_name=cfg.host, server_port=cfg.port, **launch_kwargs(ctx))

The named HTTP API that scripts use lives in app/ui/api.py and calls the same LabelService.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
from typing import Any, Optional

import gradio as gr
from starlette.middleware import Middleware

from odpo.app.services.accounts import AuthConfig, load_auth
from odpo.app.services.admin import AdminService
from odpo.app.services.import_limits import MAX_PROMPT_FILE_BYTES
from odpo.app.services.labeling import LabelService
from odpo.app.services.signin import SessionBook
from odpo.app.ui.admin import build_admin_tab, export_route, wire_admin_load
from odpo.app.ui.api import register_api
from odpo.app.ui.csp import ContentSecurityPolicy, script_hash
from odpo.app.ui.dashboard import build_dashboard_tab
from odpo.app.ui.label import build_label_tab, wire_guidelines, wire_page_load
from odpo.app.ui.sessions import LocalOnly, SignInGuard
from odpo.app.ui.shared import Identity, header_html, static_dir
from odpo.app.web import AppContext

log = logging.getLogger(__name__)

UPLOAD_CACHE_S = 600
QUEUE_MAX_SIZE = 256  # queued events of the whole app; per-labeler limits come first (services/limits.py)

def app_auth(ctx: AppContext, auth: Optional[AuthConfig] = None) -> Optional[AuthConfig]:
    """The accounts to sign in with: given, else the serve process's (ctx.auth), else what the
    config, ODPO_AUTH_FILE or the data directory's users.toml say."""
    if auth is not None:
        return auth
    return ctx.auth if ctx.auth is not None else load_auth(ctx.config.auth_file, data_dir=ctx.common.data_dir)


def build_app(ctx: AppContext, *, auth: Optional[AuthConfig] = None) -> gr.Blocks:
    """The whole UI for one serve process."""
    auth = app_auth(ctx, auth)
    identity = Identity(auth_on=auth is not None)
    labels = LabelService(db=ctx.db, config=ctx.config, sampler=ctx.sampler)
    admin = AdminService(db=ctx.db, config=ctx.config, labels=labels, auth=auth,
                         extra_admins=frozenset(ctx.admins), data_dir=ctx.common.data_dir)
    # Uploads land in Gradio's cache, readable by any signed-in user who learns the path: cleaned
    # every UPLOAD_CACHE_S (an import reads its upload at once).
    with gr.Blocks(title="odpo · Online DPO studio", analytics_enabled=False,
                   delete_cache=(UPLOAD_CACHE_S, UPLOAD_CACHE_S)) as demo:
        with gr.Row(elem_classes="odpo-top"):
            gr.HTML(header_html(auth_on=identity.auth_on))
            counters = gr.HTML(elem_id="odpo-counters")
        with gr.Tabs(elem_id="odpo-tabs"):
            with gr.Tab("Label", id="label", elem_id="odpo-tab-label") as label_tab:
                lt, handlers = build_label_tab(svc=labels, identity=identity, counters=counters,
                                               guidelines=admin.get_guidelines(),
                                               name_secret=browser_secret(ctx))
            with gr.Tab("Dashboard", id="dashboard", elem_id="odpo-tab-dashboard") as dash_tab:
                dash = build_dashboard_tab(admin=admin, tab=dash_tab, other_tabs=[label_tab])
            with gr.Tab("Admin", id="admin", elem_id="odpo-tab-admin") as admin_tab:
                at = build_admin_tab(admin=admin, identity=identity, tab=admin_tab, exports=ctx.exports)
        admin_tab.select(lambda: gr.Timer(active=False), None, dash.timer, api_visibility="private", queue=False)
        wire_page_load(demo, lt, handlers)
        wire_guidelines(demo, lt, admin.get_guidelines)  # an admin's edit shows from the next page load
        wire_admin_load(demo, at, admin, identity)
        register_api(labels, identity)
    demo.queue(max_size=QUEUE_MAX_SIZE)  # a flood waits in a bounded queue, or is told the queue is full
    return demo


def sign_in_middleware(ctx: AppContext, auth: Optional[AuthConfig]) -> list[Middleware]:
    """The sign-in guard (back-off after failures, sessions that end) when sign-in is on; without it,
    the refusal of requests that came through a reverse proxy (the app is this machine's only)."""
    if auth is None:
        return [] if ctx.config.insecure_no_auth else [Middleware(LocalOnly)]
    if ctx.sessions is None:
        ctx.sessions = SessionBook(max_age_s=ctx.config.session_hours * 3600)
    return [Middleware(SignInGuard, throttle=ctx.throttle, sessions=ctx.sessions)]


def browser_secret(ctx: AppContext) -> str:
    """Key for the name remembered in the browser (gr.BrowserState). Stable per data directory so
    a restart does not make browsers forget it; not a credential (without auth, names are trusted)."""
    return hashlib.sha256(f"odpo-labeler:{ctx.common.data_dir}".encode()).hexdigest()[:32]


def theme() -> gr.themes.Base:
    """System fonts only: the default theme would fetch Google fonts, and the page must work
    with no external network at all."""
    return gr.themes.Default(primary_hue="indigo", neutral_hue="slate",
                             font=[gr.themes.Font("system-ui"), gr.themes.Font("-apple-system"),
                                   gr.themes.Font("Segoe UI"), "sans-serif"],
                             font_mono=[gr.themes.Font("ui-monospace"), gr.themes.Font("SFMono-Regular"),
                                        gr.themes.Font("Menlo"), "monospace"])


def head_script() -> str:
    """The text of the one inline script odpo adds: odpo.js (keyboard shortcuts, latency probe)."""
    return "\n" + (static_dir() / "odpo.js").read_text(encoding="utf-8") + "\n"


def head_html() -> str:
    """odpo.js inline: no extra request, no external script. The page's Content-Security-Policy
    allows it by its hash (csp_middleware), since Gradio copies it into the page from its config."""
    return f'<meta name="color-scheme" content="light dark">\n<script>{head_script()}</script>'


def csp_middleware() -> Middleware:
    """The Content-Security-Policy on every response (app/ui/csp.py), odpo.js allowed by its hash."""
    return Middleware(ContentSecurityPolicy, script_hashes=[script_hash(head_script())])


def launch_kwargs(ctx: AppContext, *, auth: Optional[AuthConfig] = None) -> dict[str, Any]:
    """Everything `.launch()` needs besides host and port."""
    auth = app_auth(ctx, auth)
    static = static_dir()
    kwargs: dict[str, Any] = {
        "theme": theme(),
        "css_paths": [static / "odpo.css"],
        "head": head_html(),
        "allowed_paths": [str(static)],
        "favicon_path": str(static / "logo.svg"),
        "show_error": False,
        "run_history": False,  # would store every vote in the browser; nobody replays votes
        "footer_links": ["api"],
        "max_file_size": MAX_PROMPT_FILE_BYTES,  # the prompt file is the only upload
        # Admin exports download through this route, never through Gradio's file serving.
        "app_kwargs": {"routes": [export_route(ctx.exports, auth_on=auth is not None)],
                       "middleware": [csp_middleware(), *sign_in_middleware(ctx, auth)]},
    }
    if auth is not None:
        kwargs["auth"] = auth.verify
        kwargs["auth_message"] = "Sign in to label with odpo."
    return {**kwargs, **no_share_probe()}


def no_share_probe() -> dict[str, Any]:
    """Skip the probe Gradio's launch() makes to decide whether it needs a public share link.

    Why: launch() first fetches its own startup-events (no timeout), which proves the local server
    answers; it then HEADs the page once more with a 3 s timeout and takes one slow answer for
    "localhost is not accessible", raising and asking for share=True. On a busy machine (a
    training step on both cores) that turned a healthy `odpo serve` into a crash. odpo never makes
    share links, so the probe can only do harm. `_frontend` is the launch() parameter that guards
    it; a Gradio without it gets nothing passed."""
    if "_frontend" in inspect.signature(gr.Blocks.launch).parameters:
        return {"_frontend": False}
    return {}
