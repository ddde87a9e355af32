"""Alembic revisions of odpo's schema, oldest first by their number; released ones are never edited."""
