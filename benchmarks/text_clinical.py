"""Medical abstracts across 4 simulated hospitals: the text task federated vs pooled and local,
with and without DP-SGD; per-site macro-F1, accuracy and one-vs-rest ROC-AUC.

Why: issue #19 claims a text classifier federates and trains privately from a vocabulary that
no rare word leaves a site for. This puts FedAvg and FedAdam (plain, and FedAvg with DP-SGD at
every site, ε = 8 for the whole study) next to pooled (one model on the union of the sites'
train splits, also with DP) and local (each site alone) on the same per-site test splits of
simulations/clinical_text.toml (2,657 abstracts after dropping multi-label texts; 5 disease
groups; Dirichlet size/label skew; bag-of-embeddings model), and the same with a frozen
embedding table (only the head trains, so DP-SGD's noise falls on ~20 k weights, not 256 k).

The frozen-embedding rows (model.frozen_embedding, with and without DP) were added later and
written to their own file:
    python benchmarks/text_clinical.py --variants pooled_frozen fedavg_frozen \
        pooled_frozen_dp fedavg_frozen_dp --output benchmarks/results/text_clinical_frozen.json

The local and FedAdam rows with DP (issue #19's full grid) were added last:
    python benchmarks/text_clinical.py --variants fedadam_frozen_dp local_frozen_dp \
        --output benchmarks/results/text_clinical_frozen_more.json

Run from the repository root (FEDMED_DATA_DIR pointing at the shared datasets):
    python benchmarks/text_clinical.py              # 3 seeds
    python benchmarks/text_clinical.py --quick      # 1 seed, a smoke test
Results: benchmarks/results/text_clinical.json.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from _classification import Variant, cli_main

CONFIG = "clinical_text"
DEFAULT_SEEDS = (42, 43, 44)
RESULTS = Path(__file__).resolve().parent / "results" / "text_clinical.json"
DP = ("privacy.enabled=true", "privacy.target_epsilon=8.0")
# server_lr 0.01 (the default) left the model near its start in 10 rounds (macro-F1 0.10); 0.1 from
# {0.01, 0.1, 0.3} on seed 42 (0.3 scored higher on that test split; not chosen for it)
FEDADAM = ("strategy.name=fedadam", "strategy.server_lr=0.1")

# model.frozen_embedding: a fixed random 4,096-wide table, only the linear head trains (issue
# #19's DP models). Schedules chosen on seed 42's VALIDATION texts, never these test splits
# (benchmarks/text_clinical_dp_tune.py); the non-private frozen rows reuse them, to separate
# what freezing costs from what DP costs.
FROZEN = ("model.frozen_embedding=true", "model.hidden=[4096]", "train.lr=0.02")
FROZEN_POOLED = (*FROZEN, "train.batch_size=512", "train.local_epochs=5")
FROZEN_FEDAVG = (*FROZEN, "train.batch_size=64", "train.local_epochs=2")

VARIANTS = (
    Variant("pooled", "Pooled (bag of embeddings)", "pooled"),
    Variant("fedavg", "FedAvg", "federated"),
    Variant("fedadam", "FedAdam (server lr 0.1)", "federated", FEDADAM),
    Variant("local", "Local (each site alone)", "local"),
    Variant("pooled_dp", "Pooled + DP-SGD (ε = 8)", "pooled", DP),
    Variant("fedavg_dp", "FedAvg + DP-SGD (ε = 8 per site)", "federated", DP),
    Variant("pooled_frozen", "Pooled, frozen embedding", "pooled", FROZEN_POOLED),
    Variant("fedavg_frozen", "FedAvg, frozen embedding", "federated", FROZEN_FEDAVG),
    Variant(
        "pooled_frozen_dp", "Pooled + DP-SGD, frozen embedding", "pooled", (*DP, *FROZEN_POOLED)
    ),
    Variant(
        "fedavg_frozen_dp",
        "FedAvg + DP-SGD, frozen embedding (ε = 8 per site)",
        "federated",
        (*DP, *FROZEN_FEDAVG),
    ),
    # Issue #19 asks for local and FedAdam with DP too. Neither schedule was tuned for them:
    # FedAvg's frozen DP schedule, and FedAdam's server lr from the non-private rows.
    Variant(
        "fedadam_frozen_dp",
        "FedAdam (server lr 0.1) + DP-SGD, frozen embedding (ε = 8 per site)",
        "federated",
        (*DP, *FROZEN_FEDAVG, *FEDADAM),
    ),
    Variant(
        "local_frozen_dp",
        "Local + DP-SGD, frozen embedding (ε = 8 per site)",
        "local",
        (*DP, *FROZEN_FEDAVG),
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(
        argv,
        script="benchmarks/text_clinical.py",
        title="Medical abstracts across 4 simulated sites (text, bag of embeddings)",
        config=CONFIG,
        variants=VARIANTS,
        seeds=DEFAULT_SEEDS,
        output=RESULTS,
        metrics=("macro_f1", "accuracy", "roc_auc"),
    )


if __name__ == "__main__":
    sys.exit(main())
