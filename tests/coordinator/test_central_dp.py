"""Central DP through Flower's fixed-clipping wrappers, with the site-level ε accounted."""

from __future__ import annotations

import pytest
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from opacus.accountants import RDPAccountant

from fedmed.config import PrivacyConfig, RunConfig
from fedmed.coordinator.strategies import build_strategy
from fedmed.privacy.accounting import RDP_ALPHAS, central_epsilon
from tests.runtime.test_runtime import _run


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


@pytest.mark.usefixtures("task_identity")  # hand-built Messages read it
@pytest.mark.parametrize("side", ["client-side", "server-side"])
def test_central_dp_averages_sites_without_weights(csv_study: RunConfig, side: str) -> None:
    """The noise z*C/n covers an UNWEIGHTED mean: a site with 100x the rows must not outweigh."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    strategy = build_strategy(_central(csv_study, side, sigma=1e-12))
    start = np.zeros(4, dtype=np.float32)
    if side == "server-side":  # clips reply - start; configure_train would have stored it
        strategy.current_arrays = ArrayRecord({"w": Array(start)})
    sites = {"big": (0.2, 1000), "small": (-0.2, 10)}  # update per coordinate, train rows
    replies = []
    for node, (name, (step, rows)) in enumerate(sites.items(), start=1):
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(start + np.float32(step))}),
                "metrics": MetricRecord({"num-examples": rows}),
                "site": ConfigRecord({"name": name}),
            }
        )
        ask = Message(RecordDict(), dst_node_id=node, message_type="train")
        replies.append(Message(content, reply_to=ask))

    arrays, _ = strategy.aggregate_train(1, replies)

    # Weighted by rows the mean would be +0.196 per coordinate; unweighted, the updates cancel.
    np.testing.assert_allclose(arrays["w"].numpy(), 0.0, atol=1e-6)
    assert replies[0].content["metrics"]["num-examples"] == 1000  # reports keep the real rows


@pytest.mark.usefixtures("task_identity")  # hand-built Messages read it
@pytest.mark.parametrize("side", ["client-side", "server-side"])
def test_a_silent_site_does_not_thin_the_noise(csv_study: RunConfig, side: str) -> None:
    """Two of three sites reply: the mean of 2 clipped updates needs noise σ·C/2, not σ·C/3.

    With σ·C/3 on a 2-site mean the real noise multiplier is 2σ/3, so the reported ε (at σ)
    would understate the privacy loss. Measured on 200,000 coordinates of noise alone.
    """
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    strategy = build_strategy(_central(csv_study, side, sigma=1.0))  # C = 0.5, 3 sites
    start = np.zeros(200_000, dtype=np.float32)
    if side == "server-side":
        strategy.current_arrays = ArrayRecord({"w": Array(start)})
    replies = []
    for node, name in enumerate(("alpha", "beta"), start=1):  # gamma stays silent
        content = RecordDict(
            {
                # A small update (Flower's clipping divides by its norm, so never exactly zero).
                "arrays": ArrayRecord({"w": Array(start + np.float32(1e-4))}),
                "metrics": MetricRecord({"num-examples": 50}),
                "site": ConfigRecord({"name": name}),
            }
        )
        ask = Message(RecordDict(), dst_node_id=node, message_type="train")
        replies.append(Message(content, reply_to=ask))

    arrays, _ = strategy.aggregate_train(1, replies)

    assert float(np.std(arrays["w"].numpy())) == pytest.approx(1.0 * 0.5 / 2, rel=0.02)
    assert strategy.num_sampled_clients == 3  # the next round samples every site again
