"""What `fedmed run` ships to the coordinator: the app the sites run for a plan."""

from __future__ import annotations

from pathlib import Path

from fedmed.config import StatsConfig, StrategyConfig
from fedmed.runtime.deployment import ships_secure_app, write_app
from fedmed.study.plan import RunPlan
from tests.coordinator.test_stats import _study


def test_statistics_masked_under_secagg_ship_the_sites_secure_client_app(tmp_path: Path) -> None:
    cfg = _study(tmp_path)
    masked = cfg.replace(stats=StatsConfig(secure_aggregation=True))
    secure_study = cfg.replace(
        strategy=StrategyConfig(secure_aggregation=True, validate_updates=False)
    )

    assert not ships_secure_app(RunPlan(cfg, tmp_path, stats=True))
    assert ships_secure_app(RunPlan(masked, tmp_path, stats=True))
    assert not ships_secure_app(RunPlan(masked, tmp_path))  # training in the clear
    assert ships_secure_app(RunPlan(secure_study, tmp_path, stats=True))
    app = write_app(tmp_path / "app", ["fedmed.run"], secure=True)
    assert 'clientapp = "fedmed.secagg:client_app"' in (app / "pyproject.toml").read_text()
