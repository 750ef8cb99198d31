"""The deployment grid attributes replies to authenticated nodes and forgets offline ones.

In-process companions of tests/integration/test_attacks.py: the same PromptGrid over a fake
Grid whose replies and online nodes the test chooses, so each rule is checked in isolation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from fedmed.coordinator.grid import IMPERSONATION, GridWrapper, PromptGrid
from fedmed.protocol import SiteFailure, SiteReason, read_error, site_error

NODES = {11: "st-marys", 22: "riverside"}


pytestmark = pytest.mark.usefixtures("task_identity")  # the fake grid's Messages read it


class FakeGrid(GridWrapper):
    """Replies come from ``answer(message)``; ``online`` is what the SuperLink reports."""

    def __init__(self, answer, online: Iterable[int]) -> None:  # type: ignore[no-untyped-def]
        self.answer, self.online = answer, set(online)
        self.sent: dict[str, Message] = {}
        self.pulled = 0

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.online)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for n, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{len(self.sent) + n}"
            ids.append(m.metadata.message_id)
        self.sent.update({m.metadata.message_id: m for m in messages})
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulled += 1
        out = []
        for mid in list(message_ids):
            reply = self.answer(self.sent[mid])
            if reply is not None:
                out.append(reply)
        return out


def _msg(node: int) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type="train")


def _named(name: str):  # type: ignore[no-untyped-def]
    return lambda m: Message(RecordDict({"site": ConfigRecord({"name": name})}), reply_to=m)


def test_a_reply_claiming_another_site_becomes_its_own_nodes_refusal() -> None:
    grid = PromptGrid(FakeGrid(_named("st-marys"), NODES), interval=0.01, nodes=NODES)
    replies = list(grid.send_and_receive([_msg(11), _msg(22)], timeout=5))
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert by_node[11].has_content()  # st-marys speaking as itself
    forged = by_node[22]
    assert forged.has_error() and forged.error.code == IMPERSONATION
    told = read_error(forged.error)
    assert told.site == "riverside"
    assert "claimed to come from site 'st-marys'" in told.detail


def test_an_error_reply_is_attributed_to_the_authenticated_site() -> None:
    def answer(m: Message) -> Message:
        error = site_error("st-marys", SiteReason.POLICY_REFUSED, "plan refused")
        return Message(error, reply_to=m)

    grid = PromptGrid(FakeGrid(answer, NODES), interval=0.01, nodes=NODES)
    (reply,) = grid.send_and_receive([_msg(22)], timeout=5)
    assert read_error(reply.error) == SiteFailure(
        "riverside", SiteReason.POLICY_REFUSED, "plan refused"
    )


def test_an_older_sites_text_error_is_attributed_and_re_encoded() -> None:
    def answer(m: Message) -> Message:  # a fedmed site from before site_error
        return Message(Error(code=403, reason="site 'st-marys': plan refused"), reply_to=m)

    grid = PromptGrid(FakeGrid(answer, NODES), interval=0.01, nodes=NODES)
    (reply,) = grid.send_and_receive([_msg(22)], timeout=5)
    assert json.loads(reply.error.reason) == {"site": "riverside", "reason": "plan refused"}
    assert reply.error.code == SiteReason.POLICY_REFUSED


def test_unregistered_nodes_get_no_message_and_their_replies_are_refused() -> None:
    fake = FakeGrid(_named("st-marys"), {**NODES, 33: "stranger"})
    grid = PromptGrid(fake, interval=0.01, nodes=NODES)
    assert list(grid.get_node_ids()) == [11, 22]
    (reply,) = grid.send_and_receive([_msg(33)], timeout=5)
    assert reply.has_error() and "not a registered site" in reply.error.reason


def test_without_a_registry_replies_pass_unchanged() -> None:
    grid = PromptGrid(FakeGrid(_named("st-marys"), NODES), interval=0.01)
    (reply,) = grid.send_and_receive([_msg(22)], timeout=5)
    assert reply.has_content()


def test_a_node_gone_offline_is_not_waited_for() -> None:
    fake = FakeGrid(lambda m: None if m.metadata.dst_node_id == 22 else _named("st-marys")(m),
                    NODES)  # fmt: skip
    grid = PromptGrid(fake, interval=0.01, nodes=NODES, liveness=0.05)
    fake.online.discard(22)  # riverside's daemon died
    replies = list(grid.send_and_receive([_msg(11), _msg(22)], timeout=60))
    assert [r.metadata.src_node_id for r in replies] == [11]
    assert fake.pulled < 100  # stopped within a few polls, far from the 60 s timeout

    # While it is online, the same silence is waited for until the timeout.
    fake.online.add(22)
    fake.pulled = 0
    replies = list(grid.send_and_receive([_msg(11), _msg(22)], timeout=0.3))
    assert [r.metadata.src_node_id for r in replies] == [11] and fake.pulled > 5
