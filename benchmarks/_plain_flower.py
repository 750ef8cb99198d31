"""The anchor of benchmarks/scale.py: the same job on plain Flower, with no fedmed code at all.

A ServerApp with Flower's FedAvg and a ClientApp that reads its site's CSV, standardizes it and
trains the same tiny MLP (one hidden layer of 8, SGD lr 0.05, batch 32, one local epoch), then
every site evaluates the global model, on Flower's Ray simulation engine. After every round it
rewrites LIVE (a history list, as fedmed's live.json) so the benchmark times rounds the same way.

Usage: python benchmarks/_plain_flower.py SPEC.json LIVE.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

SPEC_ENV = "PLAIN_FLOWER_SPEC"
_DATA: dict[int, tuple[torch.Tensor, ...]] = {}


def _spec() -> dict:
    return json.loads(Path(os.environ[SPEC_ENV]).read_text())


def _model(features: int) -> torch.nn.Module:
    torch.manual_seed(42)
    return torch.nn.Sequential(torch.nn.Linear(features, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def _site(pid: int) -> tuple[torch.Tensor, ...]:
    """The site's train/test tensors, read once per worker process (as fedmed caches them)."""
    if pid not in _DATA:
        spec = _spec()
        path = spec["sites"][pid]["path"]
        table = np.genfromtxt(path, delimiter=",", names=True)
        x = np.stack([table[f] for f in spec["features"]], axis=1).astype(np.float32)
        y = table["outcome"].astype(np.float32)
        cut = int(len(y) * 0.75)
        mean, std = x[:cut].mean(0), x[:cut].std(0) + 1e-6
        x = (x - mean) / std
        _DATA[pid] = tuple(torch.from_numpy(a) for a in (x[:cut], y[:cut], x[cut:], y[cut:]))
    return _DATA[pid]


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    x, y, _, _ = _site(int(context.node_config["partition-id"]))
    model = _model(x.shape[1])
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    order = torch.randperm(len(y))
    for start in range(0, len(y), 32):
        idx = order[start : start + 32]
        optimizer.zero_grad()
        loss_fn(model(x[idx]).squeeze(1), y[idx]).backward()
        optimizer.step()
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": len(y)}),
        }
    )
    return Message(content, reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, _, x, y = _site(int(context.node_config["partition-id"]))
    model = _model(x.shape[1])
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    with torch.no_grad():
        logits = model(x).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y).item()
        accuracy = ((logits > 0).float() == y).float().mean().item()
    metrics = MetricRecord({"loss": loss, "accuracy": accuracy, "num-examples": len(y)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    spec, live = _spec(), Path(os.environ["PLAIN_FLOWER_LIVE"])
    history: list[dict] = []

    def after_round(rnd: int, arrays: ArrayRecord) -> None:
        if rnd > 0:  # Flower also calls it once before round 1
            history.append({"round": rnd})
            tmp = live.with_suffix(".tmp")
            tmp.write_text(json.dumps({"history": history}))
            tmp.replace(live)

    model = _model(len(spec["features"]))
    FedAvg(fraction_evaluate=1.0).start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(spec["rounds"]),
        evaluate_fn=after_round,
    )


if __name__ == "__main__":
    spec_path, live_path = Path(sys.argv[1]), Path(sys.argv[2])
    live_path.parent.mkdir(parents=True, exist_ok=True)
    os.environ[SPEC_ENV] = str(spec_path.resolve())
    os.environ["PLAIN_FLOWER_LIVE"] = str(live_path.resolve())
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    sites = len(json.loads(spec_path.read_text())["sites"])
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=sites,
        backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0}},
    )
