"""BreastMNIST across 3 simulated hospitals: federated CNN vs pooled and local, with and
without DP-SGD, per-site ROC-AUC and accuracy.

Why: the imaging task claims a GroupNorm CNN federates and trains privately. This puts FedAvg
(plain and with DP-SGD at every site, ε = 8 for the whole study) next to pooled (one model on
the union of the sites' train splits) and local (each site alone) on the same per-site test
splits of simulations/breastmnist.toml (780 images, Dirichlet size/label skew, 3 sites).

Run from the repository root (FEDMED_DATA_DIR pointing at the shared datasets):
    python benchmarks/imaging_breastmnist.py              # 3 seeds
    python benchmarks/imaging_breastmnist.py --quick      # 1 seed, a smoke test
    python benchmarks/imaging_breastmnist.py --variants fedavg_40 fedavg_dp_40 \
        --output benchmarks/results/imaging_breastmnist_40rounds.json
    python benchmarks/imaging_breastmnist.py --variants fedavg fedbn fedavg_dp fedbn_dp \
        --output benchmarks/results/imaging_breastmnist_fedbn.json
Results: benchmarks/results/imaging_breastmnist.json.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from _classification import Variant, cli_main

CONFIG = "breastmnist"
DEFAULT_SEEDS = (42, 43, 44)
RESULTS = Path(__file__).resolve().parent / "results" / "imaging_breastmnist.json"
DP = ("privacy.enabled=true", "privacy.target_epsilon=8.0")
FEDBN = "personalize.local_normalization=true"

VARIANTS = (
    Variant("pooled", "Pooled (CNN)", "pooled"),
    Variant("fedavg", "FedAvg (CNN)", "federated"),
    Variant("local", "Local (CNN, each site alone)", "local"),
    Variant("fedavg_dp", "FedAvg + DP-SGD (ε = 8 per site)", "federated", DP),
    # Not in the default set: FedAvg learns more slowly than pooled here (see docs/benchmarks.md).
    Variant("fedavg_40", "FedAvg (CNN), 40 rounds", "federated", ("rounds=40",)),
    Variant("fedavg_dp_40", "FedAvg + DP-SGD (ε = 8), 40 rounds", "federated", ("rounds=40", *DP)),
    # FedBN: each site keeps its GroupNorm layers (fedmed.local_layers); compare with fedavg(_dp).
    Variant("fedbn", "FedAvg + local normalization (FedBN)", "federated", (FEDBN,)),
    Variant("fedbn_dp", "FedAvg + local normalization + DP-SGD (ε = 8)", "federated", (FEDBN, *DP)),
)
DEFAULT_VARIANTS = ("pooled", "fedavg", "local", "fedavg_dp")


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(
        argv,
        script="benchmarks/imaging_breastmnist.py",
        title="BreastMNIST across 3 simulated sites (imaging, CNN)",
        config=CONFIG,
        variants=VARIANTS,
        seeds=DEFAULT_SEEDS,
        output=RESULTS,
        default_variants=DEFAULT_VARIANTS,
    )


if __name__ == "__main__":
    sys.exit(main())
