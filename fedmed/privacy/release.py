"""What of a site's descriptive counts may leave it: Gaussian noise, then small-cell suppression.

A site's statistics release (fedmed.data.summary) is a set of count vectors. Before it is sent:

1. Optional Gaussian noise (the site's ``statistics_epsilon``): every count gets N(0, σ²) with
   σ = z · Δ, Δ the release's L2 sensitivity (``data.summary.sensitivity``) and z the noise
   multiplier at which the study's two releases (pass 1 and pass 2) compose to ε at the site's
   δ under RDP: the same accountant DP-SGD uses, so each release is one (z, rate 1, 1 step)
   entry in the site's privacy ledger and composes with training on the same data against
   the same cap. Counts are rounded and clipped at 0 (post-processing: free).
2. Suppression: a count from 1 to ``min_cell`` - 1 becomes None. 0 is published (the usual
   small-cell rule, e.g. CMS's "1 to 10"): an empty cell says no patient is there, and
   suppressing zeros would hide nearly every rare category and tail. Then complementary
   suppression: in a vector whose cells add up to a total the receiver can know (a feature's
   missing + value cells add up to the cohort, a histogram to its present values, events to
   the outcome's event count), a single suppressed cell could be recovered by subtraction,
   so the smallest other non-zero cell is suppressed with it.
3. Sums (exact means and sds) are sent only without noise and only for a feature with at least
   ``min_cell`` present values: a sum of unbounded values has no bounded sensitivity, so under
   noise the means and sds are computed from the noisy histograms instead.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from fedmed.config import PrivacyConfig
from fedmed.privacy.accounting import Entry, _noise_for

RELEASES = 2  # pass 1 (coarse cells) and pass 2 (histograms, life table) of one study
NOT_PARTITIONS = ("cohort", "km/at_risk")  # vectors whose cells do not add up to a known total


def noise_multiplier(epsilon: float, delta: float) -> float:
    """z such that ``RELEASES`` Gaussian mechanisms of std z · sensitivity cost ε at δ (RDP)."""
    privacy = PrivacyConfig(enabled=True, target_epsilon=epsilon, delta=delta, accountant="rdp")
    return _noise_for(privacy, 1.0, RELEASES)


def ledger_entry(z: float) -> list[Entry]:
    """One release as the ledger records it: a Gaussian mechanism on every row (rate 1)."""
    return [(z, 1.0, 1)]


def noise_generator(material: str) -> np.random.Generator:
    """The noise of one release, drawn from a seed the site derives (see fedmed.site.stats)."""
    seed = int.from_bytes(hashlib.sha256(material.encode()).digest()[:16], "little")
    return np.random.default_rng(seed)


def add_noise(
    cells: dict[str, list[int]],
    sigma: float,
    rng: np.random.Generator,
    *,
    floor: int | None = 0,
) -> dict[str, list[int]]:
    """Every count plus N(0, sigma²), rounded and clipped at ``floor`` (None: not clipped, for
    counts summed under SecAgg+, where the pooled sum is clipped instead: clipping each site's
    part first would bias the sum upward)."""
    low = -math.inf if floor is None else floor
    return {
        key: [int(max(low, round(c + rng.normal(0.0, sigma)))) for c in values]
        for key, values in cells.items()
    }


def suppress(cells: dict[str, list[int]], min_cell: int) -> dict[str, list[int | None]]:
    """Counts from 1 to ``min_cell`` - 1 as None, with complementary suppression (see above)."""
    out: dict[str, list[int | None]] = {}
    for key, values in cells.items():
        kept: list[int | None] = [None if 0 < c < min_cell else c for c in values]
        if key not in NOT_PARTITIONS and kept.count(None) == 1:
            others = [(c, i) for i, c in enumerate(kept) if c]
            if others:
                kept[min(others)[1]] = None
        out[key] = kept
    return out


def publishable_sums(
    sums: dict[str, list[float]], first: dict[str, list[int | None]], min_cell: int, noisy: bool
) -> dict[str, list[float] | None]:
    """Each feature's [sum, sum of squares], or None: under noise, or unless pass 1 published
    both the cohort and the feature's missing count (``first``: pass 1 as this site sent it)
    with at least ``min_cell`` values present. The receiver divides by cohort - missing, so a
    sum never discloses a count that pass 1 suppressed."""
    if noisy or not sums:
        return dict.fromkeys(sums)
    out: dict[str, list[float] | None] = {}
    cohort = first["cohort"][0]
    for name, pair in sums.items():
        missing = first[f"feature/{name}"][0]
        shown = cohort is not None and missing is not None and cohort - missing >= min_cell
        out[name] = [float(v) for v in pair] if shown else None
    return out
