"""The in-process grid's serial delivery: what a site's thread may and may not leave behind."""

from __future__ import annotations

import time

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedmed.runtime.inprocess import InProcessGrid


@pytest.mark.usefixtures("task_identity")
def test_a_site_thread_past_its_deadline_does_not_lend_the_coordinator_its_identity() -> None:
    # Serial delivery abandons a late site in a thread of this process; whatever that thread
    # does, the coordinator's next Messages still come from the SuperLink's node id.
    app = ClientApp()
    seen: list[int] = []

    @app.train()
    def slow(msg: Message, context: Context) -> Message:
        seen.append(TaskIdentity.node_id)  # a SuperNode's ClientApp process reads its own
        time.sleep(1.0)
        return Message(RecordDict(), reply_to=msg)

    grid = InProcessGrid(app, 1, {})
    assert list(grid.send_and_receive([_train_message(grid)], timeout=0.1)) == []
    built = grid.create_message(RecordDict(), "train", 1001, "2")  # while the site still runs

    assert built.metadata.src_node_id == SUPERLINK_NODE_ID
    assert seen == [1001]


def _train_message(grid: InProcessGrid) -> Message:
    config = ConfigRecord({"server-round": 1})
    return grid.create_message(RecordDict({"config": config}), "train", 1001, "1")
