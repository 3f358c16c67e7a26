"""config-examples/apps/http_server.py unchanged, but with TCP_NODELAY on each connection.

The example writes the response headers and the body in two send() calls; on a
keep-alive connection Nagle's algorithm holds the body until the client ACKs the headers,
and the client delays that ACK (~40 ms on Linux). Each request then takes ~40 ms whatever
the CPU, so throughput is connections / 40 ms. This wrapper loads the example as a module,
sets the standard library's `disable_nagle_algorithm` on its handler and runs its main(),
so cluster.py can measure the app's CPU-bound throughput as well. Not a benchmark itself.
"""

from __future__ import annotations

import runpy
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "config-examples" / "apps" / "http_server.py"

if __name__ == "__main__":
    namespace = runpy.run_path(str(APP), run_name="pmx_example_http_server")
    namespace["Handler"].disable_nagle_algorithm = True
    namespace["main"]()
