"""Every patch fedmed makes over Flower's internals, in one module (docs/flower.md lists them all).

Flower's public API has no hook for what a hospital deployment needs at these points: checking a
task's app before Flower installs or imports it, a warm executor, a client certificate for the
Control API, prompt polling, turning an impostor's reply into an error, and a site's identity
per thread in the in-process runtime. Each function here is the one place such a patch is made,
so a Flower upgrade is checked against this file (and the module names in docs/flower.md), not
against the whole code base.

It sits on the ground floor, beside the wire (fedmed.protocol), because both the runtime
(executor, operator CLI, SuperNode) and the coordinator's grid need it; it imports nothing of
fedmed's, and Flower only inside each function, when the patch is made.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any


def guard_clientapp_pull(check: Callable[[Any, Any, bytes], None]) -> None:
    """Call ``check(message, context, fab_bytes)`` on every task a site's ClientApp process pulls,
    before Flower installs the FAB or imports its component; an exception ends the task.

    Patches flwr.supernode.runtime.run_clientapp.pull_task_input (module attribute).
    """
    flower = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    pull = flower.pull_task_input

    def guarded_pull(client: Any) -> Any:
        message, context, run, fab = pull(client)
        check(message, context, fab.content)
        return message, context, run, fab

    flower.pull_task_input = guarded_pull


def guard_serverapp_install(check: Callable[[bytes], None]) -> None:
    """Call ``check(fab_bytes)`` before Flower installs a ServerApp task's FAB (and so before it
    imports the serverapp it names).

    Patches flwr.superlink.runtime.run_serverapp.install_from_fab (module attribute).
    """
    flower = importlib.import_module("flwr.superlink.runtime.run_serverapp")
    install = flower.install_from_fab

    def guarded_install(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        check(bytes(fab_file))
        return install(fab_file, *args, **kwargs)

    flower.install_from_fab = guarded_install


def run_clientapp_task(**kwargs: Any) -> None:
    """Flower's own ClientApp process body (flwr.supernode.runtime.run_clientapp)."""
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    run_clientapp(**kwargs)


def run_serverapp_task(**kwargs: Any) -> None:
    """Flower's own ServerApp process body, its output mirrored to what `flwr log RUN` shows."""
    from queue import Queue

    from flwr.superlink.runtime.run_serverapp import run_serverapp

    flwr_serverapp = importlib.import_module("flwr.superlink.cli.flwr_serverapp")
    log_queue: Queue[str | None] = Queue()
    flwr_serverapp.mirror_output_to_queue(log_queue)
    run_serverapp(log_queue=log_queue, **kwargs)


def run_superexec_with(executor: Callable[[], Any], **kwargs: Any) -> None:
    """Flower's SuperExec task loop, launching tasks with ``executor()`` instead of its own.

    Flower picks its executor through a module-level factory (run_superexec.get_executor); there
    is no argument for it, so the factory is replaced.
    """
    from flwr.supercore.superexec import run_superexec as superexec

    superexec.get_executor = lambda *a, **k: executor()
    superexec.run_superexec(**kwargs)


def present_client_certificate(cert: str, key: str) -> None:
    """Make every Control API client Flower's CLI creates present ``cert`` (mutual TLS).

    Patches flwr.cli.utils.ControlHttpClient.from_server_address (classmethod): Flower's CLI has
    no option for a client certificate.
    """
    import ssl

    from flwr.cli import utils as cli_utils

    client_cls = cli_utils.ControlHttpClient

    def from_server_address(
        cls: Any,
        server_address: str,
        insecure: bool,
        root_certificates: bytes | str | None,
        interceptors: Any,
        *,
        retry_invoker: Any = None,
    ) -> Any:
        if insecure:
            raise SystemExit("fedmed: an operator connection needs TLS (the gate's certificate)")
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if isinstance(root_certificates, bytes):
            context.load_verify_locations(cadata=root_certificates.decode("ascii"))
        elif isinstance(root_certificates, str):
            context.load_verify_locations(cafile=root_certificates)
        context.load_cert_chain(cert, key)
        return cls(
            f"https://{server_address}",
            interceptors=interceptors,
            verify=context,
            retry_invoker=retry_invoker,
        )

    client_cls.from_server_address = classmethod(from_server_address)  # type: ignore[method-assign]


def run_supernode_with_sleeps_capped(seconds: float, argv: list[str]) -> None:
    """Flower's ``flower-supernode`` with its idle sleeps (a fixed 3 s) capped at ``seconds``.

    Patches the ``time`` module attribute of flwr.supernode.start_client_internal, whose only use
    of time is sleep.
    """
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    capped = types.SimpleNamespace(
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("__")}
    )
    capped.sleep = lambda s: time.sleep(min(s, seconds))
    start_client_internal.time = capped
    sys.argv = ["flower-supernode", *argv]
    sys.exit(flower_supernode())


def replace_with_error(reply: Any, error: Any) -> Any:
    """The same reply (ids, route) carrying ``error`` instead of its content.

    Flower's Message has no public way to swap content for an error (its setters refuse), so its
    two private fields are cleared here, and only here.
    """
    reply.__dict__["_content"] = None
    reply.__dict__["_error"] = None
    reply.error = error
    return reply


_this_thread = threading.local()  # .node_id: the node a delivery in this thread acts as


@contextlib.contextmanager
def acting_as_node(node_id: int) -> Iterator[None]:
    """Within the block, Flower's ``TaskIdentity.node_id`` is ``node_id`` in this thread only.

    Flower keeps the identity of the task a process runs in class attributes, which it reads
    whenever an instruction Message is built (its src_node_id). Its runtimes run one task per
    process; the in-process runtime runs sites in threads of the coordinator's own process, so a
    class-level value set for a site would leak into the Messages the coordinator builds
    meanwhile (a hung site's id stayed there after its deadline until its thread woke up).

    Patches the ``node_id`` property of flwr.supercore.task_identity's metaclass (once) to read
    this thread's value first and Flower's class attribute otherwise.
    """
    from flwr.supercore.task_identity import TaskIdentity

    meta = type(TaskIdentity)
    if not getattr(meta, "_fedmed_per_thread", False):
        flower = meta.node_id  # a property on the metaclass

        def per_thread(cls: Any) -> int:
            value = getattr(_this_thread, "node_id", None)
            return flower.fget(cls) if value is None else value

        meta.node_id = property(per_thread, flower.fset)
        meta._fedmed_per_thread = True
    outer = getattr(_this_thread, "node_id", None)
    _this_thread.node_id = node_id
    try:
        yield
    finally:
        _this_thread.node_id = outer
