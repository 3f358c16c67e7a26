"""Writes half a line, finishes it once the file named by argv[1] exists, then prints a
numbered tick every 50 ms: a log that must run on, unbroken, across `pmx update`."""

import os
import sys
import time

sys.stdout.write("first half, ")
sys.stdout.flush()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
sys.stdout.write("second half\n")
sys.stdout.flush()
tick = 0
while True:
    tick += 1
    print(f"tick {tick}", flush=True)
    time.sleep(0.05)
