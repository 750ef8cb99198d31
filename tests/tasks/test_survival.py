"""The survival task: Cox loss and C-index against lifelines, training, data checks, lung sites."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter
from lifelines.datasets import load_lung
from lifelines.utils import concordance_index as lifelines_c_index

from fedmed.config import RunConfig, SchemaConfig, TrainConfig, load_run_config, parse_run_config
from fedmed.config import resolve_config_path as shipped
from fedmed.data.table import validate_table
from fedmed.errors import ConfigError, DataError
from fedmed.privacy.dpsgd import train_private
from fedmed.tasks import get_task, load_site_data, load_site_table
from fedmed.tasks.survival import concordance_index, cox_partial_nll
from fedmed.train import evaluate, train_plain

COVARIATES = ["age", "sex", "ph.ecog"]
SURV = SchemaConfig(time="t", event="e", min_rows=5, min_events=2)


def _lung() -> pd.DataFrame:
    return load_lung()[["time", "status", *COVARIATES]].dropna().reset_index(drop=True)


def _tensors(df: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.tensor(df[COVARIATES].to_numpy(), dtype=torch.float64)
    t = torch.tensor(df["time"].to_numpy(), dtype=torch.float64)
    e = torch.tensor(df["status"].to_numpy(), dtype=torch.float64)
    return x, t, e


def test_cox_loss_equals_lifelines_efron_log_likelihood() -> None:
    df = _lung()  # 227 patients, with tied death times
    assert df["time"][df["status"] == 1].duplicated().any()
    fit = CoxPHFitter().fit(df, "time", "status")
    x, t, e = _tensors(df)
    beta = torch.tensor(fit.params_[COVARIATES].to_numpy(), requires_grad=True)

    nll = cox_partial_nll(x @ beta, t, e)
    nll.backward()

    assert float(nll.detach()) * len(df) == pytest.approx(-fit.log_likelihood_, rel=1e-10)
    # lifelines' estimate is the maximum: our gradient vanishes there.
    assert beta.grad is not None and float(beta.grad.abs().max()) < 1e-5


def test_cox_loss_without_ties_is_the_hand_computed_partial_likelihood() -> None:
    risk = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    time = torch.tensor([5.0, 3.0, 8.0, 1.0], dtype=torch.float64)
    event = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    w = risk.exp()
    # events at t=1 (all at risk), t=5 (rows 0 and 2 at risk), t=8 (row 2 alone)
    by_hand = (risk[3] - w.sum().log()) + (risk[0] - (w[0] + w[2]).log()) + (risk[2] - w[2].log())

    assert float(cox_partial_nll(risk, time, event)) == pytest.approx(-float(by_hand) / 4)


def test_censored_patients_only_enter_risk_sets() -> None:
    risk = torch.tensor([0.3, -0.2, 1.1], dtype=torch.float64)
    time = torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64)

    all_censored = cox_partial_nll(risk, time, torch.zeros(3, dtype=torch.float64))
    # A patient censored before every event is in no risk set: dropping it changes nothing
    # but the normalization by batch size.
    with_early = cox_partial_nll(
        torch.cat([torch.tensor([5.0], dtype=torch.float64), risk]),
        torch.cat([torch.tensor([1.0], dtype=torch.float64), time]),
        torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64),
    )
    without = cox_partial_nll(risk, time, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))

    assert float(all_censored) == 0.0
    assert float(with_early) * 4 == pytest.approx(float(without) * 3)


def test_c_index_matches_lifelines_with_ties_and_censoring() -> None:
    rng = np.random.default_rng(0)
    n = 300
    time = rng.integers(1, 40, n).astype(float)  # many tied times
    event = rng.random(n) < 0.6
    risk = np.round(rng.normal(size=n) - 0.05 * time, 1)  # tied risks too

    ours = concordance_index(time, event, risk)

    # lifelines wants survival-time-like scores (higher = longer survival): pass -risk.
    assert ours == pytest.approx(lifelines_c_index(time, -risk, event), abs=1e-12)
    assert 0.5 < ours < 1.0


def test_c_index_is_nan_without_comparable_pairs() -> None:
    assert math.isnan(concordance_index(np.array([3.0, 5.0]), np.array([0, 0]), np.zeros(2)))


def test_linear_cox_trained_by_train_plain_matches_lifelines() -> None:
    df = _lung()
    z = (df[COVARIATES] - df[COVARIATES].mean()) / df[COVARIATES].std()
    x = z.to_numpy(np.float32)
    y = df[["time", "status"]].to_numpy(np.float32)
    task = get_task("survival")
    model = task.build_model(x.shape[1], parse_run_config(_run({})).model)
    train = TrainConfig(local_steps=400, batch_size=len(df), optimizer="adam", lr=0.05)

    train_plain(model, x, y, task, train, seed=0, device=torch.device("cpu"))

    fit = CoxPHFitter().fit(pd.concat([z, df[["time", "status"]]], axis=1), "time", "status")
    ours = model[0].weight.detach().numpy().ravel()
    assert np.allclose(ours, fit.params_[COVARIATES].to_numpy(), atol=2e-3)
    metrics = evaluate(model, x, y, task, torch.device("cpu"))
    risk = x @ ours
    assert metrics["c_index"] == pytest.approx(
        lifelines_c_index(df["time"], -risk, df["status"]), abs=1e-6
    )


def _run(extra: dict, tmp_path: Path | None = None) -> dict:
    """A 2-site survival study on lung's largest institutions (raw dict, for parse_run_config)."""
    raw = {
        "task": "survival",
        "model": {"kind": "linear"},
        "output_dir": str(tmp_path / "runs") if tmp_path else "runs",
        "data": {
            "builtin": "lifelines:lung",
            "site_column": "inst",
            "schema": {"time": "time", "event": "status", "features": COVARIATES},
        },
        "sites": [{"name": "a", "site_values": [1]}, {"name": "b", "site_values": [12, 13]}],
    }
    for key, value in extra.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return raw


def test_local_dp_is_refused_with_the_reason_and_the_alternative(tmp_path: Path) -> None:
    cfg = parse_run_config(_run({"privacy.enabled": True}, tmp_path))
    task = get_task("survival")
    x, y = np.zeros((20, 3), np.float32), np.ones((20, 2), np.float32)

    with pytest.raises(ConfigError, match=r"couples the patients.*privacy.central"):
        load_site_table(cfg, cfg.sites[0])
    with pytest.raises(ConfigError, match="cannot use local DP-SGD"):
        train_private(task.build_model(3, cfg.model), x, y, task, cfg, seed=0, device="cpu")


def test_task_and_schema_must_agree() -> None:
    no_time = parse_run_config(_run({"data.schema": {"event": "status"}}))
    classify = parse_run_config(_run({"task": "tabular-classification"}))
    logreg = parse_run_config(_run({"model.kind": "logreg"}))

    with pytest.raises(ConfigError, match="needs data.schema.time"):
        load_site_table(no_time, no_time.sites[0])
    with pytest.raises(ConfigError, match="set task = 'survival'"):
        load_site_table(classify, classify.sites[0])
    with pytest.raises(ConfigError, match="use 'linear'"):
        load_site_table(logreg, logreg.sites[0])


def test_lung_sites_are_institutions_and_cover_every_coded_patient() -> None:
    cfg = load_run_config(shipped("lung"))
    lung = load_lung()

    tables = {s.name: load_site_table(cfg, s) for s in cfg.sites}

    sizes = {n: len(t.y_train) + len(t.y_test) for n, t in tables.items()}
    assert sizes["inst-1"] == (lung["inst"] == 1).sum() == 36
    assert sum(sizes.values()) == lung["inst"].notna().sum() == 227
    assert min(t.y_test[:, 1].sum() for t in tables.values()) >= 2  # events in every test split
    data = load_site_data(cfg, cfg.sites[0])
    assert data.y_train.shape == (len(tables["inst-1"].y_train), 2)
    assert "sex=2" in data.input_names and "sex" not in data.input_names


def _frame(text: str) -> pd.DataFrame:
    rows = [line.split(",") for line in text.strip().splitlines()]
    df = pd.DataFrame(rows[1:], columns=rows[0])
    df.index = pd.RangeIndex(2, 2 + len(df))
    return df


def test_bad_event_code_names_the_value_and_rows() -> None:
    df = _frame("t,e,age\n" + "".join(f"{i + 1},{i % 2},{50 + i}\n" for i in range(9)) + "4,2,70")

    with pytest.raises(DataError) as err:
        validate_table("s", df, SURV, "site.csv", target="survival")

    msg = str(err.value)
    assert "site.csv" in msg and "'e'" in msg and "2.0" in msg and "row 11" in msg
    assert "event_value" in msg


def test_negative_time_and_too_few_events_are_named() -> None:
    base = "t,e,age\n" + "".join(f"{i + 1},{int(i < 3)},{50 + i}\n" for i in range(10))
    negative = _frame(base + "-3,1,60")

    with pytest.raises(DataError, match=r"time column 't' has value -3 at row 12"):
        validate_table("s", negative, SURV, "site.csv", target="survival")
    with pytest.raises(DataError, match=r"only 3 events .* at least 5 events per site"):
        validate_table("s", _frame(base), SchemaConfig(time="t", event="e"), "x", "survival")


def test_text_event_codes_and_missing_time_policy() -> None:
    text = "t,e,age\n" + "".join(
        f"{'' if i == 4 else i + 1},{'dead' if i % 2 else 'alive'},{50 + i}\n" for i in range(12)
    )
    schema = SchemaConfig(
        time="t", event="e", event_value="dead", censored_value="alive", min_rows=5, min_events=2
    )

    table = validate_table("s", _frame(text), schema, "site.csv", target="survival")

    y = np.concatenate([table.y_train, table.y_test])
    assert len(y) == 11 and y[:, 1].sum() == 6  # the row without a time is dropped
    with pytest.raises(DataError, match=r"outcome column 't' is empty at row 6"):
        validate_table(
            "s",
            _frame(text),
            SchemaConfig(**{**schema.__dict__, "missing": "mean"}),
            "x",
            "survival",
        )


def test_site_column_values_are_checked(tmp_path: Path) -> None:
    twice = _run({"sites": [{"name": "a", "site_values": [1]}, {"name": "b", "site_values": [1]}]})
    unused = _run({"data.site_column": ""})
    absent = parse_run_config(_run({"sites": [
        {"name": "a", "site_values": [1]}, {"name": "b", "site_values": [99]}
    ]}))  # fmt: skip

    with pytest.raises(ConfigError, match="listed by both 'a' and 'b'"):
        parse_run_config(twice)
    with pytest.raises(ConfigError, match="data.site_column is not set"):
        parse_run_config(unused)
    with pytest.raises(DataError, match=r"site 'b': no rows with inst in \[99\]"):
        load_site_table(absent, absent.sites[1])


def test_survival_run_config_round_trips() -> None:
    cfg = load_run_config(shipped("lung"))

    assert RunConfig.from_json(cfg.to_json()) == cfg
    assert cfg.sites[-1].site_values[-1] == 33


def _write_cohort(path: Path, n: int, seed: int) -> None:
    """A hospital's survival table with its own column names, codes and categorical covariates."""
    rng = np.random.default_rng(seed)
    age = rng.normal(62, 9, n).round()
    stage = rng.choice(["I", "II", "III"], n)
    smoker = rng.choice(["no", "yes"], n)
    log_hazard = 0.08 * (age - 62) + (stage == "II") * 1.0 + (stage == "III") * 2.0
    event_time = rng.exponential(1 / (0.05 * np.exp(log_hazard + 0.4 * (smoker == "yes"))))
    censor_time = rng.uniform(0, 40, n)
    pd.DataFrame(
        {
            "patient": np.arange(n),
            "months": np.minimum(event_time, censor_time).round(1),
            "vital": np.where(event_time <= censor_time, "died", "alive"),
            "age_years": age,
            "stage": stage,
            "smoker": smoker,
        }
    ).to_csv(path, index=False)


def test_a_new_survival_schema_runs_by_configuration_alone(tmp_path: Path, capsys) -> None:
    from fedmed.cli.main import main

    sites = ""
    for i, (name, n) in enumerate([("north", 140), ("south", 100), ("east", 80)]):
        _write_cohort(tmp_path / f"{name}.csv", n, seed=i)
        sites += f'[[sites]]\nname = "{name}"\npath = "{tmp_path / name}.csv"\n'
    config = tmp_path / "cohort.toml"
    config.write_text(
        f"""name = "cohort"
task = "survival"
rounds = 8
output_dir = "{tmp_path / "runs"}"
[model]
kind = "linear"
[train]
local_steps = 5
batch_size = 128
lr = 0.2
[strategy]
name = "fedadam"
server_lr = 0.1
[data.schema]
time = "months"
event = "vital"
event_value = "died"
censored_value = "alive"
features = ["age_years", "stage", "smoker"]
categorical = {{ stage = ["I", "II", "III"], smoker = ["no", "yes"] }}
drop_first = true
{sites}"""
    )

    assert main(["check-data", str(config)]) == 0
    checked = capsys.readouterr().out
    assert main(["simulate", str(config), "--quiet"]) == 0

    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    import json

    metrics = json.loads((run_dir / "metrics.json").read_text())
    card = json.loads((run_dir / "model.card.json").read_text())
    assert "north: 98 train / 42 test rows" in checked and " events, " in checked
    assert set(metrics["final"]["sites"]) == {"north", "south", "east"}
    assert metrics["final"]["average"]["c_index"] > 0.65  # stage and age carry real signal
    assert card["task"] == "survival" and card["inputs"] == [
        "age_years", "stage=II", "stage=III", "smoker=yes"
    ]  # fmt: skip


def test_served_cox_model_gives_hazard_ratios_with_exact_attributions(tmp_path: Path) -> None:
    """A saved lung model served: hazard ratio vs the reference patient, IG adds up to it."""
    from fastapi.testclient import TestClient

    from fedmed.cli.main import main
    from fedmed.serving.api import ServedModel, create_app

    out = str(tmp_path / "runs")
    assert (
        main(["simulate", "lung", "--quiet", "--set", "rounds=3", "--set", f"output_dir={out}"])
        == 0
    )
    (run_dir,) = (tmp_path / "runs").iterdir()
    served = ServedModel(run_dir)
    features = list(served.schema.features)
    patients = load_lung()[features].dropna().head(4)
    rows = patients.to_dict("records")

    preds = served.predict(rows, explain=True)
    reply = TestClient(create_app(served)).post("/predict", json={"rows": rows})
    patients.to_csv(tmp_path / "patients.csv", index=False)
    scored_csv = tmp_path / "scored.csv"
    cli = ["predict", str(run_dir), str(tmp_path / "patients.csv"), "--output", str(scored_csv)]
    assert main([*cli, "--explain"]) == 0
    scored = pd.read_csv(scored_csv)

    x = served.pre.transform(served.frame(rows))
    weight = served.model[0].weight.detach().numpy()[0]
    sex = served.pre.input_names.index("sex=2")
    for pred, z in zip(preds, x, strict=True):
        assert pred["log_hazard_ratio"] == pytest.approx(float(z @ weight), abs=1e-5)
        assert pred["hazard_ratio"] == pytest.approx(math.exp(pred["log_hazard_ratio"]), rel=1e-6)
        assert sum(pred["explanation"].values()) == pytest.approx(
            pred["log_hazard_ratio"], abs=1e-4
        )
        assert pred["explanation"]["sex"] == pytest.approx(weight[sex] * z[sex], abs=1e-5)
    assert reply.status_code == 200
    assert set(reply.json()["predictions"][0]) == {
        "log_hazard_ratio",
        "hazard_ratio",
        "explanation",
        "imputed",  # the fields filled with the training mean (missing = "mean"): none here
    }
    assert reply.json()["predictions"][0]["imputed"] == []
    np.testing.assert_allclose(
        scored["hazard_ratio"], [p["hazard_ratio"] for p in preds], rtol=1e-5
    )
    explained = scored[[f"explain:{f}" for f in features]].sum(axis=1)
    np.testing.assert_allclose(explained, scored["log_hazard_ratio"], atol=1e-4)


def test_site_level_dp_is_allowed_for_survival(tmp_path: Path) -> None:
    """Central DP clips and noises whole site updates: no per-patient decomposition needed."""
    import json

    from fedmed.cli.main import main

    overrides = ["rounds=2", "privacy.central=server-side", f"output_dir={tmp_path / 'runs'}"]
    args = [item for o in overrides for item in ("--set", o)]

    assert main(["simulate", "lung", "--quiet", *args]) == 0

    (run_dir,) = (tmp_path / "runs").iterdir()
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert final["central_epsilon"] > 0
    assert 0.0 <= final["average"]["c_index"] <= 1.0


def test_mlp_cox_learns_through_train_plain() -> None:
    df = _lung()
    x = ((df[COVARIATES] - df[COVARIATES].mean()) / df[COVARIATES].std()).to_numpy(np.float32)
    y = df[["time", "status"]].to_numpy(np.float32)
    task = get_task("survival")
    torch.manual_seed(0)
    model = task.build_model(x.shape[1], parse_run_config(_run({"model.kind": "mlp"})).model)
    cpu = torch.device("cpu")
    before = evaluate(model, x, y, task, cpu)
    train = TrainConfig(local_steps=200, batch_size=64, optimizer="adam", lr=0.01)

    result = train_plain(model, x, y, task, train, seed=0, device=cpu)

    after = evaluate(model, x, y, task, cpu)
    assert result.steps == 200 and after["loss"] < before["loss"]
    assert after["c_index"] > 0.62 and after["c_index"] > before["c_index"]
