"""The Admin tab: import prompts, pause/resume training, roll back, retire the queue, export.

With auth on, the controls are hidden from non-admins on page load AND every handler checks
admin rights again in AdminService (hiding is a convenience, the check is the boundary).
"""
from __future__ import annotations

import html
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gradio as gr

from odpo.app.services.admin import AdminError, AdminService
from odpo.app.ui.common import Identity, guarded

log = logging.getLogger(__name__)

ADMIN = {"queue": True, "concurrency_limit": 1, "api_visibility": "private"}
PROMPT_TYPES = [".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt"]
EXPORT_FORMATS = [("Preference dataset (.jsonl, TRL format)", "jsonl"),
                  ("Preference dataset (.parquet)", "parquet"),
                  ("Latest adapter (PEFT directory, .zip)", "adapter")]


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
    export_file: gr.File


def build_admin_tab(*, admin: AdminService, identity: Identity, tab: gr.Tab) -> AdminTab:
    t = _layout(identity)
    h = AdminHandlers(admin, identity)
    tab.select(h.refresh, None, [t.training, t.versions], **ADMIN)
    t.import_btn.click(h.do_import, [t.upload, t.held_out], [t.upload], **ADMIN)
    t.pause.click(h.pause, None, [t.training], **ADMIN)
    t.resume.click(h.resume, None, [t.training], **ADMIN)
    t.rollback.click(h.do_rollback, [t.versions, t.retire_newer], [t.training, t.versions], **ADMIN)
    t.retire.click(h.do_retire, None, [t.training], **ADMIN)
    t.export_btn.click(h.do_export, [t.fmt], [t.export_file], **ADMIN)
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
            export_file = gr.File(label="Download", interactive=False)
    return AdminTab(box=box, note=note, training=training, versions=versions, upload=upload, held_out=held_out,
                    import_btn=import_btn, pause=pause, resume=resume, retire_newer=retire_newer,
                    rollback=rollback, retire=retire, fmt=fmt, export_btn=export_btn, export_file=export_file)


class AdminHandlers:
    """Gradio handlers; each one re-checks admin rights in AdminService (via the username)."""

    def __init__(self, admin: AdminService, identity: Identity) -> None:
        self.admin, self.identity = admin, identity

    def who(self, request: Optional[gr.Request]) -> Optional[str]:
        return self.identity.username(request)

    @guarded(outputs=2)
    def refresh(self, request: gr.Request):
        return _training_md(self.admin), _versions_update(self.admin)

    @guarded(outputs=1)
    def do_import(self, path: Optional[str], fraction: float, request: gr.Request):
        if not path:
            raise AdminError("choose a prompt file first")
        res = self.admin.import_prompts(username=self.who(request), data=Path(path).read_bytes(),
                                        filename=Path(path).name, held_out_fraction=float(fraction))
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
    def do_export(self, fmt_value: str, request: gr.Request):
        out_dir = Path(tempfile.mkdtemp(prefix="odpo-export-"))
        path = self.admin.export(username=self.who(request), fmt=fmt_value, out_dir=out_dir)
        gr.Info(f"Export written: {html.escape(path.name)}")
        return str(path)


def wire_admin_load(demo: gr.Blocks, t: AdminTab, admin: AdminService, identity: Identity) -> None:
    """Show the controls to admins only (with auth); everyone when auth is off."""
    @guarded(outputs=4)
    def load(request: gr.Request):
        allowed = admin.is_admin(identity.username(request))
        note = _note(identity.auth_on) if allowed else "Admins only. Ask an admin for access."
        training = _training_md(admin) if allowed else ""
        versions = _versions_update(admin) if allowed else gr.update(choices=[0], value=0)
        return gr.Column(visible=allowed), note, training, versions

    demo.load(load, None, [t.box, t.note, t.training, t.versions], **ADMIN)


def _note(auth_on: bool) -> str:
    if auth_on:
        return "Signed in as an admin."
    return ("Auth is off: anyone who can open this page can use these controls. "
            "Start with `--auth users.toml` to restrict them.")


def _training_md(admin: AdminService) -> str:
    paused = admin.is_paused()
    state = "**paused** (the trainer finishes its current step, then waits)" if paused else "**running**"
    c = admin.labels.counters()
    return (f"#### Training\nTraining is {state}. Serving v{c.serving_version}; {c.unconsumed} trainable "
            f"labels waiting; queue {c.queue}.")


def _versions_update(admin: AdminService):
    rows = admin.versions()
    choices = [("v0 (base model)", 0)] + [  # rolled-back versions gave their labels away: not a target
        (f"v{r['version']} (step {r['step']})", r["version"]) for r in rows if not r["rolled_back"]]
    current = max([0] + [r["version"] for r in rows if not r["rolled_back"]])
    return gr.update(choices=choices, value=current)
