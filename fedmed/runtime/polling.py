"""Prompt polling for deployments: Flower 1.41 waits a hard-coded 3 s between polls.

Two places sit idle on a fixed ``time.sleep(3)``: the ServerApp's Grid between pulls for replies,
and the SuperNode between pulls for new messages. Each phase of a round (train, evaluate) then
waits ~1.5 s on average at each end, ~6 s per round before any computation — most of a round
on a small model. ``PromptGrid`` pulls replies every 0.2 s through the Grid's public API;
``run_supernode`` starts Flower's own SuperNode with its sleeps capped at 0.2 s. Both only change
how soon a waiting side looks again: 4 sites polling 5 times a second is negligible load.
"""

from __future__ import annotations

import os
import sys
import time
import types
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedmed.runtime.grid import GridWrapper

POLL_SECONDS = 0.2
# `fedmed coordinator start --cold` sets this to Flower's own 3 s (benchmarks compare the two).
GRID_POLL_ENV = "FEDMED_GRID_POLL_SECONDS"


class PromptGrid(GridWrapper):
    """Delegates to Flower's Grid; only send_and_receive polls for replies more often."""

    def __init__(self, grid: Grid, interval: float | None = None) -> None:
        super().__init__(grid)
        self.interval = interval or float(os.environ.get(GRID_POLL_ENV, POLL_SECONDS))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Same contract as Flower's: every reply, or those in by ``timeout`` seconds."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            got = list(self.pull_messages(waiting))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.interval)
        return replies


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
