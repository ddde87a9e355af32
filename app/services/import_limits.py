"""Limits and guarded readers for files people import: prompt files (CLI and admin upload) and
preference datasets (`odpo import dataset`).

Why this module exists: an import reads a file somebody else made, and the importer must neither
run out of memory, nor print a traceback, nor write half a file. Every guard here answers with a
`FileLimitError`, one line without the file's name (the importers add it, each in its own error
type), BEFORE the costly step: a file's size is checked before its bytes are read, a Parquet
file's rows and bytes are checked from its metadata before any row data is decoded (and then
only the columns the importer needs are read, one row group at a time), a JSONL file is read one
line at a time and split on "\\n" only. `str.splitlines()` also splits on U+2028, U+2029, U+0085
and other separators that are legal inside JSON strings, so it must never split a JSONL file.
"""
from __future__ import annotations

import json
import logging
import re
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from odpo.db.errors import OdpoError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# A prompt file (CLI or admin upload; for Parquet also the uncompressed columns read): 32 MiB holds
# hundreds of thousands of prompts; the web app's upload limit (Gradio's max_file_size) is the same.
MAX_PROMPT_FILE_BYTES = 32 * MiB
MAX_PROMPT_ROWS = 200_000
# A preference dataset is bigger (two answers a row) and comes from the operator's own disk.
MAX_DATASET_FILE_BYTES = 1024 * MiB
MAX_DATASET_ROWS = 1_000_000
MAX_LINE_BYTES = 16 * MiB  # one JSONL line (one dataset row)
MAX_PROBLEM_CHARS = 300  # an error line quotes at most this much of what it complains about
PARQUET_BATCH_ROWS = 1024  # rows decoded at a time (a row group is streamed in batches)

# PostgreSQL text cannot hold NUL; an unpaired surrogate (JSON "\ud800") is not text at all: the
# database driver cannot encode it, so it would fail the whole transaction with a traceback.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class FileLimitError(OdpoError):
    """A file (or one of its lines) an importer refuses; str() is one line without the file name."""

    def __init__(self, problem: str, *, line: int | None = None) -> None:
        self.problem = one_line(problem)
        self.line = line
        super().__init__(self.problem)


def one_line(text: Any, limit: int = MAX_PROBLEM_CHARS) -> str:
    """`text` as one line of at most `limit` characters: an error must stay readable whatever
    value it quotes (a 10 MB role name, a line break inside a key)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def size_text(n: int) -> str:
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n:,} bytes"


def check_regular_file(path: Path, max_bytes: int) -> int:
    """The size of `path`, refused when it is missing, not a regular file (a directory, a FIFO or a
    device such as /dev/zero never ends) or over `max_bytes`; nothing of the file is read."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise FileLimitError(f"file not found ({path})") from None
    except PermissionError:
        raise FileLimitError(f"permission denied: cannot read {path}") from None
    except OSError as exc:
        raise FileLimitError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise FileLimitError(f"is a directory, not a file ({path})")
    if not stat.S_ISREG(info.st_mode):
        raise FileLimitError(f"is not a regular file ({path})")
    if info.st_size > max_bytes:
        raise FileLimitError(f"the file is {size_text(info.st_size)}, over the limit of {size_text(max_bytes)} "
                             "for one import; split it into smaller files")
    return info.st_size


def read_capped(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, its size checked before it is read (and
    again after, for a file that grew meanwhile)."""
    check_regular_file(path, max_bytes)
    try:
        data = path.read_bytes()
    except PermissionError:
        raise FileLimitError(f"permission denied: cannot read {path}") from None
    except OSError as exc:
        raise FileLimitError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise FileLimitError(f"the file grew to over {size_text(max_bytes)} while it was read")
    return data


def check_rows(count: int, max_rows: int) -> None:
    if count > max_rows:
        raise FileLimitError(f"more than {max_rows:,} rows, the limit for one import; split the file")


def sniff_binary(head: bytes) -> str | None:
    """Why the start of a file is not UTF-8 text (UTF-16, ZIP/Excel, Parquet), or None."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "the file is UTF-16 encoded; save it as UTF-8"
    if head.startswith(b"PK\x03\x04"):
        return "looks like a ZIP or Excel file, not text; export it as CSV or JSONL"
    if head.startswith(b"PAR1"):
        return "looks like a Parquet file; give it a .parquet extension"
    return None


def decode_text(data: bytes) -> str:
    """A whole text file as UTF-8 (a BOM dropped), \\r\\n and \\r made \\n; binary content (UTF-16,
    ZIP, Parquet, a NUL byte) and invalid UTF-8 are refused naming the line and byte offset."""
    binary = sniff_binary(data[:4])
    if binary:
        raise FileLimitError(binary)
    if b"\x00" in data:
        offset = data.index(b"\x00")
        raise FileLimitError(f"contains binary content: a NUL byte (0x00) at byte offset {offset}, which "
                             "databases cannot store in text; expected a text file",
                             line=data.count(b"\n", 0, offset) + 1)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        offset = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        raise FileLimitError(f"invalid UTF-8 at byte offset {offset} (byte 0x{data[offset]:02x}); save the "
                             "file as UTF-8", line=data.count(b"\n", 0, offset) + 1) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def jsonl_lines(handle: IO[bytes], *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, line without its "\\n" or "\\r\\n") of a binary file, split on
    "\\n" ONLY, one line in memory at a time; a line over `max_line_bytes` is refused."""
    offset = 0
    for number in range(1, sys.maxsize):
        raw = handle.readline(max_line_bytes + 2)  # room for the "\r\n" of a line of exactly the cap
        if not raw:
            return
        line = raw[:-1].removesuffix(b"\r") if raw.endswith(b"\n") else raw
        if len(line) > max_line_bytes:  # also a cut-off read: it has max + 2 bytes and no "\n"
            raise FileLimitError(f"a line longer than {size_text(max_line_bytes)}, the limit for one row",
                                 line=number)
        yield number, offset, line
        offset += len(raw)


def load_json(text: str) -> Any:
    """json.loads that fails with one line for every bad document: malformed JSON, nesting deeper
    than Python's recursion limit (a RecursionError), a number too long to convert, no memory."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        hint = "; for one object per line use a .jsonl file" if exc.msg == "Extra data" else ""
        raise FileLimitError(f"malformed JSON: {exc.msg} (column {exc.colno}){hint}", line=exc.lineno) from None
    except RecursionError:
        raise FileLimitError("JSON nested too deeply to read (arrays or objects inside each other "
                             f"about {sys.getrecursionlimit()} levels deep)") from None
    except MemoryError:
        raise FileLimitError("a JSON value too large to read into memory") from None
    except ValueError as exc:  # an integer with more digits than int() converts (CVE-2020-10735's limit)
        if "integer string conversion" in str(exc):
            raise FileLimitError(f"a JSON number longer than {sys.get_int_max_str_digits():,} digits") from None
        raise FileLimitError(f"a JSON value that cannot be read: {one_line(exc, 120)}") from None


def unstorable(value: str) -> str | None:
    """Why `value` cannot be stored as text (a NUL, an unpaired surrogate), or None."""
    match = _UNSTORABLE.search(value)
    if match is None:
        return None
    if match.group() == "\x00":
        return ("contains a NUL character (\\u0000 or a 0x00 byte), which databases cannot store in text; "
                "remove it")
    return (f"contains an unpaired UTF-16 surrogate (\\u{ord(match.group()):04x}), which is not valid "
            "Unicode text; remove it")


# --- Parquet ----------------------------------------------------------------------------------

# pick(column names of the file) -> the names to read; it raises the importer's own error when a
# column it needs is missing.
ColumnPicker = Callable[[list[str]], list[str]]


def parquet_records(source: Any, *, pick: ColumnPicker, max_rows: int,
                    max_bytes: int) -> Iterator[dict[str, Any]]:
    """The rows of a Parquet file (a path or bytes) as dicts of the picked columns only.

    The file's metadata is checked first: more than `max_rows` rows, or more than `max_bytes` of
    uncompressed data in the picked columns, is refused before a single row is decoded. Rows are
    then decoded one batch of one row group at a time, rows and decoded bytes counted again
    (metadata can lie, and a dictionary-encoded value is stored once however often it repeats)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq  # deferred: only Parquet needs it
    except ImportError:
        raise FileLimitError("reading Parquet needs pyarrow; install it (pip install pyarrow) or convert the "
                             "file to JSONL") from None
    try:
        parquet = pq.ParquetFile(pa.BufferReader(source) if isinstance(source, bytes) else str(source))
        names = [str(name) for name in parquet.schema_arrow.names]
        meta = parquet.metadata
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types; all mean "not a readable file"
        raise FileLimitError(f"not a readable Parquet file: {one_line(exc, 160)}") from None
    try:
        columns = pick(names)
        check_rows(meta.num_rows, max_rows)
        data_bytes = _column_bytes(meta, set(columns))
        if data_bytes > max_bytes:
            raise FileLimitError(f"its columns {', '.join(map(repr, columns))} hold {size_text(data_bytes)} "
                                 f"uncompressed, over the limit of {size_text(max_bytes)} for one import")
        yield from _batches(parquet, columns, max_rows, max_bytes)
    finally:
        parquet.close()


def _column_bytes(meta: Any, columns: set[str]) -> int:
    """Uncompressed bytes of the named top-level columns, summed over row groups, from metadata."""
    total = 0
    for group in range(meta.num_row_groups):
        row_group = meta.row_group(group)
        for j in range(row_group.num_columns):
            chunk = row_group.column(j)
            if chunk.path_in_schema.split(".", 1)[0] in columns:
                total += max(0, chunk.total_uncompressed_size)
    return total


def _batches(parquet: Any, columns: list[str], max_rows: int, max_bytes: int) -> Iterator[dict[str, Any]]:
    """Decoded rows, counted again as they come, and their decoded bytes too: a dictionary-encoded
    column stores a repeated value once, so its metadata size says little about what it decodes to."""
    count = decoded = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            count, decoded = count + batch.num_rows, decoded + batch.nbytes
            check_rows(count, max_rows)
            if decoded > max_bytes:
                raise FileLimitError(f"its columns {', '.join(map(repr, columns))} decode to more than "
                                     f"{size_text(max_bytes)}, the limit for one import")
            yield from batch.to_pylist()
    except FileLimitError:
        raise
    except RecursionError:
        raise FileLimitError("a Parquet value nested too deeply to read") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt page, invalid UTF-8, ...: all "not readable"
        raise FileLimitError(f"not a readable Parquet file: {one_line(exc, 160)}") from None
