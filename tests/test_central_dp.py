"""Central DP through Flower's fixed-clipping wrappers, with the site-level ε accounted."""

from __future__ import annotations

import pytest
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from opacus.accountants import RDPAccountant

from fedmed.config import PrivacyConfig, RunConfig
from fedmed.privacy import RDP_ALPHAS
from fedmed.strategies import build_strategy, central_epsilon

from .test_runtime import _run


def _central(cfg: RunConfig, side: str, sigma: float = 0.8) -> RunConfig:
    return cfg.replace(
        privacy=PrivacyConfig(
            enabled=False,
            central=side,
            central_noise_multiplier=sigma,
            central_clipping_norm=0.5,
            delta=1e-5,
        )
    )


@pytest.mark.parametrize(
    ("side", "wrapper"),
    [
        ("client-side", DifferentialPrivacyClientSideFixedClipping),
        ("server-side", DifferentialPrivacyServerSideFixedClipping),
    ],
)
def test_strategy_is_wrapped(csv_study: RunConfig, side: str, wrapper: type) -> None:
    strategy = build_strategy(_central(csv_study, side))

    assert isinstance(strategy, wrapper)
    assert strategy.clipping_norm == 0.5 and strategy.num_sampled_clients == 3


def test_central_epsilon_matches_opacus_gaussian_composition(csv_study: RunConfig) -> None:
    cfg = _central(csv_study, "client-side", sigma=1.3)
    reference = RDPAccountant()
    for _ in range(7):
        reference.step(noise_multiplier=1.3, sample_rate=1.0)

    assert central_epsilon(cfg, 7) == pytest.approx(
        reference.get_epsilon(delta=1e-5, alphas=RDP_ALPHAS)
    )
    assert central_epsilon(cfg, 0) == 0.0
    assert central_epsilon(csv_study, 7) == 0.0


@pytest.mark.parametrize("side", ["client-side", "server-side"])
def test_central_dp_run_reports_growing_epsilon(csv_study: RunConfig, side: str) -> None:
    out = _run(_central(csv_study, side))

    eps = [h["central_epsilon"] for h in out["history"]]
    assert eps == sorted(eps) and eps[0] > 0
    assert out["final"]["central_epsilon"] == eps[-1]
    assert set(out["final"]["sites"]) == {"alpha", "beta", "gamma"}
