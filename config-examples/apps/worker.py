"""A background worker: prints a heartbeat every second and stops cleanly on SIGTERM."""

import os
import signal
import sys
import time

running = True


def stop(signum: int, frame: object) -> None:
    global running
    running = False


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
beat = 0
print(f"worker {os.getpid()} started", flush=True)
while running:
    beat += 1
    print(f"worker {os.getpid()} heartbeat {beat}", flush=True)
    time.sleep(1)
print(f"worker {os.getpid()} stopping after {beat} beats", file=sys.stderr, flush=True)
