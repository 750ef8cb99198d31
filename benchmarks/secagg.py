"""What SecAgg+ costs per round: secure vs plain FedAvg, in a real federation and in-process.

The demo task (4 hospitals, MLP, DP-SGD, 1 local epoch) run four ways, side by side in one run:
a real federation on 127.0.0.1 (`fedmed coordinator start`, TLS + node auth, 4 warm `fedmed site
start` daemons with their policy and audit mods, each site reading its own CSV export) with plain
FedAvg and with `strategy.secure_aggregation = true`, and `fedmed simulate` of the same study
in one process, plain and secure. A secure round is four train exchanges (setup, share keys,
masked vectors, unmask) plus evaluate, against one train plus evaluate.

Rounds are timed as in benchmarks/deployment.py (its helpers): the gap between consecutive rounds
landing in RUN_DIR/live.json, median over rounds 2..R, round 1 reported apart.

Usage: python benchmarks/secagg.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import environment, json_safe
from deployment import FEDMED, ROOT, SITES, deployment, round_times, setup

from fedmed.serving.server import free_port

RESULTS = ROOT / "benchmarks" / "results" / "secagg.json"
SECURE_KEYS = "secure_aggregation = true\nvalidate_updates = false\n"
SECURE_SETS = ["strategy.secure_aggregation=true", "strategy.validate_updates=false"]


def secure_copy(study: Path) -> Path:
    """The same study with SecAgg+ on (same plan hash: the sites' approval covers both)."""
    text = study.read_text()
    head, sep, tail = text.partition("[strategy]\n")
    assert sep, "the federation study has a [strategy] table"
    path = study.with_name("study-secure.toml")
    path.write_text(head + sep + SECURE_KEYS + tail)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="fedmed-bench-secagg-") as tmp:
        root = Path(tmp)
        port = free_port()
        study = setup(root, port, args.rounds)
        for label, path in (
            ("deployment, FedAvg", study),
            ("deployment, SecAgg+ FedAvg", secure_copy(study)),
        ):
            results[label] = deployment(root, port, path, cold=False)
            print(label, results[label], flush=True)
        demo = ["demo", "--set", f"rounds={args.rounds}", "--quiet", "--output-dir", "sim"]
        secure = [arg for s in SECURE_SETS for arg in ("--set", s)]
        for label, extra in (("in-process, FedAvg", []), ("in-process, SecAgg+ FedAvg", secure)):
            results[label] = round_times([*FEDMED, "simulate", *demo, *extra], root, root / "sim")
            print(label, results[label], flush=True)
    print(f"\n{'runtime':<30} {'per round':>10} {'x plain':>8} {'round 1':>9} {'wall':>8}")
    for label, r in results.items():
        plain = results[label.split(",")[0] + ", FedAvg"]["per_round_median_s"]
        print(
            f"{label:<30} {r['per_round_median_s']:>9.2f}s {r['per_round_median_s'] / plain:>7.1f}x"
            f" {r['first_round_s']:>8.1f}s {r['wall_s']:>7.1f}s"
        )
    payload = {"rounds": args.rounds, "sites": len(SITES), "results": results, **environment()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(json_safe(payload), indent=2) + "\n")
    print(RESULTS)


if __name__ == "__main__":
    main()
