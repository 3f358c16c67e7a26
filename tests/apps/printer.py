"""Prints argv[1] numbered lines as fast as it can, then "done", then idles."""

import sys
import time

count = int(sys.argv[1])
out = sys.stdout
for number in range(count):
    out.write(f"line {number} of {count} xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n")
out.write("done\n")
out.flush()
while True:
    time.sleep(1)
