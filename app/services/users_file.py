"""Editing the users file: add or replace a user, remove one, hash plain passwords in place.

Every change rewrites the whole file through a temporary file in the same directory, created
0600, and renames it over the old one: a crash leaves the old file or the new one, never half of
each, and the file is never readable by others, not even for an instant.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from odpo.app.services.accounts import AuthFileError, check_user_name, read_entries
from odpo.app.services.passwords import hash_password, parse_hash

HEADER = ("# odpo sign-in accounts: `odpo users add NAME [--admin]` edits this file.\n"
          "# Passwords are salted scrypt hashes; keep the file private (chmod 600).\n")


def add_user(path: Path, name: str, password: str, *, admin: bool = False) -> bool:
    """Add `name` (or replace its password and role); True when the user is new."""
    name = check_user_name(name)
    if not password:
        raise AuthFileError("a password cannot be empty")
    entries = read_entries(path) if Path(path).exists() else []
    entry = {"name": name, "password_hash": hash_password(password), "admin": admin}
    new = not any(isinstance(e, dict) and e.get("name") == name for e in entries)
    entries = [entry if isinstance(e, dict) and e.get("name") == name else e for e in entries]
    write_entries(path, entries + ([entry] if new else []))
    return new


def remove_user(path: Path, name: str) -> None:
    entries = read_entries(path)
    kept = [e for e in entries if not (isinstance(e, dict) and e.get("name") == name)]
    if len(kept) == len(entries):
        raise AuthFileError(f"{path}: no user {name!r}")
    write_entries(path, kept)


def rehash(path: Path) -> list[str]:
    """Replace every plain `password` with a `password_hash`; the names converted. Unsalted
    SHA-256 entries cannot be converted (the password is not known): they are named in the error."""
    entries = read_entries(path)
    old = [str(e.get("name")) for e in entries if isinstance(e, dict) and "password_sha256" in e]
    if old:
        raise AuthFileError(f"{path}: {', '.join(old)} have unsalted SHA-256 hashes, which cannot be converted; "
                            "set new passwords with `odpo users add NAME`")
    converted = []
    for e in entries:
        if isinstance(e, dict) and "password" in e:
            if not isinstance(e["password"], str) or not e["password"]:
                raise AuthFileError(f"{path}: {e.get('name')!r} has an empty or non-text password")
            e["password_hash"] = hash_password(e.pop("password"))
            converted.append(str(e.get("name")))
    write_entries(path, entries)
    return converted


def write_entries(path: Path, entries: list[Any]) -> None:
    path = Path(path)
    text = HEADER + "".join(_entry_toml(e) for e in entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _entry_toml(entry: Any) -> str:
    """One [[users]] table. Values are TOML basic strings written with JSON's escapes (which TOML
    shares), booleans and integers; anything else in a hand-edited entry is kept as a string."""
    if not isinstance(entry, dict):
        raise AuthFileError("every [[users]] entry must be a table")
    if "password_hash" in entry:
        parse_hash(entry["password_hash"])  # never write an entry odpo would then refuse
    lines = ["\n[[users]]"]
    for key, value in entry.items():
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, int):
            rendered = str(value)
        else:
            rendered = json.dumps(str(value))
        lines.append(f"{_key(key)} = {rendered}")
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)
