"""The in-process runtime's worker pool: concurrent sites, the same results, the same deadlines."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmed.config import ModelConfig, PrivacyConfig, RunConfig, sim_workers, usable_cores
from fedmed.coordinator.app import build_server_app
from fedmed.errors import ConfigError
from fedmed.runtime.inprocess import InProcessGrid, run_inprocess
from fedmed.runtime.run import preflight
from fedmed.runtime.workers import WORKER_NAME
from fedmed.site.app import app as client_app
from fedmed.site.app import evaluate_global, train
from fedmed.study.plan import RunPlan, new_run_dir
from tests.coordinator.test_checkpoint import _numbers

HANG, RAISE, DIE = 1, 2, 4  # partition ids of the misbehaving sites in the fault tests
DEADLINE = 5.0  # the healthy sites answer in milliseconds; the hung one sleeps 60 s


def _study(cfg: RunConfig, workers: int, ledger: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run ``cfg`` with ``workers`` and its own privacy ledger; its run folder."""
    monkeypatch.setenv("FEDMED_LEDGER_DIR", str(ledger))  # epsilon_total: this run's spending
    plan = RunPlan(cfg, new_run_dir(cfg))
    run_inprocess(
        build_server_app(plan), client_app, len(cfg.sites), plan.to_run_config(), workers=workers
    )
    return plan.run_dir


def test_the_pool_computes_what_serial_delivery_computes(
    demo_config: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DP-SGD (Opacus' Poisson batches and noise) and dropout: both draw from torch's RNG.
    cfg, _ = preflight(demo_config.replace(model=ModelConfig(hidden=(16,), dropout=0.2)))

    serial = _study(cfg, 1, tmp_path / "ledger-serial", monkeypatch)
    pooled = _study(cfg, 2, tmp_path / "ledger-pooled", monkeypatch)

    def metrics(run_dir: Path) -> dict:
        return _numbers(json.loads((run_dir / "metrics.json").read_text()))

    assert metrics(pooled) == metrics(serial)
    assert metrics(serial)["final"]["sites"]  # there was something to compare
    model = (serial / "model.safetensors").read_bytes()
    assert (pooled / "model.safetensors").read_bytes() == model


def _reporting_app() -> ClientApp:
    """Trains like a site, and says which process trained it (metric ``pid``)."""
    app = ClientApp()

    @app.train()
    def train_and_tell(msg: Message, context: Context) -> Message:
        reply = train(msg, context)
        reply.content["metrics"]["pid"] = os.getpid()
        return reply

    app.evaluate()(evaluate_global)
    return app


def _trained_by(cfg: RunConfig, workers: int) -> list[dict[str, int]]:
    """Per round: site -> the process id that trained it."""
    plan = RunPlan(cfg, new_run_dir(cfg))
    run_inprocess(
        build_server_app(plan), _reporting_app(), 4, plan.to_run_config(), workers=workers
    )
    history = json.loads((plan.run_dir / "metrics.json").read_text())["history"]
    return [{s: m["train"]["pid"] for s, m in h["sites"].items()} for h in history]


def test_sites_train_in_worker_processes_each_keeping_its_own(demo_config: RunConfig) -> None:
    cfg, _ = preflight(demo_config.replace(privacy=PrivacyConfig(enabled=False)))

    pids = _trained_by(cfg, workers=2)

    assert pids[0] == pids[1]  # a site keeps its worker (and its warm caches) across rounds
    assert len(set(pids[0].values())) == 2  # two workers, each with two of the four sites
    assert os.getpid() not in pids[0].values()


def test_a_study_on_an_accelerator_keeps_its_sites_in_this_process(
    demo_config: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, _ = preflight(demo_config.replace(rounds=1, privacy=PrivacyConfig(enabled=False)))
    # What device="auto" resolves to on a GPU machine (the sites still train on the CPU here).
    monkeypatch.setattr("fedmed.train.resolve_device", lambda name: torch.device("cuda"))

    pids = _trained_by(cfg, workers=2)

    assert set(pids[0].values()) == {os.getpid()}


def _faulty_app() -> ClientApp:
    """Replies with its partition id, except: HANG sleeps 60 s, RAISE raises, DIE exits."""
    app = ClientApp()

    @app.train()
    def faulty(msg: Message, context: Context) -> Message:
        site = int(context.node_config["partition-id"])
        if site == HANG:
            time.sleep(60)  # in a worker process: the pool kills it at the deadline
        if site == RAISE:
            raise RuntimeError("out of memory")
        if site == DIE:
            os._exit(3)  # the process is gone, as after the kernel's OOM killer
        content = RecordDict({"metrics": MetricRecord({"site": site, "pid": os.getpid()})})
        return Message(content, reply_to=msg)

    return app


def _train_messages(grid: InProcessGrid) -> list[Message]:
    config = ConfigRecord({"server-round": 1})
    return [
        grid.create_message(RecordDict({"config": config}), "train", node, "1")
        for node in grid.get_node_ids()
    ]


@pytest.mark.usefixtures("task_identity")  # a bare grid: no runtime sets it
def test_a_hung_site_does_not_hold_the_others_past_its_deadline() -> None:
    # 6 sites on 2 workers, first come first placed: worker 0 serves partitions 0, 2, 4 and
    # worker 1 serves 1, 3, 5. Site 3 waits behind the hung site 1 on the same worker.
    with InProcessGrid(_faulty_app(), 6, {}, workers=2) as grid:
        started = time.monotonic()
        replies = list(grid.send_and_receive(_train_messages(grid), timeout=DEADLINE))
        wall = time.monotonic() - started
        alive = [p for p in multiprocessing.active_children() if p.name.startswith(WORKER_NAME)]
        frozen = gc.get_freeze_count()  # the parent's objects, shared with the workers

    nodes = [r.metadata.src_node_id for r in replies]
    assert nodes == [1001, 1003, 1004, 1005, 1006]  # in the order sent; node 1002 (HANG): none
    assert replies[0].content["metrics"]["site"] == 0
    assert replies[2].content["metrics"]["site"] == 3  # queued behind the hung site: answered
    assert replies[1].error.reason == "ClientApp raised RuntimeError"  # RAISE
    assert replies[3].error.reason == "ClientApp process died"  # DIE
    assert replies[4].content["metrics"]["site"] == 5
    assert wall < DEADLINE + 20  # far from the hung site's 60 s
    # The hung and the dead workers were replaced: two workers, neither of them busy any more.
    assert len(alive) == 2
    assert not [p for p in multiprocessing.active_children() if p.name.startswith(WORKER_NAME)]
    assert frozen > 0
    assert gc.get_freeze_count() == 0  # collectable again once the pool closed


def test_the_pool_size_is_the_usable_cores_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDMED_SIM_WORKERS", raising=False)
    assert sim_workers() == usable_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("FEDMED_SIM_WORKERS", "3")
    assert sim_workers() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("FEDMED_SIM_WORKERS", bad)
        with pytest.raises(ConfigError, match="FEDMED_SIM_WORKERS"):
            sim_workers()
