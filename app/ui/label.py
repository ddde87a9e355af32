"""The Label tab: prompt, two responses side by side, vote buttons with shortcuts, undo, typed
prompts, guidelines, and a sampling state that resolves by itself (gr.Timer).

Speed (DESIGN budget: next pair p50 <= 50 ms after a vote): the page renders TWO slots, the pair
on screen and the next one, hidden. A vote flips the visible slot in the browser at once
(static/odpo.js) and the server refills the hidden slot in the same request that records the vote
(app/label_slots.py). The server's answer carries a small sync element (active slot, hidden slot
ready, sequence number) that the page obeys, so a refused vote snaps back to the truth.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import gradio as gr

from odpo.app.services.labeling import LabelService, guest_name, normalise_labeler
from odpo.app.services.rendering import render_markdown
from odpo.app.services.status import TrainerWatch, waiting_message
from odpo.app.ui.api import client_key
from odpo.app.ui.shared import Identity, NotSignedInError, counters_html, guarded, pair_outputs, skips
from odpo.app.ui.slots import LabelSlots, SlotBook, SlotState, SlotUpdate
from odpo.db.errors import OdpoError
from odpo.trainer.options import MAX_PROMPT_CHARS

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0
FAST = {"queue": True, "concurrency_limit": None, "api_visibility": "private", "show_progress": "hidden"}
BUTTONS = [  # (side, label, elem_id, variant)
    ("left", "A is better  ⟨1 / ←⟩", "odpo-btn-left", "primary"),
    ("right", "B is better  ⟨2 / →⟩", "odpo-btn-right", "primary"),
    ("tie", "Tie  ⟨3⟩", "odpo-btn-tie", "secondary"),
    ("both_bad", "Both bad  ⟨4⟩", "odpo-btn-bad", "secondary"),
    ("skip", "Skip  ⟨S⟩", "odpo-btn-skip", "secondary"),
]
MD = {"latex_delimiters": [], "sanitize_html": True}  # the judge's note (odpo's own words)
# Runs in the browser before a vote is sent: adds what the person was looking at, "slot:seq" (odpo.js).
VOTE_JS = "(name, reason, seen) => [name, reason, window.odpo ? window.odpo.voted : '']"
NO_NAME_YET = "Type your name at the top of the page first; then your votes count."
PAGE_LOADING = "The page is still loading: vote once the pair is on screen."


@dataclass
class LabelTab:
    saved_name: gr.BrowserState
    name: gr.Textbox
    slots: list  # [prompt0, left0, right0, prompt1, left1, right1, sync]
    seen: gr.Textbox  # hidden: "slot:seq" the page showed at the vote (filled by VOTE_JS)
    reason: gr.Textbox
    judge: gr.Markdown
    counters: gr.HTML
    timer: gr.Timer
    buttons: dict
    undo: gr.Button
    ask_box: gr.Textbox
    ask_btn: gr.Button
    guidelines: Optional[gr.HTML] = None


class LabelHandlers:
    """Server side of the tab: one SlotState per page (Gradio session)."""

    def __init__(self, svc: LabelService, identity: Identity) -> None:
        self.svc, self.identity = svc, identity
        self.slots, self.book = LabelSlots(svc), SlotBook()
        self.trainer = TrainerWatch(svc.db, run=svc.config.run)

    def state(self, request: Optional[gr.Request]) -> SlotState:
        """This page's slots; its key (the Gradio session) is also the client that holds its claims."""
        return self.book.get(client_key(request))

    def labeler(self, name: Optional[str], request: Optional[gr.Request]) -> str:
        return self.identity.labeler(name, request)

    def ready_labeler(self, st: SlotState, name: Optional[str], request: Optional[gr.Request]) -> Optional[str]:
        """The labeler a vote or undo acts for, or None (after a calm note) when the page is not
        ready for one: no name yet, or the page load that sets it has not finished. A shortcut
        pressed that early is an ordinary moment, not an error: nothing to log, nothing to undo."""
        try:
            labeler = self.labeler(name, request)
        except NotSignedInError:
            raise
        except OdpoError:
            gr.Info(NO_NAME_YET)
            return None
        if st.labeler is None:
            gr.Info(PAGE_LOADING)
            return None
        return labeler

    def waiting(self) -> tuple[str, str]:
        """What an empty slot says it waits for (the model loading, the first pair, …)."""
        return waiting_message(self.svc.sampler_state())

    def render(self, st: SlotState, update: Optional[SlotUpdate]) -> tuple:
        """slot_outputs, with empty slots saying what they wait for (remembered for the tick)."""
        waiting = self.waiting()
        if update is not None and any(v is None for v in update.changed.values()):
            st.waiting = waiting
        return slot_outputs(update, waiting)

    def counters(self, st: SlotState, *, refresh: bool, skip_same: bool = False):
        """The counters strip; with skip_same, gr.skip() when the page already shows it."""
        c = self.slots.counters(st) if refresh or st.counters is None else st.counters
        text = counters_html(c, session_labels=st.session_labels, labeler=st.labeler, trainer=self.trainer.get())
        if skip_same and text == st.counters_html:
            return gr.skip()
        st.counters_html = text
        return text


def parse_seen(seen: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """"slot:seq" from the page (VOTE_JS) -> (slot, seq); (None, None) when absent (no JS)."""
    slot, _, seq = (seen or "").strip().partition(":")
    return (int(slot) if slot in ("0", "1") else None, int(seq) if seq.isdigit() else None)


def slot_outputs(update: Optional[SlotUpdate], waiting: Optional[tuple[str, str]] = None) -> tuple:
    """7 outputs: both slots (gr.skip() where unchanged) and the sync element."""
    if update is None:
        return skips(7)
    out: list = []
    for slot in (0, 1):
        changed = slot in update.changed
        out += list(pair_outputs(update.changed[slot], waiting)) if changed else [gr.skip()] * 3
    sync = (f'<div class="odpo-sync-data" data-active="{update.active}" data-ready="{int(update.ready)}" '
            f'data-seq="{update.seq}"></div>')
    return (*out, sync)


def build_label_tab(*, svc: LabelService, identity: Identity, guidelines: str, counters: gr.HTML,
                    name_secret: str) -> tuple:
    """`name_secret` must be stable across restarts, or browsers forget the remembered name."""
    t = _layout(identity=identity, guidelines=guidelines, counters=counters, name_secret=name_secret)
    h = LabelHandlers(svc, identity)
    _wire_votes(t, h)
    _wire_tick(t, h)
    _wire_ask(t, h)
    if not identity.auth_on:
        _wire_name(t, h)
    return t, h


def _layout(*, identity: Identity, guidelines: str, counters: gr.HTML, name_secret: str) -> LabelTab:
    with gr.Row(elem_classes="odpo-namerow", visible=not identity.auth_on):
        gr.HTML('<span class="odpo-name-label">Labeling as</span>', scale=0, min_width=90)
        name = gr.Textbox(show_label=False, placeholder="your name", max_length=100, container=False,
                          elem_id="odpo-name", min_width=160, scale=1)
    slots: list = []
    # Prompts, answers and guidelines arrive as HTML the server already cleaned (app/services/
    # rendering.py): gr.HTML shows it as it is, where gr.Markdown would read it as markdown again.
    for i in (0, 1):  # slot 1 starts hidden (CSS keyed on <html data-odpo-slot>)
        with gr.Column(elem_id=f"odpo-slot-{i}", elem_classes="odpo-slot"):
            prompt = gr.HTML("<h3>Loading…</h3>", elem_id=f"odpo-prompt-{i}", elem_classes=["odpo-prompt", "odpo-md"])
            with gr.Row(equal_height=True, elem_classes="odpo-pair"):
                with gr.Column(elem_classes="odpo-resp"):
                    gr.HTML('<div class="odpo-resp-title">Response A</div>')
                    left = gr.HTML(elem_id=f"odpo-left-{i}", elem_classes=["odpo-text", "odpo-md"])
                with gr.Column(elem_classes="odpo-resp"):
                    gr.HTML('<div class="odpo-resp-title">Response B</div>')
                    right = gr.HTML(elem_id=f"odpo-right-{i}", elem_classes=["odpo-text", "odpo-md"])
        slots += [prompt, left, right]
    slots.append(gr.HTML("", elem_id="odpo-sync", container=False, padding=False))
    seen = gr.Textbox(visible=False, elem_id="odpo-seen")
    with gr.Row(elem_classes="odpo-actions", elem_id="odpo-actions"):
        buttons = {side: gr.Button(label, variant=variant, elem_id=elem_id, min_width=110)
                   for side, label, elem_id, variant in BUTTONS}
        undo = gr.Button("Undo  ⟨U⟩", elem_id="odpo-btn-undo", variant="secondary", min_width=90)
    reason = gr.Textbox(show_label=False, placeholder="Optional: why? (one line, Esc to leave the field)",
                        max_length=500, elem_id="odpo-reason", lines=1)
    judge = gr.Markdown(elem_id="odpo-judge", **MD)
    with gr.Accordion("Ask your own prompt", open=False, elem_id="odpo-ask"):
        ask_box = gr.Textbox(show_label=False, lines=3, max_length=MAX_PROMPT_CHARS, elem_id="odpo-ask-box",
                             placeholder="Type a prompt: odpo samples two responses from the current policy "
                                         "and shows them to you for labeling.")
        ask_btn = gr.Button("Sample a pair for this prompt", elem_id="odpo-ask-btn", size="sm")
    with gr.Accordion("Labeling guidelines", open=False, elem_id="odpo-guidelines"):
        guide = gr.HTML(render_markdown(guidelines), elem_id="odpo-guidelines-text", elem_classes="odpo-md")
    saved = gr.BrowserState("", storage_key="odpo-labeler", secret=name_secret)
    return LabelTab(saved_name=saved, name=name, slots=slots, seen=seen,
                    reason=reason, judge=judge, counters=counters, timer=gr.Timer(TICK_SECONDS),
                    buttons=buttons, undo=undo, ask_box=ask_box, ask_btn=ask_btn, guidelines=guide)


VOTE_OUTPUTS = 10  # both slots + sync (7), reason, counters, judge note


def resync_handler(h: LabelHandlers) -> Callable:
    """After a refused vote: redraw both slots from the server's truth, keep the reason. Gets the
    failed handler's arguments (the request may come positionally). Never raises: with no
    labeler to resync for (no name yet), it leaves the page as it is."""
    def resync(name, reason, *rest, request: Optional[gr.Request] = None):
        request = request or next((a for a in rest if isinstance(a, gr.Request) or hasattr(a, "session_hash")), None)
        st = h.state(request)
        try:
            labeler = h.labeler(name, request)
        except OdpoError:
            return skips(VOTE_OUTPUTS)
        update = h.slots.resync(st, labeler=labeler)
        return (*h.render(st, update), gr.skip(), h.counters(st, refresh=False), "")
    return resync


def not_taken(h: LabelHandlers, st: SlotState) -> tuple:
    """The answer to a vote or undo the page was not ready for: slots, reason and note untouched,
    the sync element re-told (a page that flipped ahead flips back)."""
    return (*slot_outputs(h.slots.snapshot(st)), gr.skip(), gr.skip(), gr.skip())


def vote_handler(h: LabelHandlers, side: str) -> Callable:
    """The handler of one vote button (and its shortcut), as Gradio calls it."""
    @guarded(outputs=VOTE_OUTPUTS, on_error=resync_handler(h))
    def ui_vote(name: str, reason: str, seen: str, request: gr.Request):
        st = h.state(request)
        labeler = h.ready_labeler(st, name, request)
        if labeler is None:
            return not_taken(h, st)
        seen_slot, seen_seq = parse_seen(seen)
        update = h.slots.vote(st, labeler=labeler, side=side, reason=reason,
                              seen_slot=seen_slot, seen_seq=seen_seq)
        note = f"Judge, for the pair you just labeled: {update.judge_note}" if update.judge_note else ""
        return (*h.render(st, update), "", h.counters(st, refresh=False), note)
    ui_vote.__name__ = f"ui_vote_{side}"
    return ui_vote


def undo_handler(h: LabelHandlers) -> Callable:
    @guarded(outputs=VOTE_OUTPUTS, on_error=resync_handler(h))
    def ui_undo(name: str, reason: str, request: gr.Request):
        st = h.state(request)
        labeler = h.ready_labeler(st, name, request)
        if labeler is None:
            return not_taken(h, st)
        update = h.slots.undo(st, labeler=labeler)
        gr.Info("Vote taken back: label this pair again.")
        return (*h.render(st, update), "", h.counters(st, refresh=False), "")
    return ui_undo


def _wire_votes(t: LabelTab, h: LabelHandlers) -> None:
    outputs = t.slots + [t.reason, t.counters, t.judge]
    for side, button in t.buttons.items():
        button.click(vote_handler(h, side), [t.name, t.reason, t.seen], outputs, js=VOTE_JS, **FAST)
    t.undo.click(undo_handler(h), [t.name, t.reason], outputs, **FAST)


def _wire_tick(t: LabelTab, h: LabelHandlers) -> None:
    """Every second: fill an empty slot (the queue was empty), bring the pair for a typed prompt
    to the front when it is ready, drop expired claims, and refresh the counters."""
    outputs = t.slots + [t.counters]

    @guarded(outputs=len(outputs), ticking=True)
    def tick(name: str, request: gr.Request):
        try:
            labeler = h.labeler(name, request)
        except OdpoError:  # no name yet: nothing to claim (typing one loads a pair)
            return skips(len(outputs))
        st = h.state(request)
        if st.labeler is None:  # page load has not finished
            return skips(len(outputs))
        waiting = h.waiting()
        update = h.slots.refresh(st, labeler=labeler, waiting=waiting)
        if update is not None and update.typed_arrived:
            gr.Info("The pair for your prompt is ready.")
        if update is not None and not update.changed:
            update = None  # nothing new on screen: send no slot updates at all
        return (*slot_outputs(update, waiting), h.counters(st, refresh=True, skip_same=True))

    t.timer.tick(tick, [t.name], outputs, **FAST)


def _wire_ask(t: LabelTab, h: LabelHandlers) -> None:
    @guarded(outputs=1)
    def ui_ask(text: str, name: str, request: gr.Request):
        h.svc.ask(labeler=h.labeler(name, request), text=text)
        h.state(request).typed_pending = True
        gr.Info("Sampling a pair for your prompt; it will appear here when ready.")
        return ""

    t.ask_btn.click(ui_ask, [t.ask_box, t.name], [t.ask_box], **FAST)


def _wire_name(t: LabelTab, h: LabelHandlers) -> None:
    """No auth: the typed name is the labeler id, remembered in this browser (BrowserState)."""
    outputs = [t.saved_name] + t.slots + [t.counters]

    @guarded(outputs=len(outputs))
    def rename(name: str, request: gr.Request):
        new = normalise_labeler(name)
        st = h.state(request)
        if new == st.labeler:
            return skips(len(outputs))
        update = h.slots.open(st, labeler=new)  # gives the old name's claims back to the queue
        return (new, *h.render(st, update), h.counters(st, refresh=False))

    for event in (t.name.submit, t.name.blur):
        event(rename, [t.name], outputs, **FAST)


def wire_page_load(demo: gr.Blocks, t: LabelTab, h: LabelHandlers) -> None:
    """On page open: restore (or invent) the labeler name and fill both slots."""
    outputs = [t.name, t.saved_name] + t.slots + [t.counters]

    @guarded(outputs=len(outputs))
    def load(saved: str, request: gr.Request):
        if h.identity.auth_on:
            name = h.labeler(None, request)
        else:
            try:
                name = normalise_labeler(saved)
            except OdpoError:  # nothing (or something unusable) remembered in this browser
                name = guest_name()
        st = h.state(request)
        update = h.slots.open(st, labeler=name)
        return (name, name, *h.render(st, update), h.counters(st, refresh=True))

    def unload(request: gr.Request):
        h.book.drop(client_key(request))  # claims stay: a reload takes them over (LabelSlots.open)

    demo.load(load, [t.saved_name], outputs, **FAST)
    demo.unload(unload)


def guidelines_text(source: Callable[[], str]) -> str:
    """The guidelines to show now, as safe HTML: `source` (an admin's stored markdown, else the
    configured or built-in ones) through the same renderer as model output."""
    return render_markdown(source())


def wire_guidelines(demo: gr.Blocks, t: LabelTab, source: Callable[[], str]) -> None:
    """Re-read the guidelines on every page load, so an admin's edit reaches each labeler on their
    next open or reload (one small read per page load, none per tick)."""
    @guarded(outputs=1)
    def load():
        return guidelines_text(source)

    demo.load(load, None, [t.guidelines], **FAST)
