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

Trust: the executor is also where a daemon decides WHAT it runs. Every task's app bundle is
checked against fedmed's allowlist (``fedmed.security.apps``) in the child, right after Flower
pulls the task and before anything is installed, imported or read; a foreign app is refused (and,
at a site, audited). With ``--secret-file`` the executor signs its task requests with the
daemon's SuperExec secret, so no other local process can take this daemon's tasks.

Run by ``fedmed site start`` (role ``site``) and ``fedmed coordinator start`` (role
``coordinator``, for ServerApp tasks) as ``python -m fedmed.runtime.executor ...``; not a user
command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import traceback
from typing import Any

from fedmed import flower_compat

POLL_SECONDS = "0.1"  # how often the loop asks the SuperNode for work (Flower's default: 1 s)


def warm_imports() -> None:
    """Everything a fedmed ClientApp process would otherwise import per message."""
    import opacus  # noqa: F401
    import pandas  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401  (imported by the first optimizer: ~1 s per message)
    from flwr.supernode.runtime import run_clientapp  # noqa: F401

    import fedmed.site.app
    import fedmed.site.secure_app  # noqa: F401  (secure studies' ClientApp)


ROLES = ("site", "coordinator")


class ForkExecutor:
    """Flower's SuperExec Executor protocol, launching its role's tasks as forked children."""

    def __init__(self, role: str = "site") -> None:
        self.role = role
        self.children: set[int] = set()

    def _task_type(self) -> Any:
        from flwr.supercore.constant import TaskType

        return TaskType.CLIENT_APP if self.role == "site" else TaskType.SERVER_APP

    def get_eligible_capacity(
        self,
        supported_task_types: set[Any],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[Any], set[str]]:
        return {t for t in supported_task_types if t == self._task_type()}, set()

    def wait_for_capacity(self, *args: Any, **kwargs: Any) -> None:
        """Forking has no capacity gate."""

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != self._task_type():
            return LaunchResult.failed(f"the fedmed {self.role} executor runs its own tasks only")
        pid = os.fork()
        if pid == 0:  # child: never return into the parent's loop
            code = 1
            try:
                (_run_clientapp if self.role == "site" else _run_serverapp)(spec)
                code = 0
            except SystemExit as exc:  # Flower ends tasks with sys.exit(code)
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # never silent: the daemon's log is where a steward looks
                traceback.print_exc()
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


def _guard_clientapp() -> None:
    """Check the task's app right after Flower pulls it, before it is installed or loaded.

    Flower's ``run_clientapp`` pulls (message, context, run, FAB), installs the FAB and imports
    the component it names. Checking at the pull refuses a foreign app before either happens; the
    exception ends the task (Flower logs it) and the refusal goes to the site's audit log.
    """
    from fedmed.security.apps import ForeignApp, check_fab

    def check(message: Any, context: Any, fab: bytes) -> None:
        try:
            check_fab(fab)
        except ForeignApp as exc:
            _audit_refusal(message, context, str(exc))
            raise

    flower_compat.guard_clientapp_pull(check)


def _audit_refusal(message: Any, context: Any, reason: str) -> None:
    from fedmed.security.audit import AuditLog
    from fedmed.security.policy import site_config

    site = site_config(context)
    if site is None:
        return
    AuditLog(site.state_path).append(
        site=site.name,
        run_id=int(message.metadata.run_id),
        message_type=message.metadata.message_type,
        message_id=message.metadata.message_id,
        direction="received",
        outcome=f"refused: {reason}",
        bytes=-1,
        update_sha256="",
    )


def _guard_serverapp() -> None:
    """The coordinator's side of the same rule: Flower installs the FAB, then imports its
    serverapp; checking at install time refuses a foreign app before any import."""
    from fedmed.security.apps import check_fab

    flower_compat.guard_serverapp_install(check_fab)


def _child_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _run_clientapp(spec: Any) -> None:
    _child_signals()
    _guard_clientapp()
    flower_compat.run_clientapp_task(**_task_args(spec))


def _task_args(spec: Any) -> dict[str, Any]:
    """What Flower's run_clientapp / run_serverapp need from a launch spec (both the same)."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    return {
        "runtime_api_address": spec.runtime_api_address,
        "token": spec.token,
        "insecure": spec.insecure,
        "certificates": validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        ),
        "parent_pid": spec.parent_pid,
        "runtime_dependency_install": False,  # a daemon never installs what a run asks for
    }


def _run_serverapp(spec: Any) -> None:
    _child_signals()
    _guard_serverapp()
    flower_compat.run_serverapp_task(**_task_args(spec))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--role", choices=ROLES, default="site")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument(
        "--cache-dir", default=None, help="what children share (noise, prepared data)"
    )
    parser.add_argument("--secret-file", default=None, help="the daemon's SuperExec secret")
    parser.add_argument(
        "--root-certificates", default=None, help="CA of a TLS Runtime API (coordinator)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", POLL_SECONDS)
    if args.cache_dir:
        from fedmed.privacy.accounting import CACHE_ENV

        os.environ[CACHE_ENV] = args.cache_dir
    warm_imports()
    from flwr.supercore.auth import load_superexec_auth_secret

    # Flower's own task loop, launching with ours: it forks warm children.
    flower_compat.run_superexec_with(
        lambda: ForkExecutor(args.role),
        runtime_api_address=args.runtime_api_address,
        # A site's Runtime API listens on 127.0.0.1 without TLS; the coordinator's is the
        # SuperLink's own port, with TLS.
        insecure=args.root_certificates is None,
        root_certificates_path=args.root_certificates,
        superexec_auth_secret=(
            load_superexec_auth_secret(args.secret_file) if args.secret_file else None
        ),
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    main()
