"""`python -m app` runs the odpo CLI (how `odpo up` starts its children with the same interpreter)."""
from app.cli import main

main()
