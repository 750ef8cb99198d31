"""A deployed site answers the statistics queries under its OWN controls (`fedmed run --stats`)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pandas as pd
import pytest
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedmed.config import RunConfig, SiteConfig, StatsConfig, parse_run_config
from fedmed.coordinator.app import build_server_app
from fedmed.data.registry import DatasetRegistry
from fedmed.errors import PolicyViolation, StudyFailed
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.protocol import SITE_CONFIG_KEY, STATS_PASSES, encode_edges
from fedmed.runtime.inprocess import RUN_ID
from fedmed.security.policy import plan_hash
from fedmed.site.app import app as client_app
from fedmed.site.secure_app import client_app as secure_app
from fedmed.site.stats import ANSWERED, controls, statistics_reply
from fedmed.study.plan import RunPlan, new_run_dir
from tests.conftest import write_site_csv
from tests.site.test_site_daemon import CANARY, RecordingGrid


def test_a_site_is_never_laxer_than_the_plan_nor_the_plan_than_the_site() -> None:
    run = parse_run_config(
        {
            "stats": {"min_cell": 10, "epsilon": 2.0},
            "mode": "local",
            "sites": [{"name": "a", "path": "a.csv"}],
        }
    )
    strict = SiteConfig("alpha", insecure=True, statistics_min_cell=20, statistics_epsilon=0.5)
    lax = SiteConfig("alpha", insecure=True, statistics_min_cell=5)

    assert controls(run, strict) == (20, 0.5)
    assert controls(run, lax) == (10, 2.0)
    assert controls(run, None) == (10, 2.0)  # a simulated site follows the study
    assert controls(run.replace(stats=StatsConfig()), lax) == (10, 0.0)


def _site(tmp_path: Path, name: str, approved: str, table: Path, extra: str) -> Path:
    state = tmp_path / "state" / name
    DatasetRegistry(state).add("cohort", table)
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\ninsecure = true\nstate_dir = "{state}"\n'
        f'approved_plans = ["{approved}"]\nmin_rows = 10\n{extra}'
    )
    return path


def _deployed_stats(
    cfg: RunConfig, site_files: list[Path], app: ClientApp = client_app
) -> tuple[RecordingGrid, Path]:
    """The deployed ServerApp (`fedmed run --stats`) over sites that each read their own TOML."""
    plan = RunPlan(cfg, new_run_dir(cfg, "stats"), engine="deployment", stats=True)
    grid = RecordingGrid(app, len(site_files), plan.to_run_config())
    for context, site_file in zip(grid.contexts.values(), site_files, strict=True):
        context.node_config = {SITE_CONFIG_KEY: str(site_file)}
    TaskIdentity.run_id, TaskIdentity.task_id = RUN_ID, 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    server = Context(RUN_ID, SUPERLINK_NODE_ID, {}, RecordDict(), plan.to_run_config())
    build_server_app()(grid, server)  # the deployed app: it reads the plan from run_config
    return grid, plan.run_dir


def test_deployed_sites_apply_their_own_minimum_noise_and_consent(tmp_path: Path) -> None:
    cfg = parse_run_config(
        {
            "name": "cohort",
            "output_dir": str(tmp_path / "runs"),
            "data": {
                "dataset": "cohort",
                "schema": {
                    "target": "outcome",
                    "features": ["age", "bp", "smoker"],
                    "categorical": {"smoker": ["no", "yes"]},
                },
            },
            "sites": [{"name": n} for n in ("alpha", "beta", "gamma")],
        }
    )
    approved = plan_hash(cfg)
    tables = tmp_path / "hospital-files"
    tables.mkdir()
    alpha = write_site_csv(tables / "alpha.csv", 120, seed=1)
    frame = pd.read_csv(alpha)
    frame.loc[5, "bp"] = CANARY
    frame.to_csv(alpha, index=False)
    sites = [
        _site(
            tmp_path,
            "alpha",
            approved,
            alpha,
            "share_statistics = true\nstatistics_min_cell = 20\nstatistics_epsilon = 1.0\n",
        ),
        _site(tmp_path, "beta", approved, write_site_csv(tables / "beta.csv", 90, seed=2), ""),
        _site(
            tmp_path,
            "gamma",
            approved,
            write_site_csv(tables / "gamma.csv", 90, seed=3),
            "share_statistics = true\n",
        ),
    ]

    grid, run_dir = _deployed_stats(cfg, sites)

    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["sites"] == ["alpha", "gamma"]
    assert "does not share statistics" in stats["refused"]["beta"]
    assert stats["min_cell"] == 20  # alpha's own, above the plan's 10
    alpha_counts = [stats["cohort"]["sites"]["alpha"], *stats["outcome"]["sites"]["alpha"]]
    for entry in stats["features"].values():
        alpha_counts += entry.get("histogram", {}).get("sites", {}).get("alpha") or []
    assert all(c is None or c == 0 or c >= 20 for c in alpha_counts)
    assert stats["epsilon"]["gamma"] == 0.0
    assert 0.98 <= stats["epsilon"]["alpha"] <= 1.0
    ledger = PrivacyLedger("alpha", tmp_path / "state" / "alpha" / "ledger")
    entries = json.loads(ledger.path.read_text())["entries"]
    charged = [e["study"] for e in entries if e["kind"] == "reserve"]
    assert len(charged) == 2 and charged[0] == charged[1] and charged[0].startswith("statistics")
    assert (tmp_path / "state" / "alpha" / "noise.key").is_file()  # the noise is keyed
    wire = b"".join(grid.sent)
    for needle in (str(CANARY).encode(), struct.pack("<d", CANARY), str(tmp_path).encode()):
        assert needle not in wire


def test_a_deployed_site_answers_a_plan_once_and_refuses_other_edges(tmp_path: Path) -> None:
    cfg = parse_run_config(
        {
            "name": "cohort",
            "output_dir": str(tmp_path / "runs"),
            "data": {"dataset": "cohort", "schema": {"target": "outcome", "features": ["age"]}},
            "sites": [{"name": n} for n in ("alpha", "beta")],
        }
    )
    approved = plan_hash(cfg)
    share = "share_statistics = true\n"
    sites = [
        _site(tmp_path, n, approved, write_site_csv(tmp_path / f"{n}.csv", 80, seed=i), share)
        for i, n in enumerate(("alpha", "beta"))
    ]
    _, first_run = _deployed_stats(cfg, sites)

    _, again = _deployed_stats(cfg, sites)  # the same plan asks the same question: a replay
    context = Context(RUN_ID, 1001, {SITE_CONFIG_KEY: str(sites[0])}, RecordDict(), {})
    shifted = encode_edges({"features": {"age": [40.0, 41.0, 80.0]}, "km": None})

    assert json.loads((again / "stats.json").read_text())["sites"] == ["alpha", "beta"]
    with pytest.raises(PolicyViolation, match="already answered these statistics"):
        statistics_reply(cfg.to_json(), context, STATS_PASSES[1], "probe", shifted)
    assert first_run != again


def _cohort_plan(tmp_path: Path, **strategy: object) -> RunConfig:
    return parse_run_config(
        {
            "name": "cohort",
            "output_dir": str(tmp_path / "runs"),
            "data": {"dataset": "cohort", "schema": {"target": "outcome", "features": ["age"]}},
            "strategy": {"min_sites": 2, **strategy},
            "sites": [{"name": n} for n in ("alpha", "beta", "gamma")],
        }
    )


def test_a_site_that_requires_secure_aggregation_releases_no_statistics_in_clear(
    tmp_path: Path,
) -> None:
    cfg = _cohort_plan(tmp_path)
    table = write_site_csv(tmp_path / "alpha.csv", 80, seed=1)
    extra = "share_statistics = true\nrequire_secure_aggregation = true\n"
    site = _site(tmp_path, "alpha", plan_hash(cfg), table, extra)
    context = Context(RUN_ID, 1001, {SITE_CONFIG_KEY: str(site)}, RecordDict(), {})

    with pytest.raises(PolicyViolation, match="only under SecAgg"):
        statistics_reply(cfg.to_json(), context, STATS_PASSES[0], "probe")
    assert not (tmp_path / "state" / "alpha" / ANSWERED).exists()  # refused before counting


def test_a_plan_that_masks_its_statistics_is_not_answered_in_clear(tmp_path: Path) -> None:
    cfg = _cohort_plan(tmp_path).replace(stats=StatsConfig(secure_aggregation=True))
    context = Context(RUN_ID, 1001, {}, RecordDict(), {})  # a simulated site

    with pytest.raises(PolicyViolation, match="not sent in clear"):
        statistics_reply(cfg.to_json(), context, STATS_PASSES[0], "probe")


def test_deployed_sites_that_require_secure_aggregation_answer_a_secure_plan_masked(
    tmp_path: Path,
) -> None:
    cfg = _cohort_plan(tmp_path, secure_aggregation=True, validate_updates=False)
    approved = plan_hash(cfg)
    rows = {"alpha": 80, "beta": 70, "gamma": 60}
    extra = "share_statistics = true\nrequire_secure_aggregation = true\n"
    sites = [
        _site(tmp_path, n, approved, write_site_csv(tmp_path / f"{n}.csv", k, seed=i), extra)
        for i, (n, k) in enumerate(rows.items())
    ]

    grid, run_dir = _deployed_stats(cfg, sites, secure_app)

    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["refused"] == {}
    assert stats["secure_aggregation"]["passes"]["stats_cells"] == ["alpha", "beta", "gamma"]
    assert stats["cohort"]["pooled"]["count"] == sum(rows.values())
    assert set(stats["epsilon"].values()) == {0.0}
    wire = b"".join(grid.sent)
    assert b'"cohort"' not in wire  # no clear statistics reply (the vectors: test_secure_stats)
    assert str(tmp_path).encode() not in wire
    # A second sum could be differenced against the first (one site left out): no rerun.
    with pytest.raises(StudyFailed, match="already answered these statistics under SecAgg"):
        _deployed_stats(cfg, sites, secure_app)
