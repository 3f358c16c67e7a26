"""Starts a grandchild (a sleep in the same process group) and prints both pids."""

import os
import subprocess
import time

child = subprocess.Popen(["sleep", "1000"])
print(f"parent {os.getpid()} grandchild {child.pid}", flush=True)
while True:
    time.sleep(1)
