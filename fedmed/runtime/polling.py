"""A prompt SuperNode: Flower 1.41 sleeps a hard-coded 3 s between pulls for new messages.

``run_supernode`` starts Flower's own SuperNode with its idle sleeps capped at 0.2 s (4 sites
polling 5 times a second is negligible load). Its coordinator-side twin, which pulls replies
promptly and checks who answered, is fedmed.coordinator.grid.PromptGrid.
"""

from __future__ import annotations

import sys

from fedmed import flower_compat

POLL_SECONDS = 0.2


def run_supernode(argv: list[str]) -> None:
    """Flower's ``flower-supernode`` with its idle sleeps capped at POLL_SECONDS."""
    flower_compat.run_supernode_with_sleeps_capped(POLL_SECONDS, argv)


if __name__ == "__main__":
    run_supernode(sys.argv[1:])
