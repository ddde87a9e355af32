"""The text side of labeling: guidelines, labeler names, vote reasons, and the conversation history.

Separate from the labeling service because none of it touches the database: the pages, the HTTP
API and the tests use these pure functions directly. Markdown becomes HTML in
app/services/rendering.py, the one place that turns text into markup.

Names and reasons are text, never controls. A name is an identity shown to admins and written
into every label, so a name holding a control character (NUL, which PostgreSQL cannot store, or
any other C0/C1 character) or a text-direction control (U+202E then "ave" displays as "eva", and
it reorders the text around it) is refused with one line: changing it silently would let two
different typed names become one labeler, and the person should see what is wrong. A reason is
optional free text sent with a vote; refusing it would throw the vote away too, so the same
characters are removed instead, and it is made one line (line breaks and tabs become spaces)
because it is shown and exported as one line.
"""
from __future__ import annotations

import html
import logging
import re
import secrets
import unicodedata
from pathlib import Path
from typing import Mapping, Optional, Sequence

from odpo.app.services.rendering import clean_html
from odpo.db.errors import OdpoError
from odpo.db.vocabulary import DATASET_SOURCE_PREFIX

log = logging.getLogger(__name__)

SIDES = ("left", "right", "tie", "both_bad", "skip")
MAX_REASON_CHARS = 500
MAX_NAME_CHARS = 100
# Label sources that are not people: a person may not take their name.
RESERVED_PREFIXES = {"judge:": "LLM judges", DATASET_SOURCE_PREFIX: "imported datasets"}
# Unicode's explicit text-direction controls (embeddings, overrides, isolates, marks).
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")

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
    return side, one_line_reason(reason)


def one_line_reason(reason: Optional[str]) -> Optional[str]:
    """A vote's reason as stored: one line (any run of whitespace, line breaks included, becomes
    one space), control and text-direction characters removed, at most MAX_REASON_CHARS; None
    when nothing is left."""
    text = re.sub(r"\s+", " ", reason or "")
    text = "".join(ch for ch in text if not _is_control(ch))
    return text.strip()[:MAX_REASON_CHARS].strip() or None


def normalise_labeler(name: Optional[str]) -> str:
    """A labeler name as stored: trimmed, single-spaced; control and text-direction characters
    are refused, and the prefixes of judges and imported datasets are reserved."""
    clean = (name or "").strip()
    bad = next((ch for ch in clean if _is_control(ch)), None)
    if bad is not None:
        raise LabelError(f"a labeler name cannot contain control or text-direction characters "
                         f"(found U+{ord(bad):04X}); type it again without them")
    clean = re.sub(r"\s+", " ", clean)
    if not clean:
        raise LabelError("enter your name (top of the Label tab) before labeling")
    if len(clean) > MAX_NAME_CHARS:
        raise LabelError(f"a labeler name can have at most {MAX_NAME_CHARS} characters")
    for prefix, owner in RESERVED_PREFIXES.items():
        if clean.lower().startswith(prefix):
            raise LabelError(f"names starting with '{prefix}' are reserved for {owner}")
    return clean


def _is_control(ch: str) -> bool:
    """C0 and C1 controls (NUL included) and the bidi controls; ordinary spaces are not."""
    return unicodedata.category(ch) == "Cc" or ch in BIDI_CONTROLS


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


ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def conversation_html(context: Optional[Sequence[Mapping[str, str]]]) -> str:
    """The earlier turns of a conversation as one collapsed <details> block ("" for none): the
    labeler judges the two replies to the final message, and opens the history when it matters.

    Every turn is escaped as plain text (html.escape) with line breaks as <br>, so the block holds
    no line break at all, and the whole block then passes the same allow-list cleaner as every
    rendered markdown (rendering.clean_html): the one door to the page, even for odpo's own markup."""
    if not context:
        return ""
    turns = []
    for message in context:
        role = str(message.get("role", ""))
        text = html.escape(str(message.get("content", ""))).replace("\r\n", "\n").replace("\n", "<br>")
        turns.append(f'<div class="odpo-turn odpo-turn-{html.escape(role)}"><span class="odpo-turn-role">'
                     f'{html.escape(ROLE_NAMES.get(role, role.title()))}</span><div class="odpo-turn-text">'
                     f"{text}</div></div>")
    n = len(context)
    summary = f"Earlier conversation ({n} turn{'s' if n != 1 else ''})"
    return clean_html(f'<details class="odpo-context"><summary>{summary}</summary>{"".join(turns)}</details>')

