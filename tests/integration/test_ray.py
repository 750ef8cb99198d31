"""Same study, same seed: Flower's Ray engine and the in-process Grid give the same metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmed.cli import main

pytestmark = pytest.mark.integration


def test_ray_and_inprocess_agree(demo_config, tmp_path, capsys) -> None:
    from tests.test_cli import _write_toml

    config = _write_toml(demo_config, tmp_path / "demo.toml")
    results = {}
    for engine in ("inprocess", "ray"):
        assert main(["simulate", str(config), "--engine", engine, "--quiet"]) == 0
        run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
        results[engine] = json.loads((run_dir / "metrics.json").read_text())

    a, b = results["inprocess"], results["ray"]
    assert b["engine"] == "ray"
    for site in demo_config.site_names:
        for metric in ("accuracy", "roc_auc", "loss", "epsilon"):
            assert a["final"]["sites"][site][metric] == pytest.approx(
                b["final"]["sites"][site][metric], abs=1e-5
            )
