"""In-process runtime: a thin Flower Grid that hands each message to the ClientApp directly.

Flower's Ray engine costs ~10 s of start-up and ~2 GiB on a 2-core laptop; for tests and quick
studies the apps can exchange Messages without it. Each simulated site keeps its own Context
(node_config + state) across rounds, exactly like a SuperNode.

With one worker the sites run one after another in this process (the very same Message objects;
a test can spy on them). With more, they train at the same time in forked worker processes
(fedmed.runtime.workers), one per core by default ($FEDMED_SIM_WORKERS): the same replies, bit
for bit, in the same order.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import threading
import weakref
from collections.abc import Iterable
from types import TracebackType
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedmed.config import RunConfig, plan_from_json, sim_workers
from fedmed.flower_compat import acting_as_node
from fedmed.runtime.workers import SitePool, can_fork

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
    """Delivers messages to ``client_app`` for nodes 1001, 1002, ... (one per site).

    ``workers`` > 1 trains that many sites at a time in forked processes; ``close()`` (or a
    ``with`` block) stops them, and so does dropping the grid.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: dict[str, str],
        *,
        workers: int = 1,
    ) -> None:
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
        self._pool: SitePool | None = None
        if workers > 1:
            self._pool = SitePool(functools.partial(deliver, client_app), workers, run_config)
            weakref.finalize(self, self._pool.close)  # a grid nobody closed leaves no process

    def close(self) -> None:
        """Stop the worker processes, if any (a later message forks them again)."""
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> InProcessGrid:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

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
        messages = list(messages)
        ids = [self._stamp(msg) for msg in messages]  # before delivery: replies refer to them
        if self._pool is not None:
            replies = self._deliver_all(messages, None)  # no deadline: every node replies
            self._replies.update((i, r) for i, r in zip(ids, replies, strict=True) if r is not None)
        else:
            for msg_id, msg in zip(ids, messages, strict=True):
                self._replies[msg_id] = self._deliver(msg)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver each message and collect the replies that arrive within ``timeout`` seconds.

        Each message gets its own ``timeout`` from when its site starts it: the same budget a
        real site running in parallel gets. A site that misses it gives no reply at all, as on a
        real network. Replies come in the order of ``messages``.

        With one worker, sites run one after another, each in a thread of this process; a late
        one is abandoned (a daemon thread) and whatever it returns later is dropped. With a
        pool, a late site's worker process is killed (fedmed.runtime.workers).
        """
        messages = list(messages)
        for msg in messages:
            self._stamp(msg)
        if self._pool is not None:
            return [r for r in self._deliver_all(messages, timeout) if r is not None]
        replies = []
        for msg in messages:
            reply = self._deliver_within(msg, timeout)
            if reply is not None:
                replies.append(reply)
        return replies

    def _deliver_all(self, messages: list[Message], timeout: float | None) -> list[Message | None]:
        """The pool's reply to each of ``messages`` (``None``: none in time), an unknown node's
        error included."""
        assert self._pool is not None
        known = [m for m in messages if m.metadata.dst_node_id in self.contexts]
        results = iter(
            self._pool.run([(m, self.contexts[m.metadata.dst_node_id]) for m in known], timeout)
        )
        return [
            next(results) if msg.metadata.dst_node_id in self.contexts else self._deliver(msg)
            for msg in messages  # an unknown node's error comes from here, as serially
        ]

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


def _plan(run_config: dict[str, str]) -> RunConfig | None:
    """The study plan a run config carries (None for a bare grid's)."""
    from fedmed.study.plan import CONFIG_KEY

    text = run_config.get(CONFIG_KEY)
    return plan_from_json(text) if text else None


def _on_accelerator(plan: RunConfig | None) -> bool:
    """Whether the study's sites train on a GPU (or MPS). They then run one after another:
    they share the one device, and a forked worker cannot use CUDA once its parent has
    touched it (fedmed.runtime.workers)."""
    from fedmed.train import resolve_device

    return plan is not None and resolve_device(plan.device).type != "cpu"


def _import_before_forking(plan: RunConfig | None) -> None:
    """What a site imports on first use, imported once here rather than once in every forked
    worker: torch._dynamo (the first optimizer, ~0.7 s) and, for a private study, Opacus
    (~1.3 s) — CPU time a 2-core machine would otherwise spend twice in round 1."""
    import torch._dynamo  # noqa: F401

    if plan is None or plan.privacy.enabled:
        import opacus  # noqa: F401


def run_inprocess(
    server_app: ServerApp,
    client_app: ClientApp,
    num_nodes: int,
    run_config: dict[str, str],
    *,
    workers: int | None = None,
) -> None:
    """Run ``server_app`` to completion against ``num_nodes`` in-process sites.

    ``workers``: sites trained at a time (default $FEDMED_SIM_WORKERS, else one per usable
    core); 1, a study on an accelerator or a platform other than Linux runs them one after
    another in this process.

    Whatever the count, the run uses one torch intra-op thread: torch's CPU kernels (Opacus'
    per-sample gradients among them) sum in an order that depends on the thread count, a
    forked worker can only use one (fedmed.runtime.workers), and so every site trains with one,
    serially too. The same seed then gives the same bits with 1 or N workers, on any core
    count (as on Ray, whose actors get one thread for the one CPU fedmed reserves per site).
    """
    import torch

    TaskIdentity.task_id = next(itertools.count(1))
    TaskIdentity.run_id = RUN_ID
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    plan = _plan(run_config)
    workers = min(sim_workers() if workers is None else workers, num_nodes)
    if workers > 1 and (not can_fork() or _on_accelerator(plan)):
        workers = 1
    if workers > 1:
        _import_before_forking(plan)
    context = Context(
        run_id=RUN_ID,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with InProcessGrid(client_app, num_nodes, run_config, workers=workers) as grid:
            server_app(grid, context)
    finally:
        torch.set_num_threads(threads)
