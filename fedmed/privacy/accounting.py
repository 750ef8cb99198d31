"""Local differential privacy (DP-SGD with Opacus), accounted honestly across the whole study.

Two habits make the ε we print true:
1. The noise is calibrated ONCE for the planned study: every optimizer step of every round at
   its true Poisson sample rate (not "per epoch" while a round runs many epochs).
2. Every round's accountant entries go to the site's ledger (fedmed.ledger) and ε is recomputed
   from the full history; a fresh PrivacyEngine per round is only used for its mechanics, never
   for its (reset) accountant.

Both are cached without ever going stale, since each cached value is a pure function of its key:
the noise multiplier per (target ε, δ, accountant, sample rate, steps), shared by every site with
those numbers; and the RDP curve of ONE step of the sampled Gaussian mechanism per (noise, rate),
from which a history's RDP is composed as Σ steps·curve (what Opacus computes, to the last bit).
A site's history is always read from its verified ledger; only these curves are remembered.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmed.config import PrivacyConfig, RunConfig, cache_dir
from fedmed.errors import ConfigError, PolicyViolation
from fedmed.train import steps_per_round

# Known, documented Opacus/PyTorch notices that would otherwise repeat every round at every site:
# secure_mode needs torchcsprng (see README, "Privacy"); the backward-hook notice is harmless for
# input layers that need no input gradient.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")
# Opacus logs "First batch is empty" whenever Poisson sampling draws no row, which is expected
# at small sample rates (the step still adds noise and is accounted).
logging.getLogger("opacus").setLevel(logging.ERROR)

# Opacus' default RDP orders stop at 63; small-ε studies want larger orders for a tight bound.
RDP_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + list(range(64, 513, 8))

# One accountant entry: (noise multiplier, sample rate, number of steps), as Opacus stores it.
Entry = tuple[float, float, int]


@dataclass(frozen=True)
class DPPlan:
    """How a site with ``n_train`` rows trains privately in every round of this study."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_steps: int


def plan_for_site(n_train: int, cfg: RunConfig) -> DPPlan:
    """Noise for the whole planned study at this site's own sample rate."""
    # Opacus' Poisson loader samples each row with q = 1 / (batches per epoch); calibrate and
    # account at exactly that rate.
    q = 1.0 / math.ceil(n_train / cfg.train.batch_size)
    steps = steps_per_round(n_train, cfg.train)
    planned = steps * cfg.rounds
    sigma = _noise_for(calibration_settings(cfg.privacy), q, planned)
    return DPPlan(
        noise_multiplier=sigma, sample_rate=q, steps_per_round=steps, planned_steps=planned
    )


CACHE_ENV = "FEDMED_CACHE_DIR"  # set by the warm site executor: its children share results


def calibration_settings(privacy: PrivacyConfig) -> PrivacyConfig:
    """The settings noise calibration reads (target ε, δ, accountant), the rest at defaults.

    The calibration cache is keyed by this, so studies or sites that differ only in what the
    calibration ignores (clipping norm, grad_sample_mode, central DP) share one calibration.
    """
    return PrivacyConfig(
        enabled=True,
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        accountant=privacy.accountant,
    )


@functools.lru_cache(maxsize=256)
def _noise_for(privacy: PrivacyConfig, sample_rate: float, steps: int) -> float:
    """Calibrated noise; ~1-4 s of RDP search, so also remembered on disk when $FEDMED_CACHE_DIR
    is set (each message of a deployed site runs in a fresh child process, where lru_cache is
    empty). The result is a pure function of its inputs, so a cached value is always valid.
    Callers pass ``calibration_settings(privacy)``: one entry per distinct calibration."""
    cache = cache_dir()
    if not cache:
        return _calibrate(privacy, sample_rate, steps)
    from fedmed.io import file_lock, read_state_json, write_json

    path = Path(cache) / "noise.json"
    key = json.dumps([dataclasses.asdict(privacy), sample_rate, steps], sort_keys=True)
    fmt = "fedmed-noise-cache/1"
    with file_lock(path):
        table = read_state_json(path, fmt, {"format": fmt, "values": {}}, "delete the file")
        if key not in table["values"]:
            table["values"][key] = _calibrate(privacy, sample_rate, steps)
            write_json(path, table)
        return float(table["values"][key])


def _calibrate(privacy: PrivacyConfig, sample_rate: float, steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=privacy.target_epsilon,
                target_delta=privacy.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=privacy.accountant,
                **_accountant_kwargs(privacy),
            )
        )
    except ValueError as exc:
        raise ConfigError(
            f"cannot reach privacy.target_epsilon={privacy.target_epsilon} with "
            f"{steps} steps at sample rate {sample_rate:.3g} ({exc}); raise the target, or "
            "train fewer rounds/steps"
        ) from None


def planned_round(n_train: int, cfg: RunConfig) -> list[Entry]:
    """The accountant entries one round at this site will add (for the budget check)."""
    plan = plan_for_site(n_train, cfg)
    return [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)]


def merge_history(history: list[Entry]) -> list[Entry]:
    """Merge runs of identical (noise, rate) entries: RDP cost grows with entries, not steps."""
    merged: list[Entry] = []
    for sigma, q, n in history:
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1] = (sigma, q, merged[-1][2] + n)
        else:
            merged.append((float(sigma), float(q), int(n)))
    return merged


@functools.lru_cache(maxsize=4096)
def rdp_curve(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one step of the sampled Gaussian mechanism at every order of RDP_ALPHAS (read-only).

    Opacus computes this for every history entry on every ε query (~1 ms per order-series, ~0.1-
    0.3 s per entry); it depends on nothing but (noise, rate), which every round of a site repeats.
    """
    from opacus.accountants.analysis.rdp import compute_rdp

    curve = np.asarray(
        compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ALPHAS),
        dtype=np.float64,
    )
    curve.flags.writeable = False  # shared by every caller: never updated in place
    return curve


def compose_rdp(history: list[Entry]) -> np.ndarray:
    """The RDP vector of ``history`` (merged as Opacus' accountant would hold it), entry by entry.

    Σ steps · rdp_curve(noise, rate) in history order: the same floating-point operations as
    Opacus' ``RDPAccountant.get_privacy_spent`` (``compute_rdp(...) = curve * steps``, summed in
    order), so ε is bit-identical to recomputing every entry from scratch.
    """
    rdp: np.ndarray | int = 0
    for sigma, q, n in merge_history(history):
        rdp = rdp + rdp_curve(sigma, q) * n
    return np.asarray(rdp, dtype=np.float64)


def epsilon_spent(history: list[Entry], privacy: PrivacyConfig) -> float:
    """ε after every step in ``history`` (0 before any private step); never negative or NaN.

    Opacus' RDP-to-(ε, δ) conversion (Balle et al. 2020) subtracts log(1/δ)/(α-1) terms that
    turn negative for a large δ: strong noise at δ = 0.3 gives ε = -0.37. ε >= 0 by definition,
    so the bound is clamped at 0 (sites also refuse δ above their own, at most 1e-5 by default,
    where no order we use can go negative). A NaN ε cannot be trusted, so it is an error.

    RDP histories are composed from cached per-(noise, rate) curves (``compose_rdp``); the PRV
    accountant has no such decomposition and is asked afresh.
    """
    if not history:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha" at large δ
        if privacy.accountant == "rdp":
            from opacus.accountants.analysis.rdp import get_privacy_spent

            eps, _ = get_privacy_spent(
                orders=RDP_ALPHAS, rdp=compose_rdp(history), delta=privacy.delta
            )
            epsilon = float(eps)
        else:
            from opacus.accountants import create_accountant

            accountant = create_accountant(privacy.accountant)
            accountant.history = merge_history(history)
            epsilon = float(
                accountant.get_epsilon(delta=privacy.delta, **_accountant_kwargs(privacy))
            )
    if math.isnan(epsilon):
        raise ConfigError(
            f"the {privacy.accountant} accountant gave no ε at δ={privacy.delta:g}; "
            "use a δ below 1 / training rows (e.g. 1e-5)"
        )
    return max(epsilon, 0.0)


DEFAULT_SITE_DELTA = 1e-5


def site_delta(configured: float | None, n_train: int) -> float:
    """The δ a site accounts at: its own setting, else min(1e-5, 1 / its training rows).

    δ is the chance the guarantee fails outright; above 1/n it could amount to releasing
    one patient's record, which is why the default never exceeds it.
    """
    if configured is not None:
        return configured
    return min(DEFAULT_SITE_DELTA, 1.0 / max(n_train, 1))


def at_site_delta(privacy: PrivacyConfig, delta: float) -> PrivacyConfig:
    """The plan's privacy settings accounted at the site's own ``delta``.

    The plan's noise is calibrated for (target ε, plan δ); stated at a smaller δ its ε would be
    larger than the target, which the site's cap catches. A plan calibrated at a LARGER δ (say
    0.9, where ε looks tiny or even negative) is refused: the δ-bypass.
    """
    if privacy.delta > delta:
        raise PolicyViolation(
            f"the plan calibrates its noise at privacy.delta={privacy.delta:g}, larger than "
            "this site's δ; lower privacy.delta (e.g. 1e-6)"
        )
    return dataclasses.replace(privacy, delta=delta)


def central_epsilon(cfg: RunConfig, rounds: int) -> float:
    """Site-level ε of central DP after ``rounds`` rounds (every site sampled every round).

    Each round releases the clipped mean plus Gaussian noise whose std is the noise multiplier
    times the sensitivity (norm / sites): one Gaussian mechanism per round, composed with RDP.
    """
    if cfg.privacy.central == "off" or rounds == 0:
        return 0.0
    return epsilon_spent([(cfg.privacy.central_noise_multiplier, 1.0, rounds)], cfg.privacy)


def _accountant_kwargs(privacy: PrivacyConfig) -> dict[str, object]:
    return {"alphas": RDP_ALPHAS} if privacy.accountant == "rdp" else {}
