"""Ports for the daemons the integration tests start, safe under pytest-xdist.

fedmed's own ``free_port()`` asks the kernel for port 0: a port from the ephemeral range, which
the kernel also hands out as the source port of every outgoing connection and to anything else
binding port 0 (the coordinator's internal SuperLink port, Ray, uvicorn, chromedriver). A test
picks its ports minutes before the daemons bind them (``fedmed site init --runtime-port``), so
with tests running side by side (``pytest -n 2``) another worker's processes could take one in
between. Here each xdist worker draws from its own block below the ephemeral range, never hands
out a port twice in a session, and checks that nothing holds it now.
"""

from __future__ import annotations

import os
import random
import socket

FIRST = 20_000  # bottom of the blocks; the ephemeral range starts at 32768 by default
BLOCK = 1_000  # ports per xdist worker
_given: set[int] = set()
_draw = random.SystemRandom()  # pytest-randomly reseeds `random`: every test would draw alike


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))  # every address: also clashes with a 127.0.0.1-only listener
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port on 127.0.0.1 that no other test of this run is given and nothing listens on."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # "gw3" under xdist
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    blocks = max(1, (_ephemeral_start() - FIRST) // BLOCK)
    start = FIRST + (index % blocks) * BLOCK
    candidates = [p for p in range(start, start + BLOCK) if p not in _given]
    _draw.shuffle(candidates)  # another test session on this machine draws elsewhere
    for port in candidates:
        if _is_free(port):
            _given.add(port)
            return port
    raise RuntimeError(f"no free port left in {start}-{start + BLOCK - 1}")
