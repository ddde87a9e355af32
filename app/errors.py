"""Which exceptions are the user's to fix, and the one line that tells them how."""
from __future__ import annotations

from typing import Optional

from odpo.db.errors import OdpoError


def user_error_message(exc: BaseException) -> Optional[str]:
    """A one-line message for errors caused by input or environment; None for real bugs, which
    keep their traceback."""
    if isinstance(exc, OdpoError):
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    return None
