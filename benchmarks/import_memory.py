"""What one fedmed process holds before it reads any data: the memory floor of the in-process
runtime (issue #20's "≤ 1/4 of Ray's memory").

Each library the demo needs is imported in a fresh interpreter, in the order fedmed imports
them, and the growth of that process's proportional set size (PSS: what it adds to a process
tree, shared library pages counted once across the tree) is printed per step. A second column
repeats the whole chain in one interpreter, so later libraries are charged only for what they
add on top of earlier ones (scikit-learn's scipy, opacus' torch.distributed and sympy).

Usage: python benchmarks/import_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment

# What `fedmed simulate demo` imports, in order (python -X importtime shows who pulls what):
# pandas pulls pyarrow; fedmed.data.table pulls sklearn.model_selection, which pulls scipy.stats
# and sklearn.metrics; opacus pulls torch.distributed.tensor, which pulls sympy.
CHAIN = [
    "numpy",
    "torch",
    "pandas",
    "sklearn.model_selection",
    "opacus",
    "flwr.serverapp",
    "matplotlib.pyplot",
    "fedmed.runtime.run",
]

_PROBE = """
import importlib, json, sys
def pss():
    for line in open('/proc/self/smaps_rollup'):
        if line.startswith('Pss:'):
            return int(line.split()[1]) / 1024
out = [('python', pss())]
for name in sys.argv[1:]:
    importlib.import_module(name)
    out.append((name, pss()))
print(json.dumps(out))
"""


def probe(names: list[str]) -> list[tuple[str, float]]:
    """(module, PSS MiB after importing it) in one fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *names], capture_output=True, text=True, check=True
    )
    return [(name, value) for name, value in json.loads(done.stdout)]


def main() -> None:
    alone = {name: probe([name])[-1][1] - probe([])[0][1] for name in CHAIN}
    chain = probe(CHAIN)
    print(f"{'module':<26} {'alone MiB':>10} {'added in chain MiB':>19} {'chain total MiB':>16}")
    print(f"{'(bare python)':<26} {'':>10} {'':>19} {chain[0][1]:>16.0f}")
    for (name, total), (_, before) in zip(chain[1:], chain[:-1], strict=True):
        print(f"{name:<26} {alone[name]:>10.0f} {total - before:>19.0f} {total:>16.0f}")
    result = {"environment": environment(), "alone_mib": alone, "chain_mib": dict(chain)}
    out = Path(__file__).resolve().parent / "results" / "import_memory.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
