"""Read prompt files (JSONL, JSON, CSV/TSV, Parquet, plain text) into validated records.

Why this module is strict: the admin imports a file in ONE database transaction, so every line is
validated here before anything is returned. A bad file fails as a whole with a single-line
`PromptFileError` that names the file and the line/row, which the UI can show as is.

A JSON object with chat `messages` is a conversation: its last user message is the prompt, the
turns before it its context (answers after it are dropped, as before conversations existed), so
the sampler continues the conversation and labelers see it.

Files come from other people: import_limits checks a file's size before a byte is read, a Parquet
file's rows and bytes from its metadata before any row, and turns every hostile input (deep JSON,
huge numbers, unpaired surrogates, NUL) into that single line, never a traceback.
"""
from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from odpo.app.services import import_limits
from odpo.app.services.import_limits import FileLimitError, load_json, one_line, unstorable
from odpo.db.errors import OdpoError
from odpo.db.store import normalise_prompt, prompt_hash
from odpo.db.store.prompts import split_conversation
from odpo.trainer.options import MAX_PROMPT_CHARS

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
STARTER_PACKAGE = "odpo.app"
STARTER_PATH = "data/starter_prompts.jsonl"

# One prompt location: (kind, number), e.g. ("line", 3) or ("row", 2); None for the whole file.
Where = tuple[str, int] | None
# Earlier turns of a conversation as (role, content) pairs: hashable, unlike message dicts.
Turns = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class PromptRecord:
    """One prompt ready to insert. `source` is keyword-only so it cannot be confused with tags."""

    text: str
    tags: tuple[str, ...] = ()
    source: str = field(kw_only=True)
    context: Turns = field(default=(), kw_only=True)  # earlier turns; () for a single-turn prompt

    def __post_init__(self) -> None:
        # Callers may pass lists; a frozen record must stay hashable.
        object.__setattr__(self, "tags", tuple(self.tags))
        object.__setattr__(self, "context", tuple((str(r), str(c)) for r, c in self.context))

    @property
    def context_messages(self) -> tuple[dict[str, str], ...]:
        """The earlier turns as the store keeps them (store.NewPrompt.context)."""
        return tuple({"role": role, "content": content} for role, content in self.context)

    @property
    def key(self) -> str:
        """The prompt's unique key, earlier turns included (store.prompt_hash)."""
        return prompt_hash(self.text, self.context_messages)


class PromptFileError(OdpoError):
    """A prompt file could not be imported; str() is one human line naming file and line/row."""

    def __init__(self, file_name: str, problem: str, *, where: Where = None) -> None:
        self.file_name = file_name
        self.problem = one_line(problem)  # one short line, whatever the cause said or quoted
        self.where = where
        place = f", {where[0]} {where[1]}" if where else ""
        super().__init__(f"{file_name}{place}: {self.problem}")


# One normalisation for duplicate detection, the DB's unique key and the held-out hash: all three
# must agree, so the file reader uses the store's definition.
prompt_key = normalise_prompt


def held_out_split(text: str, fraction: float, context: Iterable[dict[str, str]] = ()) -> bool:
    """True if the prompt (with its earlier turns `context`, if any) belongs to the held-out split.

    A sha256 of the normalised prompt (store.prompt_hash), not Python's salted `hash()`, so the same
    prompt lands in the same split on every machine, process and re-import.
    """
    if not 0.0 <= fraction < 1.0:  # also rejects NaN
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction!r}")
    return int(prompt_hash(text, list(context))[:16], 16) / 2**64 < fraction


def dedupe(records: Iterable[PromptRecord]) -> tuple[list[PromptRecord], int]:
    """Drop repeated prompts (by `PromptRecord.key`: the normalised text and earlier turns), keeping
    the first; return (unique, n_duplicates)."""
    seen: set[str] = set()
    unique: list[PromptRecord] = []
    duplicates = 0
    for record in records:
        key = record.key
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        unique.append(record)
    return unique, duplicates


def read_prompt_file(path: Path, *, max_chars: int = MAX_PROMPT_CHARS,
                     name: str | None = None) -> list[PromptRecord]:
    """Read and fully validate a prompt file; the format is chosen by the file's suffix. `name`
    (default: the file's own name) names the file in errors and is the prompts' source, for an
    upload whose original name is not its path's.

    Raises PromptFileError for every problem with the file; ValueError only for a bad max_chars.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    path = Path(path)
    name = name or path.name or str(path)
    try:  # size checked before a byte is read: a file over the cap is never loaded
        data = import_limits.read_capped(path, import_limits.MAX_PROMPT_FILE_BYTES)
    except FileLimitError as exc:
        raise PromptFileError(name, exc.problem) from None
    records = parse_prompt_bytes(data, name=name, suffix=Path(name).suffix.lower(), max_chars=max_chars)
    logger.info("read %d prompts from %s", len(records), path)
    return records


def read_starter_prompts() -> list[PromptRecord]:
    """The bundled starter prompts, read through importlib.resources so it works when installed."""
    resource = resources.files(STARTER_PACKAGE).joinpath(STARTER_PATH)
    return parse_prompt_bytes(resource.read_bytes(), name=Path(STARTER_PATH).name, suffix=".jsonl",
                              source="starter")


def parse_prompt_bytes(data: bytes, *, name: str, suffix: str, max_chars: int = MAX_PROMPT_CHARS,
                       source: str | None = None) -> list[PromptRecord]:
    """Parse file content already in memory (uploads arrive as bytes); `name` is used in errors.
    Every problem, however deep in the file, is one PromptFileError (never a RecursionError or a
    pyarrow exception), raised before anything is returned."""
    src = source if source is not None else name
    try:
        records = list(_records(_rows(data, name, suffix), name, src, max_chars))
    except FileLimitError as exc:
        raise PromptFileError(name, exc.problem, where=("line", exc.line) if exc.line else None) from None
    except RecursionError:  # a value nested so deep that checking it recursed too far
        raise PromptFileError(name, "a value nested too deeply to read") from None
    if not records:
        raise PromptFileError(name, "the file is empty: no prompts found")
    return records


def _rows(data: bytes, name: str, suffix: str) -> Iterator[tuple[Where, Any, Any]]:
    if suffix == ".parquet":
        return _parquet_rows(data, name)
    text = import_limits.decode_text(data)  # a FileLimitError names the line
    if suffix in JSONL_SUFFIXES:
        return _jsonl_rows(text, name)
    if suffix == ".json":
        return _json_rows(text, name)
    if suffix in CSV_DELIMITERS:
        return _csv_rows(text, name, CSV_DELIMITERS[suffix])
    return _text_rows(text)


def _records(rows: Iterable[tuple[Where, Any, Any]], name: str, source: str,
             max_chars: int) -> Iterator[PromptRecord]:
    """Validated records, at most MAX_PROMPT_ROWS of them (counted as they come: a file of tiny
    prompts must not fill the memory before the count is checked)."""
    for count, (where, value, tags, turns) in enumerate(_with_turns(rows), start=1):
        if count > import_limits.MAX_PROMPT_ROWS:
            raise PromptFileError(name, f"more than {import_limits.MAX_PROMPT_ROWS:,} prompts, the limit for "
                                        "one file; split it into smaller files")
        yield PromptRecord(_check_prompt(value, name, where, max_chars), _check_tags(tags, name, where),
                           source=source, context=_check_turns(turns, name, where, max_chars))


# --- per-format row iterators: each yields (where, prompt value, tags value) -------------------
# Lines split on "\n" only: str.splitlines() also splits on U+2028, U+2029, U+0085 (text, not lines).

def _text_rows(text: str) -> Iterator[tuple[Where, Any, Any]]:
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield ("line", number), line, None


def _jsonl_rows(text: str, name: str) -> Iterator[tuple[Where, Any, Any]]:
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = ("line", number)
        try:
            obj = load_json(line)
        except FileLimitError as exc:
            raise PromptFileError(name, exc.problem, where=where) from None
        yield where, _object_prompt(obj, name, where), obj.get("tags")


def _json_rows(text: str, name: str) -> Iterator[tuple[Where, Any, Any]]:
    doc = load_json(text)  # a FileLimitError carries the line of a syntax error
    if not isinstance(doc, list):
        raise PromptFileError(name, f"expected a JSON list of prompt objects, got {_json_type(doc)}")
    for number, obj in enumerate(doc, start=1):
        where = ("item", number)
        yield where, _object_prompt(obj, name, where), obj.get("tags")


def _csv_rows(text: str, name: str, delimiter: str) -> Iterator[tuple[Where, Any, Any]]:
    reader = csv.reader(io.StringIO(text, newline="\n"), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return
        columns = [column.strip().lower() for column in header]
        prompt_col = _require_column(columns, name, header)
        tags_col = columns.index("tags") if "tags" in columns else None
        # Row numbers as a spreadsheet shows them: the header is row 1.
        for number, row in enumerate(reader, start=2):
            if not any(row):  # a blank line or an empty spreadsheet row (",,"), not a prompt
                continue
            value = row[prompt_col] if prompt_col < len(row) else ""
            tags = row[tags_col] if tags_col is not None and tags_col < len(row) else None
            yield ("row", number), value, tags
    except csv.Error as exc:
        raise PromptFileError(name, f"malformed CSV: {exc}", where=("line", reader.line_num)) from None


def _parquet_rows(data: bytes, name: str) -> Iterator[tuple[Where, Any, Any]]:
    """Only the prompt (or chat messages) and tags columns, after the metadata passed the row and
    size caps (import_limits.parquet_records)."""
    picked: dict[str, str] = {}

    def pick(names: list[str]) -> list[str]:
        lower: dict[str, str] = {}
        for column in names:
            lower.setdefault(column.strip().lower(), column)
        for role in ("prompt", "messages", "tags"):
            if role in lower and not (role == "messages" and "prompt" in picked):
                picked[role] = lower[role]
        if "prompt" not in picked and "messages" not in picked:
            found = ", ".join(repr(column) for column in names) or "none"
            raise PromptFileError(name, f"no 'prompt' column or chat 'messages' column (found columns: {found})")
        return list(picked.values())

    records = import_limits.parquet_records(data, pick=pick, max_rows=import_limits.MAX_PROMPT_ROWS,
                                            max_bytes=import_limits.MAX_PROMPT_FILE_BYTES)
    for number, record in enumerate(records, start=1):
        where = ("row", number)
        value = (record[picked["prompt"]] if "prompt" in picked
                 else _messages_prompt(record[picked["messages"]], name, where))
        yield where, value, record.get(picked.get("tags", ""))


# --- shared validation ---------------------------------------------------------------------------

def _require_column(columns: list[str], name: str, original: list[str]) -> int:
    if "prompt" not in columns:
        found = ", ".join(repr(column) for column in original) or "none"
        raise PromptFileError(name, f"no 'prompt' column (found columns: {found})")
    return columns.index("prompt")


@dataclass(frozen=True)
class _Conversation:
    """A `messages` prompt on its way through the row iterators: the final user text and the turns
    before it (the iterators yield one prompt value, so the turns travel inside it)."""

    text: Any
    turns: Turns


def _with_turns(rows: Iterable[tuple[Where, Any, Any]]) -> Iterator[tuple[Where, Any, Any, Turns]]:
    for where, value, tags in rows:
        if isinstance(value, _Conversation):
            yield where, value.text, tags, value.turns
        else:
            yield where, value, tags, ()


def _object_prompt(obj: Any, name: str, where: Where) -> Any:
    """The prompt of one JSON object: its `prompt` field, else the conversation in `messages`."""
    if not isinstance(obj, dict):
        raise PromptFileError(name, f"expected a JSON object, got {_json_type(obj)}", where=where)
    if "prompt" in obj:
        return obj["prompt"]
    if "messages" in obj:
        return _messages_prompt(obj["messages"], name, where)
    found = ", ".join(repr(key) for key in obj) or "none"
    raise PromptFileError(name, f"no 'prompt' field or chat 'messages' (found fields: {found})", where=where)


def _messages_prompt(messages: Any, name: str, where: Where) -> Any:
    """The last user message, with the turns before it as its context; answers after it are
    dropped. A conversation odpo cannot continue (unknown role, turns out of order) is refused."""
    if not isinstance(messages, list):
        raise PromptFileError(name, f"'messages' must be a list, got {_json_type(messages)}", where=where)
    last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"), default=None)
    if last is None:
        raise PromptFileError(name, "'messages' has no message with role 'user'", where=where)
    head = [{"role": m.get("role"), "content": _text_parts(m.get("content"))} if isinstance(m, dict) else m
            for m in messages[:last + 1]]
    if last == 0:
        return head[0]["content"]  # a single user turn: checked like any prompt
    try:
        context, text = split_conversation(head)
    except ValueError as exc:
        raise PromptFileError(name, f"'messages': {exc}", where=where) from None
    return _Conversation(text, tuple((m["role"], m["content"]) for m in context))


def _text_parts(content: Any) -> Any:
    """OpenAI-style content parts: keep the text parts; anything else as it is."""
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if texts and all(isinstance(t, str) for t in texts):
            return "\n".join(texts)
    return content


def _check_turns(turns: Turns, name: str, where: Where, max_chars: int) -> Turns:
    """The earlier turns, checked like prompts (no NUL, within max_chars), line endings normalised."""
    out = []
    for i, (role, content) in enumerate(turns, start=1):
        _check_storable(content, f"message {i} of 'messages'", name, where)
        if len(content) > max_chars:
            raise PromptFileError(name, f"message {i} of 'messages' is {len(content)} characters, over the "
                                        f"limit of {max_chars}", where=where)
        out.append((role, content.replace("\r\n", "\n").replace("\r", "\n")))
    return tuple(out)


def _check_prompt(value: Any, name: str, where: Where, max_chars: int) -> str:
    if value is None:
        raise PromptFileError(name, "prompt is missing (null)", where=where)
    if not isinstance(value, str):
        raise PromptFileError(name, f"prompt must be a string, got {_json_type(value)}", where=where)
    _check_storable(value, "prompt", name, where)
    text = value.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text:
        raise PromptFileError(name, "prompt is empty or only whitespace", where=where)
    if len(text) > max_chars:
        raise PromptFileError(name, f"prompt is {len(text)} characters, over the limit of {max_chars}",
                              where=where)
    return text


def _check_tags(value: Any, name: str, where: Where) -> tuple[str, ...]:
    """Tags as a list of strings or one comma-separated string; blanks dropped, order kept."""
    if value is None:
        return ()
    if isinstance(value, str):
        parts = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(tag, str) for tag in value):
        parts = list(value)
    else:
        raise PromptFileError(name, "tags must be a list of strings or a comma-separated string, "
                                    f"got {_json_type(value)}", where=where)
    for tag in parts:
        _check_storable(tag, "a tag", name, where)
    return tuple(dict.fromkeys(tag.strip() for tag in parts if tag.strip()))


def _check_storable(value: str, what: str, name: str, where: Where) -> None:
    """Text a database can store (no NUL, even escaped as \\u0000; no unpaired surrogate: see
    import_limits.unstorable), refused like any bad value so the whole file fails first."""
    problem = unstorable(value)
    if problem:
        raise PromptFileError(name, f"{what} {problem}", where=where)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
