"""Allocates LEAK_MB_PER_S megabytes a second (default 50), touching every page.

LEAK_IN_CHILD=1 makes a child process hold the memory instead. Records the time it
passed LIMIT_MB (if set) in the file $CROSSED_FILE, for the benchmark.
"""

import os
import time

rate = float(os.environ.get("LEAK_MB_PER_S", "50"))
limit_mb = float(os.environ.get("LIMIT_MB", "0"))
crossed_file = os.environ.get("CROSSED_FILE")
if os.environ.get("LEAK_IN_CHILD") and os.fork() != 0:
    while True:  # the parent stays small
        time.sleep(1)
held = []
start = time.monotonic()
print(f"leaking {rate} MB/s in pid {os.getpid()}", flush=True)
while True:
    held.append(bytearray(b"x" * (1024 * 1024)))
    if crossed_file and limit_mb and len(held) > limit_mb:
        with open(crossed_file, "a") as file:
            file.write(f"{time.time()}\n")
        crossed_file = None
    time.sleep(1.0 / rate)
