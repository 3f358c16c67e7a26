"""Prints argv[1] bytes of numbered 100-byte lines, flushed in chunks of argv[2] bytes
(default 2048) with a short pause between chunks, then "done", then idles."""

import sys
import time

total = int(sys.argv[1])
chunk = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
per_chunk = max(1, chunk // 100)
number = 0
written = 0
while written < total:
    lines = []
    for _ in range(per_chunk):
        lines.append(f"chunk line {number:08d} ".ljust(99, "x") + "\n")
        number += 1
    data = "".join(lines)
    sys.stdout.write(data)
    sys.stdout.flush()
    written += len(data)
    time.sleep(0.005)
print("done", flush=True)
while True:
    time.sleep(3600)
