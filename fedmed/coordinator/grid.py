"""The coordinator's Grid wrappers: a base that passes everything through, and PromptGrid.

Wrappers change one thing about how a ServerApp talks to the sites (PromptGrid: how often it
polls for replies and who may answer; fedmed.coordinator.secure's PlanStampingGrid: what every
SecAgg+ message carries) and pass the rest through untouched, whichever Grid the runtime gave.

PromptGrid: Flower 1.41's Grid waits a hard-coded 3 s between pulls for replies, ~6 s per round
before any computation. It pulls every 0.2 s through the Grid's public API. In a deployment it
is also where the coordinator decides who answered (``nodes``: Flower node id -> site name, from
the coordinator's registry):

- identity: a node speaks only for the site its key was registered as. A reply whose content
  names another site is turned into a refusal; an error reply keeps its code and words but
  its site field becomes the authenticated site (fedmed.protocol.site_error); a node that is
  not a registered site of the study gets no message;
- liveness: while it waits, the grid asks the SuperLink which nodes are online every few
  seconds and stops waiting for a node that went offline (a killed daemon costs the round the
  SuperLink's heartbeat patience, about a minute, not ``round_timeout``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedmed.config import grid_poll_seconds
from fedmed.flower_compat import replace_with_error
from fedmed.protocol import SiteReason, read_error, site_error

POLL_SECONDS = 0.2
log = logging.getLogger("fedmed.coordinator")


class GridWrapper(Grid):
    """Delegates every Grid call to ``grid``; subclasses override what they change."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


# `fedmed coordinator start --cold` sets this to Flower's own 3 s (benchmarks compare the two).
GRID_POLL_ENV = "FEDMED_GRID_POLL_SECONDS"

LIVENESS_SECONDS = 3.0  # how often a waiting coordinator asks which nodes are online

IMPERSONATION = SiteReason.IMPERSONATION  # Error code of a reply refused for naming another site


class PromptGrid(GridWrapper):
    """Delegates to Flower's Grid; polls for replies more often, and with ``nodes`` attributes
    every reply to its authenticated node's site and stops waiting for nodes gone offline."""

    def __init__(
        self,
        grid: Grid,
        interval: float | None = None,
        nodes: dict[int, str] | None = None,
        liveness: float = LIVENESS_SECONDS,
    ) -> None:
        super().__init__(grid)
        self.interval = interval or grid_poll_seconds(POLL_SECONDS)
        self.nodes = dict(nodes or {})
        self.liveness = liveness

    def get_node_ids(self) -> Iterable[int]:
        online = list(self.grid.get_node_ids())
        return [n for n in online if n in self.nodes] if self.nodes else online

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._attributed(m) for m in self.grid.pull_messages(message_ids)]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Same contract as Flower's: every reply, or those in by ``timeout`` seconds; with
        ``nodes``, a node that goes offline is not waited for."""
        messages = list(messages)
        ids = list(self.push_messages(messages))
        waiting = dict(zip(ids, (m.metadata.dst_node_id for m in messages), strict=True))
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        next_check = now + self.liveness
        replies: list[Message] = []
        while waiting:
            got = list(self.pull_messages(list(waiting)))
            replies += got
            for m in got:
                waiting.pop(m.metadata.reply_to_message_id, None)
            now = time.monotonic()
            if not waiting or (deadline is not None and now >= deadline):
                break
            if self.nodes and now >= next_check:
                self._forget_offline(waiting)
                next_check = now + self.liveness
            time.sleep(self.interval)
        return replies

    def _forget_offline(self, waiting: dict[str, int]) -> None:
        online = set(self.grid.get_node_ids())
        for message_id, node in list(waiting.items()):
            if node not in online:
                log.warning("site %s went offline: not waiting for its reply", self._who(node))
                del waiting[message_id]

    def _who(self, node: int) -> str:
        return f"'{self.nodes[node]}'" if node in self.nodes else f"node {node}"

    def _attributed(self, reply: Message) -> Message:
        """``reply`` as the authenticated node's site: its own words, or a refusal."""
        if not self.nodes:
            return reply
        node = reply.metadata.src_node_id
        site = self.nodes.get(node)
        if site is None:  # names no site: the error is the node's, not any site's
            return _as_error(
                reply, Error(IMPERSONATION, f"node {node}: not a registered site of this study")
            )
        if reply.has_error():  # its own code and words, under the site its key authenticates
            failure = read_error(reply.error)
            return _as_error(reply, site_error(site, failure.code, failure.detail))
        impostor = sorted(name for name in claimed_sites(reply) if name != site)
        if impostor:
            log.warning("node %s (site '%s') claimed to be %s", node, site, impostor)
            return _as_error(
                reply,
                site_error(
                    site,
                    IMPERSONATION,
                    f"its reply claimed to come from site '{impostor[0]}' and was rejected "
                    "(a node speaks only for the site its key was registered as)",
                ),
            )
        return reply


def claimed_sites(reply: Message) -> set[str]:
    """Every site name a reply's content states (Message API and legacy SecAgg+ layouts)."""
    if not reply.has_content():
        return set()
    names: set[str] = set()
    for key, record in reply.content.config_records.items():
        if key == "site" and "name" in record:
            names.add(str(record["name"]))
        if isinstance(record.get("site"), str):
            names.add(str(record["site"]))
    return names


def _as_error(reply: Message, error: Error) -> Message:
    """The same reply (ids, route) carrying ``error`` instead of content."""
    return replace_with_error(reply, error)
