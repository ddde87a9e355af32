"""odpo tests (a package so fixture plugins import as tests.<module>)."""
