"""Prints "idle pid N" once, then sleeps until stopped (SIGTERM ends it at once)."""

import os
import time

print(f"idle pid {os.getpid()}", flush=True)
while True:
    time.sleep(3600)
