"""pmx web: the browser dashboard, the HTTP API and the Prometheus metrics.

A client of pmxd like `pmx monit`: it talks to the daemon over the ZeroMQ control socket
and one PUB subscription, so pmxd never serves HTTP itself.
"""
