"""DP accounting: our ε is Opacus' own RDP accountant on the true step history, across rounds."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from fedmed.config import PrivacyConfig, RunConfig
from fedmed.privacy.accounting import RDP_ALPHAS, epsilon_spent, merge_history, plan_for_site
from fedmed.privacy.dpsgd import train_private
from fedmed.tasks import get_task, load_site_data


def _site(cfg: RunConfig, index: int = 0):
    return load_site_data(cfg, cfg.sites[index])


def test_epsilon_matches_an_independent_rdp_accountant(demo_config: RunConfig) -> None:
    data = _site(demo_config)
    task = get_task(demo_config.task)
    model = task.build_model(data.x_train.shape[1], demo_config.model)
    history: list = []
    for rnd in range(1, demo_config.rounds + 1):
        _, entries = train_private(
            model,
            data.x_train,
            data.y_train,
            task,
            demo_config,
            seed=rnd,
            device=torch.device("cpu"),
        )
        history += entries

    plan = plan_for_site(data.n_train, demo_config)
    reference = RDPAccountant()
    for _ in range(plan.steps_per_round * demo_config.rounds):  # step by step, no merging
        reference.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    expected = reference.get_epsilon(delta=demo_config.privacy.delta, alphas=RDP_ALPHAS)

    assert epsilon_spent(history, demo_config.privacy) == expected
    assert sum(n for _, _, n in history) == plan.steps_per_round * demo_config.rounds


def test_noise_is_calibrated_for_the_whole_study_not_one_round(demo_config: RunConfig) -> None:
    demo_config = demo_config.replace(rounds=10)
    data = _site(demo_config)
    plan = plan_for_site(data.n_train, demo_config)
    full = [(plan.noise_multiplier, plan.sample_rate, plan.planned_steps)]
    one_round = [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)]

    # The whole study lands on the target (from below), one round spends only part of it.
    assert epsilon_spent(full, demo_config.privacy) <= demo_config.privacy.target_epsilon + 1e-6
    assert epsilon_spent(full, demo_config.privacy) > 0.95 * demo_config.privacy.target_epsilon
    assert epsilon_spent(one_round, demo_config.privacy) < 0.6 * demo_config.privacy.target_epsilon


def test_more_rounds_means_more_noise(demo_config: RunConfig) -> None:
    n = _site(demo_config).n_train
    short = plan_for_site(n, demo_config)
    long = plan_for_site(n, demo_config.replace(rounds=demo_config.rounds * 10))

    assert long.noise_multiplier > short.noise_multiplier


def test_epsilon_never_decreases_across_rounds(demo_config: RunConfig) -> None:
    cfg = demo_config.replace(rounds=4)
    data = _site(cfg, 1)
    task = get_task(cfg.task)
    model = task.build_model(data.x_train.shape[1], cfg.model)
    history: list = []
    spent = []
    for rnd in range(1, cfg.rounds + 1):
        _, entries = train_private(
            model,
            data.x_train,
            data.y_train,
            task,
            cfg,
            seed=rnd,
            device=torch.device("cpu"),
        )
        history += entries
        spent.append(epsilon_spent(history, cfg.privacy))

    assert all(b > a for a, b in itertools.pairwise(spent))
    assert spent[-1] <= cfg.privacy.target_epsilon + 1e-6


def test_private_training_keeps_original_keys_and_changes_weights(demo_config: RunConfig) -> None:
    data = _site(demo_config)
    task = get_task(demo_config.task)
    model = task.build_model(data.x_train.shape[1], demo_config.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    train_private(
        model,
        data.x_train,
        data.y_train,
        task,
        demo_config,
        seed=0,
        device=torch.device("cpu"),
    )

    after = model.state_dict()
    assert set(after) == set(before)  # no "_module." prefix leaks out
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_merge_history_only_merges_identical_mechanisms() -> None:
    merged = merge_history([(1.0, 0.1, 5), (1.0, 0.1, 3), (2.0, 0.1, 1), (1.0, 0.1, 2)])

    assert merged == [(1.0, 0.1, 8), (2.0, 0.1, 1), (1.0, 0.1, 2)]
    assert epsilon_spent([], PrivacyConfig()) == 0.0


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
def test_every_grad_sample_mode_trains_and_accounts_the_same(
    demo_config: RunConfig, mode: str
) -> None:
    cfg = demo_config.replace(
        privacy=dataclasses.replace(demo_config.privacy, grad_sample_mode=mode)
    )
    data = _site(cfg, 2)
    task = get_task(cfg.task)
    model = task.build_model(data.x_train.shape[1], cfg.model)

    result, entries = train_private(
        model, data.x_train, data.y_train, task, cfg, seed=3, device=torch.device("cpu")
    )

    plan = plan_for_site(data.n_train, cfg)
    assert entries == [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.steps == plan.steps_per_round


def test_prv_accountant_matches_opacus() -> None:
    from opacus.accountants import PRVAccountant

    privacy = PrivacyConfig(enabled=True, accountant="prv", delta=1e-5)
    reference = PRVAccountant()
    for _ in range(200):
        reference.step(noise_multiplier=1.1, sample_rate=0.05)

    assert epsilon_spent([(1.1, 0.05, 200)], privacy) == pytest.approx(
        reference.get_epsilon(delta=1e-5), rel=1e-6
    )


def test_expanded_weights_on_an_empty_poisson_batch_is_a_clear_error(
    demo_config: RunConfig,
) -> None:
    from fedmed.config import TrainConfig
    from fedmed.errors import ConfigError

    cfg = demo_config.replace(
        train=TrainConfig(local_steps=60, batch_size=1, lr=0.1),
        privacy=dataclasses.replace(demo_config.privacy, grad_sample_mode="ew"),
    )
    data = _site(cfg, 2)
    task = get_task(cfg.task)
    model = task.build_model(data.x_train.shape[1], cfg.model)

    with pytest.raises(ConfigError, match="use 'hooks'"):
        train_private(
            model,
            data.x_train[:10],
            data.y_train[:10],
            task,
            cfg,
            seed=1,
            device=torch.device("cpu"),
        )


def test_noise_calibration_is_shared_through_the_disk_cache(tmp_path, monkeypatch) -> None:
    """Forked site children start with empty memory: the second one reads the first's result."""
    from fedmed.config import PrivacyConfig
    from fedmed.privacy.accounting import CACHE_ENV, _calibrate, _noise_for

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    privacy = PrivacyConfig(enabled=True, target_epsilon=2.5)
    _noise_for.cache_clear()
    first = _noise_for(privacy, 0.1, 120)
    assert (tmp_path / "noise.json").is_file()
    assert first == _calibrate(privacy, 0.1, 120)
    _noise_for.cache_clear()
    monkeypatch.setattr(
        "fedmed.privacy.accounting._calibrate", lambda *a: pytest.fail("recomputed")
    )
    assert _noise_for(privacy, 0.1, 120) == first
    _noise_for.cache_clear()


def test_epsilon_is_never_negative_even_at_a_large_delta() -> None:
    # Strong noise at δ = 0.3: Opacus' RDP conversion gives ε ≈ -0.37; ε >= 0 by definition.

    history = [(5.0, 0.01, 10)]
    large = PrivacyConfig(enabled=True, delta=0.3)
    small = PrivacyConfig(enabled=True, delta=1e-5)

    assert epsilon_spent(history, large) == 0.0
    assert epsilon_spent(history, small) > 0.0


def test_a_site_delta_defaults_to_one_over_its_rows_and_refuses_a_larger_plan_delta() -> None:
    from fedmed.errors import PolicyViolation
    from fedmed.privacy.accounting import at_site_delta, site_delta

    assert site_delta(None, 1_000) == 1e-5
    assert site_delta(None, 50) == 1e-5
    assert site_delta(None, 10**7) == 1e-7
    assert site_delta(1e-9, 50) == 1e-9
    strict = PrivacyConfig(enabled=True, delta=1e-7)
    assert at_site_delta(strict, 1e-5).delta == 1e-5  # accounted at the site's δ
    plan = PrivacyConfig(enabled=True, delta=1e-5)
    with pytest.raises(PolicyViolation, match="privacy.delta=1e-05"):
        at_site_delta(plan, 1e-6)


def _opacus_epsilon(history: list, delta: float) -> float:
    """Opacus' own RDP accountant over the whole (merged) history, recomputed from scratch."""
    reference = RDPAccountant()
    reference.history = merge_history(history)
    return reference.get_epsilon(delta=delta, alphas=RDP_ALPHAS)


def test_composed_rdp_gives_opacus_full_recomputation_at_every_step_of_a_varied_history() -> None:
    """ε from cached per-(noise, rate) curves, as a ledger grows entry by entry, against Opacus
    recomputing every entry from scratch: another noise, rate, size, the same mechanism again
    after another one, full-batch (q = 1) central-DP rounds, an empty round."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from fedmed.privacy.accounting import compose_rdp, rdp_curve

    rdp_curve.cache_clear()  # this test's first query computes the curves it later reuses
    history = [
        (1.1, 0.05, 20),
        (1.1, 0.05, 20),  # merged with the entry before
        (0.8, 0.2, 3),
        (1.1, 0.05, 7),  # the first mechanism again, not adjacent: its own entry
        (2.5, 1.0, 4),
        (0.9, 1 / 3, 0),
        (4.0, 0.01, 1000),
        (0.8, 0.2, 11),
    ]
    deltas = (1e-5, 1e-7)
    for end in range(1, len(history) + 1):
        prefix = history[:end]
        full = sum(
            compute_rdp(q=q, noise_multiplier=s, steps=n, orders=RDP_ALPHAS)
            for s, q, n in merge_history(prefix)
        )

        assert np.array_equal(compose_rdp(prefix), full)  # the same operations, bit for bit
        for delta in deltas:
            expected, _ = get_privacy_spent(orders=RDP_ALPHAS, rdp=full, delta=delta)
            privacy = PrivacyConfig(enabled=True, delta=delta)
            assert epsilon_spent(prefix, privacy) == pytest.approx(float(expected), rel=1e-9)
    for delta in deltas:  # and the whole history through Opacus' accountant object itself
        privacy = PrivacyConfig(enabled=True, delta=delta)
        assert epsilon_spent(history, privacy) == pytest.approx(
            _opacus_epsilon(history, delta), rel=1e-9
        )
    assert rdp_curve.cache_info().misses == 5  # one curve per distinct (noise, rate), ever


def test_a_cached_rdp_curve_cannot_be_changed_by_a_caller() -> None:
    from fedmed.privacy.accounting import rdp_curve

    curve = rdp_curve(1.3, 0.07)

    with pytest.raises(ValueError, match="read-only"):
        curve[0] = 0.0  # every later ε of every site would be wrong


def test_sites_that_differ_only_in_what_calibration_ignores_share_one_calibration(
    demo_config: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmed.privacy import accounting

    calls: list[tuple] = []
    calibrate = accounting._calibrate
    monkeypatch.setattr(
        accounting, "_calibrate", lambda *args: calls.append(args) or calibrate(*args)
    )
    accounting._noise_for.cache_clear()
    clipped = dataclasses.replace(
        demo_config.privacy, max_grad_norm=0.5, grad_sample_mode="functorch"
    )
    other = dataclasses.replace(demo_config.privacy, target_epsilon=2.0)

    first = plan_for_site(100, demo_config)
    same = plan_for_site(100, demo_config.replace(privacy=clipped))
    different = plan_for_site(100, demo_config.replace(privacy=other))
    accounting._noise_for.cache_clear()

    assert same == first and len(calls) == 2  # clipping norm and grad mode: no new search
    assert different.noise_multiplier > first.noise_multiplier  # a smaller ε: more noise
