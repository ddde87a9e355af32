"""Hostile uploads and imports (security issue): prompt files (`odpo prompts import`, the Admin
tab's upload) and preference datasets (`odpo import dataset`) made by somebody else.

Grouped by defect:
1. the admin upload checks rights BEFORE it opens the file, then reads it with a size cap;
2. Parquet is refused from its metadata (rows, bytes) and only the needed columns are read;
3. every bad input is one line (CLI `Error: ...`, exit 1; admin toast), and nothing is written;
4. U+2028 / U+2029 / U+0085 and other unusual text survive export -> import exactly.
"""
from __future__ import annotations

import html
import json
import re
import types
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from odpo.app.services import import_limits
from odpo.app.services.admin import AdminError, AdminService
from odpo.app.services.labeling import LabelService
from odpo.db.models import Label, Prompt
from odpo.trainer.options import MAX_PROMPT_CHARS
from tests.ui_fixtures import write_users

GOOD_ROW = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Trains."}


def admin_service(database, tmp_path, *, auth: bool = True) -> AdminService:
    from odpo.app.config import ServeConfig
    from odpo.app.services.accounts import load_auth

    cfg = ServeConfig()
    users = load_auth(write_users(tmp_path / "users.toml", {"alice": ("a", True), "bob": ("b", False)}))
    return AdminService(db=database, config=cfg, labels=LabelService(db=database, config=cfg),
                        auth=users if auth else None)


def odpo(common_config, *args: str):
    """Run the real `odpo` CLI against the test database; returns click's Result."""
    from odpo.app.cli import cli

    base = ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url]
    return CliRunner().invoke(cli, [*base, *map(str, args)])


def error_line(result) -> str:
    """The one `Error:` line of a refused command: exit 1 through click, never a traceback."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def count(db, model) -> int:
    with db.sessions() as s:
        return s.scalar(select(func.count()).select_from(model))


def jsonl(*rows) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


@pytest.fixture
def toasts(monkeypatch):
    """What the Admin tab would show: gradio's toasts, captured."""
    import gradio as gr

    shown: dict[str, list[str]] = {"warning": [], "info": []}
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: shown["warning"].append(message))
    monkeypatch.setattr(gr, "Info", lambda message, *a, **k: shown["info"].append(message))
    return shown


@pytest.fixture
def file_reads(monkeypatch):
    """Every stat, open or read of a path, recorded (the calls still happen)."""
    import builtins

    seen: list[str] = []

    def spy(owner, name):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            seen.append(str(args[0]))
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)

    for name in ("stat", "open", "read_bytes", "read_text"):
        spy(Path, name)
    spy(builtins, "open")
    return seen


# --- 1. the admin upload: rights first, then a capped read ------------------------------------

def upload_handler(svc: AdminService):
    from odpo.app.ui.admin import AdminHandlers
    from odpo.app.ui.shared import Identity

    return AdminHandlers(svc, Identity(auth_on=True), exports=None)


def as_user(name: str):
    return types.SimpleNamespace(username=name)


def test_a_non_admins_upload_is_refused_before_it_is_opened(database, tmp_path, toasts, file_reads, monkeypatch):
    from odpo.app.services import prompt_files

    upload = tmp_path / "gradio" / "prompts.jsonl"
    upload.parent.mkdir()
    upload.write_bytes(jsonl({"prompt": "one"}))
    handler = upload_handler(admin_service(database, tmp_path))
    read_calls = []
    monkeypatch.setattr(prompt_files, "read_prompt_file", lambda *a, **k: read_calls.append(a))
    file_reads.clear()  # from here on, every touch of a file counts

    assert handler.do_import(str(upload), 0.0, as_user("bob")) is not None  # outputs skipped
    assert toasts["warning"] == ["admins only: ask an admin to mark you `admin = true` in the users file"]
    assert read_calls == [] and str(upload) not in file_reads  # never read, not even stat-ed
    # A path that would fail loudly if touched: still the rights line, not "file not found".
    assert handler.do_import(str(tmp_path / "missing" / "x.jsonl"), 0.0, as_user("bob")) is not None
    assert toasts["warning"][-1].startswith("admins only")
    assert count(database, Prompt) == 0


def test_an_admins_upload_is_read_with_a_size_cap(database, tmp_path, toasts, monkeypatch):
    upload = tmp_path / "prompts.jsonl"
    upload.write_bytes(jsonl({"prompt": "one"}, {"prompt": "two"}))
    handler = upload_handler(admin_service(database, tmp_path))
    assert handler.do_import(str(upload), 0.0, as_user("alice")) is None
    assert toasts["info"] == ["Imported 2 prompts (0 held out), skipped 0 duplicates."]

    monkeypatch.setattr(import_limits, "MAX_PROMPT_FILE_BYTES", 1000)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} was read whole"))
    upload.write_bytes(jsonl(*({"prompt": f"p{i}"} for i in range(100))))  # ~1.6 kB
    handler.do_import(str(upload), 0.0, as_user("alice"))
    assert toasts["warning"] == [f"prompts.jsonl: the file is {upload.stat().st_size:,} bytes, over the limit "
                                 "of 1,000 bytes for one import; split it into smaller files"]
    svc = admin_service(database, tmp_path, auth=False)  # bytes handed in are capped the same way
    with pytest.raises(AdminError, match="over the limit of 1,000 bytes"):
        svc.import_prompts(username=None, data=b"x\n" * 600, filename="p.txt")
    assert count(database, Prompt) == 2


def test_the_upload_cap_is_sane_for_prompt_files():
    assert import_limits.MAX_PROMPT_FILE_BYTES == 32 * 1024 * 1024
    assert import_limits.MAX_PROMPT_ROWS * MAX_PROMPT_CHARS > import_limits.MAX_PROMPT_FILE_BYTES


# --- 2. Parquet: metadata first, only the needed columns ----------------------------------------

@pytest.fixture
def parquet_reads(monkeypatch):
    """Every way pyarrow decodes row data, recorded; iter_batches passes through (with its columns)."""
    import pyarrow.parquet as pq

    calls: list[tuple] = []
    real = pq.ParquetFile.iter_batches

    def tripwire(name):
        def read(*args, **kwargs):
            calls.append((name, kwargs.get("columns")))
            raise AssertionError(f"row data read through {name}")
        return read

    def iter_batches(self, *args, **kwargs):
        calls.append(("iter_batches", kwargs.get("columns")))
        return real(self, *args, **kwargs)

    for name in ("read", "read_row_group", "read_row_groups", "scan_contents"):
        monkeypatch.setattr(pq.ParquetFile, name, tripwire(name))
    monkeypatch.setattr(pq, "read_table", tripwire("read_table"))
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)
    return calls


def write_parquet(path: Path, rows: int, *, dictionary: bool = True, **columns) -> Path:
    """`rows` rows, each column one repeated value (dictionary-encoded unless told not to)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: pa.repeat(v, rows) for k, v in columns.items()}), path, use_dictionary=dictionary)
    return path


def test_a_dataset_parquet_over_the_row_cap_is_refused_from_its_metadata(common_config, tmp_path, parquet_reads):
    path = write_parquet(tmp_path / "big.parquet", import_limits.MAX_DATASET_ROWS + 1, prompt="p", chosen="a",
                         rejected="b")
    line = error_line(odpo(common_config, "import", "dataset", path))
    assert line == "Error: big.parquet: more than 1,000,000 rows, the limit for one import; split the file"
    assert parquet_reads == []


def test_a_prompt_parquet_over_the_row_cap_is_refused_from_its_metadata(common_config, tmp_path, parquet_reads):
    path = write_parquet(tmp_path / "many.parquet", import_limits.MAX_PROMPT_ROWS + 1, prompt="hello")
    line = error_line(odpo(common_config, "prompts", "import", path))
    assert line == "Error: many.parquet: more than 200,000 rows, the limit for one import; split the file"
    assert parquet_reads == []


def test_parquet_reads_only_the_needed_columns(common_config, database, tmp_path, parquet_reads, monkeypatch):
    monkeypatch.setattr(import_limits, "MAX_DATASET_FILE_BYTES", 200_000)  # a blob column alone is ~1 MB
    blob = "x" * 100_000
    prefs = write_parquet(tmp_path / "prefs.parquet", 10, prompt="Say hi.", chosen="Hi!", rejected="No.",
                          blob=blob, labeler="ann", dictionary=False)
    assert odpo(common_config, "import", "dataset", prefs).exit_code == 0
    prompts = write_parquet(tmp_path / "p.parquet", 3, Prompt="Count to three.", Tags="x", blob=blob)
    assert odpo(common_config, "prompts", "import", prompts).exit_code == 0
    assert parquet_reads == [("iter_batches", ["prompt", "chosen", "rejected"]), ("iter_batches", ["Prompt", "Tags"])]
    assert count(database, Label) == 10


def test_a_parquet_column_too_big_is_refused(common_config, database, tmp_path, parquet_reads, monkeypatch):
    """From the metadata when its pages are that big; while decoding when a dictionary-encoded value
    repeats (stored once, decoded every time)."""
    monkeypatch.setattr(import_limits, "MAX_DATASET_FILE_BYTES", 200_000)
    blob = "x" * 100_000
    plain = write_parquet(tmp_path / "plain.parquet", 10, prompt="Hi.", chosen=blob, rejected="No.", dictionary=False)
    line = error_line(odpo(common_config, "import", "dataset", plain))
    assert re.fullmatch(r"Error: plain\.parquet: its columns 'prompt', 'chosen', 'rejected' hold 1,0\d\d,\d\d\d "
                        r"bytes uncompressed, over the limit of 200,000 bytes for one import", line), line
    assert parquet_reads == []
    repeated = write_parquet(tmp_path / "repeated.parquet", 10, prompt="Hi.", chosen=blob, rejected="No.")
    line = error_line(odpo(common_config, "import", "dataset", repeated))
    assert line == ("Error: repeated.parquet: its columns 'prompt', 'chosen', 'rejected' decode to more than "
                    "200,000 bytes, the limit for one import")
    assert count(database, Label) == 0


def test_parquet_prompts_may_be_chat_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from odpo.app.services.prompt_files import read_prompt_file

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Bye?"}]
    pq.write_table(pa.table({"messages": [turns]}), tmp_path / "chat.parquet")
    [record] = read_prompt_file(tmp_path / "chat.parquet")
    assert (record.text, record.context) == ("Bye?", (("user", "Hi"), ("assistant", "Hello")))


# --- 3. every bad input is one line, and nothing is written -------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000
OK = b'{"prompt": "fine"}\n'
BAD_PROMPT_FILES = [
    ("deep.json", DEEP, "deep.json: JSON nested too deeply to read"),
    ("deep.jsonl", OK + b'{"prompt": ' + DEEP + b"}\n", "deep.jsonl, line 2: JSON nested too deeply to read"),
    ("number.jsonl", OK + b'{"prompt": ' + b"9" * 5000 + b"}\n", "line 2: a JSON number longer than 4,300 digits"),
    ("surrogate.jsonl", OK + b'{"prompt": "a\\ud800b"}\n', "line 2: prompt contains an unpaired UTF-16 surrogate"),
    ("latin1.txt", b"fine\ncaf\xe9\n", "latin1.txt, line 2: invalid UTF-8 at byte offset 8"),
    ("utf16.jsonl", '{"prompt": "x"}\n'.encode("utf-16"), "utf16.jsonl: the file is UTF-16 encoded"),
    ("nul.jsonl", OK + b'{"prompt": "a\\u0000b"}\n', "nul.jsonl, line 2: prompt contains a NUL character"),
    ("nul.csv", b'prompt\nfine\n"a\x00b"\n', "nul.csv, line 3: contains binary content: a NUL byte"),
    ("long.jsonl", OK + jsonl({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}),
     f"line 2: prompt is {MAX_PROMPT_CHARS + 1} characters, over the limit of {MAX_PROMPT_CHARS}"),
    ("long-turn.jsonl", OK + jsonl({"messages": [{"role": "user", "content": "x" * (MAX_PROMPT_CHARS + 1)},
                                                 {"role": "assistant", "content": "a"},
                                                 {"role": "user", "content": "b"}]}),
     f"line 2: message 1 of 'messages' is {MAX_PROMPT_CHARS + 1} characters, over the limit"),
    ("object.jsonl", OK + b'{"prompt": {"text": "x"}}\n', "line 2: prompt must be a string, got an object"),
    ("turns.jsonl", OK + b'{"messages": "hi"}\n', "line 2: 'messages' must be a list, got a string"),
    ("role.jsonl", OK + jsonl({"messages": [{"role": ["x"] * 100_000, "content": "a"}, {"role": "user",
                                                                                       "content": "b"}]}),
     "line 2: 'messages': message 1: unknown role ['x', 'x', "),
    ("tags.json", b'[{"prompt": "x"}, {"prompt": "y", "tags": {"a": 1}}]', "tags.json, item 2: tags must be"),
    ("list.jsonl", OK + b"[1, 2]\n", "list.jsonl, line 2: expected a JSON object, got a list"),
]


@pytest.mark.parametrize(("name", "content", "expected"), BAD_PROMPT_FILES, ids=[c[0] for c in BAD_PROMPT_FILES])
def test_a_bad_prompt_file_is_one_line_and_imports_nothing(common_config, tmp_path, name, content, expected):
    good = tmp_path / "good.jsonl"
    good.write_bytes(OK)
    (tmp_path / name).write_bytes(content)
    line = error_line(odpo(common_config, "prompts", "import", good, tmp_path / name))
    assert expected in line and len(line) < 400
    db = common_config.open_db()
    try:
        assert count(db, Prompt) == 0  # the good file before it is not half-imported either
    finally:
        db.close()


def row(**changes) -> dict:
    return {**GOOD_ROW, **changes}


GOOD = jsonl(GOOD_ROW)
BAD_DATASET_ROWS = [
    ("deep", GOOD + b'{"prompt": "x", "chosen": ' + DEEP + b', "rejected": "b"}\n', "JSON nested too deeply to read"),
    ("number", GOOD + b'{"prompt": "x", "chosen": "a", "rejected": ' + b"9" * 5000 + b"}\n",
     "a JSON number longer than 4,300 digits"),
    ("surrogate", GOOD + b'{"prompt": "x", "chosen": "a\\udfff", "rejected": "b"}\n',
     "'chosen' contains an unpaired UTF-16 surrogate (\\udfff)"),
    ("escaped-nul", GOOD + jsonl(row(rejected="a\x00b")), "'rejected' contains a NUL character"),
    ("raw-nul", GOOD + b'{"prompt": "x", "chosen": "a\x00", "rejected": "b"}\n', "contains a NUL byte (0x00)"),
    ("long", GOOD + jsonl(row(prompt="x" * (MAX_PROMPT_CHARS + 1))),
     f"'prompt' is {MAX_PROMPT_CHARS + 1} characters, over the limit of {MAX_PROMPT_CHARS}"),
    ("long-turn", GOOD + jsonl({"prompt": [{"role": "user", "content": "x" * (MAX_PROMPT_CHARS + 1)},
                                           {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
                                "chosen": [{"role": "assistant", "content": "c"}],
                                "rejected": [{"role": "assistant", "content": "d"}]}),
     "message 1 of 'prompt' is 8001 characters, over the limit of 8000"),
    ("types", GOOD + jsonl(row(prompt=3.5)), "'prompt' must be a string or a list of messages, got float"),
    ("answer-type", GOOD + jsonl(row(chosen={"text": "a"})), "'chosen' must be a string when 'prompt' is one"),
    ("array", GOOD + b"[1, 2]\n", "expected an object with prompt/chosen/rejected, got list"),
]


@pytest.mark.parametrize(("case", "content", "problem"), BAD_DATASET_ROWS, ids=[c[0] for c in BAD_DATASET_ROWS])
def test_a_bad_dataset_row_is_one_line_and_imports_nothing(common_config, tmp_path, case, content, problem):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(content)
    result = odpo(common_config, "import", "dataset", path)
    assert error_line(result) == ("Error: prefs.jsonl: 1 bad row(s); nothing was imported (fix them, or pass "
                                  "--skip-bad to import the other rows)")
    assert f"prefs.jsonl:2: {problem}" in result.output
    db = common_config.open_db()
    try:
        assert count(db, Label) == count(db, Prompt) == 0
    finally:
        db.close()


@pytest.mark.parametrize(("content", "expected"), [
    (GOOD + b'{"prompt": "caf\xe9"}\n',  # the offset counts from the start of the file
     f"Error: prefs.jsonl:2: not UTF-8 text (byte offset {len(GOOD) + 15}); save it as UTF-8"),
    (jsonl(GOOD_ROW).decode().encode("utf-16"), "Error: prefs.jsonl: the file is UTF-16 encoded; save it as UTF-8"),
    (GOOD + b'{"prompt": "' + b"x" * 2000 + b'"}\n', "Error: prefs.jsonl:2: a line longer than 1,000 bytes, the "
                                                   "limit for one row"),
    (GOOD * 4, "Error: prefs.jsonl: more than 3 rows, the limit for one import; split the file"),
], ids=["latin1", "utf16", "long-line", "too-many-rows"])
def test_a_bad_dataset_file_is_one_line(common_config, tmp_path, monkeypatch, content, expected):
    monkeypatch.setattr(import_limits, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(import_limits, "MAX_DATASET_ROWS", 3)
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(content)
    assert error_line(odpo(common_config, "import", "dataset", path)) == expected


def test_a_utf8_bom_and_crlf_line_ends_are_accepted(common_config, database, tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "prefs.jsonl").write_bytes(bom + GOOD.replace(b"\n", b"\r\n"))
    (tmp_path / "p.jsonl").write_bytes(bom + b'{"prompt": "first"}\r\n{"prompt": "second"}\r\n')
    assert odpo(common_config, "import", "dataset", tmp_path / "prefs.jsonl").exit_code == 0
    assert odpo(common_config, "prompts", "import", tmp_path / "p.jsonl").exit_code == 0
    with database.sessions() as s:
        assert sorted(s.scalars(select(Prompt.text))) == ["Name a colour.", "first", "second"]


def test_too_many_prompts_is_one_line(common_config, tmp_path, monkeypatch):
    monkeypatch.setattr(import_limits, "MAX_PROMPT_ROWS", 3)
    (tmp_path / "p.txt").write_text("a\nb\nc\nd\n")
    line = error_line(odpo(common_config, "prompts", "import", tmp_path / "p.txt"))
    assert line == "Error: p.txt: more than 3 prompts, the limit for one file; split it into smaller files"


@pytest.mark.parametrize(("name", "content", "expected"),
                         [BAD_PROMPT_FILES[i] for i in (0, 1, 3, 4, 6, 12)],
                         ids=[BAD_PROMPT_FILES[i][0] for i in (0, 1, 3, 4, 6, 12)])
def test_a_bad_upload_is_one_toast_line(database, tmp_path, toasts, name, content, expected):
    (tmp_path / name).write_bytes(content)
    upload_handler(admin_service(database, tmp_path)).do_import(str(tmp_path / name), 0.0, as_user("alice"))
    [warning] = toasts["warning"]
    text = html.unescape(warning)  # the toast escapes what it quotes
    assert expected in text and "\n" not in text and len(text) < 400
    assert toasts["info"] == [] and count(database, Prompt) == 0
