"""Queries to every site outside the rounds: before round 1 they wait for every site's node
(Ray lists none for its first seconds); after the rounds they ask the nodes there, so a site
that died mid-study does not hold the end of the study for the 5-minute query timeout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flwr.app import Message, RecordDict

import fedmed.coordinator.app as app
from fedmed.config import resolve_config_path
from fedmed.study.history import RunHistory
from fedmed.study.plan import RunPlan


class OneNodeGrid:
    """Lists one node of a study's four and answers nothing: a site died, or one came late."""

    def __init__(self) -> None:
        self.sent: list[int] = []  # the nodes asked

    def get_node_ids(self) -> list[int]:
        return [1]

    def create_message(self, content: RecordDict, message_type: str, dst: int, group_id: str):
        assert message_type == "query.statistics"
        return dst  # stands in for the Message (Flower's needs a run)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        self.sent += list(messages)
        return []


@pytest.fixture
def plan(tmp_path: Path) -> RunPlan:
    from fedmed.config import load_run_config

    cfg = load_run_config(resolve_config_path("demo"), [f"output_dir={tmp_path}"])
    assert len(cfg.sites) == 4
    return RunPlan(cfg, tmp_path / "run")


def test_a_query_before_round_1_waits_for_every_site(plan, monkeypatch) -> None:
    monkeypatch.setattr(app, "QUERY_TIMEOUT", 0.5)
    grid = OneNodeGrid()
    started = time.monotonic()

    app.ask_statistics(grid, plan, RunHistory(sites=plan.config.site_names), 0)

    assert time.monotonic() - started >= 0.5  # waited for the other three nodes
    assert grid.sent == [1]  # then asked who was there


def test_statistics_after_the_rounds_do_not_wait_for_a_dead_site(plan, monkeypatch) -> None:
    monkeypatch.setattr(app, "QUERY_TIMEOUT", 30.0)
    grid = OneNodeGrid()
    started = time.monotonic()

    assert app.collect_statistics(grid, plan, RunHistory(sites=plan.config.site_names)) == ""

    assert time.monotonic() - started < 5
    assert grid.sent == [1]
