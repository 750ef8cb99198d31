"""BreastMNIST across 3 simulated hospitals: federated CNN vs pooled and local, with and
without DP-SGD, per-site ROC-AUC and accuracy.

Why: the imaging task claims a GroupNorm CNN federates and trains privately. This puts FedAvg
(plain and with DP-SGD at every site, ε = 8 for the whole study) next to pooled (one model on
the union of the sites' train splits) and local (each site alone) on the same per-site test
splits of simulations/breastmnist.toml (780 images, Dirichlet size/label skew, 3 sites).

Run from the repository root (FEDMED_DATA_DIR pointing at the shared datasets):
    python benchmarks/imaging_breastmnist.py              # 3 seeds
    python benchmarks/imaging_breastmnist.py --quick      # 1 seed, a smoke test
Results: benchmarks/results/imaging_breastmnist.json.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from _classification import Variant, run_benchmark

CONFIG = "breastmnist"
DEFAULT_SEEDS = (42, 43, 44)
RESULTS = Path(__file__).resolve().parent / "results" / "imaging_breastmnist.json"
DP = ("privacy.enabled=true", "privacy.target_epsilon=8.0")

VARIANTS = (
    Variant("pooled", "Pooled (CNN)", "pooled"),
    Variant("fedavg", "FedAvg (CNN)", "federated"),
    Variant("local", "Local (CNN, each site alone)", "local"),
    Variant("fedavg_dp", "FedAvg + DP-SGD (ε = 8 per site)", "federated", DP),
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--quick", action="store_true", help="one seed (the first), smoke test")
    parser.add_argument("--variants", nargs="+", default=[v.key for v in VARIANTS])
    parser.add_argument("--runs-dir", type=Path, default=Path(tempfile.gettempdir()) / "bm_runs")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    run_benchmark(
        title="BreastMNIST across 3 simulated sites (imaging, CNN)",
        config=CONFIG,
        variants=tuple(v for v in VARIANTS if v.key in args.variants),
        seeds=args.seeds[:1] if args.quick else args.seeds,
        runs_dir=args.runs_dir,
        output=args.output,
        command=shlex.join(["python", "benchmarks/imaging_breastmnist.py", *argv]),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
