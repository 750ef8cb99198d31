"""DP-SGD cost per local epoch, side by side with non-private training, for each Opacus mode.

Two models a hospital would train: the tabular MLP of the demo (30 inputs) and a small
GroupNorm CNN for 28x28 grayscale images (BreastMNIST-sized, 546 training images). For each we
time one local epoch of plain SGD and of DP-SGD with every per-example-gradient mode Opacus offers
(hooks, functorch, expanded weights, ghost clipping), interleaved and repeated, and print the
ratio DP / plain. The fastest mode per model is what fedmed's `privacy.grad_sample_mode` should be.

Usage: python benchmarks/dp_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

RESULTS = Path(__file__).resolve().parent / "results" / "dp_speed.json"
MODES = ("hooks", "functorch", "ew", "ghost")
warnings.filterwarnings("ignore")


def tabular_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 1))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.GroupNorm(8, 32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 64),
        nn.ReLU(),
        nn.Linear(64, 1),
    )


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, int]] = {
    # name: (model, input shape, rows, batch size)
    "tabular MLP (30-16-1), batch 16": (tabular_mlp, (30,), 400, 16),
    "tabular MLP (30-16-1), batch 64": (tabular_mlp, (30,), 400, 64),
    "CNN 28x28 GroupNorm, batch 32": (small_cnn, (1, 28, 28), 546, 32),
}


def _loader(shape: tuple[int, ...], rows: int, batch: int) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, *shape, generator=gen)
    y = (torch.rand(rows, 1, generator=gen) > 0.5).float()
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, generator=gen)


def epoch_seconds(
    build: Callable[[], nn.Module], shape: tuple[int, ...], rows: int, batch: int, mode: str | None
) -> float:
    """Seconds for one epoch (len(loader) steps); mode None = non-private."""
    torch.manual_seed(0)
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = _loader(shape, rows, batch)
    criterion: nn.Module = nn.BCEWithLogitsLoss()
    if mode is not None:
        engine = PrivacyEngine()
        made = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=True,
            grad_sample_mode=mode,
            criterion=criterion,
        )
        if mode == "ghost":
            model, optimizer, criterion, loader = made
        else:
            model, optimizer, loader = made
    model.train()
    start = time.perf_counter()
    for xb, yb in loader:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"command: python benchmarks/dp_speed.py --repeats {args.repeats}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    results: dict[str, dict[str, float]] = {}
    for name, (build, shape, rows, batch) in CASES.items():
        times: dict[str, list[float]] = {"plain": [], **{m: [] for m in MODES}}
        epoch_seconds(build, shape, rows, batch, None)  # warm-up
        for _ in range(args.repeats):  # interleaved: every variant sees the same machine state
            times["plain"].append(epoch_seconds(build, shape, rows, batch, None))
            for mode in MODES:
                times[mode].append(epoch_seconds(build, shape, rows, batch, mode))
        med = {k: statistics.median(v) for k, v in times.items()}
        results[name] = {
            "plain_ms": med["plain"] * 1e3,
            **{f"{m}_ms": med[m] * 1e3 for m in MODES},
            **{f"{m}_ratio": med[m] / med["plain"] for m in MODES},
        }
        best = min(MODES, key=lambda m: med[m])
        results[name]["fastest"] = best  # type: ignore[assignment]
        print(f"\n{name}: {rows} rows, {-(-rows // batch)} steps per epoch")
        print(f"  plain        {med['plain'] * 1e3:8.1f} ms/epoch")
        for mode in MODES:
            mark = "  <- fastest" if mode == best else ""
            print(
                f"  DP {mode:<9} {med[mode] * 1e3:8.1f} ms/epoch  x{med[mode] / med['plain']:.2f}"
                f"{mark}"
            )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
