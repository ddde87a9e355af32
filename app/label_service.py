"""The labeling service behind the web UI and its HTTP API: claim, vote, undo, typed prompts.

No gradio here: every method takes plain values, returns plain data and raises an OdpoError
subclass (one readable line) for anything the labeler can fix, so the whole labeling flow is
tested without a browser. Left/right is what the labeler saw; the store speaks absolute a/b, and
the mapping through `shown_left` happens in exactly one place: `absolute_choice`.
"""
from __future__ import annotations

import logging
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from odpo.app.context import SamplerHandle, ServeConfig
from odpo.db import store
from odpo.db.engine import Database
from odpo.db.errors import OdpoError
from odpo.db.models import Assignment, Pair

log = logging.getLogger(__name__)

SIDES = ("left", "right", "tie", "both_bad", "skip")
DEFAULT_BATCH_SIZE = 8
MAX_REASON_CHARS = 500
MAX_PROMPT_CHARS = 8000
MAX_NAME_CHARS = 100

DEFAULT_GUIDELINES = """\
**Pick the response you would rather receive.** Judge the whole answer, not its first line.

1. **Correct and honest** beats fluent: wrong facts, broken code or made-up details lose.
2. **Helpful**: answers what was asked, completely, without padding or needless refusals.
3. **Clear**: well organised, right length for the question, readable formatting.
4. **Safe**: no harmful instructions; a polite refusal wins when the request is harmful.

Use **Tie** when both are about equally good, **Both bad** when neither is acceptable (neither
is trained on by default), and **Skip** when you cannot judge (e.g. outside your expertise).
Add a one-line reason when the choice was hard: it helps whoever reviews the data later.
"""


class LabelError(OdpoError):
    """A labeling request that cannot be served (no pair on screen, bad choice, bad name, ...)."""


@dataclass(frozen=True)
class PairView:
    """What one labeler sees. Which sample is on the left stays on the server (never sent)."""

    assignment_id: int
    pair_id: int
    prompt: str
    left: str
    right: str
    version: int
    typed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VoteResult:
    label_id: int
    choice: str  # absolute: a | b | tie | both_bad | skip
    next: Optional[PairView]
    judge_note: Optional[str] = None


@dataclass(frozen=True)
class Counters:
    queue: int
    serving_version: int
    unconsumed: int
    per_update: int
    until_update: int
    paused: bool
    generating: Optional[bool] = None
    sampler_error: Optional[str] = None


def absolute_choice(side: str, shown_left: str) -> str:
    """Map what the labeler clicked (left/right/...) to the stored absolute choice (a/b/...)."""
    if side == "left":
        return shown_left
    if side == "right":
        return "b" if shown_left == "a" else "a"
    if side in SIDES:
        return side
    raise LabelError(f"unknown choice {side!r}; expected one of {', '.join(SIDES)}")


def check_vote(side: Optional[str], reason: Optional[str]) -> tuple[str, Optional[str]]:
    """Validate a vote before touching the database: (side, trimmed reason or None)."""
    side = (side or "").strip().lower()
    if side not in SIDES:
        raise LabelError(f"unknown choice {side!r}; expected one of {', '.join(SIDES)}")
    return side, (reason or "").strip()[:MAX_REASON_CHARS] or None


def normalise_labeler(name: Optional[str]) -> str:
    """A labeler name as stored: trimmed, single-spaced; judge ids are reserved."""
    clean = re.sub(r"\s+", " ", (name or "").strip())
    if not clean:
        raise LabelError("enter your name (top of the Label tab) before labeling")
    if len(clean) > MAX_NAME_CHARS:
        raise LabelError(f"a labeler name can have at most {MAX_NAME_CHARS} characters")
    if clean.lower().startswith("judge:"):
        raise LabelError("names starting with 'judge:' are reserved for LLM judges")
    return clean


def guest_name() -> str:
    """A distinct default name, so two people who never type one do not share a queue."""
    return f"guest-{secrets.token_hex(2)}"


def load_guidelines(path: Optional[Path]) -> str:
    """The guidelines markdown from ServeConfig.guidelines, or the built-in default."""
    if path is None:
        return DEFAULT_GUIDELINES
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("cannot read guidelines %s (%s); using the built-in ones", path, exc)
        return DEFAULT_GUIDELINES
    return text or DEFAULT_GUIDELINES


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)[\s\S]*?[^`]\1(?!`)")


def safe_markdown(text: Optional[str]) -> str:
    """Markdown from a model or a prompt, made inert: raw HTML shows as text (`<` escaped outside
    code, where markdown itself escapes it) and images are not fetched (they could phone home).
    The UI also renders with sanitize_html on; this is the layer that does not depend on it."""
    out: list[str] = []
    prose: list[str] = []
    fence: Optional[str] = None
    for line in (text or "").split("\n"):
        m = _FENCE.match(line)
        if fence is None and m:
            if prose:
                out.append(_escape_prose("\n".join(prose)))
            prose, fence = [], m.group(1)
            out.append(line)
        elif fence is not None:
            out.append(line)
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and \
                    not line.strip()[len(m.group(1)):].strip():
                fence = None
        else:
            prose.append(line)
    if prose:
        out.append(_escape_prose("\n".join(prose)))
    return "\n".join(out)


def _escape_prose(text: str) -> str:
    parts, last = [], 0
    for m in _CODE_SPAN.finditer(text):
        parts.append(_escape_html(text[last:m.start()]))
        parts.append(m.group(0))
        last = m.end()
    parts.append(_escape_html(text[last:]))
    return "".join(parts)


def _escape_html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("![", "!\\[")


class LabelService:
    """One per serve process; safe to share between request threads (no mutable state besides a
    timestamp, and every method opens its own short transaction)."""

    def __init__(self, *, db: Database, config: ServeConfig, sampler: Optional[SamplerHandle] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.db, self.config, self.sampler, self._clock = db, config, sampler, clock
        self._last_release = float("-inf")

    # -- the pair on screen ---------------------------------------------------------------
    def current_pair(self, *, labeler: str) -> Optional[PairView]:
        """The pair to show this labeler now: a pair for a prompt they typed when one is ready,
        else the pair they were already shown (page reload), else the next queued pair."""
        self.release_expired_claims()
        with self.db.sessions.begin() as s:
            return self.next_for(s, labeler=labeler)

    def next_for(self, s, *, labeler: str, exclude: Sequence[int] = ()) -> Optional[PairView]:
        """Typed pair first; else a claim of theirs not on screen (`exclude`), oldest first; else a
        new claim. Used for the pair on screen and for the prefetched one."""
        if not store.typed_pair_waiting(s, labeler=labeler):
            shown = store.oldest_open_claim(s, labeler=labeler, exclude=exclude)
            if shown is not None:
                return _view(s, shown)
        claimed = store.claim_next_pair(s, labeler=labeler, timeout_s=self.config.claim_timeout_s)
        return None if claimed is None else _view(s, claimed)

    def view_of(self, s, *, assignment_id: Optional[int], labeler: str) -> Optional[PairView]:
        """The PairView of one of this labeler's open claims (to re-render a slot), else None."""
        if assignment_id is None:
            return None
        claimed = store.open_claim(s, assignment_id=int(assignment_id), labeler=labeler)
        return None if claimed is None else _view(s, claimed)

    def release_expired_claims(self) -> None:
        """Closed tabs give their pairs back. The sampler does this too; doing it here (at most
        every few seconds) means a lone UI process without a sampler still recovers them."""
        now = self._clock()
        if now - self._last_release < min(10.0, self.config.claim_timeout_s / 4):
            return
        self._last_release = now
        with self.db.sessions.begin() as s:
            released = store.release_expired(s)
        if released:
            log.info("released %d expired claim(s)", released)

    def release(self, *, labeler: str, assignment_id: Optional[int]) -> None:
        """Give back a pair the labeler will not answer (they switched name)."""
        if assignment_id is None:
            return
        with self.db.sessions.begin() as s:
            store.release_assignment(s, assignment_id=int(assignment_id), labeler=labeler)

    # -- votes ------------------------------------------------------------------------------
    def vote(self, *, labeler: str, assignment_id: Optional[int], side: str,
             reason: Optional[str] = None) -> VoteResult:
        """Record the vote and claim the next pair in ONE short transaction. This is the HTTP API's
        single-pair flow; the web page uses LabelSlots (a prefetched second pair)."""
        side, reason = check_vote(side, reason)
        if assignment_id is None:
            raise LabelError("no pair on screen yet: wait for the next pair to appear")
        self.release_expired_claims()
        with self.db.sessions.begin() as s:
            label_id, choice, note = self.record(s, labeler=labeler, assignment_id=assignment_id, side=side,
                                                 reason=reason)
            nxt = self.next_for(s, labeler=labeler)
            result = VoteResult(label_id=label_id, choice=choice, next=nxt, judge_note=note)
        log.debug("label %d by %s: %s", result.label_id, labeler, result.choice)
        return result

    def record(self, s, *, labeler: str, assignment_id: int, side: str,
               reason: Optional[str]) -> tuple[int, str, Optional[str]]:
        """Store one vote inside the caller's transaction: (label id, absolute choice, judge note)."""
        asg = s.get(Assignment, int(assignment_id))
        if asg is None or asg.labeler != labeler:
            raise LabelError("this pair is not assigned to you (it may have expired); showing the next one")
        shown_left = asg.shown_left
        label = store.record_label(s, assignment_id=asg.id, labeler=labeler,
                                   choice=absolute_choice(side, shown_left), reason=reason)
        note = self._judge_note(s, label.pair_id, shown_left) if self.config.show_judge_after_vote else None
        return label.id, label.choice, note

    def _judge_note(self, s, pair_id: int, shown_left: str) -> Optional[str]:
        """The judge's pick for the pair just voted on, in the labeler's own left/right terms."""
        picks = store.judge_labels_for_pair(s, pair_id=pair_id)
        if not picks:
            return None
        names = {shown_left: "A (left)", ("b" if shown_left == "a" else "a"): "B (right)",
                 "tie": "a tie", "both_bad": "both bad", "skip": "skip"}
        notes = []
        for p in picks:
            conf = f" (confidence {p['confidence']:.2f})" if p["confidence"] is not None else ""
            notes.append(f"{p['judge']} picked {names.get(p['choice'], p['choice'])}{conf}")
        return "; ".join(notes)

    def undo(self, *, labeler: str) -> PairView:
        """Take back this labeler's last vote that training has not consumed, and show it again."""
        with self.db.sessions.begin() as s:
            label = store.last_undoable_label(s, labeler=labeler)
            if label is None:
                raise LabelError("nothing to undo: no vote of yours is waiting for training")
            claimed = store.undo_label(s, label_id=label.id, labeler=labeler,
                                       timeout_s=self.config.claim_timeout_s)
            return _view(s, claimed)

    # -- typed prompts ------------------------------------------------------------------------
    def ask(self, *, labeler: str, text: str) -> int:
        """Store a typed prompt (source "typed") and ask the sampler for a pair; returns the prompt
        id. The pair reaches this labeler first (claim_next_pair puts their typed pairs first)."""
        text = (text or "").strip()
        if not text:
            raise LabelError("type a prompt first")
        if len(text) > MAX_PROMPT_CHARS:
            raise LabelError(f"a prompt can have at most {MAX_PROMPT_CHARS} characters")
        if self.sampler is None:
            raise LabelError("no sampler is running in this process, so typed prompts cannot be sampled")
        with self.db.sessions.begin() as s:
            prompt_id = store.add_typed_prompt(s, text=text, source="typed").id
        self.sampler.request_typed(prompt_id=prompt_id, labeler=labeler)
        return prompt_id

    def typed_ready(self, *, labeler: str) -> bool:
        with self.db.sessions() as s:
            return store.typed_pair_waiting(s, labeler=labeler)

    # -- counters -----------------------------------------------------------------------------
    def counters(self) -> Counters:
        """Queue size, serving version and labels until the next adapter update."""
        state = self.sampler_state()
        with self.db.sessions() as s:
            train_cfg = store.get_control(s, key="train.config") or {}
            per_update = _per_update(train_cfg)
            sources = train_cfg.get("sources", "all")
            unconsumed = store.count_unconsumed(s, sources=sources if sources in ("human", "judge") else "all")
            paused = bool((store.get_control(s, key="train.paused") or {}).get("paused", False))
            queue = store.count_pairs(s, status="queued")
            serving = state.get("serving_version")
            if serving is None:
                latest = store.latest_adapter(s, run=self.config.run)
                serving = latest.version if latest else 0
        return Counters(queue=queue, serving_version=int(serving), unconsumed=unconsumed, per_update=per_update,
                        until_update=max(0, per_update - unconsumed), paused=paused,
                        generating=state.get("generating"), sampler_error=state.get("last_error"))

    def sampler_state(self) -> dict[str, Any]:
        """sampler.state(), or {} without a sampler; a failing sampler never breaks a page."""
        if self.sampler is None:
            return {}
        try:
            return dict(self.sampler.state() or {})
        except Exception as exc:  # the sampler is another team's thread: report, don't crash
            log.warning("sampler.state() failed: %s", exc)
            return {"last_error": f"sampler state unavailable: {exc}"}

    def labels_by(self, *, labeler: str) -> int:
        with self.db.sessions() as s:
            return store.count_labels(s, labeler=labeler)


def _per_update(train_cfg: dict[str, Any]) -> int:
    """Labels one adapter version consumes: batch_size x save_every from the trainer's config."""
    try:
        batch = int(train_cfg.get("batch_size") or DEFAULT_BATCH_SIZE)
        every = int(train_cfg.get("save_every") or 1)
    except (TypeError, ValueError):
        return DEFAULT_BATCH_SIZE
    return max(1, batch) * max(1, every)


def _view(s, claimed: store.ClaimedPair) -> PairView:
    pair = s.get(Pair, claimed.pair_id)  # already in the session's identity map: no query
    return PairView(assignment_id=claimed.assignment_id, pair_id=claimed.pair_id, prompt=claimed.prompt,
                    left=claimed.left, right=claimed.right, version=claimed.version,
                    typed=bool(pair is not None and pair.purpose == "typed"))
