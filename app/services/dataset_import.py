"""`odpo import dataset`: read a preference file in TRL's formats and store it in one transaction.

Accepted rows (JSONL, one object a line, or Parquet), the formats TRL's DPO trainer documents:
- standard: `prompt`, `chosen`, `rejected` strings;
- conversational: `prompt` a list of messages, `chosen`/`rejected` lists of assistant messages;
- conversational with an implicit prompt: `chosen`/`rejected` whole conversations sharing every
  message but the last (the prompt), each ending in the assistant's answer.
Other columns (what `odpo export dataset` adds: labeler, source, versions, ...) are ignored, so an
export imports as is. A conversational prompt may hold earlier turns: odpo stores its final user
message as the prompt text and the turns before it as the prompt's context (the sampler and the
trainer render them all with the tokenizer's chat template). Its shape is checked by
`store.split_conversation` (an optional first system message, then user and assistant turns
alternating, ending with the user message the answers reply to); any other shape is refused with
the row named, never reordered or flattened silently.

Why strict: every row is validated before anything is written, and a file with any bad row imports
nothing (each bad row gets one line: file, line or row, what is wrong) unless `skip_bad` is set.
A file over the size or row limits (app/services/import_limits.py) is refused before its rows are
read; JSONL is read one line at a time and split on "\n" only.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from sqlalchemy.exc import IntegrityError

from odpo.app.services import import_limits
from odpo.app.services.import_limits import FileLimitError
from odpo.db import store
from odpo.db.engine import Database
from odpo.db.errors import OdpoError
from odpo.db.store.prompts import split_conversation
from odpo.trainer.options import MAX_PROMPT_CHARS

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
MAX_LISTED = 20  # bad rows listed one line each; the rest are counted
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, allowed at the start of a file
DATASET_COLUMNS = ("prompt", "chosen", "rejected")  # what a row is read from (other columns are ignored)


class DatasetFileError(OdpoError):
    """A dataset file that cannot be imported; str() is one line, `problems` one line per bad row."""

    def __init__(self, message: str, problems: Optional[list[str]] = None) -> None:
        super().__init__(message)
        self.problems = problems or []


@dataclass(frozen=True)
class ImportReport:
    name: str
    file: str
    pairs: int
    prompts_added: int
    prompts_reused: int
    bad_rows: list[str]


def import_dataset(db: Database, *, path: Path, name: Optional[str] = None, skip_bad: bool = False) -> ImportReport:
    """Read, validate and store `path` as dataset `name` (default: the file's stem), all or nothing."""
    path = Path(path)
    name = name if name is not None else re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).strip("-.") or "dataset"
    _check_name(name)
    rows, problems = read_dataset_file(path)
    if problems and not skip_bad:
        raise DatasetFileError(f"{path.name}: {len(problems)} bad row(s); nothing was imported (fix them, "
                               "or pass --skip-bad to import the other rows)", problems)
    if not rows:
        raise DatasetFileError(f"{path.name}: no preference rows to import")
    try:
        with db.writes.begin() as s:
            result = store.import_dataset_rows(s, name=name, file=path.name, rows=rows)
    except IntegrityError:  # another import stored one of these prompts meanwhile: nothing was written
        raise DatasetFileError(f"{path.name}: another import wrote the same prompts meanwhile; nothing was "
                               "imported, run it again") from None
    log.info("imported %d preference pairs from %s as dataset %r", result.pairs, path, name)
    return ImportReport(name=name, file=path.name, pairs=result.pairs, prompts_added=result.prompts_added,
                        prompts_reused=result.prompts_reused, bad_rows=problems)


def _check_name(name: str) -> None:
    if not (0 < len(name) <= 80 and all(c.isalnum() or c in "-_." for c in name)):
        raise DatasetFileError(f"dataset name must be 1-80 letters, digits, '-', '_' or '.', got {name!r}")


def read_dataset_file(path: Path) -> tuple[list[store.DatasetRow], list[str]]:
    """(good rows, one line per bad row). Whole-file problems raise DatasetFileError: a missing or
    special file, a file over MAX_DATASET_FILE_BYTES or MAX_DATASET_ROWS (checked before the rows
    are read: for Parquet from its metadata), binary content, text that is not UTF-8."""
    if not path.exists():
        raise DatasetFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        records, place = _parquet_records(path), "row"
    elif suffix in JSONL_SUFFIXES:
        records, place = _jsonl_records(path), "line"
    else:
        raise DatasetFileError(f"{path.name}: cannot tell the format; use a .jsonl or .parquet file")
    rows: list[store.DatasetRow] = []
    problems: list[str] = []
    try:
        import_limits.check_regular_file(path, import_limits.MAX_DATASET_FILE_BYTES)
        for number, record in records:
            try:
                rows.append(parse_record(record, number))
            except ValueError as exc:
                problem = import_limits.one_line(exc)
            except RecursionError:  # comparing or quoting a value nested deeper than Python recurses
                problem = "a value nested too deeply to read"
            else:
                continue
            problems.append(f"{path.name}:{number}: {problem}" if place == "line"
                            else f"{path.name} row {number}: {problem}")
    except FileLimitError as exc:
        where = "" if not exc.line else f":{exc.line}" if place == "line" else f" row {exc.line}"
        raise DatasetFileError(f"{path.name}{where}: {exc.problem}") from None
    return rows, problems


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """One line at a time, split on "\\n" only (U+2028, U+2029 and U+0085 are text inside a row,
    which str.splitlines() would cut), each line decoded and parsed on its own."""
    count = 0
    with path.open("rb") as handle:
        for number, offset, raw in import_limits.jsonl_lines(handle, max_line_bytes=import_limits.MAX_LINE_BYTES):
            if number == 1:
                binary = import_limits.sniff_binary(raw)
                if binary:
                    raise FileLimitError(binary)
                if raw.startswith(BOM):
                    raw, offset = raw[len(BOM):], offset + len(BOM)
            if not raw.strip():
                continue
            count += 1
            import_limits.check_rows(count, import_limits.MAX_DATASET_ROWS)
            yield number, _json_line(raw, number, offset)


def _json_line(raw: bytes, number: int, offset: int) -> Any:
    """The object on one line, or the ValueError that says what is wrong with it."""
    if b"\x00" in raw:
        return ValueError("contains a NUL byte (0x00), which databases cannot store in text; binary content?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileLimitError(f"not UTF-8 text (byte offset {offset + exc.start}); save it as UTF-8",
                             line=number) from None
    try:
        return import_limits.load_json(text)
    except FileLimitError as exc:
        return ValueError(exc.problem)


def _parquet_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Only the prompt/chosen/rejected columns, after the metadata passed the row and size caps."""
    def pick(names: list[str]) -> list[str]:
        missing = [column for column in ("chosen", "rejected") if column not in names]
        if missing:
            found = ", ".join(repr(name) for name in names) or "none"
            raise FileLimitError(f"no {' or '.join(map(repr, missing))} column (found columns: {found})")
        return [column for column in DATASET_COLUMNS if column in names]

    records = import_limits.parquet_records(path, pick=pick, max_rows=import_limits.MAX_DATASET_ROWS,
                                            max_bytes=import_limits.MAX_DATASET_FILE_BYTES)
    yield from enumerate(records, start=1)


def parse_record(record: Any, number: int) -> store.DatasetRow:
    """One row in any accepted format -> prompt, chosen, rejected texts; ValueError says what is wrong."""
    if isinstance(record, ValueError):
        raise record
    if not isinstance(record, dict):
        raise ValueError(f"expected an object with prompt/chosen/rejected, got {type(record).__name__}")
    missing = [k for k in ("chosen", "rejected") if record.get(k) is None]
    if missing:
        raise ValueError(f"missing {' and '.join(repr(k) for k in missing)}")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    context: list[dict[str, str]] = []
    if prompt is None:
        context, prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
    elif isinstance(prompt, list):
        context, prompt = _conversation(prompt, "'prompt'")
        chosen, rejected = _answer(chosen, "chosen"), _answer(rejected, "rejected")
    elif isinstance(prompt, str):
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                raise ValueError(f"{key!r} must be a string when 'prompt' is one, got {type(value).__name__}")
    else:
        raise ValueError(f"'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    for i, turn in enumerate(context, start=1):
        _check_text(turn["content"], "prompt")
        if len(turn["content"]) > MAX_PROMPT_CHARS:
            raise ValueError(f"message {i} of 'prompt' is {len(turn['content'])} characters, over the limit "
                             f"of {MAX_PROMPT_CHARS}")
    return store.DatasetRow(prompt=_check_prompt(prompt), chosen=_check_text(chosen, "chosen"),
                            rejected=_check_text(rejected, "rejected"), row=number, context=tuple(context))


def _content(message: Any, where: str) -> tuple[str, str]:
    """(role, text) of one chat message; content parts keep their text parts."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValueError(f"{where}: each message must be an object with 'role' and 'content'")
    content = message.get("content")
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if parts and all(isinstance(p, str) for p in parts):
            content = "\n".join(parts)
    if not isinstance(content, str):
        raise ValueError(f"{where}: message content must be text")
    return message["role"], content


def _conversation(messages: list[Any], where: str) -> tuple[list[dict[str, str]], str]:
    """(earlier turns, final user text) of a conversational prompt; ValueError names what is wrong."""
    turns = [dict(zip(("role", "content"), _content(m, where), strict=True)) for m in messages]
    try:
        return split_conversation(turns)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _answer(value: Any, key: str) -> str:
    if not isinstance(value, list) or len(value) != 1:
        raise ValueError(f"{key!r} must be a list of one assistant message when 'prompt' is a list")
    role, text = _content(value[0], repr(key))
    if role != "assistant":
        raise ValueError(f"{key!r} must be an assistant message, got role {role!r}")
    return text


def _implicit_prompt(chosen: Any, rejected: Any) -> tuple[list[dict[str, str]], str, str, str]:
    """TRL's implicit-prompt form: two conversations whose shared head is the prompt (its earlier
    turns and its final user message)."""
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise ValueError("missing 'prompt' (plain-text chosen/rejected need one; conversations carry it)")
    if len(chosen) < 2 or len(rejected) < 2 or chosen[:-1] != rejected[:-1]:
        raise ValueError("'chosen' and 'rejected' without 'prompt' must be conversations that share every "
                         "message but their last")
    context, prompt = _conversation(chosen[:-1], "the shared messages of 'chosen' and 'rejected'")
    return context, prompt, _answer(chosen[-1:], "chosen"), _answer(rejected[-1:], "rejected")


def _check_prompt(text: str) -> str:
    text = _check_text(text, "prompt").strip()
    if not text:
        raise ValueError("'prompt' is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"'prompt' is {len(text)} characters, over the limit of {MAX_PROMPT_CHARS}")
    return text


def _check_text(text: str, key: str) -> str:
    """Text a database can store: no NUL, no unpaired surrogate (import_limits.unstorable)."""
    problem = import_limits.unstorable(text)
    if problem:
        raise ValueError(f"{key!r} {problem}")
    return text

