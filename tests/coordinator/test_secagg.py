"""SecAgg+ (Flower's legacy workflow): same FedAvg result, local DP composes, dropouts survive."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from opacus.accountants import RDPAccountant
from safetensors.numpy import load_file

from fedmed.config import PrivacyConfig, RunConfig, StrategyConfig, parse_run_config
from fedmed.coordinator import strategies
from fedmed.coordinator.app import build_server_app
from fedmed.errors import ConfigError
from fedmed.privacy.accounting import RDP_ALPHAS, central_epsilon
from fedmed.security.audit import AuditLog
from fedmed.security.policy import plan_hash
from fedmed.site.secure_app import SITE_MODS, SiteClient
from fedmed.site.secure_app import client_app as secure_app
from fedmed.study.plan import RunPlan, new_run_dir
from tests.conftest import write_site_csv
from tests.runtime.test_runtime import _run
from tests.site.test_site_daemon import _run_deployed, _site
from tests.site.test_site_daemon import _study as _daemon_study

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


class DropsInRound1(SiteClient):
    def fit(self, parameters, config):
        # After the key setup, while masked updates are collected: a mid-protocol dropout.
        if int(config["server-round"]) == 1 and self.context.node_config["partition-id"] == 2:
            raise RuntimeError("connection lost")
        return super().fit(parameters, config)


dropping_app = ClientApp(
    client_fn=lambda context: DropsInRound1(context).to_client(), mods=SITE_MODS
)


def test_a_site_dropping_out_mid_protocol_is_survived_and_named(csv_study: RunConfig) -> None:
    app = dropping_app
    cfg = csv_study.replace(
        rounds=2,
        strategy=StrategyConfig(secure_aggregation=True, validate_updates=False, min_sites=2),
    )

    out = _run(cfg, app)

    round1, round2 = out["history"]
    assert [f["site"] for f in round1["failures"]] == ["gamma"]
    assert set(s for s, ph in round1["sites"].items() if "train" in ph) == {"alpha", "beta"}
    assert round2["failures"] == [] and set(out["final"]["sites"]) == set(cfg.site_names)


class LiesInRound1(SiteClient):
    def fit(self, parameters, config):
        # gamma's round-1 reply: a poisoned update, and metrics the coordinator cannot believe.
        arrays, rows, metrics = super().fit(parameters, config)
        if int(config["server-round"]) == 1 and self.context.node_config["partition-id"] == 2:
            return [a + 5.0 for a in arrays], rows, {**metrics, "loss": float("nan")}
        return arrays, rows, metrics


lying_app = ClientApp(client_fn=lambda context: LiesInRound1(context).to_client(), mods=SITE_MODS)


def test_a_rejected_reply_is_left_out_of_the_masked_sum(csv_study: RunConfig) -> None:
    """Judged before the sum is unmasked, a rejected site is a dropout: its update is not in it.

    The run must end exactly where a run ends in which gamma dropped out of round 1 (only
    SecAgg+'s stochastic quantization separates the two), not 5/3 higher per weight.
    """
    cfg = csv_study.replace(
        rounds=2,
        strategy=StrategyConfig(secure_aggregation=True, validate_updates=False, min_sites=2),
    )

    lied = _run(cfg, lying_app)
    dropped = _run(cfg, dropping_app)

    round1 = lied["history"][0]
    assert [(f["site"], f["phase"]) for f in round1["failures"]] == [("gamma", "train")]
    assert "reply rejected: 'loss' is NaN" in round1["failures"][0]["reason"]
    assert lied["history"][1]["failures"] == []
    a = load_file(f"{lied['_dir']}/model.safetensors")
    b = load_file(f"{dropped['_dir']}/model.safetensors")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-4)


def test_below_min_sites_the_round_is_lost_and_every_site_named(csv_study: RunConfig) -> None:
    # min_sites = 0: all 3 must complete (reconstruction threshold 3); gamma drops in round 1.
    cfg = csv_study.replace(rounds=2, strategy=SECURE)

    out = _run(cfg, dropping_app)

    round1, round2 = out["history"]
    train = {f["site"]: f["reason"] for f in round1["failures"] if f["phase"] == "train"}
    assert set(train) == {"alpha", "beta", "gamma"}
    assert "site failed" in train["gamma"]  # its own (wire-safe) reason
    assert all("secure round lost" in train[s] for s in ("alpha", "beta"))
    assert not any("train" in phases for phases in round1["sites"].values())
    # The next round starts the protocol afresh and all three aggregate.
    assert round2["failures"] == []
    assert {s for s, phases in round2["sites"].items() if "train" in phases} == set(cfg.site_names)


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
    # Local DP-SGD and central DP (clipped at the site under the policy and audit mods) at once.
    study["privacy"] = {**study["privacy"], "central": "client-side", "central_clipping_norm": 0.5}
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

    grid, metrics, _ = _run_deployed(cfg, site_files, secure_app)

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
    assert 0 < metrics["history"][0]["central_epsilon"] < metrics["history"][1]["central_epsilon"]
    wire = b"".join(grid.sent)
    for needle in (str(tmp_path).encode(), b"hospital-files", b".csv", b"Traceback"):
        assert needle not in wire, f"{needle!r} left a site"


# -- central DP: clipped at the sites before masking, noised by the coordinator ---------------


def _secure_central(cfg: RunConfig, sigma: float, norm: float, rounds: int) -> RunConfig:
    return cfg.replace(
        rounds=rounds,
        strategy=StrategyConfig(secure_aggregation=True, validate_updates=False, min_sites=2),
        privacy=PrivacyConfig(
            central="client-side", central_noise_multiplier=sigma, central_clipping_norm=norm
        ),
    )


def _record_noise(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float, int]]:
    """Replace the coordinator's noise by nothing (noise multiplier 0), recording each call."""
    calls: list[tuple[float, float, int]] = []

    def no_noise(parameters, sigma: float, clipping_norm: float, sites: int):
        calls.append((sigma, clipping_norm, sites))
        return parameters

    monkeypatch.setattr(strategies, "add_noise", no_noise)
    return calls


NORM = 0.02  # below every site's update norm in round 1 (0.08-0.21): all are clipped


def test_without_noise_the_aggregate_is_the_mean_of_the_sites_clipped_updates(
    csv_study: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmed.runtime.run import preflight
    from fedmed.site.app import local_round
    from fedmed.study.plan import initial_model

    cfg, _ = preflight(_secure_central(csv_study, sigma=1.0, norm=NORM, rounds=1))
    calls = _record_noise(monkeypatch)
    # What each site trains from the initial model, computed here, independently of SecAgg+.
    start = initial_model(RunPlan(cfg, Path(cfg.output_dir))).state_dict()
    updates = []
    for i in range(len(cfg.sites)):
        context = Context(0, i, {"partition-id": i}, RecordDict(), {})
        _, local, _ = local_round(cfg.to_json(), context, start, {"server-round": 1})
        updates.append({k: (v - start[k]).numpy() for k, v in local.items()})

    out = _run(cfg, secure_app)

    assert calls == [(1.0, NORM, 3)]  # noise for a mean of 3 updates clipped to NORM
    final = load_file(f"{out['_dir']}/model.safetensors")
    clipped = []
    for update in updates:
        norm = np.sqrt(sum(float(np.sum(u**2)) for u in update.values()))
        clipped.append({k: u * min(1.0, NORM / norm) for k, u in update.items()})
    for key in final:
        expected = start[key].numpy() + np.mean([c[key] for c in clipped], axis=0)
        np.testing.assert_allclose(final[key], expected, atol=1e-4)
    # The clipping was real: every update was longer than the norm, the plain mean differs.
    norms = [np.sqrt(sum(float(np.sum(u**2)) for u in up.values())) for up in updates]
    assert min(norms) > 2 * NORM, norms
    key = "linear.weight" if "linear.weight" in final else next(iter(final))
    plain = start[key].numpy() + np.mean([u[key] for u in updates], axis=0)
    assert np.abs(final[key] - plain).max() > 1e-3


def test_secure_central_dp_accounts_epsilon_as_plain_central_dp(csv_study: RunConfig) -> None:
    cfg = _secure_central(csv_study, sigma=0.8, norm=0.5, rounds=2)

    out = _run(cfg, secure_app)

    reference = RDPAccountant()
    for h in out["history"]:
        reference.step(noise_multiplier=0.8, sample_rate=1.0)
        expected = reference.get_epsilon(delta=cfg.privacy.delta, alphas=RDP_ALPHAS)
        assert h["central_epsilon"] == pytest.approx(expected)
        assert h["central_epsilon"] == pytest.approx(central_epsilon(cfg, h["round"]))
    assert out["final"]["central_epsilon"] == out["history"][-1]["central_epsilon"]
    assert set(out["final"]["sites"]) == set(cfg.site_names)


def test_noise_is_scaled_to_the_sites_left_after_a_dropout(
    csv_study: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record_noise(monkeypatch)

    out = _run(_secure_central(csv_study, sigma=1.0, norm=0.5, rounds=2), dropping_app)

    # Round 1 aggregates 2 clipped updates (gamma dropped): std sigma*C/2, not Flower's /3.
    assert calls == [(1.0, 0.5, 2), (1.0, 0.5, 3)]
    assert [f["site"] for f in out["history"][0]["failures"]] == ["gamma"]


def test_server_side_clipping_is_refused_with_secure_aggregation(csv_study: RunConfig) -> None:
    with pytest.raises(ConfigError, match="never sees an individual update"):
        csv_study.replace(strategy=SECURE, privacy=PrivacyConfig(central="server-side"))


# -- resume ------------------------------------------------------------------------------------


def test_a_killed_secure_run_resumes_from_its_last_round(csv_study: RunConfig) -> None:
    from fedmed.coordinator.checkpoint import load_checkpoint
    from fedmed.runtime.inprocess import run_inprocess
    from fedmed.runtime.run import preflight
    from tests.coordinator.test_checkpoint import Killed, _kill_after

    cfg, _ = preflight(csv_study.replace(strategy=SECURE))  # 3 rounds
    reference = _run(cfg, secure_app)
    run_dir = new_run_dir(cfg)

    def run(plan: RunPlan, on_round=None) -> None:
        server = build_server_app(plan, on_round)
        run_inprocess(server, secure_app, len(cfg.sites), plan.to_run_config())

    with pytest.raises(Killed):
        run(RunPlan(cfg, run_dir), _kill_after(1))
    assert load_checkpoint(run_dir, cfg).round == 1
    resumed_rounds: list[int] = []
    run(RunPlan(cfg, run_dir, resume=True), lambda rnd, _: resumed_rounds.append(rnd))

    assert resumed_rounds == [2, 3]  # only the remaining rounds, with their true numbers
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert [h["round"] for h in resumed["history"]] == [1, 2, 3]
    # SecAgg+ rounds stochastically when it quantizes: equal up to that, not bit for bit. A
    # site's masked vector is (rows / max_weight 1000) x its parameters on 2^22 levels over
    # [-8, 8], so one round's error per parameter is up to ~4e-6 x 1000 / rows (5e-5 to 1e-4 for
    # these 40-84-row train splits), and it carries through later rounds: compare at 1e-3.
    for site, metrics in reference["final"]["sites"].items():
        assert resumed["final"]["sites"][site]["loss"] == pytest.approx(metrics["loss"], abs=1e-3)
    a = load_file(f"{reference['_dir']}/model.safetensors")
    b = load_file(run_dir / "model.safetensors")
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-3)
