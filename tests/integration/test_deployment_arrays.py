"""Image and series sites in a real federation on 127.0.0.1: coordinator and site daemons in
their own processes (insecure mode: TLS and node auth are covered by test_deployment.py).

One study, two hospitals that registered different image exports (a .npz, a PNG folder with
its labels CSV) through `fedmed site data add`; the federated model is then served."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fedmed.config import parse_run_config
from fedmed.runtime.deployment import wait_until_ready
from fedmed.security.policy import plan_hash
from fedmed.serving.api import create_app, open_model

from .ports import free_port
from .test_deployment import Daemons, _wait_online, fedmed

pytestmark = pytest.mark.integration


def test_image_sites_federate_over_real_processes_and_the_model_serves(tmp_path: Path) -> None:
    from tests.data.test_registry import _png_folder
    from tests.tasks.test_imaging import _images, _npz, _to_toml

    root, port = tmp_path, free_port()
    raw = {
        "name": "scans",
        "task": "imaging-classification",
        "rounds": 1,
        "output_dir": "runs",
        "model": {"kind": "cnn", "hidden": [4]},
        "train": {"local_steps": 2, "batch_size": 8, "optimizer": "adam", "lr": 0.01},
        "data": {"dataset": "scans", "schema": {"features": ["gray"], "min_rows": 10}},
        "sites": [{"name": "st-marys"}, {"name": "riverside"}],
    }
    (root / "study.toml").write_text(_to_toml(raw))
    plan = plan_hash(parse_run_config(raw))
    (root / "exports").mkdir()
    exports = {
        "st-marys": _npz(root / "exports" / "st-marys.npz"),
        "riverside": _png_folder(root / "exports" / "riverside", n=40),
    }
    labels = exports["riverside"] / "labels.csv"
    labels.write_text(labels.read_text().replace("image,label", "image,target", 1))
    for name, export in exports.items():
        res = fedmed("site", "init", name, "--coordinator", f"127.0.0.1:{port}", "--insecure",
                     "--runtime-port", str(free_port()), "--approve", plan, "--min-rows", "10",
                     "--share-statistics", "--no-require-privacy", cwd=root)  # fmt: skip
        assert res.returncode == 0, res.stderr
        res = fedmed("site", "data", "add", f"sites/{name}.toml", "scans", str(export), cwd=root)
        assert res.returncode == 0 and "images" in res.stdout, res.stderr
    daemons = Daemons(root)
    try:
        coordinator = daemons.start(
            "coordinator", "coordinator", "start", "--port", str(port), "--insecure"
        )
        wait_until_ready(root / "coordinator", timeout=120, proc=coordinator)
        for name in exports:
            daemons.start(name, "site", "start", f"sites/{name}.toml")
        _wait_online(root, port, len(exports))

        res = fedmed("run", "study.toml", cwd=root, timeout=600)

        assert res.returncode == 0, res.stderr + daemons.log("coordinator")[-3000:]
    finally:
        daemons.stop_all()
    run_dir = Path(res.stdout.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["final"]["sites"]) == {"st-marys", "riverside"}, metrics["history"]
    assert all(not h["failures"] for h in metrics["history"]), metrics["history"]
    client = TestClient(create_app(open_model(run_dir)))
    images, _ = _images(2, seed=9)
    reply = client.post("/predict", json={"images": images.tolist()})
    assert reply.status_code == 200, reply.text
    assert all(0 <= p["probability"] <= 1 for p in reply.json()["predictions"])
    assert client.post("/predict", json={"images": [np.zeros((9, 9)).tolist()]}).status_code == 422
