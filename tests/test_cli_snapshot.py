"""`odpo --help` of every command keeps the options and defaults it had before the options moved into
the config dataclasses (tests/data/cli_snapshot.json was taken from the code before the move).

An option added since must be listed in ADDED with the reason; none may disappear or change its
flags, type, default or metavar."""
from __future__ import annotations

import json
import re
from pathlib import Path

import click

from odpo.app.cli import cli

SNAPSHOT = Path(__file__).parent / "data" / "cli_snapshot.json"
ADDED: dict[tuple[str, str], str] = {
    # (command, parameter name): why it was added after the snapshot
    **{(cmd, name): "sign-in where it matters, per-labeler limits (security)"
       for cmd in ("odpo serve", "odpo up") for name in ("insecure_no_auth", "session_hours", "max_typed_pending")},
    ("odpo bench labelers", "flooder"): "a flooding labeler beside the others (security)",
    **{(cmd, name): "K candidates per prompt and a pair selector (active selection)"
       for cmd in ("odpo sample", "odpo serve", "odpo up")
       for name in ("candidates", "selector", "selector_judge", "auto_label_confident")},
    ("odpo bench learn", "candidates"): "online+SELECTOR arms (active selection)",
    ("odpo bench sampling", "candidates"): "the cost of K candidates per shown pair (active selection)",
    **{(cmd, "vllm_bin"): "start vLLM from its own venv (`make vllm`), not odpo's (a real vLLM, really run)"
       for cmd in ("odpo vllm-serve", "odpo up")},
    **{("odpo bench sampling", name): "the vLLM backend timed beside hf (a real vLLM, really run)"
       for name in ("sampler", "vllm_url")},
    **{(cmd, name): "training metrics in TensorBoard / W&B / trackio (--report-to, as TRL)"
       for cmd, name in (("odpo train", "report_to"), ("odpo train", "logging_dir"), ("odpo up", "report_to"),
                         ("odpo eval", "report_to"), ("odpo eval", "logging_dir"))},
    ("odpo train", "passes"): "several updates per batch of fresh labels (every label counts)",
    ("odpo bench learn", "passes"): "several updates per batch, every arm (every label counts)",
}


def _commands(cmd: click.Command, path: list[str], ctx: click.Context) -> dict[str, click.Command]:
    out = {" ".join(path): cmd}
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None:
                out.update(_commands(sub, path + [name], ctx))
    return out


def _type_name(text: str) -> str:
    """'<click.types.Path object at 0x7f..>' -> 'click.types.Path': the address is not a fact."""
    return re.sub(r"<([\w.]+) object at 0x[0-9a-f]+>", r"\1", text)


def _default(entry: dict) -> object:
    """click 8.2+ reports an unset flag's default as a sentinel; the flag is off."""
    default = entry["default"]
    if default == "Sentinel.UNSET":
        return [] if entry["multiple"] or entry["kind"] == "Argument" and entry["nargs"] == -1 else \
            (False if entry["is_flag"] else None)
    return default


def _now(param: click.Parameter) -> dict:
    default = param.default
    if callable(default):
        default = "<callable>"
    entry = {"name": param.name, "opts": list(param.opts) + list(getattr(param, "secondary_opts", [])),
             "kind": type(param).__name__, "type": repr(param.type), "default": default,
             "is_flag": getattr(param, "is_flag", False), "multiple": param.multiple, "required": param.required,
             "metavar": param.metavar, "nargs": param.nargs}
    entry["default"] = list(default) if isinstance(default, tuple) else (
        "Sentinel.UNSET" if repr(default).startswith("Sentinel") else default)
    return entry


FACTS = ("opts", "kind", "type", "default", "is_flag", "multiple", "required", "metavar")


def _current() -> dict[str, dict[str, dict]]:
    return {path: {p.name: _now(p) for p in cmd.params}
            for path, cmd in _commands(cli, ["odpo"], click.Context(cli)).items()}


def differences(before: dict, now: dict) -> list[str]:
    """What changed between the snapshot and today's commands, one line each."""
    changed = [f"{path}: the command is gone" for path in before if path not in now]
    for path, entry in before.items():
        old, new = {p["name"]: p for p in entry["params"]}, now.get(path, {})
        changed += [f"{path}: {name} is gone" for name in old if name not in new and path in now]
        changed += [f"{path}: {name} was added (list it in ADDED with why)" for name in new
                    if name not in old and (path, name) not in ADDED]
        for name in sorted(set(old) & set(new)):
            for fact in FACTS:
                was = _default(old[name]) if fact == "default" else old[name][fact]
                is_ = _default(new[name]) if fact == "default" else new[name][fact]
                if fact == "type":
                    was, is_ = _type_name(str(was)), _type_name(str(is_))
                if was != is_:
                    changed.append(f"{path} {name}: {fact} {was!r} -> {is_!r}")
    return changed


def test_every_command_keeps_its_options_and_defaults():
    changed = differences(json.loads(SNAPSHOT.read_text()), _current())
    assert not changed, "\n".join(changed)


def test_the_comparison_notices_a_moved_default_a_lost_option_and_a_new_one():
    before = json.loads(SNAPSHOT.read_text())
    now = _current()
    now["odpo train"]["batch_size"] = dict(now["odpo train"]["batch_size"], default=9)
    del now["odpo serve"]["port"]
    now["odpo up"]["surprise"] = dict(now["odpo up"]["grace"], name="surprise")
    changed = differences(before, now)
    assert "odpo train batch_size: default 8 -> 9" in changed
    assert "odpo serve: port is gone" in changed
    assert any(line.startswith("odpo up: surprise was added") for line in changed)
