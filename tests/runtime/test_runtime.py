"""The Flower apps end to end in-process: rounds, per-site metrics, failures, outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmed.config import RunConfig, StrategyConfig
from fedmed.coordinator.app import build_server_app
from fedmed.runtime.inprocess import run_inprocess
from fedmed.site.app import app as client_app
from fedmed.study.plan import RunPlan, new_run_dir


def _run(cfg: RunConfig, app: ClientApp = client_app, serving: str = "") -> dict:
    from fedmed.runtime.run import preflight

    cfg, _ = preflight(cfg)
    plan = RunPlan(cfg, new_run_dir(cfg), serving=serving)
    run_inprocess(build_server_app(plan), app, len(cfg.sites), plan.to_run_config())
    return json.loads((plan.run_dir / "metrics.json").read_text()) | {"_dir": str(plan.run_dir)}


def test_federated_dp_run_reports_every_site_every_round(demo_config: RunConfig) -> None:
    out = _run(demo_config)

    assert [h["round"] for h in out["history"]] == [1, 2]
    final = out["final"]
    assert set(final["sites"]) == set(demo_config.site_names)
    for site in final["sites"].values():
        assert 0.0 <= site["accuracy"] <= 1.0
        assert 0.0 < site["epsilon"] <= demo_config.privacy.target_epsilon + 1e-6
    mean = sum(s["accuracy"] for s in final["sites"].values()) / len(final["sites"])
    assert final["average"]["accuracy"] == pytest.approx(mean)
    run_dir = Path(out["_dir"])
    for name in ("metrics.csv", "metrics.png", "model.safetensors", "model.card.json"):
        assert (run_dir / name).stat().st_size > 0


def test_epsilon_grows_per_round_in_the_report(demo_config: RunConfig) -> None:
    out = _run(demo_config.replace(rounds=3))

    for site in demo_config.site_names:
        eps = [h["epsilon"][site] for h in out["history"]]
        assert eps == sorted(eps) and eps[0] < eps[-1]


def test_federated_training_beats_the_initial_model(csv_study: RunConfig) -> None:
    out = _run(csv_study.replace(rounds=5))

    losses = [h["average"]["loss"] for h in out["history"]]
    assert losses[-1] < losses[0]
    assert out["final"]["average"]["accuracy"] > 0.7


def test_a_crashing_site_is_reported_and_the_run_completes(csv_study: RunConfig) -> None:
    cfg = csv_study.replace(strategy=StrategyConfig(min_sites=2))
    broken = ClientApp()

    def crash_gamma(handler):
        def wrapped(msg: Message, context: Context) -> Message:
            if int(context.node_config["partition-id"]) == 2:
                raise RuntimeError("disk on fire")
            return handler(msg, context)

        return wrapped

    from fedmed.site.app import evaluate_global, train

    broken.train()(crash_gamma(train))
    broken.evaluate()(crash_gamma(evaluate_global))

    out = _run(cfg, broken)

    assert out["final"]["missing_sites"] == ["gamma"]
    assert set(out["final"]["sites"]) == {"alpha", "beta"}
    failures = [f for h in out["history"] for f in h["failures"]]
    assert failures and all("disk on fire" not in f["reason"] for f in failures)  # wire-safe
    assert not math.isnan(out["final"]["average"]["accuracy"])


def test_site_errors_are_wire_safe(csv_study: RunConfig, tmp_path: Path) -> None:
    # gamma's file disappears after the coordinator checked it: the site answers with an error
    # that names the site but not the path.
    cfg, _ = __import__("fedmed.runtime.run", fromlist=["preflight"]).preflight(
        csv_study.replace(strategy=StrategyConfig(min_sites=2))
    )
    Path(cfg.sites[2].path).unlink()
    plan = RunPlan(cfg, new_run_dir(cfg))

    run_inprocess(build_server_app(plan), client_app, 3, plan.to_run_config())

    out = json.loads((plan.run_dir / "metrics.json").read_text())
    reasons = [f["reason"] for h in out["history"] for f in h["failures"]]
    assert reasons and all(r.startswith("site 'gamma'") for r in reasons)
    assert all(str(tmp_path) not in r and ".csv" not in r for r in reasons)


def test_live_json_is_written_every_round(demo_config: RunConfig) -> None:
    seen: list[int] = []

    def watch(rnd: int, history) -> None:
        live = json.loads((plan.run_dir / "live.json").read_text())
        assert live["status"] == "running" and live["history"][-1]["round"] == rnd
        seen.append(rnd)

    from fedmed.runtime.run import preflight

    cfg, _ = preflight(demo_config.replace(privacy=demo_config.privacy.__class__()))
    plan = RunPlan(cfg, new_run_dir(cfg))
    run_inprocess(build_server_app(plan, watch), client_app, 4, plan.to_run_config())

    assert seen == [1, 2]
    assert json.loads((plan.run_dir / "live.json").read_text())["status"] == "finished"


def test_run_directories_are_never_reused(demo_config: RunConfig) -> None:
    dirs = [new_run_dir(demo_config) for _ in range(3)]  # same second, same name

    assert len(set(dirs)) == 3 and all(d.is_dir() for d in dirs)
