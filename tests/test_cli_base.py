"""`odpo init / prompts / status` through click's CliRunner: formats, bad input, no partial writes."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from odpo.app.cli import cli


@pytest.fixture
def run(tmp_path, db_url):
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(cli, ["--data-dir", str(tmp_path / "data"), "--db", db_url, *args])

    return invoke


def status(run) -> dict:
    result = run("status", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_help_lists_base_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("init", "prompts", "status"):
        assert f"  {name} " in result.output


def test_init_imports_starter_prompts_once(run):
    first = run("init")
    assert first.exit_code == 0, first.output
    counts = status(run)
    assert counts["prompts"] >= 280 and 0 < counts["held_out"] < counts["prompts"] // 4
    again = run("init")
    assert again.exit_code == 0 and "already present" in again.output
    assert status(run)["prompts"] == counts["prompts"]


def test_import_every_format(run, tmp_path):
    files = {
        "a.jsonl": '{"prompt": "jsonl one"}\n{"messages": [{"role": "user", "content": "chat two"}]}\n',
        "b.csv": "prompt,tags\ncsv three,x\n",
        "c.txt": "text four\n\ntext five\n",
    }
    paths = []
    for name, content in files.items():
        (tmp_path / name).write_text(content)
        paths.append(str(tmp_path / name))
    pd.DataFrame({"prompt": ["parquet six", "text four"]}).to_parquet(tmp_path / "d.parquet")
    paths.append(str(tmp_path / "d.parquet"))
    result = run("prompts", "import", *paths, "--held-out", "0.5")
    assert result.exit_code == 0, result.output
    assert "imported 6 prompts" in result.output and "skipped 1 duplicates" in result.output
    listed = run("prompts", "list", "--json", "--limit", "10")
    texts = [json.loads(line)["prompt"] for line in listed.output.splitlines()]
    assert sorted(texts) == sorted(["jsonl one", "chat two", "csv three", "text four", "text five", "parquet six"])


BAD_INPUTS = {
    "missing": None,
    "bad.jsonl": b'{"prompt": "ok"}\n{"prompt": \n',
    "cols.csv": b"question,answer\nq,a\n",
    "empty.txt": b"",
    "blank.jsonl": b'{"prompt": "   "}\n',
    "long.txt": b"x" * 9000 + b"\n",
    "latin1.txt": b"caf\xe9 au lait\n",
}


@pytest.mark.parametrize("name", list(BAD_INPUTS) + ["a-directory"])
def test_bad_input_exits_nonzero_with_one_line_and_writes_nothing(run, tmp_path, name):
    good = tmp_path / "good.txt"
    good.write_text("a fine prompt\n")
    if name == "a-directory":
        target = tmp_path / "somedir"
        target.mkdir()
    else:
        target = tmp_path / name
        if BAD_INPUTS[name] is not None:
            target.write_bytes(BAD_INPUTS[name])
    assert run("init", "--no-starter").exit_code == 0
    result = run("prompts", "import", str(good), str(target))
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert "Traceback" not in result.output
    assert status(run)["prompts"] == 0  # the valid file before it was not half-imported


def test_unreachable_database_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "--db",
                                      "postgresql+psycopg://u:p@127.0.0.1:1/x", "status"])
    assert result.exit_code != 0
    assert result.output.count("\n") == 1 and "database" in result.output


def test_status_text(run):
    run("init")
    result = run("status")
    assert result.exit_code == 0
    assert "prompts:" in result.output and "adapter versions: none (base model)" in result.output
