"""tests/apps/leak.py, started after a random pause of 0..JITTER_S seconds (default 1).

pmxd samples memory on a fixed 1 s tick and spawns the replacement right after the tick
that caught the old process, so a leak that reaches its limit in about a whole number of
ticks is caught at the same age every time: every run would show the same delay. The
pause spreads the moment of crossing uniformly over the tick, as in real use. The leak
itself, its rate, LIMIT_MB and CROSSED_FILE are leak.py's, unchanged. Not a benchmark itself.
"""

from __future__ import annotations

import os
import random
import runpy
import time
from pathlib import Path

LEAK = Path(__file__).resolve().parent.parent / "tests" / "apps" / "leak.py"

if __name__ == "__main__":
    time.sleep(random.uniform(0.0, float(os.environ.get("JITTER_S", "1"))))
    runpy.run_path(str(LEAK), run_name="__main__")
