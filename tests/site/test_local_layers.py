"""FedBN (personalize.local_normalization): normalization layers stay at each site."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file
from torch import nn

from fedmed.config import RunConfig, parse_run_config
from fedmed.coordinator.app import build_server_app
from fedmed.errors import ConfigError
from fedmed.runtime.inprocess import run_inprocess
from fedmed.runtime.run import preflight
from fedmed.site.app import evaluate_global, personalize_final, train
from fedmed.site.fedbn import LocalLayerStore
from fedmed.study.plan import RunPlan, new_run_dir
from fedmed.tasks import build_model
from fedmed.tasks.local_layers import local_keys
from tests.coordinator.test_checkpoint import Killed, _kill_after, _numbers
from tests.tasks.test_imaging import _study

NORM = ("2.weight", "2.bias", "6.weight", "6.bias")  # a 2-block cnn's GroupNorms


def _config(tmp_path: Path, **extra: object) -> RunConfig:
    raw = _study(tmp_path, rounds=3, **extra)
    raw["personalize"] = {"local_normalization": True, **raw.get("personalize", {})}
    cfg, _ = preflight(parse_run_config(raw))
    return cfg


class Wire:
    """A ClientApp that records the array keys crossing the network in each direction."""

    def __init__(self) -> None:
        self.sent: set[str] = set()  # coordinator -> site
        self.received: set[str] = set()  # site -> coordinator
        self.app = ClientApp()
        self.app.train()(self._spy(train))
        self.app.evaluate()(self._spy(evaluate_global))
        self.app.evaluate("personalize")(self._spy(personalize_final))

    def _spy(self, handler):
        def wrapped(msg: Message, context: Context) -> Message:
            self.sent.update(msg.content["arrays"].keys())
            reply = handler(msg, context)
            assert not reply.has_error(), reply.error.reason
            for record in reply.content.array_records.values():
                self.received.update(record.keys())
            return reply

        return wrapped


def _run(plan: RunPlan, app: ClientApp, on_round=None, workers: int | None = None) -> dict:
    server = build_server_app(plan, on_round)
    run_inprocess(server, app, len(plan.config.sites), plan.to_run_config(), workers=workers)
    return json.loads((plan.run_dir / "metrics.json").read_text())


def _site_layers(tmp_path: Path, site: str, run_dir: Path, rnd: int) -> dict[str, torch.Tensor]:
    store = LocalLayerStore(tmp_path / "sites" / site / "local-layers", run_dir.name)
    layers = store.latest(rnd)
    assert layers is not None
    return layers


def test_normalization_layers_are_found_by_module_type_not_by_name() -> None:
    model = nn.Sequential()
    model.add_module("norm", nn.Linear(3, 4))  # named like one, is not one
    model.add_module("b", nn.BatchNorm1d(4))
    model.add_module("g", nn.GroupNorm(2, 4))
    model.add_module("ln", nn.LayerNorm(4, elementwise_affine=False))  # nothing to keep

    keys = local_keys(model)

    assert keys == {
        "b.weight",
        "b.bias",
        "b.running_mean",
        "b.running_var",
        "b.num_batches_tracked",
        "g.weight",
        "g.bias",
    }


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_sites_keep_their_own_normalization_and_share_the_rest(
    tmp_path: Path, strategy: str
) -> None:
    cfg = _config(tmp_path, strategy={"name": strategy, "server_lr": 0.01})
    assert local_keys(build_model(cfg)) == set(NORM)
    wire = Wire()
    plan = RunPlan(cfg, new_run_dir(cfg))

    out = _run(plan, wire.app, workers=1)  # serial: the spy records in this process

    # Nothing of the normalization layers crosses the network, in either direction.
    assert wire.sent and wire.received
    assert not (wire.sent | wire.received) & set(NORM)
    # Each site ends with its own, trained normalization layers ...
    a = _site_layers(tmp_path, "a", plan.run_dir, cfg.rounds)
    b = _site_layers(tmp_path, "b", plan.run_dir, cfg.rounds)
    assert set(a) == set(NORM) and not torch.equal(a["2.weight"], b["2.weight"])
    assert not torch.equal(a["2.weight"], torch.ones_like(a["2.weight"]))
    # ... and the coordinator's model keeps the study's initial ones (it never saw a site's).
    final = load_file(plan.run_dir / "model.safetensors")
    np.testing.assert_array_equal(final["2.weight"], np.ones(4, np.float32))
    card = json.loads((plan.run_dir / "model.card.json").read_text())
    assert "these weights hold the study's initial ones" in card["local_normalization"]
    assert [h["round"] for h in out["history"]] == [1, 2, 3]
    assert not any(h["failures"] for h in out["history"])


def test_per_site_metrics_of_the_global_model_vs_the_site_own(tmp_path: Path) -> None:
    cfg = _config(tmp_path)

    out = _run(RunPlan(cfg, new_run_dir(cfg)), Wire().app)

    personalized = out["final"]["personalized"]["sites"]
    assert set(personalized) == {"a", "b"}
    for site, result in personalized.items():
        # "after" (the site's own layers) is what the site evaluated with in the last round.
        assert result["after"]["loss"] == pytest.approx(out["final"]["sites"][site]["loss"])
        assert result["before"]["loss"] != result["after"]["loss"]


def test_a_resumed_study_continues_from_the_sites_stored_layers(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    reference = _run(RunPlan(cfg, new_run_dir(cfg)), Wire().app)
    run_dir = new_run_dir(cfg)
    with pytest.raises(Killed):
        _run(RunPlan(cfg, run_dir), Wire().app, _kill_after(1))
    # The same checkpoint under the same study id (folder name), for a control run below.
    control = tmp_path / "control" / run_dir.name
    shutil.copytree(run_dir, control)

    resumed = _run(RunPlan(cfg, run_dir, resume=True), Wire().app)

    # A new Flower run (empty Context.state), yet the same numbers as the uninterrupted study.
    assert _numbers(resumed) == _numbers(reference)
    # It is the stored layers that make it so: sites that lost them start round 2 elsewhere.
    for site in ("a", "b"):
        shutil.rmtree(
            LocalLayerStore(tmp_path / "sites" / site / "local-layers", run_dir.name).directory
        )
    forgot = _run(RunPlan(cfg, control, resume=True), Wire().app)
    assert _numbers(forgot)["history"][1] != _numbers(reference)["history"][1]


def test_local_normalization_trains_under_dp_without_sending_the_layers(tmp_path: Path) -> None:
    cfg = _config(tmp_path, privacy={"enabled": True, "target_epsilon": 5.0})
    wire = Wire()

    out = _run(RunPlan(cfg, new_run_dir(cfg)), wire.app, workers=1)  # the spy records here

    assert wire.sent and wire.received
    assert not (wire.sent | wire.received) & set(NORM)
    eps = [m["train"]["epsilon"] for h in out["history"] for m in h["sites"].values()]
    assert 0 < max(eps) <= 5.0 + 1e-6
    assert set(out["final"]["personalized"]["sites"]) == {"a", "b"}


def test_refused_with_secure_aggregation_and_for_a_model_without_normalization(
    tmp_path: Path, csv_study: RunConfig
) -> None:
    raw = _study(tmp_path)
    raw["personalize"] = {"local_normalization": True}
    raw["strategy"] = {"secure_aggregation": True, "validate_updates": False}
    with pytest.raises(ConfigError, match="needs personalize.local_normalization = false"):
        parse_run_config(raw)

    raw = json.loads(csv_study.to_json())
    raw["personalize"]["local_normalization"] = True
    cfg, _ = preflight(parse_run_config(raw))
    with pytest.raises(ConfigError, match="no normalization layer"):
        _run(RunPlan(cfg, new_run_dir(cfg)), Wire().app)


def test_a_deployed_site_keeps_its_layers_in_its_own_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deployment mode in-process: the site's TOML decides where its layers live."""
    import pandas as pd
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedmed.data.registry import DatasetRegistry
    from fedmed.protocol import SITE_CONFIG_KEY
    from fedmed.runtime.inprocess import RUN_ID, InProcessGrid
    from fedmed.security.policy import plan_hash
    from tests.tasks.test_imaging import _npz

    raw = _study(tmp_path, rounds=2)
    raw["data"] = {"dataset": "scans", "schema": {"features": ["gray"], "min_rows": 10}}
    raw["personalize"] = {"local_normalization": True}
    cfg = parse_run_config(raw)
    # `fedmed site data add` parses tables only (an .npz cannot be registered yet): stand in for
    # its parse check so the registry records the image file with its real SHA-256.
    monkeypatch.setattr("fedmed.data.registry.read_table", lambda *_: pd.DataFrame({"x": [0]}))
    site_files = []
    for name, seed_rows in (("a", 60), ("b", 80)):
        state = tmp_path / "state" / name
        DatasetRegistry(state).add("scans", _npz(tmp_path / f"{name}.npz", n=seed_rows))
        path = tmp_path / f"{name}.toml"
        path.write_text(
            f'name = "{name}"\ninsecure = true\nstate_dir = "{state}"\n'
            f'approved_plans = ["{plan_hash(cfg)}"]\nmin_rows = 10\n'
        )
        site_files.append(path)
    plan = RunPlan(cfg, new_run_dir(cfg), engine="deployment")
    grid = InProcessGrid(Wire().app, 2, plan.to_run_config())
    for context, site_file in zip(grid.contexts.values(), site_files, strict=True):
        context.node_config = {SITE_CONFIG_KEY: str(site_file)}
    TaskIdentity.run_id, TaskIdentity.task_id = RUN_ID, 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID

    build_server_app(plan)(grid, Context(RUN_ID, SUPERLINK_NODE_ID, {}, RecordDict(), {}))

    out = json.loads((plan.run_dir / "metrics.json").read_text())
    assert set(out["final"]["personalized"]["sites"]) == {"a", "b"}
    for name in ("a", "b"):
        store = LocalLayerStore(tmp_path / "state" / name / "local-layers", plan.run_dir.name)
        assert set(store.latest(2) or {}) == set(NORM)
    assert not (tmp_path / "sites").exists()  # nothing in the simulation folder
