"""odpo's database layer: typed SQLAlchemy models, engine setup, migrations and store functions.

The database is the only channel for data between odpo's processes (see DESIGN.md), so every
write here is a short transaction and every read is safe under concurrent writers.
"""
