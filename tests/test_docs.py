"""The README and docs show only commands that exist: every `odpo ...` line in a code block or in
backticks names a real command path (`odpo bench learn`), and every `--flag` written after it is an
option of that command (or of `odpo` itself). Relative links between the docs resolve."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from odpo.app.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250


def _commands() -> dict[tuple[str, ...], click.Command]:
    ctx = click.Context(cli)
    out: dict[tuple[str, ...], click.Command] = {(): cli}

    def walk(cmd: click.Command, path: tuple[str, ...]) -> None:
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None:
                    out[path + (name,)] = sub
                    walk(sub, path + (name,))

    walk(cli, ())
    return out


def _flags(cmd: click.Command) -> set[str]:
    return {opt.split("=")[0] for p in cmd.params for opt in [*p.opts, *getattr(p, "secondary_opts", [])]}


def _command_part(line: str) -> str:
    """The command of a code line: comments dropped, and text aligned after it in columns (a
    description) dropped unless it continues the options (`odpo export gguf    --version 3`)."""
    line = re.split(r"\s#\s", line)[0]
    parts = re.split(r"\s{3,}", line)
    kept = [parts[0]]
    for part in parts[1:]:
        if not part.startswith(("-", "[")):
            break
        kept.append(part)
    return " ".join(kept).strip()


def _snippets(text: str) -> list[str]:
    """`odpo ...` as written: lines of fenced code blocks, and inline `odpo ...` spans."""
    found: list[str] = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = _command_part(line.strip())
            if line.startswith("odpo ") or line.startswith(".venv/bin/odpo "):
                found.append(line.removeprefix(".venv/bin/"))
    found += [m for m in re.findall(r"`(odpo [^`]+)`", text)]
    return found


def _check(snippet: str, commands: dict[tuple[str, ...], click.Command]) -> list[str]:
    try:
        words = shlex.split(snippet.replace("|", " ").replace("[", " ").replace("]", " "))[1:]
    except ValueError:
        words = snippet.split()[1:]
    path: tuple[str, ...] = ()
    for word in words:
        if word.startswith("-") or path + (word,) not in commands:
            break
        path += (word,)
    if not path and words and not words[0].startswith("-") and words[0].isidentifier():
        return [f"`{snippet}`: no command `odpo {words[0]}`"]
    known = _flags(commands[path]) | _flags(cli) | {"-h", "--help"}
    flags = [w.split("=")[0] for w in words if re.fullmatch(r"--?[a-z][\w-]*(=.*)?", w)]
    return [f"`{snippet}`: `odpo {' '.join(path)}` has no option {f}" for f in flags if f not in known]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_shown_exists(doc):
    commands = _commands()
    problems = [problem for snippet in _snippets(doc.read_text()) for problem in _check(snippet, commands)]
    assert not problems, "\n".join(problems)


def test_the_check_notices_a_made_up_command_and_flag():
    commands = _commands()
    assert _check("odpo trian --model x", commands)
    assert _check("odpo train --no-such-flag 3", commands)
    assert _check("odpo bench learn --rules rule:shorter --seeds 3", commands) == []
    assert _snippets("see `odpo up --judge rule:shorter`\n```bash\nodpo status --json   # counts\n```") == [
        "odpo status --json", "odpo up --judge rule:shorter"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        if not (doc.parent / target).exists():
            missing.append(target)
    assert not missing, missing


def test_the_readme_fits_on_a_few_screens():
    assert len((ROOT / "README.md").read_text().splitlines()) <= README_MAX_LINES
