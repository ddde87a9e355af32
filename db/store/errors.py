"""StoreError: the refusal every store module raises, so it lives below all of them.

A request the store turns down (unknown pair, a vote already trained, a bad choice) is the user's to
fix, so it is an OdpoError: the CLI and UI show its one-line message instead of a traceback.
"""
from odpo.db.errors import OdpoError


class StoreError(OdpoError, ValueError):
    """A request the store refuses (unknown pair, label already consumed, ...): message for users."""
