"""Running a FastAPI app under uvicorn: in the foreground (CLI) or in a thread (tests, live views).

The thread variant returns only once the socket accepts connections and stops cleanly, so a test
or a coordinator never leaves a server behind.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI


def exposure_warning(host: str, what: str) -> str | None:
    """A warning when ``host`` is reachable from other machines: these HTTP servers have no login
    of their own (loopback is the default), so exposing one is the operator's deliberate choice
    and must be made with eyes open."""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        if host == "localhost":
            return None
    return (
        f"WARNING: {what} on {host} has no login: anyone who can reach that address can use it. "
        "Bind to 127.0.0.1 and put an authenticating reverse proxy (TLS + login) in front."
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve(app: FastAPI, host: str, port: int) -> None:
    """Serve until interrupted (Ctrl-C)."""
    uvicorn.run(app, host=host, port=port, log_level="warning")


@dataclass
class BackgroundServer:
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_in_thread(
    app: FastAPI, host: str = "127.0.0.1", port: int | None = None, timeout: float = 15.0
) -> BackgroundServer:
    """Start ``app`` in a daemon thread; returns when it is accepting connections."""
    port = port or free_port(host)
    # log_config=None: do not reconfigure the host process's logging (a coordinator, a test).
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)

    def run() -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits this way when it cannot bind
            server.run()

    thread = threading.Thread(target=run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout=5)
            raise RuntimeError(
                f"could not start an HTTP server on http://{host}:{port} (is the port taken?)"
            )
        time.sleep(0.02)
    return BackgroundServer(server, thread, f"http://{host}:{port}")
