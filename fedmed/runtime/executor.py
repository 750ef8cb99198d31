"""A warm ClientApp executor for a site daemon: fork per message instead of a fresh interpreter.

With Flower's default subprocess isolation, every message a site receives (each train and each
evaluate) starts a new ``flwr-clientapp`` interpreter that imports torch, Opacus, pandas and
scikit-learn again: ~5 s of CPU per message, which on a 2-core machine hosting 4 sites made a
round of the demo take ~29 s. This process imports all of that ONCE, then serves Flower's own
task loop (``run_superexec``) with an executor that ``fork()``s a child per task; the child runs
Flower's unchanged ``run_clientapp`` with the task's token and exits. Each message still runs in
its own process (a crash or leak cannot outlive the message), the SuperNode runs with
``--isolation process``, and every byte still goes through Flower's Runtime API.

Fork safety: the parent only imports modules and talks HTTP to the local SuperNode; it never
runs a torch operation, so no thread pool exists at fork time.

Run by ``fedmed site start`` (``python -m fedmed.runtime.executor ...``); not a user command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from typing import Any

POLL_SECONDS = "0.1"  # how often the loop asks the SuperNode for work (Flower's default: 1 s)


def warm_imports() -> None:
    """Everything a fedmed ClientApp process would otherwise import per message."""
    import opacus  # noqa: F401
    import pandas  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401  (imported by the first optimizer: ~1 s per message)
    from flwr.supernode.runtime import run_clientapp  # noqa: F401

    import fedmed.client_app
    import fedmed.privacy
    import fedmed.secagg  # noqa: F401  (secure studies' ClientApp)


class ForkExecutor:
    """Flower's SuperExec Executor protocol, launching ClientApp tasks as forked children."""

    def __init__(self) -> None:
        self.children: set[int] = set()

    def get_eligible_capacity(
        self,
        supported_task_types: set[Any],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[Any], set[str]]:
        from flwr.supercore.constant import TaskType

        return {t for t in supported_task_types if t == TaskType.CLIENT_APP}, set()

    def wait_for_capacity(self, *args: Any, **kwargs: Any) -> None:
        """Forking has no capacity gate."""

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed("the fedmed site executor runs ClientApp tasks only")
        pid = os.fork()
        if pid == 0:  # child: never return into the parent's loop
            code = 1
            try:
                _run_task(spec)
                code = 0
            except SystemExit as exc:  # Flower ends tasks with sys.exit(code)
                code = exc.code if isinstance(exc.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children (no zombies)."""
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    continue
            self.children.discard(pid)

    def close(self) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _run_task(spec: Any) -> None:
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        ),
        parent_pid=spec.parent_pid,
        runtime_dependency_install=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--cache-dir", default=None, help="results children share (noise)")
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", POLL_SECONDS)
    if args.cache_dir:
        from fedmed.privacy import CACHE_ENV

        os.environ[CACHE_ENV] = args.cache_dir
    warm_imports()
    from flwr.supercore.superexec import run_superexec as superexec

    # Flower picks its executor through this module-level factory; ours forks warm children.
    superexec.get_executor = lambda *a, **k: ForkExecutor()
    superexec.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=True,  # the SuperNode's Runtime API listens on 127.0.0.1 only
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    main()
