"""Who may label and who may administer: a small users.toml, checked at sign-in.

Why a file and not a database table: the people who run a self-hosted studio manage it with one
command (`odpo users add NAME [--admin]`) or a text editor, and it keeps credentials out of the
labels database (and out of its backups and exports). Format, as `odpo users add` writes it:

    [[users]]
    name = "alice"
    password_hash = "scrypt$131072$8$1$<salt>$<hash>"     # app/services/passwords.py
    admin = true

A plain `password` or the old unsalted `password_sha256` is refused with one line saying how to
convert (`odpo users rehash` hashes plain passwords in place; a SHA-256 entry must be re-added).
The file is refused when others may write it and warned about when others may read it.

Which file: `--auth-file` (ServeConfig.auth_file), else ODPO_AUTH_FILE, else `users.toml` in the
data directory when it exists; with none, sign-in is off (loopback only, see app/web.py).
"""
from __future__ import annotations

import hmac
import logging
import os
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Mapping, Optional

from odpo.app.services.passwords import ScryptHash, hash_password, parse_hash, verify_password
from odpo.db.errors import OdpoError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    tomllib = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

AUTH_ENV = "ODPO_AUTH_FILE"
USERS_FILE_NAME = "users.toml"  # in the data directory: where `odpo users add` writes by default
RESERVED_PREFIXES = ("judge:", "dataset:")  # label sources that are not people


class AuthFileError(OdpoError):
    """The users file is missing, malformed or unsafe; the message names the file and the entry."""


@dataclass(frozen=True)
class User:
    name: str
    password: ScryptHash
    admin: bool = False


@dataclass(frozen=True)
class AuthConfig:
    """Loaded users; `verify` is what the sign-in form calls."""

    path: Path
    users: Mapping[str, User]

    @property
    def admins(self) -> set[str]:
        return {u.name for u in self.users.values() if u.admin}

    @cached_property
    def _decoy(self) -> ScryptHash:
        """What an unknown name is checked against, at the file's usual cost, so a miss takes as
        long as a hit (no finding out who has an account by timing)."""
        costs = sorted((u.password.n, u.password.r, u.password.p) for u in self.users.values())
        n, r, p = costs[len(costs) // 2]
        return parse_hash(hash_password("odpo decoy", n=n, r=r, p=p))

    def verify(self, username: str, password: str) -> bool:
        user = self.users.get((username or "").strip())
        if user is None:
            verify_password(password or "", self._decoy)
            return False
        return verify_password(password or "", user.password)

    def is_admin(self, username: Optional[str]) -> bool:
        user = self.users.get(username or "")
        return bool(user and user.admin)


def resolve_auth_file(configured: Optional[Path], *, data_dir: Optional[Path] = None,
                      environ: Optional[Mapping[str, str]] = None) -> Optional[Path]:
    """The configured path wins over the environment, which wins over the data directory's
    users.toml (used only when it exists); an empty variable means no auth."""
    if configured:
        return Path(configured)
    env = os.environ if environ is None else environ
    value = (env.get(AUTH_ENV) or "").strip()
    if value:
        return Path(value)
    if data_dir is not None and (Path(data_dir) / USERS_FILE_NAME).is_file():
        return Path(data_dir) / USERS_FILE_NAME
    return None


def load_auth(configured: Optional[Path], *, data_dir: Optional[Path] = None,
              environ: Optional[Mapping[str, str]] = None) -> Optional[AuthConfig]:
    """None when auth is off; raises AuthFileError for a file that cannot be used (never silently
    starts an open app when the operator asked for a locked one)."""
    path = resolve_auth_file(configured, data_dir=data_dir, environ=environ)
    if path is None:
        return None
    check_file_mode(path)
    users = load_users(path)
    weak = [u.name for u in users if u.password.weak]
    if weak:
        log.warning("%s: weak password hashes for %s; re-add them with `odpo users add NAME`", path, ", ".join(weak))
    log.info("sign-in on: %d user(s) from %s (%d admin)", len(users), path, sum(u.admin for u in users))
    return AuthConfig(path=path, users={u.name: u for u in users})


def check_file_mode(path: Path) -> None:
    """Refuse a users file that others may write (anyone could add an admin); warn when others may
    read it (the hashes are salted and slow, but they are still worth keeping private)."""
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        raise AuthFileError(f"auth file {path} does not exist") from None
    except OSError as exc:
        raise AuthFileError(f"cannot read auth file {path}: {exc.strerror}") from None
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise AuthFileError(f"auth file {path} is writable by other users; run: chmod 600 {path}")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("auth file %s is readable by other users; chmod 600 %s keeps the hashes private", path, path)


def read_entries(path: Path) -> list:
    """The raw [[users]] tables of the file (what `odpo users` edits)."""
    if tomllib is None:  # pragma: no cover
        raise AuthFileError("reading users.toml needs Python 3.11+ (tomllib)")
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AuthFileError(f"auth file {path} does not exist") from None
    except OSError as exc:
        raise AuthFileError(f"cannot read auth file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AuthFileError(f"{path}: not valid TOML: {str(exc).splitlines()[0]}") from None
    entries = data.get("users", [])
    if not isinstance(entries, list):
        raise AuthFileError(f"{path}: expected [[users]] entries with name and password_hash")
    return entries


def load_users(path: Path) -> list[User]:
    entries = read_entries(path)
    if not entries:
        raise AuthFileError(f"{path}: expected at least one [[users]] entry; add one with `odpo users add NAME`")
    users = [parse_user(entry, path, i) for i, entry in enumerate(entries, start=1)]
    names = [u.name for u in users]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AuthFileError(f"{path}: user {dup[0]!r} is listed twice")
    return users


def parse_user(entry: object, path: Path, index: int) -> User:
    where = f"{path}, users entry {index}"
    if not isinstance(entry, dict):
        raise AuthFileError(f"{where}: expected a table with name and password_hash")
    name = check_user_name(entry.get("name"), where=where)
    where = f"{where} ({name})"
    if "password" in entry:
        raise AuthFileError(f"{where}: plain passwords are not accepted; `odpo users rehash --file {path}` "
                            "hashes them in place")
    if "password_sha256" in entry:
        raise AuthFileError(f"{where}: unsalted password_sha256 is not accepted; set a new password with "
                            f"`odpo users add {name} --file {path}`")
    encoded = entry.get("password_hash")
    if not isinstance(encoded, str):
        raise AuthFileError(f"{where}: missing 'password_hash' (`odpo users add {name}` writes one)")
    try:
        password = parse_hash(encoded)
    except ValueError as exc:
        raise AuthFileError(f"{where}: bad password_hash: {exc}") from None
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise AuthFileError(f"{where}: 'admin' must be true or false")
    return User(name=name, password=password, admin=admin)


def check_user_name(name: object, *, where: str = "user") -> str:
    """A sign-in name: printable text without controls, not a reserved label source."""
    if not isinstance(name, str) or not name.strip():
        raise AuthFileError(f"{where}: missing 'name'")
    name = name.strip()
    if len(name) > 100 or any(not ch.isprintable() for ch in name):
        raise AuthFileError(f"{where}: a name is at most 100 printable characters")
    if name.lower().startswith(RESERVED_PREFIXES):
        raise AuthFileError(f"{where}: names starting with {' or '.join(RESERVED_PREFIXES)} are reserved")
    return name


def same_secret(a: str, b: str) -> bool:
    """Constant-time string comparison (for tokens that are not passwords)."""
    return hmac.compare_digest(a.encode(), b.encode())
