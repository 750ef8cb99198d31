"""Forked worker processes that let the in-process runtime train simulated sites concurrently.

Why processes, not threads (measured on 2 cores, docs/benchmarks.md): a simulated site's round
is mostly Python that holds the GIL (Opacus' RDP accounting, its per-sample hooks on small
tensors, Flower's records), so two threads ran four sites' rounds no faster than one thread,
while two processes ran them in about half the time. Processes also give each worker its own
torch and numpy RNG, Flower ``TaskIdentity`` and caches: a delivery computes exactly what it
computes serially (every training seeds the RNG it draws from before drawing), whichever worker
runs it and whatever runs beside it. And a site that misses its deadline can be stopped
(its worker is killed and replaced) instead of abandoned in a thread that trains on.

Why fork: the ClientApp (any object, a test's closure included), monkeypatches and imported
modules carry over as they are, with no pickling and no second import of torch. Workers are
forked when the first message is sent; each node keeps the worker it was first given, so that
worker's caches (the site's data, its noise calibration) stay warm across rounds.

Fork safety: a parent that ran torch has a live OpenMP pool, which a forked child cannot use
(libgomp hangs in the child's first parallel region). Each worker therefore runs torch with one
intra-op thread, which never enters OpenMP; with one worker per core that uses the cores
anyway. A study on an accelerator does not come here at all (run_inprocess keeps it serial):
a forked child cannot use CUDA once its parent has touched it, and the sites share one device.

Memory: the workers share the parent's pages until one of them writes to a page. CPython's
garbage collector writes to every object it scans, so before forking the pool moves the
parent's objects out of its reach (``gc.freeze``, as the gc module's documentation advises for
fork without exec) until the pool closes: measured on the demo, each worker's private memory
fell from ~130 MiB to ~30 MiB (docs/benchmarks.md).

Messages and contexts cross the pipe as Flower's protobuf, the bytes a SuperNode receives,
never pickled. A worker exits when the pool closes, and on its own when its parent is gone.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from flwr.app import Context, Error, Message, UserConfig
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

log = logging.getLogger("fedmed.runtime")

Deliver = Callable[[Message, Context], Message]
PARENT_CHECK_SECONDS = 1.0  # how often an idle worker checks that its parent still runs
WORKER_NAME = "fedmed-site-worker"
STOP = b""  # the frame that ends a worker's loop (a serialized Message is never empty)


def can_fork() -> bool:
    """Whether workers may be forked here: on Linux. Windows cannot fork, and macOS' system
    frameworks are not fork-safe (Python defaults to spawn there); elsewhere sites run serially.
    """
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


@dataclass
class _Job:
    index: int  # position in the batch: replies come back in the order messages were given
    message: Message
    context: Context


class _Worker:
    """One forked process and the job it is running (``None`` when idle)."""

    def __init__(self, slot: int, deliver: Deliver, run_config: UserConfig) -> None:
        fork = multiprocessing.get_context("fork")
        self.run_config = run_config
        self.conn, child_end = fork.Pipe()
        self.process = fork.Process(
            target=_serve,
            args=(child_end, self.conn, deliver, run_config, os.getpid()),
            name=f"{WORKER_NAME}-{slot}",
            daemon=True,  # multiprocessing's exit handler ends it if the parent exits first
        )
        self.process.start()
        child_end.close()
        self.job: _Job | None = None
        self.started = 0.0

    def start(self, job: _Job) -> None:
        self.conn.send_bytes(message_to_proto(job.message).SerializeToString())
        self.conn.send_bytes(_without_run_config(job.context, self.run_config))
        self.job, self.started = job, time.monotonic()

    def result(self) -> tuple[Message, Context]:
        reply = message_from_proto(ProtoMessage.FromString(self.conn.recv_bytes()))
        context = context_from_proto(ProtoContext.FromString(self.conn.recv_bytes()))
        self.job = None
        return reply, context

    def stop(self, *, kill: bool = False) -> None:
        """End the process: politely when idle (it finishes its loop), at once when ``kill``.

        The polite word is an empty frame, not closing the pipe: workers forked later hold
        copies of this end, so the worker would never read EOF.
        """
        if kill:
            self.process.kill()
        else:
            with contextlib.suppress(OSError):  # it died already
                self.conn.send_bytes(STOP)
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()
        self.process.close()


def _without_run_config(context: Context, known: UserConfig) -> bytes:
    """``context`` for the pipe, its run config left out when the worker has it already.

    The run config carries the study plan, which names every site: at 10,000 sites ~1 MB that
    serializing twice per message made every round O(N^2) (measured: 33 ms per site-round at
    10,000 sites vs 10 at 1,000). It is the same for every node of a run, so each worker gets it
    once, when it is forked.
    """
    same = context.run_config == known  # the same string objects: an identity check per key
    slim = Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=context.node_config,
        state=context.state,
        run_config={} if same else context.run_config,
        series_id=context.series_id,
    )
    return bytes(context_to_proto(slim).SerializeToString())


def _serve(
    conn: Connection, parent_end: Connection, deliver: Deliver, run_config: UserConfig, parent: int
) -> None:
    """A worker's loop: a message and its node's context in, the reply and the context out."""
    import torch

    parent_end.close()  # the parent's end of this pipe: never ours to read or write
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)  # see the module docstring: OpenMP after fork hangs
    while True:
        if not conn.poll(PARENT_CHECK_SECONDS):
            if os.getppid() != parent:  # the parent died without closing the pool
                return
            continue
        try:
            frame = conn.recv_bytes()
            if frame == STOP:
                return
            message = message_from_proto(ProtoMessage.FromString(frame))
            context = context_from_proto(ProtoContext.FromString(conn.recv_bytes()))
        except EOFError:
            return
        if not context.run_config:  # left out by the parent: the run's, given at fork
            context.run_config = dict(run_config)
        reply = deliver(message, context)
        conn.send_bytes(message_to_proto(reply).SerializeToString())
        conn.send_bytes(_without_run_config(context, context.run_config))  # only state returns


class SitePool:
    """Up to ``workers`` forked processes delivering messages to ``deliver(message, context)``.

    ``deliver`` must turn a ClientApp's exception into an error reply itself; a worker that dies
    mid-message (killed, out of memory) gives that message an error reply and is replaced.
    """

    def __init__(
        self, deliver: Deliver, workers: int, run_config: UserConfig | None = None
    ) -> None:
        if workers < 1:
            raise ValueError("a pool needs at least one worker")
        self._deliver = deliver
        self._size = workers
        self._run_config: UserConfig = dict(run_config or {})  # every node's (sent at fork)
        self._workers: list[_Worker] = []  # forked on first use
        self._slot_of: dict[int, int] = {}  # node id -> the worker that serves it

    def run(
        self, jobs: list[tuple[Message, Context]], timeout: float | None
    ) -> list[Message | None]:
        """The reply to each of ``jobs``, in their order; ``None`` where none came in ``timeout``.

        Each message gets its own ``timeout`` from the moment its worker starts it, as in serial
        delivery: the budget a real site running in parallel gets. A message waits for its
        node's worker; a worker past its message's deadline is killed (the message gives no
        reply, as on a real network) and replaced, and the messages queued on it go on. Every
        context that came back replaces the state of the caller's Context object.
        """
        if jobs and not self._workers:
            gc.collect()  # what is garbage now would otherwise stay frozen below
            gc.freeze()
            self._workers = [
                _Worker(slot, self._deliver, self._run_config) for slot in range(self._size)
            ]
        # One queue per worker, so that starting the next message costs O(workers), not O(N):
        # at 10,000 sites a scan of every queued message per reply would be 10^8 steps a round.
        queues: list[deque[_Job]] = [deque() for _ in range(self._size)]
        for i, (msg, ctx) in enumerate(jobs):
            queues[self._slot(msg.metadata.dst_node_id)].append(_Job(i, msg, ctx))
        replies: dict[int, Message] = {}
        while any(queues) or self._busy():
            self._start_idle(queues)
            self._collect(replies, timeout)
        return [replies.get(i) for i in range(len(jobs))]

    def _busy(self) -> list[_Worker]:
        return [w for w in self._workers if w.job is not None]

    def _slot(self, node: int) -> int:
        """A node's worker: the next one in turn when the node is first seen (so every worker
        serves as many nodes as the others, give or take one), then always it."""
        if node not in self._slot_of:
            self._slot_of[node] = len(self._slot_of) % self._size
        return self._slot_of[node]

    def _start_idle(self, queues: list[deque[_Job]]) -> None:
        for slot, queue in enumerate(queues):
            if queue and self._workers[slot].job is None:
                job = queue.popleft()
                try:
                    self._workers[slot].start(job)
                except OSError:  # it died while idle: a fresh one takes the message
                    self._replace(self._workers[slot])
                    self._workers[slot].start(job)

    def _collect(self, replies: dict[int, Message], timeout: float | None) -> None:
        """Wait for the next reply or deadline; take every reply that is ready."""
        busy = self._busy()
        wait_for = None
        if timeout is not None:
            now = time.monotonic()
            wait_for = max(0.0, min(w.started + timeout for w in busy) - now)
        ready = wait([w.conn for w in busy], wait_for)
        for worker in busy:
            job = worker.job
            assert job is not None
            if worker.conn in ready:
                try:
                    reply, context = worker.result()
                except (EOFError, OSError):
                    node = job.message.metadata.dst_node_id
                    log.warning("node %d: its worker process died", node)
                    replies[job.index] = Message(
                        Error(code=500, reason="ClientApp process died"), reply_to=job.message
                    )
                    self._replace(worker)
                    continue
                job.context.state = context.state
                replies[job.index] = reply
            elif timeout is not None and time.monotonic() - worker.started >= timeout:
                log.warning(
                    "node %d gave no %s reply within %s s",
                    job.message.metadata.dst_node_id,
                    job.message.metadata.message_type,
                    timeout,
                )
                self._replace(worker)

    def _replace(self, worker: _Worker) -> None:
        """A fresh worker in ``worker``'s slot (its nodes stay with the slot); the old one,
        hung or dead, is killed."""
        slot = self._workers.index(worker)
        worker.stop(kill=True)
        gc.freeze()  # what this process allocated since the pool started: shared, too
        self._workers[slot] = _Worker(slot, self._deliver, self._run_config)

    def close(self) -> None:
        """Stop every worker (a busy one is killed); the pool can be used again after."""
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.stop(kill=worker.job is not None)
        if workers:
            gc.unfreeze()  # this process's objects are collectable again
