"""`python -m odpo` runs the odpo CLI (how `odpo up` starts its children with the same interpreter)."""
from odpo.app.cli import main

main()
