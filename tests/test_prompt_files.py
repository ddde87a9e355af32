"""Prompt file parsing: every format's happy path, every bad input, the split and the starter set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from odpo.app.services.prompt_files import (
    PromptFileError,
    PromptRecord,
    dedupe,
    held_out_split,
    read_prompt_file,
    read_starter_prompts,
)

CATEGORIES = {"advice", "explanation", "creative", "coding", "factual", "safety", "short"}


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_bytes(content.encode("utf-8"))
    return path


def error_of(path: Path, **kwargs) -> str:
    with pytest.raises(PromptFileError) as info:
        read_prompt_file(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    assert path.name in message, "errors must name the file"
    return message


# --- happy paths ------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".ndjson"])
def test_jsonl_prompt_messages_and_tags(tmp_path: Path, suffix: str) -> None:
    objects = [
        {"prompt": "  What is 2+2?  ", "tags": ["math", " short "]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
                      {"role": "assistant", "content": "ok"}, {"role": "user", "content": "last turn"}],
         "tags": "chat, demo ,,"},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "part one"},
                                                    {"type": "text", "text": "part two"}]}]},
    ]
    lines = [json.dumps(objects[0]), "   ", json.dumps(objects[1]), json.dumps(objects[2])]
    text = "\r\n".join(lines)  # Windows line endings and a whitespace-only line in between
    path = write(tmp_path, "p" + suffix, text + "\r\n")
    records = read_prompt_file(path)
    assert records == [
        PromptRecord("What is 2+2?", ("math", "short"), source=path.name),
        PromptRecord("last turn", ("chat", "demo"), source=path.name,
                     context=(("system", "be brief"), ("user", "first"), ("assistant", "ok"))),
        PromptRecord("part one\npart two", (), source=path.name),
    ]


def test_jsonl_crlf_inside_prompt_is_normalised(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", json.dumps({"prompt": "line one\r\nline two\rthree"}))
    assert read_prompt_file(path)[0].text == "line one\nline two\nthree"


def test_json_list(tmp_path: Path) -> None:
    path = write(tmp_path, "p.json", json.dumps([{"prompt": "a"}, {"prompt": "b", "tags": ["x"]}]))
    records = read_prompt_file(path)
    assert [(r.text, r.tags, r.source) for r in records] == [("a", (), "p.json"), ("b", ("x",), "p.json")]


def test_csv_with_bom_quotes_and_tags(tmp_path: Path) -> None:
    content = '\ufeffid,Prompt,tags\r\n1,"Hello, world",greet\r\n\r\n2,"multi\r\nline",\r\n'
    records = read_prompt_file(write(tmp_path, "p.csv", content))
    assert [(r.text, r.tags) for r in records] == [("Hello, world", ("greet",)), ("multi\nline", ())]


def test_tsv(tmp_path: Path) -> None:
    records = read_prompt_file(write(tmp_path, "p.tsv", "prompt\ttags\nName a colour\ta,b\n"))
    assert [(r.text, r.tags) for r in records] == [("Name a colour", ("a", "b"))]


def test_parquet(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    path = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": [" one ", "two"], "tags": [["a", "b"], None]}).to_parquet(path)
    records = read_prompt_file(path)
    assert [(r.text, r.tags, r.source) for r in records] == [("one", ("a", "b"), "p.parquet"),
                                                            ("two", (), "p.parquet")]


@pytest.mark.parametrize("name", ["p.txt", "prompts", "p.md"])
def test_plain_text_one_prompt_per_line(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, "  first  \r\n\r\n   \nsecond\n")
    assert [r.text for r in read_prompt_file(path)] == ["first", "second"]


# --- bad inputs ---------------------------------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in error_of(tmp_path / "nope.jsonl")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.jsonl").mkdir()
    assert "directory" in error_of(tmp_path / "dir.jsonl")


def test_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: chmod 000 does not stop root, and tests may run as root.
    path = write(tmp_path, "locked.txt", "hi\n")

    def deny(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    assert "permission denied" in error_of(path)


def test_invalid_utf8_names_line_and_offset(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", b"ok line\nbad \xff here\n")
    message = error_of(path)
    assert "line 2" in message and "byte offset 12" in message and "UTF-8" in message
    # The offset counts from the start of the file, a UTF-8 byte-order mark included.
    assert "byte offset 5" in error_of(write(tmp_path, "bom.txt", b"\xef\xbb\xbfab\xff\n"))


def test_malformed_json_line(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", '{"prompt": "fine"}\n\n{"prompt": "broken"\n')
    message = error_of(path)
    assert "line 3" in message and "malformed JSON" in message


def test_json_document_errors(tmp_path: Path) -> None:
    assert "list" in error_of(write(tmp_path, "a.json", '{"prompt": "x"}'))
    message = error_of(write(tmp_path, "b.json", '{"prompt": "x"}\n{"prompt": "y"}\n'))
    assert "line 2" in message and ".jsonl" in message
    assert "item 2" in error_of(write(tmp_path, "c.json", '[{"prompt": "x"}, "bare"]'))


def test_missing_prompt_field_lists_found_fields(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "p.jsonl", '{"prompt": "a"}\n{"question": "b", "id": 1}\n'))
    assert "line 2" in message and "'prompt'" in message and "'question', 'id'" in message


def test_messages_without_user_turn(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", json.dumps({"messages": [{"role": "system", "content": "x"}]}))
    assert "no message with role 'user'" in error_of(path)


def test_missing_prompt_column_lists_found_columns(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "p.csv", "question,answer\nq,a\n"))
    assert "no 'prompt' column" in message and "'question', 'answer'" in message


def test_parquet_missing_column_and_corrupt(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    path = tmp_path / "p.parquet"
    pd.DataFrame({"text": ["x"]}).to_parquet(path)
    assert "found columns: 'text'" in error_of(path)
    assert "Parquet" in error_of(write(tmp_path, "bad.parquet", b"definitely not parquet"))


@pytest.mark.parametrize(("name", "content", "where"), [
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt": 42}\n', "line 2"),
    ("p.json", '[{"prompt": ["a"]}]', "item 1"),
])
def test_prompt_not_a_string(tmp_path: Path, name: str, content: str, where: str) -> None:
    message = error_of(write(tmp_path, name, content))
    assert where in message and "must be a string" in message


@pytest.mark.parametrize(("name", "content", "where"), [
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "   \\n  "}\n', "line 2"),
    ("p.csv", "prompt,tags\nfine,x\n   ,y\n", "row 3"),
    ("p.csv", 'prompt\nfine\n\n"  "\n', "row 4"),
    ("p.jsonl", '{"prompt": null}\n', "line 1"),
])
def test_empty_prompt(tmp_path: Path, name: str, content: str, where: str) -> None:
    message = error_of(write(tmp_path, name, content))
    assert where in message and ("empty" in message or "missing" in message)


def test_over_long_prompt(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "short\n" + "x" * 11 + "\n")
    message = error_of(path, max_chars=10)
    assert "line 2" in message and "11 characters" in message and "limit of 10" in message
    assert len(read_prompt_file(path, max_chars=11)) == 2


def test_bad_tags(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "p.jsonl", json.dumps({"prompt": "x", "tags": [1, 2]})))
    assert "tags" in message and "line 1" in message


@pytest.mark.parametrize(("name", "content"), [
    ("p.txt", ""), ("p.txt", "\n  \n\t\n"), ("p.jsonl", "\n\n"), ("p.json", "[]"),
    ("p.csv", ""), ("p.csv", "prompt,tags\n"),
])
def test_empty_file(tmp_path: Path, name: str, content: str) -> None:
    assert "empty" in error_of(write(tmp_path, name, content))


@pytest.mark.parametrize(("content", "expected"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    (b"PK\x03\x04\x14\x00\x00\x00", "ZIP or Excel"),
    ("prompt\n".encode("utf-16"), "UTF-16"),
    (b"PAR1\x15\x04", "Parquet"),
])
def test_binary_content(tmp_path: Path, content: bytes, expected: str) -> None:
    assert expected in error_of(write(tmp_path, "p.csv", content))


@pytest.mark.parametrize(("name", "content", "where"), [
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "bad\\u0000 one"}\n', "line 2"),  # JSON escape: a NUL after json.loads
    ("p.jsonl", '{"prompt": "ok"}\n\n{"prompt": "fine", "tags": ["a\\u0000"]}\n', "line 3"),
    ("p.jsonl", '{"prompt": "ok"}\n{"messages": [{"role": "user", "content": "x\\u0000"}]}\n', "line 2"),
    ("p.json", '[{"prompt": "ok"}, {"prompt": "\\u0000"}]', "item 2"),
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "raw \x00 NUL"}\n', "line 2"),
    ("p.txt", 'one\ntwo\nthree \x00\n', "line 3"),
    ("p.csv", 'prompt\nfine\n"bad \x00"\n', "line 3"),
])
def test_nul_is_rejected_with_its_line(tmp_path: Path, name: str, content: str, where: str) -> None:
    """PostgreSQL text cannot hold NUL: raw or JSON-escaped (\\u0000), a file with one is refused
    as a whole, naming the file and the line (or JSON list item)."""
    message = error_of(write(tmp_path, name, content))
    assert f"{name}, {where}:" in message and "NUL" in message


def test_a_file_with_nul_imports_nothing(tmp_path: Path, common_config) -> None:
    """Several files, the last one bad: not one prompt of any of them is stored."""
    from odpo.app.services.prompts import import_prompt_files
    from odpo.db import store

    good = write(tmp_path, "good.jsonl", '{"prompt": "first"}\n{"prompt": "second"}\n')
    bad = write(tmp_path, "bad.jsonl", '{"prompt": "third"}\n{"prompt": "fourth\\u0000"}\n')
    with pytest.raises(PromptFileError, match=r"bad\.jsonl, line 2: .*NUL"):
        import_prompt_files(common_config, [good, bad], held_out_fraction=0.0, max_chars=8000)
    db = common_config.open_db()
    try:
        with db.sessions() as s:
            assert store.count_prompts(s) == (0, 0)
    finally:
        db.close()


def test_bad_max_chars_is_a_caller_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        read_prompt_file(write(tmp_path, "p.txt", "x\n"), max_chars=0)


# --- dedupe and split -----------------------------------------------------------------------

def test_dedupe_keeps_first_by_normalised_text() -> None:
    records = [PromptRecord("Hello  World", source="a"), PromptRecord(" hello world ", source="b"),
               PromptRecord("HELLO\tWORLD", source="c"), PromptRecord("other", source="d")]
    unique, n_duplicates = dedupe(records)
    assert [r.source for r in unique] == ["a", "d"] and n_duplicates == 2


def test_held_out_split_is_deterministic_and_validated() -> None:
    # Pinned values: a change of hash or normalisation would silently reshuffle users' eval sets.
    assert held_out_split("What is 7 times 8?", 0.5) == held_out_split("  what is 7   TIMES 8? ", 0.5)
    assert [held_out_split(f"prompt {i}", 0.3) for i in range(8)] == _PINNED_SPLIT
    assert not any(held_out_split(f"p{i}", 0.0) for i in range(100))
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError):
            held_out_split("x", bad)


_PINNED_SPLIT = [True, False, True, False, False, False, True, True]


def test_held_out_fraction_on_starter_set() -> None:
    records = read_starter_prompts()
    share = sum(held_out_split(r.text, 0.1) for r in records) / len(records)
    assert 0.05 <= share <= 0.15


# --- starter prompts ------------------------------------------------------------------------

def test_starter_prompts() -> None:
    records = read_starter_prompts()
    assert len(records) >= 280
    assert all(r.source == "starter" for r in records)
    assert all(len(r.text) <= 300 for r in records)
    assert dedupe(records)[1] == 0
    counts = {c: sum(c in r.tags for r in records) for c in CATEGORIES}
    assert all(n >= 30 for n in counts.values()), counts
