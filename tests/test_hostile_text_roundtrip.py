"""Hostile imports, defect 4 (the rest is tests/test_hostile_imports.py): text with U+2028,
U+2029, U+0085, control characters, emoji, right-to-left scripts and combining marks survives
`odpo export dataset` -> `odpo import dataset` (JSONL and Parquet) and `odpo prompts import`
exactly. JSONL used to be split with str.splitlines(), which also splits on those separators."""
from __future__ import annotations

import csv
import io
import json

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from odpo.db.models import Prompt, Sample

TRICKY = {
    "separators": "a\u2028b\u2029c\u0085d\x1ce\x1df\x1eg",  # all line breaks to str.splitlines()
    "c0": "".join(map(chr, (0x01, 0x07, 0x08, 0x0B, 0x0C, 0x1B, 0x1F, 0x7F))) + "\t",  # NUL-free
    "c1": "\x80\x81\x9b\x9f",
    "emoji": "👍🏽 👩\u200d👩\u200d👧\u200d👦 🏳️\u200d🌈 🧑🏿\u200d💻",  # skin tones and ZWJ sequences
    "rtl": "שלום, עולם — مرحبا بالعالم \u200f! \u202eevil\u202c",
    "combining": "e\u0301 n\u0303 Z\u0351\u036b\u0343\u036a a\u0308\u0304 \u0928\u093f",
    "zero-width": "zero\ufeffwidth\u200bspace",
    "quotes": "tab\there \\ \" ' </script>",
}
ALL = "".join(TRICKY.values())


def prompt_of(label: str, text: str) -> str:
    return f"Q[{label}]: {text} ?"  # ends that no strip() touches


def triples() -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): answers even begin and end with separators and carry \\r\\n."""
    return [(prompt_of(label, text), f"\u2028{text}\u0085", f"no\r\n{text}\u2029")
            for label, text in [*TRICKY.items(), ("all", ALL)]]


def odpo(config, *args) -> str:
    from odpo.app.cli import cli

    result = CliRunner().invoke(cli, ["--data-dir", str(config.data_dir), "--db", config.db_url, *map(str, args)])
    assert result.exit_code == 0 and result.exception is None, result.output
    return result.output


def read_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.split(b"\n") if line]


def exported(path) -> dict[str, list[tuple[str, str, str]]]:
    """The exported rows' texts by source (dataset:NAME), in file order."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    for r in read_jsonl(path.read_bytes()):
        assert len(r["prompt"]) == 1  # one user message: nothing was split off as a turn
        out.setdefault(r["source"], []).append((r["prompt"][0]["content"], r["chosen"][0]["content"],
                                                r["rejected"][0]["content"]))
    return out


def test_a_dataset_round_trips_exactly(common_config, database, tmp_path):
    original = triples()
    source = tmp_path / "orig.jsonl"  # what another tool writes: the separators raw, unescaped
    source.write_bytes(b"".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}, ensure_ascii=False)
                                .encode() + b"\n" for p, c, r in original))
    assert "\u2028".encode() in source.read_bytes() and "\u0085".encode() in source.read_bytes()
    assert f"imported {len(original)} preference pairs" in odpo(common_config, "import", "dataset", source)
    with database.sessions() as s:  # stored exactly, on SQLite and PostgreSQL
        assert sorted(s.scalars(select(Prompt.text))) == sorted(p for p, _, _ in original)
        assert sorted(s.scalars(select(Sample.text))) == sorted(a for _, *ab in original for a in ab)

    first = tmp_path / "first.jsonl"
    odpo(common_config, "export", "dataset", first, "--source", "dataset")
    raw = first.read_bytes()
    assert raw.count(b"\n") == len(original)  # one line a row, for any line-splitting reader
    assert all(ch.encode() not in raw for ch in "\u2028\u2029\u0085")  # escaped by the exporter
    assert exported(first) == {"dataset:orig": original}

    odpo(common_config, "export", "dataset", tmp_path / "first.parquet", "--source", "dataset")
    odpo(common_config, "import", "dataset", first, "--name", "again")
    odpo(common_config, "import", "dataset", tmp_path / "first.parquet", "--name", "pq")
    final = tmp_path / "final.jsonl"
    odpo(common_config, "export", "dataset", final, "--source", "dataset")
    assert exported(final) == {"dataset:orig": original, "dataset:again": original, "dataset:pq": original}


def prompt_file(name: str, prompts: list[str]) -> bytes:
    if name.endswith(".jsonl"):
        return b"".join(json.dumps({"prompt": p}, ensure_ascii=False).encode() + b"\n" for p in prompts)
    if name.endswith(".csv"):
        out = io.StringIO(newline="")
        csv.writer(out).writerows([["prompt"], *([p] for p in prompts)])
        return out.getvalue().encode()
    return "".join(p + "\n" for p in prompts).encode()


@pytest.mark.parametrize("name", ["prompts.jsonl", "prompts.csv", "prompts.txt"])
def test_prompt_files_keep_unusual_text_exactly(common_config, database, tmp_path, name):
    prompts = [prompt_of(label, text) for label, text in [*TRICKY.items(), ("all", ALL)]]
    (tmp_path / name).write_bytes(prompt_file(name, prompts))
    assert f"imported {len(prompts)} prompts" in odpo(common_config, "prompts", "import", tmp_path / name)
    with database.sessions() as s:
        assert sorted(s.scalars(select(Prompt.text))) == sorted(prompts)


def test_prompts_round_trip_through_list_json(common_config, tmp_path):
    """`odpo prompts list --json` is the prompts' export: its output imports back as the same texts."""
    from odpo.app.config import CommonConfig

    prompts = [prompt_of(label, text) for label, text in [*TRICKY.items(), ("all", ALL)]]
    (tmp_path / "p.jsonl").write_bytes(prompt_file("p.jsonl", prompts))
    odpo(common_config, "prompts", "import", tmp_path / "p.jsonl")
    listed = odpo(common_config, "prompts", "list", "--json", "--limit", "100")
    (tmp_path / "listed.jsonl").write_text("".join(line + "\n" for line in listed.split("\n")
                                                   if line.startswith("{")), encoding="utf-8")
    fresh = CommonConfig.resolve(data_dir=str(tmp_path / "fresh"), db_url=f"sqlite:///{tmp_path / 'fresh.db'}")
    odpo(fresh, "prompts", "import", tmp_path / "listed.jsonl")
    db = fresh.open_db()
    try:
        with db.sessions() as s:
            assert sorted(s.scalars(select(Prompt.text))) == sorted(prompts)
    finally:
        db.close()
