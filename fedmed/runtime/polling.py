"""A prompt SuperNode: Flower 1.41 sleeps a hard-coded 3 s between pulls for new messages.

``run_supernode`` starts Flower's own SuperNode with its idle sleeps capped at 0.2 s (4 sites
polling 5 times a second is negligible load). Its coordinator-side twin, which pulls replies
promptly and checks who answered, is fedmed.coordinator.grid.PromptGrid.
"""

from __future__ import annotations

import sys
import time
import types

POLL_SECONDS = 0.2


def run_supernode(argv: list[str]) -> None:
    """Flower's ``flower-supernode`` with its idle sleeps capped at POLL_SECONDS."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    capped = types.SimpleNamespace(
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("__")}
    )
    capped.sleep = lambda seconds: time.sleep(min(seconds, POLL_SECONDS))
    start_client_internal.time = capped  # the module's only use of time is sleep
    sys.argv = ["flower-supernode", *argv]
    sys.exit(flower_supernode())


if __name__ == "__main__":
    run_supernode(sys.argv[1:])
