"""`fedmed serve` for image and sequence models: raw images (JSON arrays, PNG uploads) and
patients' observations in, probabilities (and integrated-gradients explanations) out, the card's
preprocessing applied exactly, 422s that name the fix; `fedmed predict` on a long CSV of
observations agrees with the HTTP API."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from fedmed.cli.main import main
from fedmed.data.images import to_model_input
from fedmed.errors import ConfigError
from fedmed.serving.api import ServedModel, create_app, open_model
from fedmed.serving.arrays import ServedImages, ServedSeries, series_explanation
from tests.tasks.test_imaging import _images, _to_toml
from tests.tasks.test_imaging import _study as _image_study
from tests.tasks.test_sequence import _study as _series_study


def _trained(raw: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> Path:
    toml = tmp_path / "study.toml"
    toml.write_text(_to_toml(raw))
    assert main(["simulate", str(toml), "--quiet"]) == 0
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_image_model_serves_json_arrays_and_png_uploads(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = _trained(_image_study(tmp_path), tmp_path, capsys)
    served = open_model(run_dir)
    client = TestClient(create_app(served))
    images, _ = _images(3, seed=5)  # 8x8 grayscale, as the sites' images

    reply = client.post("/predict", json={"images": images.tolist()})
    png = client.post("/predict/png?explain=true", content=_png(images[1]))

    assert isinstance(served, ServedImages)
    assert reply.status_code == 200, reply.text
    with torch.no_grad():
        logits = served.model(torch.from_numpy(to_model_input(images[..., None]))).squeeze(-1)
    expected = torch.sigmoid(logits).numpy()
    probs = [p["probability"] for p in reply.json()["predictions"]]
    np.testing.assert_allclose(probs, expected, rtol=1e-5)
    assert [p["label"] for p in reply.json()["predictions"]] == [int(p >= 0.5) for p in probs]
    assert png.status_code == 200, png.text
    one = png.json()["predictions"][0]
    assert one["probability"] == pytest.approx(expected[1], rel=1e-5)
    assert np.asarray(one["saliency"]).shape == (8, 8)
    card = client.get("/model").json()
    assert card["task"] == "imaging-classification" and card["signature"]["algorithm"]
    assert client.get("/health").json()["weights_sha256"] == card["weights_sha256"]
    assert "/predict/png" in client.get("/openapi.json").json()["paths"]
    with pytest.raises(ConfigError, match="open_model"):
        ServedModel(run_dir)  # the table server still says where images are served


def test_bad_images_get_422s_that_name_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = _trained(_image_study(tmp_path), tmp_path, capsys)
    client = TestClient(create_app(open_model(run_dir)))
    gray, _ = _images(1, seed=1)
    rgb = np.stack([gray[0]] * 3, axis=-1)
    cases = [
        ({"images": [np.zeros((10, 10), int).tolist()]}, "image_size", "resize it to 8x8"),
        ({"images": [rgb.tolist()]}, "image_channels", "convert it to grayscale"),
        ({"images": [np.full((8, 8), 300).tolist()]}, "image_pixels", "integers 0-255"),
        ({"images": [[[1, 2], [3]]]}, "image_array", "rows of equal length"),
        ({"images": [np.zeros((2, 8, 8, 1)).tolist()]}, "image_shape", "H x W x C"),
    ]
    for body, kind, fix in cases:
        reply = client.post("/predict", json=body)
        assert reply.status_code == 422, (kind, reply.text)
        detail = reply.json()["detail"][0]
        assert detail["type"] == kind and fix in detail["msg"], detail

    reply = client.post("/predict/png", content=_png(rgb))
    assert reply.status_code == 422 and "convert it to grayscale" in reply.text
    reply = client.post("/predict/png", content=b"not a png")
    assert reply.status_code == 422 and "not a readable image" in reply.text
    assert client.post("/predict", json={"images": []}).status_code == 422


# A patient by hand, for a study with 12 hourly bins and variables HR, Temp, Age.
PATIENT = [
    {"time": 0, "variable": "Age", "value": 50.0},
    {"time": 30, "variable": "HR", "value": 90.0},
    {"time": 150, "variable": "HR", "value": 100.0},
    {"time": 170, "variable": "HR", "value": 110.0},  # same bin: the mean, 105
    {"time": 200, "variable": "Temp", "value": -1.0},  # the missing-value code: dropped
    {"time": 900, "variable": "HR", "value": 300.0},  # after the 12 h window: dropped
]


def _by_hand(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(12 bins, value x3 | mask x3 | delta x3) for PATIENT, variables (HR, Temp, Age)."""
    bins = 12
    x = np.zeros((bins, 9), np.float32)
    z = (np.array([90.0, 105.0]) - mean[0]) / std[0]
    x[0:2, 0], x[2:, 0] = z[0], z[1]  # HR, carried forward
    x[:, 2] = (50.0 - mean[2]) / std[2]  # Age, seen at admission
    x[[0, 2], 3] = 1.0  # HR observed in bins 0 and 2
    x[0, 5] = 1.0  # Age in bin 0
    steps = np.arange(bins)
    x[:, 6] = np.where(steps < 2, steps, steps - 2) / bins  # HR: bins since last seen
    x[:, 7] = (steps + 1) / bins  # Temp: never seen, time since admission
    x[:, 8] = steps / bins
    return x


def test_series_model_serves_a_patients_observations_as_the_sites_built_them(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = _trained(_series_study(tmp_path), tmp_path, capsys)
    served = open_model(run_dir)
    client = TestClient(create_app(served))
    other = [{"time": 60, "variable": "HR", "value": 70.0}]

    reply = client.post(
        "/predict", json={"patients": [{"observations": PATIENT}, {"observations": other}]}
    )

    assert isinstance(served, ServedSeries) and served.variables == ("HR", "Temp", "Age")
    assert reply.status_code == 200, reply.text
    expected_x = _by_hand(served.mean, served.std)
    np.testing.assert_allclose(served.inputs([PATIENT])[0], expected_x, atol=1e-6)
    with torch.no_grad():
        logit = served.model(torch.from_numpy(expected_x[None]))
    first = reply.json()["predictions"][0]
    assert first["probability"] == pytest.approx(torch.sigmoid(logit).item(), rel=1e-5)
    assert len(reply.json()["predictions"]) == 2
    assert client.get("/model").json()["preprocessing"]["variables"] == ["HR", "Temp", "Age"]


def test_logged_variables_and_summaries_serve_as_the_sites_trained_them(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = _series_study(tmp_path, model={"kind": "grud", "hidden": [8], "summaries": True})
    raw["data"]["series"]["log_variables"] = ["HR"]
    served = open_model(_trained(raw, tmp_path, capsys))

    x = served.inputs([PATIENT])[0]

    assert served.pre["log_variables"] == ["HR"] and served.series.log_variables == ("HR",)
    logged = np.array([np.log1p(90.0), (np.log1p(100.0) + np.log1p(110.0)) / 2])
    np.testing.assert_allclose(x[[0, 2], 0], (logged - served.mean[0]) / served.std[0], rtol=1e-5)
    np.testing.assert_allclose(x[0, 2], (50.0 - served.mean[2]) / served.std[2], rtol=1e-5)
    assert served.model.head.in_features == 8 + 5 * 3  # the state + 5 summaries x 3 variables


def test_bad_series_get_422s_that_name_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = _series_study(tmp_path)
    raw["rounds"] = 1
    client = TestClient(create_app(open_model(_trained(raw, tmp_path, capsys))))
    cases = [
        ([{"time": 5, "variable": "SpO2", "value": 97}], "series_variable", "HR, Temp, Age"),
        ([], "series_empty", "send at least one"),
        ([{"time": 9000, "variable": "HR", "value": 80}], "series_empty", "0 to 720 minutes"),
        ([{"time": 5, "variable": "HR"}], "missing", ""),
        ([{"time": 5, "variable": "HR", "value": 80, "unit": "bpm"}], "extra_forbidden", ""),
    ]
    for patient, kind, fix in cases:
        reply = client.post("/predict", json={"patients": [{"observations": patient}]})

        assert reply.status_code == 422, (kind, reply.text)
        detail = reply.json()["detail"][0]
        assert detail["type"] == kind and fix in detail["msg"], detail


def _logits(served: ServedSeries, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return served.model(torch.from_numpy(x)).squeeze(-1).numpy()


@pytest.mark.parametrize("model", [{"kind": "gru"}, {"kind": "grud", "summaries": True}])
def test_series_attributions_add_up_and_are_zero_for_a_variable_never_observed(
    tmp_path: Path, capsys: pytest.CaptureFixture, model: dict
) -> None:
    raw = _series_study(tmp_path, model={"hidden": [8], **model})
    served = open_model(_trained(raw, tmp_path, capsys))
    other = [
        {"time": 60, "variable": "HR", "value": 70.0},
        {"time": 65, "variable": "Temp", "value": 38.5},
    ]
    x = served.inputs([PATIENT, other])

    per_bin = served.attributions(torch.from_numpy(x))

    assert isinstance(served, ServedSeries) and per_bin.shape == (2, 12, 3)
    baseline = served.baseline()[0]  # nothing observed: train mean, no masks, time since admission
    steps = np.arange(12)
    np.testing.assert_array_equal(baseline[:, :6], 0.0)
    np.testing.assert_allclose(baseline[:, 6:], np.repeat((steps + 1)[:, None] / 12, 3, 1))
    gap = _logits(served, x) - _logits(served, served.baseline())
    np.testing.assert_allclose(per_bin.sum(axis=(1, 2)), gap, atol=0.01 * np.abs(gap).max())
    assert (per_bin[0, :, 1] == 0.0).all()  # PATIENT's only Temp was the missing code
    assert (per_bin[1, :, 2] == 0.0).all()  # the other patient has no Age
    assert np.abs(per_bin[0, :, 0]).sum() > 0 and np.abs(per_bin[1, :, 1]).sum() > 0


def test_series_explain_over_http_gives_every_variable_and_bins_for_the_top_five(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = _series_study(tmp_path)
    raw["rounds"] = 1
    served = open_model(_trained(raw, tmp_path, capsys))
    client = TestClient(create_app(served))
    body = {"patients": [{"observations": PATIENT}]}

    plain = client.post("/predict", json=body)
    explained = client.post("/predict", json={**body, "explain": True})

    assert plain.status_code == 200 and explained.status_code == 200, explained.text
    assert plain.json()["predictions"][0]["explanation"] is None
    one = explained.json()["predictions"][0]
    assert one["probability"] == plain.json()["predictions"][0]["probability"]
    per_bin = served.attributions(torch.from_numpy(served.inputs([PATIENT])))[0]
    totals = dict(zip(served.variables, per_bin.sum(0).tolist(), strict=True))
    assert one["explanation"] == pytest.approx(totals, abs=1e-5)
    assert set(one["explanation_bins"]) == {"HR", "Temp", "Age"}
    assert one["explanation_bins"]["HR"] == pytest.approx(per_bin[:, 0].tolist(), abs=1e-5)
    # With more variables than that, only the 5 largest carry their course over time.
    many = np.zeros((12, 7))
    many[3] = [0.1, -0.9, 0.2, 0.8, 0.0, -0.5, 0.3]
    small = series_explanation(tuple("ABCDEFG"), many)
    assert list(small["explanation"]) == list("ABCDEFG")
    assert list(small["explanation_bins"]) == ["B", "D", "F", "G", "C"]


def _long_csv(path: Path, patients: dict[str, list[dict]], names: tuple[str, ...]) -> Path:
    rows = [
        (pid, o["time"], o["variable"], o["value"]) for pid, obs in patients.items() for o in obs
    ]
    pd.DataFrame(rows, columns=list(names)).to_csv(path, index=False)
    return path


def test_fedmed_predict_on_a_long_csv_matches_the_http_api(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = _trained({**_series_study(tmp_path), "rounds": 1}, tmp_path, capsys)
    client = TestClient(create_app(open_model(run_dir)))
    other = [{"time": 60, "variable": "HR", "value": 70.0}]
    default = _long_csv(
        tmp_path / "obs.csv",
        {"p9": other, "p1": PATIENT},
        ("record_id", "time_min", "parameter", "value"),
    )
    own = _long_csv(
        tmp_path / "own.csv", {"p9": other, "p1": PATIENT}, ("pid", "minute", "item", "reading")
    )
    flags = "--id-column pid --time-column minute --variable-column item --value-column reading"
    out_a, out_b = tmp_path / "a.csv", tmp_path / "b.csv"

    codes = [
        main(["predict", str(run_dir), str(default), "--explain", "--output", str(out_a)]),
        main(["predict", str(run_dir), str(own), *flags.split(), "--output", str(out_b)]),
    ]
    reply = client.post(
        "/predict",
        json={"patients": [{"observations": other}, {"observations": PATIENT}], "explain": True},
    )

    assert codes == [0, 0], capsys.readouterr().err
    a, b = pd.read_csv(out_a), pd.read_csv(out_b)
    predictions = reply.json()["predictions"]
    assert a["record_id"].tolist() == ["p9", "p1"] and b["pid"].tolist() == ["p9", "p1"]
    probs = [p["probability"] for p in predictions]
    np.testing.assert_allclose(a["probability"], probs, atol=1e-6)
    np.testing.assert_allclose(b["probability"], probs, atol=1e-6)
    assert a["label"].tolist() == [p["label"] for p in predictions]
    for variable in ("HR", "Temp", "Age"):
        expected = [p["explanation"][variable] for p in predictions]
        np.testing.assert_allclose(a[f"explain:{variable}"], expected, atol=1e-5)
    assert "explain:HR" not in b.columns


def test_bad_long_csvs_name_the_file_the_row_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = _trained({**_series_study(tmp_path), "rounds": 1}, tmp_path, capsys)
    header = "record_id,time_min,parameter,value\n"
    cases = {
        "descriptors.csv": (  # patient 2 has descriptor rows only: named, never skipped
            header + "1,0,HR,80\n2,0,RecordID,2\n2,0,ICUType,3\n",
            "patient 2 has no observation",
            "leave the patient out",
        ),
        "othermodel.csv": (
            header + "1,0,Glucose,80\n1,0,RecordID,1\n",
            "no observation of a variable the model reads (HR, Temp, Age; found only: "
            "Glucose, RecordID)",
            "rename the variables",
        ),
        "text.csv": (
            header + "1,0,HR,80\n1,5,HR,high\n",
            "column 'value' has 'high'",
            "data row 2; give a number",
        ),
        "notime.csv": (header + "1,,HR,80\n", "column 'time_min' is empty", "data row 1"),
        # A reading no model can use is refused, never scored as if it were a number.
        "infinite.csv": (
            header + "1,0,HR,80\n1,5,HR,inf\n",
            "column 'value' has 'inf' at data row 2",
            "not a finite number",
        ),
        "huge.csv": (header + "1,0,HR,1e39\n", "column 'value' has '1e+39'", "remove the row"),
        "inftime.csv": (header + "1,-inf,HR,80\n", "column 'time_min' has '-inf'", "data row 1"),
        "late.csv": (
            header + "1,0,HR,80\n2,5,Temp,-1\n2,9000,HR,80\n",
            "patient 2 has no observation",
            "0 to 720 minutes",
        ),
        "empty.csv": (header, "no observations", "add rows"),
        "cols.csv": ("id,t,var,val\n1,0,HR,80\n", "column 'record_id' is missing", "--id-column"),
    }
    for name, (text, what, fix) in cases.items():
        (tmp_path / name).write_text(text)

        code = main(["predict", str(run_dir), str(tmp_path / name)])

        err = capsys.readouterr().err
        assert code == 2 and str(tmp_path / name) in err, err
        assert what in err and fix in err, err


def test_fedmed_predict_skips_the_descriptor_rows_training_skips_and_says_so_once(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The training table itself (with its 'Unit' rows) plus PhysioNet's RecordID/ICUType rows
    predicts exactly like the same table holding only the model's variables."""
    run_dir = _trained({**_series_study(tmp_path), "rounds": 1}, tmp_path, capsys)
    long = pd.read_csv(tmp_path / "long.csv")
    ids = long["record_id"].drop_duplicates()
    descriptors = pd.concat(
        [
            pd.DataFrame({"record_id": ids, "time_min": 0, "parameter": name, "value": ids % 4})
            for name in ("RecordID", "ICUType")
        ]
    )
    messy = pd.concat([descriptors, long]).sort_index(kind="stable")
    messy.to_csv(tmp_path / "messy.csv", index=False)
    clean = long[long["parameter"].isin(["HR", "Temp", "Age"])]
    clean.to_csv(tmp_path / "clean.csv", index=False)

    codes = [
        main(["predict", str(run_dir), str(tmp_path / f"{name}.csv"), "--output", str(out)])
        for name, out in (("messy", tmp_path / "a.csv"), ("clean", tmp_path / "b.csv"))
    ]

    err = capsys.readouterr().err
    assert codes == [0, 0], err
    notes = [line for line in err.splitlines() if "ignored" in line]
    assert len(notes) == 1 and str(tmp_path / "messy.csv") in notes[0], err
    assert "3 variable(s) the model does not read: RecordID, ICUType, Unit" in notes[0]
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    assert sorted(a["record_id"]) == sorted(ids) and len(a) == len(ids)
    merged = a.merge(b, on="record_id", suffixes=("_messy", "_clean"))
    np.testing.assert_allclose(merged["probability_messy"], merged["probability_clean"])
