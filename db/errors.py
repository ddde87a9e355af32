"""The root of odpo's user-facing errors.

Lives in db/ because db is the bottom layer every other package may import. Anything raised as an
OdpoError is the user's to fix (bad input, missing model, unreachable database): its str() is one
clear line, and the CLI and UI show exactly that line instead of a traceback.
"""


class OdpoError(Exception):
    """An error caused by input or environment, with a one-line message saying what to do."""


class StoreError(OdpoError, ValueError):
    """A request the store refuses (unknown pair, a vote already trained, a bad choice): the user's to
    fix, so an OdpoError whose one-line message the CLI and UI show instead of a traceback."""
