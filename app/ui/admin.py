"""The Admin tab: import prompts, pause/resume training, roll back, retire the queue, export, mark
gold answers and edit the labeling guidelines.

With auth on, the controls are hidden from non-admins on page load AND every handler checks
admin rights again in AdminService (hiding is a convenience, the check is the boundary).

Exports are never handed to Gradio (it would serve them at /gradio_api/file= to anyone signed
in): the tab shows a link to `/odpo/export/<token>`, a route that sends the file only to the admin
who made it (app/services/exports.py keeps the files and deletes them).
"""
from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import gradio as gr
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

from odpo.app.services.admin import MAX_GUIDELINES_CHARS, AdminError, AdminService
from odpo.app.services.exports import Export, ExportStore, export_gguf_zip
from odpo.app.services.status import DOWN, PAUSED, STARTING, UNKNOWN, trainer_state
from odpo.app.ui.shared import Identity, guarded

log = logging.getLogger(__name__)

ADMIN = {"queue": True, "concurrency_limit": 1, "api_visibility": "private"}
PROMPT_TYPES = [".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt"]
EXPORT_PATH = "odpo/export/"  # relative to the page, like the sign-out link (works under a root path)
EXPORT_FORMATS = [("Preference dataset (.jsonl, TRL format)", "jsonl"),
                  ("Preference dataset (.parquet)", "parquet"),
                  ("Latest adapter (PEFT directory, .zip)", "adapter"),
                  ("Latest adapter for llama.cpp / Ollama (LoRA GGUF + Modelfile, .zip)", "gguf")]


@dataclass
class AdminTab:
    box: gr.Column
    note: gr.Markdown
    training: gr.Markdown
    versions: gr.Dropdown
    upload: gr.File
    held_out: gr.Slider
    import_btn: gr.Button
    pause: gr.Button
    resume: gr.Button
    retire_newer: gr.Checkbox
    rollback: gr.Button
    retire: gr.Button
    fmt: gr.Dropdown
    export_btn: gr.Button
    export_file: gr.HTML
    gold_pair: gr.Textbox
    gold_choice: gr.Radio
    gold_btn: gr.Button
    guidelines: gr.Textbox
    guidelines_btn: gr.Button
    typed_list: gr.HTML
    typed_ids: gr.Textbox
    promote_btn: gr.Button


def build_admin_tab(*, admin: AdminService, identity: Identity, tab: gr.Tab, exports: ExportStore) -> AdminTab:
    t = _layout(identity)
    h = AdminHandlers(admin, identity, exports)
    tab.select(h.refresh, None, [t.training, t.versions], **ADMIN)
    t.import_btn.click(h.do_import, [t.upload, t.held_out], [t.upload], **ADMIN)
    t.pause.click(h.pause, None, [t.training], **ADMIN)
    t.resume.click(h.resume, None, [t.training], **ADMIN)
    t.rollback.click(h.do_rollback, [t.versions, t.retire_newer], [t.training, t.versions], **ADMIN)
    t.retire.click(h.do_retire, None, [t.training], **ADMIN)
    t.export_btn.click(h.do_export, [t.fmt], [t.export_file], **ADMIN)
    t.gold_btn.click(h.do_gold, [t.gold_pair, t.gold_choice], [t.gold_pair], **ADMIN)
    t.guidelines_btn.click(h.do_guidelines, [t.guidelines], [t.guidelines], **ADMIN)
    t.promote_btn.click(h.do_promote, [t.typed_ids], [t.typed_ids, t.typed_list], **ADMIN)
    tab.select(h.typed, None, [t.typed_list], **ADMIN)
    return t


def _layout(identity: Identity) -> AdminTab:
    note = gr.Markdown(_note(identity.auth_on), elem_id="odpo-admin-note")
    with gr.Column(elem_id="odpo-admin-box") as box:
        with gr.Group():
            gr.Markdown("#### Import prompts\nJSONL/JSON (`prompt` or chat `messages`), CSV/TSV (`prompt` "
                        "column), Parquet or plain text (one per line). A file is imported all or nothing.")
            upload = gr.File(label="Prompt file", file_types=PROMPT_TYPES, type="filepath", elem_id="odpo-upload")
            held_out = gr.Slider(0.0, 0.5, value=0.0, step=0.05, label="Held-out fraction (eval prompts)")
            import_btn = gr.Button("Import", variant="primary", elem_id="odpo-import-btn")
        with gr.Group():
            training = gr.Markdown(elem_id="odpo-admin-training")
            with gr.Row():
                pause = gr.Button("Pause training", elem_id="odpo-pause-btn")
                resume = gr.Button("Resume training", elem_id="odpo-resume-btn")
        with gr.Group():
            gr.Markdown("#### Roll back\nServe and train from an earlier version; newer versions are set "
                        "aside and their labels are trained again on top of it.")
            with gr.Row():
                versions = gr.Dropdown(label="Version", choices=[0], value=0, elem_id="odpo-rollback-version")
                retire_newer = gr.Checkbox(value=True, label="Retire queued pairs sampled by newer versions")
            rollback = gr.Button("Roll back to this version", variant="stop", elem_id="odpo-rollback-btn")
        with gr.Group():
            gr.Markdown("#### Queue\nDrop every queued pair nobody is looking at (the sampler refills it).")
            retire = gr.Button("Retire the queue", variant="stop", elem_id="odpo-retire-btn")
        with gr.Group():
            gr.Markdown("#### Export labels")
            with gr.Row():
                fmt = gr.Dropdown(EXPORT_FORMATS, value="jsonl", label="Format")
                export_btn = gr.Button("Export", elem_id="odpo-export-btn")
            export_file = gr.HTML(elem_id="odpo-export-link")
        gold_pair, gold_choice, gold_btn, guidelines, guidelines_btn = _quality_layout()
        typed_list, typed_ids, promote_btn = _typed_layout()
    return AdminTab(typed_list=typed_list, typed_ids=typed_ids, promote_btn=promote_btn,
                    box=box, note=note, training=training, versions=versions, upload=upload, held_out=held_out,
                    import_btn=import_btn, pause=pause, resume=resume, retire_newer=retire_newer,
                    rollback=rollback, retire=retire, fmt=fmt, export_btn=export_btn, export_file=export_file,
                    gold_pair=gold_pair, gold_choice=gold_choice, gold_btn=gold_btn, guidelines=guidelines,
                    guidelines_btn=guidelines_btn)


def _quality_layout() -> tuple:
    """Gold answers (for the dashboard's labeler quality) and the guidelines editor."""
    with gr.Group():
        gr.Markdown("#### Gold answer\nThe right answer of a pair, in pair terms (A = the pair's first sample, "
                    "whatever side a labeler saw it on); people's agreement with gold is on the Dashboard.")
        with gr.Row():
            gold_pair = gr.Textbox(label="Pair id", max_lines=1, max_length=20, elem_id="odpo-gold-pair")
            gold_choice = gr.Radio([("A", "a"), ("B", "b")], value="a", label="Gold answer", elem_id="odpo-gold-choice")
        gold_btn = gr.Button("Mark gold", elem_id="odpo-gold-btn")
    with gr.Group():
        gr.Markdown("#### Labeling guidelines\nMarkdown shown on the Label tab (from each page's next load); "
                    "save an empty text to go back to the configured ones.")
        guidelines = gr.Textbox(show_label=False, lines=10, max_length=MAX_GUIDELINES_CHARS,
                                elem_id="odpo-guidelines-edit")
        guidelines_btn = gr.Button("Save guidelines", elem_id="odpo-guidelines-btn")
    return gold_pair, gold_choice, gold_btn, guidelines, guidelines_btn


def _typed_layout() -> tuple:
    """Typed prompts: a labeler's own until promoted (then shared, judged and trained on)."""
    with gr.Group():
        gr.Markdown("#### Typed prompts\nPrompts labelers typed are sampled for them alone and never trained "
                    "on. Promote the ones everyone should label (ids, comma separated).")
        typed_list = gr.HTML(elem_id="odpo-typed-list")
        with gr.Row():
            typed_ids = gr.Textbox(label="Prompt ids", max_lines=1, max_length=400, elem_id="odpo-typed-ids")
            promote_btn = gr.Button("Promote", elem_id="odpo-promote-btn")
    return typed_list, typed_ids, promote_btn


def typed_html(rows: list[dict[str, Any]]) -> str:
    """The waiting typed prompts, escaped (a labeler wrote them)."""
    if not rows:
        return "<p><small>No typed prompts are waiting.</small></p>"
    items = "".join(f"<li><code>{r['id']}</code> {html.escape(r['text'][:200])}</li>" for r in rows)
    return f"<ul class='odpo-typed'>{items}</ul>"


class AdminHandlers:
    """Gradio handlers; each one re-checks admin rights in AdminService (via the username)."""

    def __init__(self, admin: AdminService, identity: Identity, exports: ExportStore) -> None:
        self.admin, self.identity, self.exports = admin, identity, exports

    def who(self, request: Optional[gr.Request]) -> Optional[str]:
        return self.identity.username(request)

    @guarded(outputs=2)
    def refresh(self, request: gr.Request):
        return _training_md(self.admin), _versions_update(self.admin)

    @guarded(outputs=1)
    def do_import(self, path: Optional[str], fraction: float, request: gr.Request):
        if not path:
            raise AdminError("choose a prompt file first")
        # The path, not its bytes: the service checks admin rights before it opens the upload.
        res = self.admin.import_prompts(username=self.who(request), path=Path(path), filename=Path(path).name,
                                        held_out_fraction=float(fraction))
        gr.Info(f"Imported {res.added} prompts ({res.held_out} held out), skipped {res.duplicates} duplicates.")
        return None

    def pause(self, request: gr.Request):
        return self._set_paused(True, request)

    def resume(self, request: gr.Request):
        return self._set_paused(False, request)

    @guarded(outputs=1)
    def _set_paused(self, paused: bool, request: gr.Request):
        self.admin.set_paused(username=self.who(request), paused=paused)
        gr.Info("Training paused." if paused else "Training resumed.")
        return _training_md(self.admin)

    @guarded(outputs=2)
    def do_rollback(self, version, retire_newer_pairs: bool, request: gr.Request):
        if version is None:
            raise AdminError("choose a version first")
        res = self.admin.rollback(username=self.who(request), version=int(version),
                                  retire_newer=bool(retire_newer_pairs))
        gr.Info(f"Rolled back to v{res['version']}: {res['released_labels']} labels will be trained again, "
                f"{res['retired_pairs']} queued pairs retired.")
        return _training_md(self.admin), _versions_update(self.admin)

    @guarded(outputs=1)
    def do_retire(self, request: gr.Request):
        n = self.admin.retire_queue(username=self.who(request))
        gr.Info(f"Retired {n} queued pairs.")
        return _training_md(self.admin)

    @guarded(outputs=1)
    def do_gold(self, pair_id: Optional[str], choice: Optional[str], request: gr.Request):
        if not (pair_id or "").strip():
            raise AdminError("enter a pair id first")
        res = self.admin.mark_gold(username=self.who(request), pair_id=pair_id, choice=choice or "")
        gr.Info(f"Pair {res['pair_id']}: gold answer {res['choice'].upper()}.")
        return ""

    @guarded(outputs=1)
    def typed(self, request: gr.Request):
        if not self.admin.is_admin(self.who(request)):
            return ""
        return typed_html(self.admin.typed_prompts(username=self.who(request)))

    @guarded(outputs=2)
    def do_promote(self, ids_text: Optional[str], request: gr.Request):
        try:
            ids = [int(part) for part in (ids_text or "").replace(" ", "").split(",") if part]
        except ValueError:
            raise AdminError("prompt ids are whole numbers, comma separated") from None
        if not ids:
            raise AdminError("enter the ids of the prompts to promote")
        moved = self.admin.promote_prompts(username=self.who(request), ids=ids)
        gr.Info(f"Promoted {moved} of {len(ids)} prompt(s).")
        return "", typed_html(self.admin.typed_prompts(username=self.who(request)))

    @guarded(outputs=1)
    def do_guidelines(self, text: Optional[str], request: gr.Request):
        saved = self.admin.set_guidelines(username=self.who(request), text=text)
        gr.Info("Guidelines saved: labelers see them when they next open or reload the page.")
        return saved

    @guarded(outputs=1)
    def do_export(self, fmt_value: str, request: gr.Request):
        """Write the export into the store's own directory and show a link only its maker can use."""
        self.admin.require_admin(self.who(request))
        out_dir = self.exports.new_dir()
        try:
            if fmt_value == "gguf":
                path = export_gguf_zip(self.admin.db, out_dir=out_dir, run=self.admin.config.run,
                                       data_dir=self.admin.data_dir)
            else:
                path = self.admin.export(username=self.who(request), fmt=fmt_value, out_dir=out_dir)
        except BaseException:
            self.exports.discard_dir(out_dir)
            raise
        entry = self.exports.add(path, owner=self.who(request))
        gr.Info(f"Export written: {html.escape(path.name)}")
        return export_link_html(entry, ttl_s=self.exports.ttl_s)


def export_link_html(entry: Export, *, ttl_s: float) -> str:
    name = html.escape(entry.path.name)
    return (f'<a class="odpo-export-link" href="{EXPORT_PATH}{entry.token}" download="{name}">Download {name}</a>'
            f' <small>(for you only; the link works for {ttl_s / 60:.0f} minutes)</small>')


def export_route(exports: ExportStore, *, auth_on: bool) -> Route:
    """`GET /odpo/export/<token>`: the file to the admin who made it, and to nobody else (with auth
    off, everyone who can open the page is an admin, as on the tab itself)."""
    async def download(request: Request) -> Response:
        entry = exports.get(request.path_params["token"])
        if entry is None:
            return PlainTextResponse("This export link has expired: export again in the Admin tab.", status_code=404)
        if auth_on:
            user = request_user(request)
            if user is None:
                return PlainTextResponse("Sign in first.", status_code=401)
            if user != entry.owner:
                return PlainTextResponse("Only the admin who made this export can download it.", status_code=403)
        if not entry.path.is_file():
            return PlainTextResponse("This export is gone: export again in the Admin tab.", status_code=404)
        return FileResponse(entry.path, filename=entry.path.name)

    return Route("/" + EXPORT_PATH + "{token}", download, methods=["GET"])


def request_user(request: Request) -> Optional[str]:
    """The signed-in user of a plain HTTP request, as Gradio's own /user route finds it (its
    login cookie -> its token table); None when not signed in."""
    app: Any = request.app
    cookie_id = getattr(app, "cookie_id", None)
    tokens = getattr(app, "tokens", None)
    if cookie_id is None or not isinstance(tokens, dict):
        return None
    token = request.cookies.get(f"access-token-{cookie_id}") or request.cookies.get(
        f"access-token-unsecure-{cookie_id}")
    return tokens.get(token) if token else None


def wire_admin_load(demo: gr.Blocks, t: AdminTab, admin: AdminService, identity: Identity) -> None:
    """Show the controls to admins only (with auth); everyone when auth is off."""
    @guarded(outputs=5)
    def load(request: gr.Request):
        allowed = admin.is_admin(identity.username(request))
        note = _note(identity.auth_on) if allowed else "Admins only. Ask an admin for access."
        training = _training_md(admin) if allowed else ""
        versions = _versions_update(admin) if allowed else gr.update(choices=[0], value=0)
        guidelines = admin.get_guidelines() if allowed else ""
        return gr.Column(visible=allowed), note, training, versions, guidelines

    demo.load(load, None, [t.box, t.note, t.training, t.versions, t.guidelines], **ADMIN)


def _note(auth_on: bool) -> str:
    if auth_on:
        return "Signed in as an admin."
    return ("Auth is off: anyone who can open this page can use these controls. "
            "Start with `--auth users.toml` to restrict them.")


def _training_md(admin: AdminService) -> str:
    paused = admin.is_paused()
    with admin.db.sessions() as s:
        trainer = trainer_state(s, run=admin.config.run)
    state = "**paused** (the trainer finishes its current step, then waits)" if paused else "**on**"
    if trainer.state == DOWN:
        state += ", but **no trainer is running** (" + trainer.detail + ")"
    elif trainer.state == STARTING:
        state += "; the trainer is starting"
    elif trainer.state == UNKNOWN:
        state += "; no trainer seen lately (start `odpo train`, or use `odpo up`)"
    elif trainer.state == PAUSED:
        state += f"; **{html.escape(trainer.detail)}**"
    c = admin.labels.counters()
    return (f"#### Training\nTraining is {state}. Serving v{c.serving_version}; {c.unconsumed} trainable "
            f"labels waiting; queue {c.queue}.")


def _versions_update(admin: AdminService):
    rows = admin.versions()
    choices = [("v0 (base model)", 0)] + [  # rolled-back versions gave their labels away: not a target
        (f"v{r['version']} (step {r['step']})", r["version"]) for r in rows if not r["rolled_back"]]
    current = max([0] + [r["version"] for r in rows if not r["rolled_back"]])
    return gr.update(choices=choices, value=current)
