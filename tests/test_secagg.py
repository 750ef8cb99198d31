"""SecAgg+ (Flower's legacy workflow): same FedAvg result, local DP composes, dropouts survive."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from fedmed.config import PrivacyConfig, RunConfig, StrategyConfig, parse_run_config
from fedmed.errors import ConfigError
from fedmed.runtime.inprocess import RUN_ID
from fedmed.secagg import SiteClient
from fedmed.secagg import client_app as secure_app
from fedmed.security.audit import AuditLog
from fedmed.security.policy import SITE_CONFIG_KEY
from fedmed.server_app import build_server_app
from fedmed.study import RunPlan, new_run_dir, plan_hash

from .conftest import write_site_csv
from .test_runtime import _run
from .test_site_daemon import RecordingGrid, _site
from .test_site_daemon import _study as _daemon_study

SECURE = StrategyConfig(secure_aggregation=True, validate_updates=False)


def test_secure_fedavg_matches_plain_fedavg(csv_study: RunConfig) -> None:
    plain = _run(csv_study.replace(strategy=StrategyConfig(validate_updates=False)))

    secure = _run(csv_study.replace(strategy=SECURE), secure_app)

    assert [h["round"] for h in secure["history"]] == [1, 2, 3]
    assert all(h["failures"] == [] for h in secure["history"])
    for site, metrics in plain["final"]["sites"].items():
        # Only SecAgg+'s quantization (2^22 levels over [-8, 8]) separates the two.
        assert secure["final"]["sites"][site]["loss"] == pytest.approx(metrics["loss"], abs=1e-4)
    a = load_file(f"{plain['_dir']}/model.safetensors")
    b = load_file(f"{secure['_dir']}/model.safetensors")
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-4)
    # Per-site train metrics are not masked: the report still has each site's round.
    assert set(secure["history"][0]["sites"]) == {"alpha", "beta", "gamma"}


def test_local_dp_composes_with_secure_aggregation(csv_study: RunConfig) -> None:
    cfg = csv_study.replace(rounds=2, strategy=SECURE, privacy=PrivacyConfig(enabled=True))

    out = _run(cfg, secure_app)

    for site in cfg.site_names:
        assert 0 < out["final"]["sites"][site]["epsilon"] <= cfg.privacy.target_epsilon + 1e-6


def test_a_site_dropping_out_mid_protocol_is_survived_and_named(csv_study: RunConfig) -> None:
    class DropsInRound1(SiteClient):
        def fit(self, parameters, config):
            # After the key setup, while masked updates are collected: a mid-protocol dropout.
            if int(config["server-round"]) == 1 and self.context.node_config["partition-id"] == 2:
                raise RuntimeError("connection lost")
            return super().fit(parameters, config)

    app = ClientApp(
        client_fn=lambda context: DropsInRound1(context).to_client(), mods=[secaggplus_mod]
    )
    cfg = csv_study.replace(
        rounds=2,
        strategy=StrategyConfig(secure_aggregation=True, validate_updates=False, min_sites=2),
    )

    out = _run(cfg, app)

    round1, round2 = out["history"]
    assert [f["site"] for f in round1["failures"]] == ["gamma"]
    assert set(s for s, ph in round1["sites"].items() if "train" in ph) == {"alpha", "beta"}
    assert round2["failures"] == [] and set(out["final"]["sites"]) == set(cfg.site_names)


@pytest.mark.parametrize(
    ("change", "fix"),
    [
        ({"name": "fedmedian"}, 'strategy.name = "fedavg"'),
        ({"validate_updates": True}, "strategy.validate_updates = false"),
    ],
)
def test_what_secure_aggregation_cannot_combine_with_is_refused(
    csv_study: RunConfig, change: dict, fix: str
) -> None:
    settings = {"secure_aggregation": True, "validate_updates": False, **change}
    with pytest.raises(ConfigError, match=fix):
        csv_study.replace(strategy=StrategyConfig(**settings))


def test_deployed_sites_check_the_plan_and_audit_every_secagg_stage(tmp_path: Path) -> None:
    """Site daemons' mods on the secure app: an unapproved site refuses at setup, the round
    goes on without it, every stage is in every site's audit log, nothing identifying leaves."""
    study = _daemon_study(tmp_path)
    study["sites"] = [{"name": n} for n in ("alpha", "beta", "gamma")]
    study["strategy"] = {"min_sites": 2, "secure_aggregation": True, "validate_updates": False}
    cfg = parse_run_config(study)
    approved = plan_hash(cfg)
    tables = tmp_path / "hospital-files"
    tables.mkdir()
    site_files = [
        _site(tmp_path, "alpha", approved, write_site_csv(tables / "alpha.csv", 80, seed=1)),
        _site(tmp_path, "beta", approved, write_site_csv(tables / "beta.csv", 60, seed=2)),
        # gamma's steward approved another plan and registered no data: refusal on the plan alone
        _site(tmp_path, "gamma", "sha256:" + "1" * 64, None),
    ]
    plan = RunPlan(cfg, new_run_dir(cfg), engine="deployment")
    grid = RecordingGrid(secure_app, len(site_files), plan.to_run_config())
    for context, site_file in zip(grid.contexts.values(), site_files, strict=True):
        context.node_config = {SITE_CONFIG_KEY: str(site_file)}
    TaskIdentity.run_id, TaskIdentity.task_id = RUN_ID, 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    server = Context(RUN_ID, SUPERLINK_NODE_ID, {}, RecordDict(), plan.to_run_config())

    build_server_app(plan)(grid, server)

    metrics = json.loads((plan.run_dir / "metrics.json").read_text())
    assert set(metrics["final"]["sites"]) == {"alpha", "beta"}
    for h in metrics["history"]:  # named with its own reason, in both phases of every round
        assert [(f["site"], f["phase"]) for f in h["failures"]] == [
            ("gamma", "train"),
            ("gamma", "evaluate"),
        ]
        assert all("not approved" in f["reason"] for f in h["failures"])
        assert {s for s, phases in h["sites"].items() if "train" in phases} == {"alpha", "beta"}
    stages = ["setup", "share_keys", "collect_masked_vectors", "unmask"]
    for name in ("alpha", "beta", "gamma"):
        log = AuditLog(tmp_path / "state" / name)
        assert log.verify() == []
        assert {e["plan_hash"] for e in log.entries()} == {approved}
    alpha = AuditLog(tmp_path / "state" / "alpha").entries()
    received = [e for e in alpha if e["direction"] == "received"]
    assert [e.get("secagg_stage", e["message_type"]) for e in received] == 2 * [*stages, "evaluate"]
    assert [e["round"] for e in received] == [1] * 5 + [2] * 5
    masked = [e for e in alpha if e.get("secagg_stage") == "collect_masked_vectors"]
    sent = [e for e in masked if e["direction"] == "sent"]
    assert all(e["update_sha256"].startswith("sha256:") and e["epsilon"] > 0 for e in sent)
    # gamma is asked for setup only (then left out of the round) and for evaluation; it refuses.
    gamma = AuditLog(tmp_path / "state" / "gamma").entries()
    got = [e.get("secagg_stage", e["message_type"]) for e in gamma if e["direction"] == "received"]
    assert got == 2 * ["setup", "evaluate"]
    assert all("not approved" in e["outcome"] for e in gamma if e["direction"] == "sent")
    wire = b"".join(grid.sent)
    for needle in (str(tmp_path).encode(), b"hospital-files", b".csv", b"Traceback"):
        assert needle not in wire, f"{needle!r} left a site"
