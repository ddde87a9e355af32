"""Which exceptions are the user's to fix, and the one line that tells them how."""
from __future__ import annotations

from typing import Optional

from odpo.db.errors import OdpoError
from odpo.db.transient import classify

# The exit status of a process that stopped on a transient fault (sysexits.h EX_TEMPFAIL): `odpo up`
# restarts such a child after a backoff and never counts it toward giving up.
EXIT_TRANSIENT = 75

# File-system errors a user causes with a path they gave (a data dir under a file, a directory
# they may not write, a model path that does not exist): the path and the reason say it all.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def user_error_message(exc: BaseException) -> Optional[str]:
    """A one-line message for errors caused by input or environment; None for real bugs, which
    keep their traceback (`-vv` logs it for the one-line ones too)."""
    if isinstance(exc, OdpoError):
        return _first_line(exc)
    fault = classify(exc)
    if fault.transient:  # a database or server that went away: one line, never a traceback
        return fault.line
    if isinstance(exc, _PATH_ERRORS) or (isinstance(exc, OSError) and exc.filename):
        return _os_error_line(exc)  # type: ignore[arg-type]
    return None


def _os_error_line(exc: OSError) -> str:
    """"Not a directory: /x/file/odpo-data" from OSError's errno form (what the OS said, about
    which path); an OSError subclass raised with its own message (trainer.policy.loading'
    ModelNotFoundError) keeps that message."""
    if exc.filename is None or exc.strerror is None:
        return _first_line(exc)
    what = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
    return f"{exc.strerror}: {what}"


def exit_status(exc: BaseException) -> int:
    """1 for an error the user must fix; EXIT_TRANSIENT for one that waiting fixes."""
    return EXIT_TRANSIENT if classify(exc).transient else 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
