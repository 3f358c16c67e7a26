"""Exits at once with the code given as argv[1] (default 3), after a line on stderr."""

import sys

print("crashing on purpose", file=sys.stderr, flush=True)
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
