"""model.members: a deep ensemble in one model (fedmed.tasks.ensemble)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule

from fedmed.cli.main import main
from fedmed.config import ModelConfig, RunConfig, parse_run_config
from fedmed.errors import ConfigError
from fedmed.serving.export import load_model
from fedmed.tasks import TASKS
from fedmed.tasks.ensemble import Ensemble

SEQUENCE = TASKS["sequence-classification"]


def _ensemble(members: int = 3) -> Ensemble:
    torch.manual_seed(0)
    model = SEQUENCE.build_model(4, ModelConfig(kind="gru", hidden=(6,), members=members))
    assert isinstance(model, Ensemble)
    return model


def test_members_start_apart_and_the_served_logit_is_their_mean() -> None:
    model = _ensemble(3).eval()
    x = torch.randn(5, 7, 12)

    first, second = (m.head.weight for m in model.members[:2])
    assert not torch.equal(first, second)  # each member drew its own initialization
    with torch.no_grad():
        alone = torch.cat([m(x) for m in model.members], dim=1)
        assert model(x).shape == (5, 1)
        torch.testing.assert_close(model(x), alone.mean(dim=1, keepdim=True))


def test_each_member_learns_from_its_own_loss_as_if_trained_alone() -> None:
    model = _ensemble(3).train()
    member = copy.deepcopy(model.members[1])
    x, y = torch.randn(8, 7, 12), (torch.rand(8) > 0.5).float()

    SEQUENCE.loss(model(x), y).backward()
    SEQUENCE.loss(member(x), y).backward()

    # The ensemble's loss is the mean of the members' own losses: 1/3 of the lone gradient.
    for (name, p), q in zip(model.members[1].named_parameters(), member.parameters(), strict=True):
        torch.testing.assert_close(p.grad * 3, q.grad, msg=name)


def test_dp_clips_one_gradient_per_patient_over_all_members() -> None:
    from fedmed.tasks.dp_compat import make_compatible

    model = make_compatible(_ensemble(2)).train()
    wrapped = GradSampleModule(model, loss_reduction="mean")
    x, y = torch.randn(4, 7, 12), (torch.rand(4) > 0.5).float()

    SEQUENCE.loss(wrapped(x), y).backward()

    per_patient = [p.grad_sample for p in model.parameters() if p.requires_grad]
    assert all(g.shape[0] == 4 for g in per_patient)  # every member's parameters, per patient
    wrapped._close()


def test_a_federated_tabular_ensemble_runs_saves_and_serves(
    csv_study: RunConfig, capsys: pytest.CaptureFixture
) -> None:
    from tests.cli.test_cli import _write_toml

    raw = json.loads(csv_study.to_json())
    raw["model"] = {"kind": "mlp", "hidden": [8], "members": 3}
    config = _write_toml(parse_run_config(raw), Path(csv_study.output_dir).parent / "ens.toml")

    assert main(["simulate", str(config), "--quiet"]) == 0

    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    model, card = load_model(run_dir / "model.safetensors", require_signature=False)
    assert isinstance(model, Ensemble) and len(model.members) == 3
    assert card["model"]["members"] == 3
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert all(0 <= m["roc_auc"] <= 1 for m in metrics["final"]["sites"].values())


@pytest.mark.parametrize(
    ("model", "task", "message"),
    [
        ({"kind": "mlp", "members": 0}, "tabular-classification", "model.members must be >= 1"),
        ({"kind": "linear", "members": 3}, "survival", "set model.members = 1"),
    ],
)
def test_bad_ensembles_are_refused_naming_the_fix(
    csv_study: RunConfig, model: dict, task: str, message: str
) -> None:
    from fedmed.runtime.run import preflight

    raw = json.loads(csv_study.to_json())
    raw["model"], raw["task"] = model, task
    if task == "survival":
        raw["data"]["schema"].update(time="age", event="outcome", target="")
    with pytest.raises(ConfigError, match=message):
        preflight(parse_run_config(raw))
