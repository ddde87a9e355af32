"""Who may label and who may administer: a small users.toml, checked by Gradio's login form.

Why a file and not a database table: the people who run a self-hosted studio edit a text file
faster than any admin screen, and it keeps credentials out of the labels database. Format:

    [[users]]
    name = "alice"
    password = "plain text"          # or password_sha256 = "<hex digest>"
    admin = true

The file is found from `--auth` (ServeConfig.auth_file) or the ODPO_AUTH_FILE environment
variable; with neither, auth is off and labelers type their name in the page.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from odpo.db.errors import OdpoError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    tomllib = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

AUTH_ENV = "ODPO_AUTH_FILE"


class AuthFileError(OdpoError):
    """The users file is missing or malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class User:
    name: str
    password_sha256: str  # hex digest; plain passwords are hashed on load and never kept
    admin: bool = False


@dataclass(frozen=True)
class AuthConfig:
    """Loaded users; `verify` is what Gradio's `auth=` callable calls for every login."""

    path: Path
    users: Mapping[str, User]

    @property
    def admins(self) -> set[str]:
        return {u.name for u in self.users.values() if u.admin}

    def verify(self, username: str, password: str) -> bool:
        user = self.users.get((username or "").strip())
        if user is None:
            hmac.compare_digest(sha256_hex(password or ""), sha256_hex(""))  # same work either way
            return False
        return hmac.compare_digest(sha256_hex(password or ""), user.password_sha256)

    def is_admin(self, username: Optional[str]) -> bool:
        user = self.users.get(username or "")
        return bool(user and user.admin)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve_auth_file(configured: Optional[Path], *, environ: Optional[Mapping[str, str]] = None) -> Optional[Path]:
    """The configured path wins over the environment; an empty variable means no auth."""
    if configured:
        return Path(configured)
    env = os.environ if environ is None else environ
    value = (env.get(AUTH_ENV) or "").strip()
    return Path(value) if value else None


def load_auth(configured: Optional[Path], *, environ: Optional[Mapping[str, str]] = None) -> Optional[AuthConfig]:
    """None when auth is off; raises AuthFileError for a file that cannot be used (never silently
    starts an open app when the operator asked for a locked one)."""
    path = resolve_auth_file(configured, environ=environ)
    if path is None:
        return None
    users = load_users(path)
    log.info("auth on: %d user(s) from %s (%d admin)", len(users), path, sum(u.admin for u in users))
    return AuthConfig(path=path, users={u.name: u for u in users})


def load_users(path: Path) -> list[User]:
    if tomllib is None:  # pragma: no cover
        raise AuthFileError("reading users.toml needs Python 3.11+ (tomllib)")
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AuthFileError(f"auth file {path} does not exist") from None
    except OSError as exc:
        raise AuthFileError(f"cannot read auth file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AuthFileError(f"{path}: not valid TOML: {exc}") from None
    entries = data.get("users")
    if not isinstance(entries, list) or not entries:
        raise AuthFileError(f"{path}: expected at least one [[users]] entry with name and password")
    users = [_parse_user(entry, path, i) for i, entry in enumerate(entries, start=1)]
    names = [u.name for u in users]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AuthFileError(f"{path}: user {dup[0]!r} is listed twice")
    return users


def _parse_user(entry: object, path: Path, index: int) -> User:
    where = f"{path}, users entry {index}"
    if not isinstance(entry, dict):
        raise AuthFileError(f"{where}: expected a table with name and password")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise AuthFileError(f"{where}: missing 'name'")
    name = name.strip()
    if name.startswith("judge:"):
        raise AuthFileError(f"{where}: names starting with 'judge:' are reserved for judges")
    plain, digest = entry.get("password"), entry.get("password_sha256")
    if (plain is None) == (digest is None):
        raise AuthFileError(f"{where} ({name}): give exactly one of 'password' or 'password_sha256'")
    if plain is not None:
        if not isinstance(plain, str) or not plain:
            raise AuthFileError(f"{where} ({name}): 'password' must be a non-empty string")
        digest = sha256_hex(plain)
    elif not (isinstance(digest, str) and len(digest) == 64
              and all(c in "0123456789abcdef" for c in digest.lower())):
        raise AuthFileError(f"{where} ({name}): 'password_sha256' must be 64 hex digits")
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise AuthFileError(f"{where} ({name}): 'admin' must be true or false")
    return User(name=name, password_sha256=digest.lower(), admin=admin)
