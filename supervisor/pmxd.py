"""pmxd's program: `python -m pmx.supervisor.pmxd`, and the `pmxd` and `pmx-runtime` scripts.

Before anything imports asyncio, this marks `ssl` as absent. asyncio imports it only to
offer TLS, which pmxd never speaks (its control sockets are Unix sockets, its readiness
probes plain HTTP); not loading it keeps libssl and libcrypto, about 4 MiB resident, out of
a daemon that runs for months. The rest is launch.py.
"""

from __future__ import annotations

import sys


def _without_tls() -> None:
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]


def main() -> int:
    _without_tls()
    from .launch import main as run

    return run()


def runtime_main() -> int:
    """`pmx-runtime FILE...`: pmxd in the foreground as a container's PID 1."""
    _without_tls()
    from .launch import runtime_main as run

    return run()


if __name__ == "__main__":
    sys.exit(main())
