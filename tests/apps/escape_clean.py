"""Starts a descendant that leaves the app's process group (setsid) and clears its
environment (no PMX_RUN_ID), then prints its pid and idles: only a cgroup finds it."""

import os
import time

pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:  # the grandchild: re-parented when the child exits
        os.execve("/bin/sleep", ["sleep", "1000"], {})
    os._exit(0)
os.waitpid(pid, 0)
print("escaped", flush=True)
while True:
    time.sleep(1)
