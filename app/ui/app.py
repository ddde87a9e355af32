"""The odpo web app: `build_app(ctx)` makes the Gradio Blocks, `launch_kwargs(ctx)` says how to
launch it (theme, CSS/JS from static/, auth), so app/web.py needs to know neither.

    demo = build_app(ctx)
    demo.launch(server_name=cfg.host, server_port=cfg.port, **launch_kwargs(ctx))

The named HTTP API that scripts use lives in app/ui/api.py and calls the same LabelService.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any, Optional

import gradio as gr

from odpo.app.services.accounts import AuthConfig, load_auth
from odpo.app.services.admin import AdminService
from odpo.app.services.labeling import LabelService
from odpo.app.ui.admin import build_admin_tab, export_route, wire_admin_load
from odpo.app.ui.api import register_api
from odpo.app.ui.dashboard import build_dashboard_tab
from odpo.app.ui.label import build_label_tab, wire_guidelines, wire_page_load
from odpo.app.ui.shared import Identity, header_html, static_dir
from odpo.app.web import AppContext

log = logging.getLogger(__name__)

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
    return demo


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


def head_html() -> str:
    """odpo.js inline (keyboard shortcuts, latency probe): no extra request, no external script."""
    js = (static_dir() / "odpo.js").read_text(encoding="utf-8")
    return f'<meta name="color-scheme" content="light dark">\n<script>\n{js}\n</script>'


def launch_kwargs(ctx: AppContext, *, auth: Optional[AuthConfig] = None) -> dict[str, Any]:
    """Everything `.launch()` needs besides host and port."""
    auth = auth if auth is not None else load_auth(ctx.config.auth_file)
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
        "max_file_size": "200mb",
        # Admin exports download through this route, never through Gradio's file serving.
        "app_kwargs": {"routes": [export_route(ctx.exports, auth_on=auth is not None)]},
    }
    if auth is not None:
        kwargs["auth"] = auth.verify
        kwargs["auth_message"] = "Sign in to label with odpo."
    return kwargs
