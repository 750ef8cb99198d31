"""The run dashboard's HTTP side: which file it serves, its errors, the page, the thread."""

from __future__ import annotations

import math
import re
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from fedmed.io import write_json
from fedmed.serving.dashboard import (
    create_dashboard_app,
    start_dashboard_thread,
    stop_dashboard_thread,
)
from fedmed.study.history import RunHistory

SITES = ("st-marys", "riverside", "lakeview")


def _payload(rounds: int, status: str, planned: int = 3) -> dict[str, Any]:
    """A run JSON as the federation writes it (RunHistory.to_dict + the study header).

    lakeview refuses training every round (privacy cap) but still evaluates the global model,
    and riverside's ROC-AUC is NaN in round 1 (one class in its test split).
    """
    history = RunHistory(sites=SITES)
    for rnd in range(1, rounds + 1):
        for i, site in enumerate(SITES):
            if site == "lakeview":
                history.record_failure(rnd, "train", site, "privacy budget exhausted")
            else:
                history.record(
                    rnd, "train", site, {"num-examples": 100.0, "epsilon": 0.5 * rnd + 0.1 * i}
                )
            auc = math.nan if (site == "riverside" and rnd == 1) else 0.8 + 0.01 * rnd
            history.record(
                rnd,
                "evaluate",
                site,
                {
                    "accuracy": 0.7 + 0.05 * rnd,
                    "roc_auc": auc,
                    "loss": 1.0 / rnd,
                    "num-examples": 30,
                },
            )
    header = {"name": "heart", "mode": "federated", "engine": "inprocess"}
    return {**header, "rounds_planned": planned, "config": {}, "status": status} | (
        history.to_dict()
    )


def _write(run_dir: Path, name: str, payload: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / name, payload)


def test_api_run_serves_metrics_json_of_a_finished_run(tmp_path: Path) -> None:
    _write(tmp_path, "live.json", _payload(2, "running"))  # stale: must not win
    _write(tmp_path, "metrics.json", _payload(3, "finished"))

    resp = TestClient(create_dashboard_app(tmp_path)).get("/api/run")

    assert resp.status_code == 200
    assert resp.headers["cache-control"] == "no-store"
    run = resp.json()
    assert run["status"] == "finished"
    assert [h["round"] for h in run["history"]] == [1, 2, 3]
    assert run["sites"] == list(SITES)
    first = run["history"][0]
    assert first["sites"]["riverside"]["evaluate"]["roc_auc"] is None  # NaN arrives as null
    assert "train" not in first["sites"]["lakeview"]
    assert first["failures"] == [
        {
            "site": "lakeview",
            "phase": "train",
            "reason": "site 'lakeview': privacy budget exhausted",
        }
    ]


def test_api_run_falls_back_to_live_json_while_running_then_switches(tmp_path: Path) -> None:
    client = TestClient(create_dashboard_app(tmp_path))
    _write(tmp_path, "live.json", _payload(1, "running", planned=3))

    running = client.get("/api/run").json()
    assert (running["status"], len(running["history"]), running["rounds_planned"]) == (
        "running",
        1,
        3,
    )

    _write(tmp_path, "metrics.json", _payload(3, "finished"))  # the same app, re-read per request
    assert client.get("/api/run").json()["status"] == "finished"


def test_api_run_404_names_the_folder_before_the_run_starts(tmp_path: Path) -> None:
    run_dir = tmp_path / "heart-federated-20250101-000000"
    run_dir.mkdir()
    client = TestClient(create_dashboard_app(run_dir))

    resp = client.get("/api/run")

    assert resp.status_code == 404
    detail = resp.json()["detail"]
    assert str(run_dir) in detail
    assert "metrics.json" in detail and "live.json" in detail and "started" in detail
    assert client.get("/health").json() == {
        "status": "ok",
        "run_dir": str(run_dir),
        "has_data": False,
    }


def test_api_run_reports_a_corrupt_file_instead_of_crashing(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text('{"status": "fini')

    resp = TestClient(create_dashboard_app(tmp_path)).get("/api/run")

    assert resp.status_code == 500
    assert "not valid JSON" in resp.json()["detail"]


def test_page_is_self_contained_html_that_polls_the_run(tmp_path: Path) -> None:
    resp = TestClient(create_dashboard_app(tmp_path)).get("/")

    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    html = resp.text
    assert "api/run" in html and "setTimeout(poll, POLL_MS)" in html
    assert "const POLL_MS = 2000;" in html
    assert '<table id="replies">' in html
    for metric in ("accuracy", "roc_auc", "loss", "epsilon"):
        assert f'metric: "{metric}"' in html
    # No network in hospitals or CI: nothing may be loaded from elsewhere.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<script src" not in html and "@import" not in html


def test_dashboard_thread_serves_then_stops_cleanly(tmp_path: Path) -> None:
    _write(tmp_path, "live.json", _payload(1, "running"))
    server, thread = start_dashboard_thread(tmp_path, "127.0.0.1", 0)
    port = server.config.port
    try:
        assert thread.is_alive() and thread.daemon
        resp = httpx.get(f"http://127.0.0.1:{port}/api/run", timeout=5)
        assert resp.json()["status"] == "running"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["has_data"] is True
    finally:
        stop_dashboard_thread(server, thread)
    assert not thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_dashboard_thread_on_a_taken_port_raises(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=str(port)):
            start_dashboard_thread(tmp_path, "127.0.0.1", port)
