"""The text side of labeling: guidelines, labeler names, and model output made safe to render.

Separate from the labeling service because none of it touches the database: the pages, the HTTP
API and the tests use these pure functions directly.
"""
from __future__ import annotations

import html
import logging
import re
import secrets
from pathlib import Path
from typing import Mapping, Optional, Sequence

from odpo.db.errors import OdpoError

log = logging.getLogger(__name__)

SIDES = ("left", "right", "tie", "both_bad", "skip")
MAX_REASON_CHARS = 500
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


ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def conversation_html(context: Optional[Sequence[Mapping[str, str]]]) -> str:
    """The earlier turns of a conversation as one collapsed <details> block ("" for none): the
    labeler judges the two replies to the final message, and opens the history when it matters.

    Every turn is escaped as plain text (html.escape) with line breaks as <br>, so the block holds
    no blank line: in the page's markdown a blank line would end the raw HTML block early."""
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
    return f'<details class="odpo-context"><summary>{summary}</summary>{"".join(turns)}</details>'


def _escape_html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("![", "!\\[")
