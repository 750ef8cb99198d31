"""PhysioNet 2012 set A by ICU type: federated GRU vs pooled and local in-hospital-mortality
AUROC, with and without DP-SGD (Opacus DPGRU).

Why: the sequence task claims a GRU on irregular ICU time series federates across units that
differ in case mix (cardiac surgery recovery: 4.9 % mortality; medical ICU: 18.6 %) and trains
privately. simulations/physionet2012.toml: 4 sites = the 4 ICU types, hourly bins over 48 h
with masks and time since last observation; per-site AUROC on each site's own 30 % test split.
Published centralized reference on set A: GRU-D 0.842 AUROC (Che et al. 2018).

Run from the repository root (FEDMED_DATA_DIR pointing at the shared datasets):
    OMP_NUM_THREADS=1 python benchmarks/sequence_physionet.py          # 3 seeds
    python benchmarks/sequence_physionet.py --quick                    # 1 seed
Results: benchmarks/results/sequence_physionet.json.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from _classification import Variant, cli_main

CONFIG = "physionet2012"
DEFAULT_SEEDS = (42, 43, 44)
RESULTS = Path(__file__).resolve().parent / "results" / "sequence_physionet.json"
DP = ("privacy.enabled=true", "privacy.target_epsilon=8.0")

VARIANTS = (
    Variant("pooled", "Pooled (GRU)", "pooled"),
    Variant("fedavg", "FedAvg (GRU)", "federated"),
    Variant(
        "fedadam",
        "FedAdam (GRU, server lr 0.01)",
        "federated",
        ("strategy.name=fedadam", "strategy.server_lr=0.01"),
    ),
    Variant("local", "Local (GRU, each ICU alone)", "local"),
    Variant("fedavg_dp", "FedAvg + DP-SGD (DPGRU, ε = 8 per site)", "federated", DP),
    Variant("pooled_dp", "Pooled + DP-SGD (DPGRU, ε = 8)", "pooled", DP),
)


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(
        argv,
        script="benchmarks/sequence_physionet.py",
        title="PhysioNet 2012 set A by ICU type (sequence, GRU, in-hospital death)",
        config=CONFIG,
        variants=VARIANTS,
        seeds=DEFAULT_SEEDS,
        output=RESULTS,
    )


if __name__ == "__main__":
    sys.exit(main())
