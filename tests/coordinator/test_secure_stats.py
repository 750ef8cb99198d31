"""Federated statistics under SecAgg+: the pooled counts are exact sums, no site's own leave."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.serde import message_to_proto
from flwr.server.workflow import SecAggPlusWorkflow

from fedmed.config import RunConfig
from fedmed.coordinator import secure_stats
from fedmed.coordinator.stats import POOLED, build_stats_app
from fedmed.data.summary import first_pass, read_site_rows, second_pass
from fedmed.protocol import (
    SECURE_STATS_CLIPPING,
    SECURE_STATS_MAX_SITES,
    SECURE_STATS_MODULUS,
    SECURE_STATS_QUANTIZATION,
    STATS_PASS_KEY,
    STATS_PASSES,
    flatten_counts,
    unflatten_sum,
)
from fedmed.runtime.inprocess import run_inprocess
from fedmed.runtime.run import plan_stats
from fedmed.site.secure_app import SITE_MODS, SiteClient
from fedmed.site.secure_app import client_app as secure_app
from tests.coordinator.test_stats import CANARY, PLANTED, _study

Counts = dict[str, list[int]]


def _secure(tmp_path: Path, **stats: Any) -> RunConfig:
    return _study(tmp_path, {"secure_aggregation": True, **stats})


def _run(cfg: RunConfig, client: Any = secure_app) -> tuple[dict[str, Any], list[Any]]:
    """stats.json of a secure run, and what each masked pass summed (``SecurePass``)."""
    passes: list[Any] = []
    real = secure_stats.secure_pass

    def spy(*args: Any, **kwargs: Any) -> Any:
        passes.append(real(*args, **kwargs))
        return passes[-1]

    plan = plan_stats(cfg)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(secure_stats, "secure_pass", spy)
        run_inprocess(
            build_stats_app(plan), client, len(cfg.sites), plan.to_run_config(), workers=1
        )
    return json.loads((plan.run_dir / "stats.json").read_text()), passes


def _clear_counts(cfg: RunConfig, edges: dict[str, Any] | None = None) -> dict[str, Counts]:
    """Each site's own unsuppressed counts of pass 1 (or of pass 2 on ``edges``)."""
    out = {}
    for site in cfg.sites:
        rows = read_site_rows(cfg, site, "binary")
        out[site.name] = first_pass(rows) if edges is None else second_pass(rows, edges, None)[0]
    return out


def _summed(per_site: list[Counts]) -> Counts:
    return {k: [sum(v) for v in zip(*(c[k] for c in per_site), strict=True)] for k in per_site[0]}


def test_the_pooled_counts_under_secagg_are_the_exact_sums_of_the_sites_counts(
    tmp_path: Path,
) -> None:
    cfg = _secure(tmp_path)

    stats, passes = _run(cfg)

    first, second = passes
    assert first.sites == second.sites == ["alpha", "beta", "gamma"]
    assert first.pooled == _summed(list(_clear_counts(cfg).values()))
    edges = {n: f["histogram"]["edges"] for n, f in stats["features"].items() if "histogram" in f}
    assert second.pooled == _summed(list(_clear_counts(cfg, edges).values()))
    assert stats["sites"] == [POOLED]
    assert stats["cohort"]["pooled"] == {"count": 360, "partial": False, "suppressed_sites": 0}
    # The minimum applies to the POOLED cell: alpha's 3 missing blood pressures are 3 pooled.
    assert first.pooled["feature/bp"][0] == PLANTED
    assert stats["features"]["bp"]["missing"]["sites"][POOLED] is None
    assert stats["secure_aggregation"]["min_cell"] == cfg.stats.min_cell
    report = next(Path(cfg.output_dir).glob("*/stats.md")).read_text()
    assert "3 sites summed under SecAgg+ (alpha, beta, gamma)" in report
    assert f"| {POOLED} |" not in report  # its rows would repeat the pooled ones


class Wire:
    """The sites' SecAgg+ ClientApp, keeping every reply's wire bytes: what the coordinator gets."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def __call__(self, msg: Message, context: Context) -> Message:
        reply = secure_app(msg, context)
        self.sent.append(message_to_proto(reply).SerializeToString())
        return reply


def _encodings(vector: list[int]) -> list[bytes]:
    """``vector`` as a site could send it: floats, ints, Flower's quantized (shifted) form."""
    plain = np.asarray(vector)
    out = [plain.astype(dtype).tobytes() for dtype in ("<f8", "<f4", "<i8", "<i4", ">f8")]
    shifted = plain + SECURE_STATS_CLIPPING
    out += [shifted.astype(dtype).tobytes() for dtype in ("<i8", "<i4", "<f8")]
    return [*out, json.dumps(vector).encode(), json.dumps(vector, separators=(",", ":")).encode()]


def test_no_reply_the_coordinator_receives_holds_a_sites_own_counts(tmp_path: Path) -> None:
    cfg = _secure(tmp_path)
    wire = Wire()

    stats, _ = _run(cfg, wire)

    assert stats["cohort"]["pooled"]["count"] == 360  # the run summed what the sites masked
    sent = b"".join(wire.sent)
    for site, counts in _clear_counts(cfg).items():
        # The feature vectors are long and distinctive; alpha's age holds the planted canary.
        for key in ("feature/age", "feature/bp"):
            for needle in _encodings(counts[key]):
                assert needle not in sent, (site, key)
    for packed in (struct.pack("<d", CANARY), repr(CANARY).encode(), b"987654"):
        assert packed not in sent
    # Beside each masked vector, in the clear: the site's name, its ε and its minimum only.
    assert sent.count(b"min-cell") == 2 * len(cfg.sites)


class DropsAfterSharingKeys(SiteClient):
    """gamma loses its connection after the key exchange, before its masked vector is sent."""

    def fit(self, parameters: Any, config: Any) -> Any:
        if self.context.node_config["partition-id"] == 2:
            raise RuntimeError("connection lost")
        return super().fit(parameters, config)


dropping_app = ClientApp(
    client_fn=lambda context: DropsAfterSharingKeys(context).to_client(), mods=SITE_MODS
)


def test_a_site_dropping_out_mid_protocol_is_left_out_of_the_sum_and_named(
    tmp_path: Path,
) -> None:
    cfg = _secure(tmp_path)

    stats, passes = _run(cfg, dropping_app)

    clear = _clear_counts(cfg)
    assert passes[0].sites == ["alpha", "beta"]
    assert passes[0].pooled == _summed([clear["alpha"], clear["beta"]])
    assert stats["cohort"]["pooled"]["count"] == 150 + 120
    assert "gamma" in stats["refused"]
    assert stats["secure_aggregation"]["passes"][STATS_PASSES[1]] == ["alpha", "beta"]


class DropsInPassTwo(SiteClient):
    """gamma answers pass 1 and loses its connection in pass 2."""

    def fit(self, parameters: Any, config: Any) -> Any:
        gamma = self.context.node_config["partition-id"] == 2
        if gamma and config[STATS_PASS_KEY] == STATS_PASSES[1]:
            raise RuntimeError("connection lost")
        return super().fit(parameters, config)


def test_a_pass_summing_other_sites_than_the_first_is_not_unmasked(tmp_path: Path) -> None:
    """Pass 2's histograms add up to what pass 1 counted (present values, the open tails are
    coarse cells): a sum over alpha + beta against pass 1's alpha + beta + gamma would be
    gamma's counts. The coordinator does not unmask it."""
    cfg = _secure(tmp_path)
    app = ClientApp(client_fn=lambda context: DropsInPassTwo(context).to_client(), mods=SITE_MODS)

    stats, passes = _run(cfg, app)

    assert passes[0].sites == ["alpha", "beta", "gamma"]
    assert passes[1].pooled is None and passes[1].sites == []
    assert stats["cohort"]["pooled"]["count"] == 360  # pass 1 is reported
    assert all(
        "histogram" not in f or not f["histogram"]["pooled"] for f in stats["features"].values()
    )
    assert "not unmasked: gamma in one pass but not the other" in stats["refused"]["alpha"]


def test_the_sites_refuse_to_unmask_it_for_a_coordinator_that_skips_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _secure(tmp_path)
    app = ClientApp(client_fn=lambda context: DropsInPassTwo(context).to_client(), mods=SITE_MODS)
    monkeypatch.setattr(secure_stats._SameSites, "unmask_stage", SecAggPlusWorkflow.unmask_stage)

    stats, passes = _run(cfg, app)

    assert passes[1].pooled is None  # alpha and beta kept their shares: nothing was unmasked
    for site in ("alpha", "beta"):
        assert "only for the sites the first pass summed" in stats["refused"][site]


def test_noise_is_added_by_each_site_before_masking_and_charged_to_its_ledger(
    tmp_path: Path,
) -> None:
    cfg = _secure(tmp_path, epsilon=1.0)

    stats, passes = _run(cfg)

    assert stats["epsilon"] == pytest.approx({s: 1.0 for s in cfg.site_names}, abs=0.02)
    exact = _summed(list(_clear_counts(cfg).values()))
    noisy = passes[0].pooled
    assert noisy != exact
    # Three sites' independent noise of σ = z·Δ each (z ≈ 5.7, Δ ≈ √5): the sum's sd ≈ 22.
    assert abs(noisy["cohort"][0] - 360) < 6 * 22
    assert any(c < 0 for v in noisy.values() for c in v)  # not clipped at the sites
    assert all(c is None or c >= 0 for c in stats["outcome"]["sites"][POOLED])


def test_flowers_quantization_carries_whole_counts_exactly() -> None:
    """Flower's own quantize/dequantize with fedmed's ranges, at the extremes: the largest
    count, the most sites, negative (noisy) counts. Each site's weight is 1 (factor T)."""
    clip, target, modulus = SECURE_STATS_CLIPPING, SECURE_STATS_QUANTIZATION, SECURE_STATS_MODULUS
    rng = np.random.default_rng(0)
    sites = [rng.integers(-clip, clip + 1, 64) for _ in range(SECURE_STATS_MAX_SITES - 1)]
    sites.append(np.array([clip, -clip, 0, 1] * 16))
    quantized = [quantize([s.astype(np.float64)], float(clip), target)[0] for s in sites]
    summed = sum(q.astype(np.int64) for q in quantized) % modulus
    total = dequantize([summed], float(clip), target)[0] - (len(sites) - 1) * clip
    mean = total * (target / (len(sites) * target))  # Flower's unmask step, weight 1 each

    pooled = unflatten_sum(mean, len(sites), {"x": 64})

    assert pooled["x"] == np.sum(sites, axis=0).tolist()
    assert max(int(q.max()) for q in quantized) <= target < 2**31  # fits Flower's int32 step
    assert len(sites) * target < modulus  # the shifted sum never wraps


def test_a_count_the_lattice_cannot_carry_is_refused_not_clipped() -> None:
    layout = json.dumps({"a": 2})

    assert flatten_counts({"a": [SECURE_STATS_CLIPPING, 0]}, layout).tolist() == [
        SECURE_STATS_CLIPPING,
        0,
    ]
    with pytest.raises(ValueError, match="cannot be summed exactly under SecAgg"):
        flatten_counts({"a": [SECURE_STATS_CLIPPING + 1, 0]}, layout)
    with pytest.raises(ValueError, match="does not count"):
        flatten_counts({"a": [1, 0], "b": [1]}, layout)
    with pytest.raises(ValueError, match="not a vector of whole counts"):
        unflatten_sum(np.array([0.5, 1.0]), 3, {"a": 2})
