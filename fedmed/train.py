"""Local training and evaluation: plain PyTorch loops, no Flower import.

Keeping this Flower-free means the same loops serve the federated ClientApp, the pooled and local
baselines and the benchmarks, and can be tested without any runtime.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmed.config import TrainConfig
from fedmed.errors import ConfigError
from fedmed.tasks.tabular import Task


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda > mps > cpu; asking for an absent accelerator is a ConfigError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA GPU is visible; use device='auto' or 'cpu'")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' but MPS is not available; use device='auto' or 'cpu'")
    return torch.device(name)


def derive_seed(*parts: object) -> int:
    """A stable seed from run seed, round and site: same numbers in every runtime and process."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def steps_per_round(n_train: int, cfg: TrainConfig) -> int:
    """Optimizer steps a site takes per round (epochs are converted at the nominal batch size)."""
    if cfg.local_steps is not None:
        return cfg.local_steps
    assert cfg.local_epochs is not None
    return max(1, math.ceil(cfg.local_epochs * n_train / cfg.batch_size))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def make_loader(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    return DataLoader(
        dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, generator=generator
    )


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the round's steps
    steps: int
    num_examples: int


def run_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    task: Task,
    steps: int,
    device: torch.device,
    proximal_mu: float = 0.0,
) -> float:
    """Take exactly ``steps`` optimizer steps, cycling the loader; returns the mean loss.

    ``proximal_mu`` > 0 adds FedProx's pull towards the round's global weights as a decoupled
    step after each optimizer step (w -= lr * mu * (w - w_global)). It touches no data, so under
    DP it needs no clipping and costs no privacy, and it works the same with or without Opacus.
    """
    model.train()
    total, seen = 0.0, 0
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    batches = iter(loader)
    for _ in range(steps):
        try:
            xb, yb = next(batches)
        except StopIteration:
            batches = iter(loader)
            xb, yb = next(batches)
        xb, yb = xb.to(device), yb.to(device)
        optimizer.zero_grad(set_to_none=True)
        # Poisson sampling may draw an empty batch; Opacus then takes a noise-only step, which
        # still counts (and is accounted) as a step.
        loss = task.loss(model(xb), yb)
        loss.backward()
        optimizer.step()
        if anchor:
            with torch.no_grad():
                pull = optimizer.param_groups[0]["lr"] * proximal_mu
                for param, start in zip(model.parameters(), anchor, strict=True):
                    param.sub_(pull * (param - start))
        if len(yb):
            total += float(loss.detach()) * len(yb)
            seen += len(yb)
    return total / max(seen, 1)


def train_plain(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    task: Task,
    cfg: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    proximal_mu: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
) -> TrainResult:
    """Non-private local training for one round.

    A site in a federation starts each round from new global weights, so it gets a fresh
    optimizer; a baseline that trains one model throughout passes its own to keep Adam's state.
    """
    torch.manual_seed(seed)
    model.to(device)
    steps = steps_per_round(len(y), cfg)
    loss = run_steps(
        model,
        optimizer or make_optimizer(model, cfg),
        make_loader(x, y, cfg.batch_size, seed),
        task,
        steps,
        device,
        proximal_mu,
    )
    return TrainResult(loss=loss, steps=steps, num_examples=len(y))


EVAL_BATCH = 256  # rows per forward pass when evaluating


@torch.no_grad()
def forward_in_batches(model: nn.Module, x: np.ndarray, device: torch.device) -> torch.Tensor:
    """``model``'s output on every row of ``x``, computed a batch at a time.

    One pass over a whole test split is fine for a table, but a Transformer's attention over
    1,000 texts of 256 tokens would need gigabytes at once; row by row outputs are the same.
    """
    if len(x) <= EVAL_BATCH:
        return model(torch.from_numpy(x).to(device))
    chunks = [x[i : i + EVAL_BATCH] for i in range(0, len(x), EVAL_BATCH)]
    return torch.cat([model(torch.from_numpy(c).to(device)) for c in chunks])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    task: Task,
    device: torch.device,
    *,
    train: tuple[np.ndarray, np.ndarray] | None = None,
    horizons: tuple[float, ...] = (),
) -> dict[str, float]:
    """Metrics of ``model`` on one site's held-out rows.

    ``horizons`` (survival) adds time-dependent metrics, whose baseline hazard and censoring
    weights come from the same site's ``train`` split (x, y).
    """
    model.to(device).eval()
    output = forward_in_batches(model, x, device)
    loss = float(task.loss(output, torch.from_numpy(y).to(device)))
    scores = task.scores(output)
    metrics = task.evaluate(y, scores, loss)
    if horizons:
        if train is None:
            raise ValueError("time-dependent metrics need the site's train split")
        x_train, y_train = train
        train_scores = task.scores(forward_in_batches(model, x_train, device))
        metrics.update(task.horizon_metrics(y_train, train_scores, y, scores, horizons))
    return metrics


def mean_of_models(models: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Element-wise mean (in float64, cast back) of float arrays; others from the last model."""
    out = {}
    for key, value in models[-1].items():
        if np.issubdtype(value.dtype, np.floating):
            value = np.stack([m[key].astype(np.float64) for m in models]).mean(axis=0)
            value = value.astype(models[-1][key].dtype)
        out[key] = np.ascontiguousarray(value)
    return out
