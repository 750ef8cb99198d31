"""Split one table into simulated hospitals with size skew and label skew.

Real hospitals differ in size and case mix; a uniform random split hides exactly the problems
federated learning has to survive. Each class is spread over the sites with Dirichlet(alpha)
proportions scaled by the sites' target sizes: alpha -> infinity gives the sizes with the global
class mix; alpha ~ 1 gives visibly different positive rates per site.
"""

from __future__ import annotations

import numpy as np

from fedmed.errors import ConfigError

MIN_PER_CLASS = 5


def partition_rows(
    labels: np.ndarray, *, sizes: tuple[float, ...], alpha: float, seed: int
) -> list[np.ndarray]:
    """Row positions per site; every site gets at least MIN_PER_CLASS rows of every class."""
    sizes_arr = np.asarray(sizes, dtype=float)
    if (sizes_arr <= 0).any() or alpha <= 0:
        raise ConfigError("data.partition_sizes and data.dirichlet_alpha must all be > 0")
    sizes_arr = sizes_arr / sizes_arr.sum()
    classes = np.unique(labels)
    n_sites = len(sizes_arr)
    if len(labels) < n_sites * MIN_PER_CLASS * len(classes):
        raise ConfigError(
            f"{len(labels)} rows cannot feed {n_sites} sites with {MIN_PER_CLASS} rows of each "
            "class; use fewer sites"
        )
    rng = np.random.default_rng(seed)
    for _attempt in range(100):
        shards: list[list[int]] = [[] for _ in range(n_sites)]
        for cls in classes:
            rows = rng.permutation(np.flatnonzero(labels == cls))
            share = sizes_arr * rng.dirichlet(np.full(n_sites, alpha))
            counts = _largest_remainder(share / share.sum(), len(rows))
            for site, chunk in enumerate(np.split(rows, np.cumsum(counts)[:-1])):
                shards[site].extend(chunk.tolist())
        if all(
            (np.asarray(labels)[s] == cls).sum() >= MIN_PER_CLASS for s in shards for cls in classes
        ):
            return [np.sort(np.asarray(s, dtype=int)) for s in shards]
    raise ConfigError(
        "could not give every site enough rows of every class; raise data.dirichlet_alpha "
        "or make data.partition_sizes more even"
    )


def _largest_remainder(fractions: np.ndarray, total: int) -> np.ndarray:
    raw = fractions * total
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts))[: total - counts.sum()]:
        counts[i] += 1
    return counts
