"""Markdown from a model, a prompt or an admin, turned into HTML that is safe to put in the page.

Why the server does it all: the page promises that no HTML from a model or a prompt reaches it,
and a promise kept only by the browser's own sanitiser is one bug away from broken. Two layers,
each sufficient on its own for the worst cases:

1. markdown-it-py parses the text with raw HTML switched off (`<img ...>` is text), renders
   images as their alt text and address in plain text (nothing is ever fetched: an image could
   phone home), and keeps a link only when it is an absolute http/https/mailto address (anything
   else shows as its text followed by the address, so a `javascript:` link is just words).
2. nh3 (ammonia, a real HTML parser) re-parses that output and keeps only the tags, attributes
   and classes below; `on*` attributes, `style`, `<script>`, `<img>`, `<iframe>` and the rest
   cannot survive it, whatever the first layer let through.

The UI shows the result with gr.HTML (not gr.Markdown, which would read the HTML as markdown
again), and the page's Content-Security-Policy (app/ui/csp.py) is the third layer.
Pure functions, no gradio: the pages, the HTTP API and the tests call them directly.
"""
from __future__ import annotations

import functools
import re
from typing import Optional

import nh3
from markdown_it import MarkdownIt
from markdown_it.token import Token

# What odpo's own markup and markdown need, nothing more.
ALLOWED_TAGS = frozenset({
    "p", "em", "strong", "code", "pre", "blockquote", "ul", "ol", "li", "h1", "h2", "h3", "h4", "h5", "h6",
    "hr", "br", "a", "table", "thead", "tbody", "tr", "th", "td", "del", "s", "small",
    "details", "summary", "div", "span",
})
ALLOWED_ATTRIBUTES = {"*": set(), "a": {"href", "title"}, "ol": {"start"}}
ALIGN_CLASSES = {"odpo-align-left", "odpo-align-center", "odpo-align-right"}
# Classes only where odpo's own markup uses them (conversation_html, tables): a model cannot
# borrow the page's classes (e.g. Gradio's `hidden`) to dress its text up as a control.
ALLOWED_CLASSES = {
    "details": {"odpo-context"},
    "div": {"odpo-turn", "odpo-turn-text", "odpo-turn-system", "odpo-turn-user", "odpo-turn-assistant"},
    "span": {"odpo-turn-role"},
    "th": ALIGN_CLASSES,
    "td": ALIGN_CLASSES,
}
LINK_SCHEMES = frozenset({"http", "https", "mailto"})
LINK_REL = "noopener noreferrer nofollow"
# Tags whose content goes with them: what is inside a <script> is never text anyone wanted to read.
DROPPED_WITH_CONTENT = frozenset({"script", "style"})

_SAFE_HREF = re.compile(r"^(?:https?://[^\s]|mailto:[^\s])", re.IGNORECASE)


def safe_href(url: str) -> bool:
    """Only absolute http(s) and mailto addresses become links; relative ones (e.g. `logout`)
    could act on the page itself, and every other scheme could run code or fetch something."""
    return bool(_SAFE_HREF.match(url or ""))


def _keep_attribute(tag: str, attr: str, value: str) -> Optional[str]:
    """nh3's last word on a kept attribute: an href that is not http/https/mailto goes."""
    if attr == "href" and not safe_href(value):
        return None
    return value


@functools.lru_cache(maxsize=1)
def _cleaner() -> nh3.Cleaner:
    """The allow-list cleaner, built on first use (and then reused: it is immutable)."""
    return nh3.Cleaner(
        tags=set(ALLOWED_TAGS),
        clean_content_tags=set(DROPPED_WITH_CONTENT),
        attributes={k: set(v) for k, v in ALLOWED_ATTRIBUTES.items()},
        attribute_filter=_keep_attribute,
        link_rel=LINK_REL,
        url_schemes=set(LINK_SCHEMES),
        url_relative="deny",
        allowed_classes={k: set(v) for k, v in ALLOWED_CLASSES.items()},
        strip_comments=True,
    )


def clean_html(html: Optional[str]) -> str:
    """Any HTML, reduced to the allow-list above (the one cleaner every rendered text passes)."""
    return _cleaner().clean(html or "")


def render_markdown(text: Optional[str], *, breaks: bool = False) -> str:
    """Markdown (model output, a prompt, the guidelines) as safe HTML. `breaks`: a single newline
    is a line break, as in chat answers; off for prompts and guidelines (CommonMark's rule)."""
    if not text:
        return ""
    return clean_html(_parser(breaks).render(text))


@functools.lru_cache(maxsize=2)
def _parser(breaks: bool) -> MarkdownIt:
    """CommonMark with GitHub's tables and strikethrough; raw HTML off, so `<b>` is text."""
    md = MarkdownIt("commonmark", {"html": False, "breaks": breaks}).enable(["table", "strikethrough"])
    md.disable(["html_inline", "html_block"])
    md.core.ruler.push("odpo_inert", _make_inert)
    return md


def _make_inert(state) -> None:
    """A core rule after inline parsing: images become text, unsafe links lose their link, table
    alignment becomes a class (style attributes are not allowed)."""
    for block in state.tokens:
        if block.type in ("th_open", "td_open"):
            _align_class(block)
        if block.type == "inline" and block.children:
            block.children = _inert_inline(block.children)


def _inert_inline(children: list[Token]) -> list[Token]:
    out: list[Token] = []
    dropped: list[str] = []  # hrefs of link_open tokens removed, awaiting their link_close
    for tok in children:
        if tok.type == "image":
            out.append(_text(image_text(_plain(tok.children), str(tok.attrGet("src") or ""))))
        elif tok.type == "link_open" and not safe_href(str(tok.attrGet("href") or "")):
            dropped.append(str(tok.attrGet("href") or ""))
        elif tok.type == "link_close" and dropped:
            href = dropped.pop()
            out.append(_text(f" ({href})"))
        else:
            out.append(tok)
    return out


def image_text(alt: str, src: str) -> str:
    """What shows instead of an image: its alt text and address, as text (never fetched)."""
    alt = alt.strip() or "no description"
    return f"[image: {alt} — {src}]" if src else f"[image: {alt}]"


def _plain(tokens: Optional[list[Token]]) -> str:
    """An image's alt text from its parsed children (nested images give their own alt)."""
    parts = []
    for tok in tokens or []:
        if tok.type in ("text", "code_inline"):
            parts.append(tok.content)
        elif tok.type == "image":
            parts.append(_plain(tok.children))
        elif tok.type in ("softbreak", "hardbreak"):
            parts.append(" ")
    return "".join(parts)


def _text(content: str) -> Token:
    tok = Token("text", "", 0)
    tok.content = content
    return tok


def _align_class(tok: Token) -> None:
    style = str(tok.attrGet("style") or "")
    if tok.attrs:
        tok.attrs.pop("style", None)
    m = re.fullmatch(r"text-align:(left|center|right)", style)
    if m:
        tok.attrSet("class", f"odpo-align-{m.group(1)}")
