"""SecAgg+ (Flower's legacy workflow): same FedAvg result, local DP composes, dropouts survive."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file

from fedmed.config import PrivacyConfig, RunConfig, StrategyConfig
from fedmed.errors import ConfigError
from fedmed.secagg import SiteClient
from fedmed.secagg import client_app as secure_app

from .test_runtime import _run

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
