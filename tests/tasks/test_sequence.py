"""The sequence task: binning, masks and carried-forward values by hand, outcome fields that
must never become inputs, loader errors, GRU-D's decays by hand and its per-patient gradients,
validation splits, federated training with and without DP (DPGRU, GRU-D), and the PhysioNet
2012 sites by ICU type."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from opacus import GradSampleModule
from opacus.layers import DPGRU
from opacus.validators import ModuleValidator

from fedmed.cli.main import main
from fedmed.config import ModelConfig, load_run_config, parse_run_config, resolve_config_path
from fedmed.data.series import bin_means, features_of, load_long
from fedmed.errors import ConfigError, DataError
from fedmed.tasks import build_model, load_site_data, load_site_table
from fedmed.tasks.sequence import SeriesGRUD, window_summaries
from tests.conftest import DATA_DIR, needs_shared_data
from tests.tasks.test_imaging import _to_toml

VARIABLES = ("HR", "Temp", "Age")


def _long_and_outcomes(tmp_path: Path, n: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """Patients whose heart rate drifts up when they die; irregular times; some -1 codes."""
    rng = np.random.default_rng(seed)
    rows, outcomes = [], []
    for pid in range(1000, 1000 + n):
        died = int(pid % 3 == 0)
        rows.append((pid, 0, "Age", float(rng.integers(20, 90))))
        rows.append((pid, 0, "Unit", float(1 + pid % 2)))
        for t in np.sort(rng.choice(np.arange(0, 12 * 60), 8, replace=False)):
            rows.append((pid, int(t), "HR", 80 + 30 * died * t / 720 + rng.normal(0, 3)))
        rows.append((pid, 30, "Temp", -1.0))  # the missing-value code
        outcomes.append((pid, rng.integers(0, 30), rng.integers(0, 20), died))
    long = tmp_path / "long.csv"
    pd.DataFrame(rows, columns=["record_id", "time_min", "parameter", "value"]).to_csv(
        long, index=False
    )
    out = tmp_path / "outcomes.csv"
    pd.DataFrame(outcomes, columns=["RecordID", "SAPS-I", "SOFA", "In-hospital_death"]).to_csv(
        out, index=False
    )
    return long, out


def _study(tmp_path: Path, **extra: object) -> dict:
    long, out = _long_and_outcomes(tmp_path)
    raw: dict = {
        "name": "seq",
        "task": "sequence-classification",
        "rounds": 2,
        "output_dir": str(tmp_path / "runs"),
        "model": {"kind": "gru", "hidden": [8]},
        "train": {"local_steps": 2, "batch_size": 16, "optimizer": "adam", "lr": 0.01},
        "data": {
            "site_column": "Unit",
            "schema": {
                "target": "In-hospital_death",
                "features": list(VARIABLES),
                "min_rows": 10,
            },
            "series": {"outcomes": str(out), "hours": 12, "bin_minutes": 60},
        },
        "sites": [
            {"name": "u1", "path": str(long), "site_values": [1]},
            {"name": "u2", "path": str(long), "site_values": [2]},
        ],
    }
    raw.update(extra)
    return raw


def test_binning_masks_carry_forward_and_delta_by_hand() -> None:
    cfg = parse_run_config(
        {
            "task": "sequence-classification",
            "model": {"kind": "gru"},
            "data": {"series": {"hours": 4, "bin_minutes": 60}},
            "sites": [{"name": "a", "path": "x"}],
            "mode": "local",
        }
    )
    obs = pd.DataFrame(
        {
            "id": [7, 7, 7, 7, 7, 7],
            "time": [0, 10, 50, 130, 240, 300],  # 240 = the window's end: last bin; 300: after
            "variable": ["HR", "HR", "Temp", "HR", "HR", "HR"],
            "value": [80.0, 90.0, -1.0, 100.0, 70.0, 999.0],
        }
    )
    sums, counts = bin_means(obs, np.array([7]), ("HR", "Temp"), cfg.data.series, 4)

    assert counts[0, :, 0].tolist() == [2, 0, 1, 1]  # HR: bins 0, 2, 3; 300 min dropped
    assert counts[0, :, 1].tolist() == [0, 0, 0, 0]  # Temp: -1 is "not measured"
    assert sums[0, 0, 0] == 170.0
    x = features_of(sums, counts, mean=np.array([85.0, 37.0]), std=np.array([5.0, 1.0]))
    value, mask, delta = x[0, :, 0], x[0, :, 2], x[0, :, 4]
    assert value.tolist() == [0.0, 0.0, 3.0, -3.0]  # bin 1 carries bin 0's mean (85 -> 0)
    assert mask.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert np.allclose(delta, np.array([0, 1, 0, 0]) / 4)
    assert np.allclose(x[0, :, 5], np.array([1, 2, 3, 4]) / 4)  # Temp never seen: since admission
    assert np.all(x[0, :, 1] == 0.0)  # never-seen values are the train mean (0)


def test_log_variables_and_window_summaries_by_hand() -> None:
    cfg = parse_run_config(
        {
            "task": "sequence-classification",
            "model": {"kind": "gru"},
            "data": {
                "schema": {"features": ["HR", "Urine"]},
                "series": {"hours": 2, "bin_minutes": 60, "log_variables": ["Urine"]},
            },
            "sites": [{"name": "a", "path": "x"}],
            "mode": "local",
        }
    )
    obs = pd.DataFrame(
        {
            "id": [1, 1, 1, 1],
            "time": [0, 10, 70, 80],
            "variable": ["HR", "Urine", "Urine", "Urine"],
            "value": [80.0, 99.0, -5.0, 1999.0],  # -5: an artefact, read as 0
        }
    )
    sums, counts = bin_means(obs, np.array([1]), ("HR", "Urine"), cfg.data.series, 2)

    assert sums[0, 0].tolist() == [80.0, pytest.approx(np.log1p(99.0))]  # HR is not logged
    assert sums[0, 1, 1] == pytest.approx(np.log(2000.0))  # log1p(0) + log1p(1999)
    assert counts[0, :, 1].tolist() == [1, 2]
    # Summaries over (patients, bins, value|mask|delta): observed share, mean, min, max, last.
    x = torch.tensor([[[2.0, 1.0, 0.0], [4.0, 1.0, 0.0], [4.0, 0.0, 0.5]]])
    never = torch.tensor([[[0.0, 0.0, 0.1]] * 3])
    assert window_summaries(x, 1).tolist() == [[pytest.approx(2 / 3), 3.0, 2.0, 4.0, 4.0]]
    assert window_summaries(never, 1).tolist() == [[0.0, 0.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ConfigError, match="log_variables names 'Lactate'"):
        raw = cfg.to_dict()
        raw["data"]["series"]["log_variables"] = ["Lactate"]
        load_site_table(bad := parse_run_config(raw), bad.sites[0])


def test_consortium_scale_is_the_unions_and_trains_serves_and_pools_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from fedmed.study.baselines import pooled_site_data, union_scale
    from fedmed.study.statistics import series_reference

    raw = _study(tmp_path)
    raw["data"]["series"]["log_variables"] = ["HR"]
    cfg = parse_run_config(raw)
    tables = [load_site_table(cfg, s) for s in cfg.sites]
    observed = []  # every observed train bin of both sites, back in (logged) units
    for t in tables:
        x, pre = t.data.x_train, t.data.preprocessing
        raw_units = x[..., :3] * np.array(pre["std"]) + np.array(pre["mean"])
        observed.append([raw_units[..., v][x[..., 3 + v] > 0] for v in range(3)])
    union = [np.concatenate([site[v] for site in observed]) for v in range(3)]

    mean, std = series_reference([t.data.preprocessing for t in tables])

    seen = [0, 2]  # Temp (1) is only ever the missing code: no cell, the neutral (0, 1)
    np.testing.assert_allclose(np.array(mean)[seen], [union[v].mean() for v in seen], rtol=1e-5)
    np.testing.assert_allclose(np.array(std)[seen], [union[v].std() for v in seen], rtol=1e-4)
    assert (mean[1], std[1]) == (0.0, 1.0) and len(union[1]) == 0
    raw["data"]["series"]["standardize"] = "consortium"
    toml = tmp_path / "consortium.toml"
    toml.write_text(_to_toml(raw))
    assert main(["simulate", str(toml), "--quiet"]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    used = json.loads((run_dir / "metrics.json").read_text())["config"]["data"]["series"]
    card = json.loads((run_dir / "model.card.json").read_text())["preprocessing"]
    np.testing.assert_allclose(used["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(card["mean"], mean, rtol=1e-12)
    pooled, per_site = pooled_site_data(union_scale(parse_run_config(raw)))
    assert all(np.allclose(d.preprocessing["mean"], mean) for d in per_site)
    assert np.allclose(pooled.preprocessing["mean"], mean)
    with pytest.raises(ConfigError, match="SecAgg"):
        raw["strategy"] = {"secure_aggregation": True, "validate_updates": False}
        load_site_table(bad := parse_run_config(raw), bad.sites[0])


def test_outcome_fields_never_reach_the_model(tmp_path: Path) -> None:
    cfg = parse_run_config(_study(tmp_path))
    before = load_site_data(cfg, cfg.sites[0])
    out = Path(cfg.data.series.outcomes)
    frame = pd.read_csv(out)
    frame["SAPS-I"] = frame["In-hospital_death"] * 100  # a perfect leak, if it were read
    frame["SOFA"] = 0
    frame.to_csv(out, index=False)
    from fedmed.data.series import load_outcomes

    load_outcomes.cache_clear()
    after = load_site_data(cfg, cfg.sites[0])

    assert np.array_equal(before.x_train, after.x_train)
    assert before.input_names == VARIABLES
    assert before.x_train.shape[1:] == (12, 3 * len(VARIABLES))


def test_site_column_picks_the_patients_and_splits_are_standardized(tmp_path: Path) -> None:
    cfg = parse_run_config(_study(tmp_path))

    tables = [load_site_table(cfg, s) for s in cfg.sites]

    assert [len(t.y_train) + len(t.y_test) for t in tables] == [30, 30]
    hr = tables[0].data.x_train[:, :, 0][tables[0].data.x_train[:, :, 3] == 1]
    assert abs(float(hr.mean())) < 0.1 and abs(float(hr.std()) - 1) < 0.1


def test_loader_errors_name_the_fix(tmp_path: Path) -> None:
    raw = _study(tmp_path)
    long = Path(raw["sites"][0]["path"])
    pd.read_csv(long).rename(columns={"time_min": "minutes"}).to_csv(
        tmp_path / "bad.csv", index=False
    )
    raw["sites"][0]["path"] = str(tmp_path / "bad.csv")
    cfg = parse_run_config(raw)

    with pytest.raises(DataError, match="column 'time_min' is missing.*data.series.id_column"):
        load_site_table(cfg, cfg.sites[0])
    no_vars = parse_run_config({**_study(tmp_path), "data": {**raw["data"], "schema": {}}})
    with pytest.raises(ConfigError, match="needs data.schema.features"):
        load_site_table(no_vars, no_vars.sites[1])
    fresh = parse_run_config(_study(tmp_path))  # rewrites the files
    outcomes = Path(fresh.data.series.outcomes)
    pd.read_csv(outcomes).iloc[:-3].to_csv(outcomes, index=False)
    from fedmed.data.series import load_outcomes

    load_outcomes.cache_clear()
    with pytest.raises(DataError, match="2 patients have no row in"):
        load_site_table(fresh, fresh.sites[1])
    load_outcomes.cache_clear()
    load_long.cache_clear()


def test_dp_studies_build_opacus_dpgru(tmp_path: Path) -> None:
    cfg = parse_run_config(_study(tmp_path, privacy={"enabled": True}))

    model = build_model(cfg)

    assert isinstance(model.gru, DPGRU)


def _grud(n_variables: int = 1, hidden: int = 4, seed: int = 0) -> SeriesGRUD:
    torch.manual_seed(seed)
    return SeriesGRUD(n_variables, ModelConfig(kind="grud", hidden=(hidden,)))


def _series(values: list[float], mask: list[float]) -> torch.Tensor:
    """One patient, one variable: (1, bins, value|mask|delta) with a junk delta channel."""
    v, m = torch.tensor(values), torch.tensor(mask)
    return torch.stack([v, m, torch.full_like(v, 99.0)], dim=1)[None]


def test_grud_input_decay_matches_the_formula_by_hand() -> None:
    model = _grud()
    with torch.no_grad():
        model.input_decay.weight.fill_(0.5)
        model.input_decay.bias.fill_(-0.25)
    x = _series([2.0, 7.0, 7.0, 3.0, 7.0], [1, 0, 0, 1, 0])  # 7.0: carried junk, never read

    x_hat, mask, delta = model.decayed_inputs(x)

    # δ: bins since the last observation before t (t + 1 before any); γ = exp(-relu(.5δ - .25))
    assert delta[0, :, 0].tolist() == [1.0, 1.0, 2.0, 3.0, 1.0]
    gamma = [np.exp(-max(0.5 * d - 0.25, 0.0)) for d in (1, 2, 1)]
    expected = [2.0, gamma[0] * 2.0, gamma[1] * 2.0, 3.0, gamma[2] * 3.0]
    assert np.allclose(x_hat[0, :, 0].detach().numpy(), expected)
    assert mask[0, :, 0].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_grud_reads_only_observed_values_and_decays_to_the_mean_before_the_first() -> None:
    model = _grud(n_variables=2, hidden=6).eval()
    torch.manual_seed(1)
    x = torch.randn(3, 8, 6)
    x[..., 2:4] = (torch.rand(3, 8, 2) > 0.5).float()
    x[:, 0, 2:4] = 0.0  # nothing observed in the first bin
    unobserved = x.clone()
    unobserved[..., :2] += 10.0 * (1 - x[..., 2:4])  # change only values the mask hides
    unobserved[..., 4:] = -3.0  # and the data layer's delta channel
    observed = x.clone()
    observed[..., :2] += 1.0 * x[..., 2:4]

    out = model(x)

    assert out.shape == (3, 1)
    assert torch.allclose(model(unobserved), out)
    assert not torch.allclose(model(observed), out)
    assert torch.all(model.decayed_inputs(x)[0][:, 0] == 0.0)  # the train mean after scaling


def test_grud_per_patient_gradients_match_one_patient_at_a_time() -> None:
    model = _grud(n_variables=3, hidden=5)
    twin = _grud(n_variables=3, hidden=5, seed=1)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, 6, 9)
    x[..., 3:6] = (torch.rand(4, 6, 3) > 0.5).float()

    assert ModuleValidator.validate(model, strict=False) == []
    wrapped = GradSampleModule(model, loss_reduction="sum")
    wrapped(x).sum().backward()

    for i in range(len(x)):
        twin.zero_grad()
        twin(x[i : i + 1]).sum().backward()
        for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            assert torch.allclose(p.grad_sample[i], q.grad, atol=1e-5), name
    wrapped._close()


def test_validation_split_is_carved_from_train_and_never_shows_test(tmp_path: Path) -> None:
    plain = parse_run_config(_study(tmp_path))
    raw = _study(tmp_path)
    raw["data"]["schema"]["validation_fraction"] = 0.25
    tuning = parse_run_config(raw)

    full = load_site_table(plain, plain.sites[0]).data
    carved = load_site_table(tuning, tuning.sites[0]).data

    def masks(a: np.ndarray) -> set[bytes]:  # masks are not rescaled: rows identify patients
        return {row.tobytes() for row in a[:, :, 3:6]}

    assert len(carved.y_train) + len(carved.y_test) == len(full.y_train)
    assert masks(carved.x_train) | masks(carved.x_test) == masks(full.x_train)
    assert not masks(carved.x_test) & masks(full.x_test)
    with pytest.raises(ConfigError, match="validation_fraction must be in"):
        raw["data"]["schema"]["validation_fraction"] = 1.0
        parse_run_config(raw)


@pytest.mark.parametrize(
    ("kind", "private", "summaries", "members"),
    [
        ("gru", False, False, 1),
        ("gru", True, False, 1),
        ("grud", True, False, 1),
        ("grud", True, True, 1),
        ("gru", False, False, 3),  # an ensemble: trained, saved, served and explained as one
        ("gru", True, False, 2),
    ],
)
def test_federated_sequence_study_trains_with_and_without_dp(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    kind: str,
    private: bool,
    summaries: bool,
    members: int,
) -> None:
    toml = tmp_path / "seq.toml"
    model = {"kind": kind, "hidden": [8], "summaries": summaries, "members": members}
    study = _study(tmp_path, privacy={"enabled": private}, model=model)
    toml.write_text(_to_toml(study))

    code = main(["simulate", str(toml), "--quiet"])

    assert code == 0, capsys.readouterr().err
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["final"]["sites"]) == {"u1", "u2"}
    assert all(0 <= m["roc_auc"] <= 1 for m in metrics["final"]["sites"].values())
    eps = [m["train"]["epsilon"] for h in metrics["history"] for m in h["sites"].values()]
    assert (max(eps) > 0) == private
    rows = tmp_path / "rows.csv"  # a clinic's long table, scored and explained offline
    rows.write_text("record_id,time_min,parameter,value\n7,0,Age,60\n7,30,HR,95\n7,90,HR,-1\n")
    assert main(["predict", str(run_dir), str(rows), "--explain"]) == 0
    scored = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert scored.columns.tolist() == [
        "record_id",
        "probability",
        "label",
        *(f"explain:{v}" for v in VARIABLES),
    ]
    assert scored["explain:Temp"].tolist() == [0.0]  # never observed: exactly the baseline


@needs_shared_data
def test_physionet_sites_by_icu_type_match_provenance() -> None:
    assert (DATA_DIR / "physionet2012" / "set_a_long.csv.gz").is_file()
    cfg = load_run_config(resolve_config_path("physionet2012"))
    leaking = {"SAPS-I", "SOFA", "Length_of_stay", "Survival", "In-hospital_death", "ICUType"}

    tables = [load_site_table(cfg, s) for s in cfg.sites]

    sizes = [len(t.y_train) + len(t.y_test) for t in tables]
    deaths = [int(t.y_train.sum() + t.y_test.sum()) for t in tables]
    assert sizes == [577, 874, 1481, 1068] and deaths == [81, 43, 275, 155]
    assert not leaking & set(tables[0].features)
    assert tables[0].data.x_train.shape[1:] == (48, 3 * len(cfg.data.schema.features))
