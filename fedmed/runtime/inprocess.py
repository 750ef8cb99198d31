"""In-process runtime: a thin Flower Grid that hands each message to the ClientApp directly.

Flower's Ray engine costs ~10 s of start-up and ~2 GiB on a 2-core laptop; for tests and quick
studies the apps can exchange the very same Message objects in one process. Each simulated site
keeps its own Context (node_config + state) across rounds, exactly like a SuperNode.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedmed.flower_compat import acting_as_node

RUN_ID = 1
log = logging.getLogger("fedmed.runtime")


def deliver(client_app: ClientApp, msg: Message, context: Context) -> Message:
    """``client_app``'s reply to ``msg`` as the node of ``context``; an exception is an error
    reply, as a SuperNode sends when its ClientApp raises."""
    with acting_as_node(context.node_id):  # Messages a site builds name it (this thread only)
        try:
            # Each site gets its own copy, as over a network: a ClientApp (or a mod such as
            # Flower's secaggplus_mod) may mutate the content, and coordinators may send one
            # RecordDict object to every node.
            return client_app(copy.deepcopy(msg), context)
        except Exception as exc:
            return Message(
                Error(code=500, reason=f"ClientApp raised {type(exc).__name__}"), reply_to=msg
            )


class InProcessGrid(Grid):
    """Delivers messages to ``client_app`` for nodes 1001, 1002, ... (one per site)."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict[str, str]) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(RUN_ID)
        self.contexts = {
            1001 + i: Context(
                run_id=RUN_ID,
                node_id=1001 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count(1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = self._stamp(msg)  # before delivery: the reply refers to this id
            self._replies[msg_id] = self._deliver(msg)
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver each message and collect the replies that arrive within ``timeout`` seconds.

        Sites run one after another (parallel sites would share torch's global RNG and lose
        reproducibility), each in a worker thread given its own ``timeout``: the same budget a
        real site running in parallel gets. A site that misses it gives no reply at all, as on a
        real network; its thread is abandoned (a daemon) and whatever it returns later is dropped.
        """
        replies = []
        for msg in messages:
            self._stamp(msg)
            reply = self._deliver_within(msg, timeout)
            if reply is not None:
                replies.append(reply)
        return replies

    @staticmethod
    def _stamp(msg: Message) -> str:
        msg_id = str(uuid4())
        msg.metadata.__dict__["_message_id"] = msg_id
        return msg_id

    def _deliver_within(self, msg: Message, timeout: float | None) -> Message | None:
        box: list[Message] = []
        node = msg.metadata.dst_node_id
        worker = threading.Thread(
            target=lambda: box.append(self._deliver(msg)), name=f"site-{node}", daemon=True
        )
        worker.start()
        worker.join(timeout)
        if worker.is_alive() or not box:
            log.warning(
                "node %d gave no %s reply within %s s", node, msg.metadata.message_type, timeout
            )
            return None
        return box[0]

    def _deliver(self, msg: Message) -> Message:
        context = self.contexts.get(msg.metadata.dst_node_id)
        if context is None:
            return Message(
                Error(code=404, reason=f"unknown node {msg.metadata.dst_node_id}"), reply_to=msg
            )
        return deliver(self.client_app, msg, context)


def run_inprocess(
    server_app: ServerApp, client_app: ClientApp, num_nodes: int, run_config: dict[str, str]
) -> None:
    """Run ``server_app`` to completion against ``num_nodes`` in-process sites."""
    TaskIdentity.task_id = next(itertools.count(1))
    TaskIdentity.run_id = RUN_ID
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    grid = InProcessGrid(client_app, num_nodes, run_config)
    context = Context(
        run_id=RUN_ID,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config),
    )
    server_app(grid, context)
