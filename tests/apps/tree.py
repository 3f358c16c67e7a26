"""A hostile process tree: listens on 127.0.0.1:argv[1], forks three workers that
inherit the listening socket (worker 0 ignores SIGTERM), and double-forks an escapee
that leaves the process group with setsid(). Prints every pid on one line:

    tree main 100 workers 101 102 103 escapee 105

On SIGTERM the main process forwards it to its workers and waits for all of them, as
a pre-fork master does, so the worker that ignores it keeps the main process alive
until pmx's kill_timeout runs out.
"""

import os
import signal
import socket
import sys
import time

listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(16)


def sleep_forever() -> None:
    while True:
        time.sleep(3600)


workers = []
for number in range(3):
    pid = os.fork()
    if pid == 0:
        if number == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sleep_forever()
    workers.append(pid)

read_end, write_end = os.pipe()
middle = os.fork()
if middle == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(write_end, str(os.getpid()).encode())
        os.close(write_end)
        sleep_forever()
    os._exit(0)
os.close(write_end)
os.waitpid(middle, 0)
escapee = int(os.read(read_end, 32))
os.close(read_end)


def forward(signum: int, frame: object) -> None:
    for worker in workers:
        try:
            os.kill(worker, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for worker in workers:
        try:
            os.waitpid(worker, 0)
        except ChildProcessError:
            pass
    os._exit(0)


signal.signal(signal.SIGTERM, forward)
print(f"tree main {os.getpid()} workers {' '.join(map(str, workers))} escapee {escapee}",
      flush=True)
sleep_forever()
