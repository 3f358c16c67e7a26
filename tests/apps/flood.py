"""Prints numbered lines forever: "flood N", then sleeps argv[1] seconds between
batches of argv[2] lines (defaults: no pause, batches of 1000)."""

import sys
import time

pause = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
out = sys.stdout
number = 0
while True:
    out.write("".join(f"flood {number + i} {'x' * 40}\n" for i in range(batch)))
    out.flush()
    number += batch
    if pause:
        time.sleep(pause)
