"""Model as a service over real HTTP on 127.0.0.1: predictions, 422s, signatures, batch CLI."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from fedmed.cli.main import main
from fedmed.config import RunConfig
from fedmed.errors import ConfigError
from fedmed.serving.api import ServedModel, create_app
from fedmed.serving.server import start_in_thread
from tests.runtime.test_runtime import _run

ROWS = [
    {"age": 71.0, "bp": 150.0, "smoker": "yes"},
    {"age": 45.0, "bp": 118.0, "smoker": "no"},
]


@pytest.fixture
def run_dir(csv_study: RunConfig) -> Path:
    """A finished federated run (logistic regression with a categorical feature)."""
    from fedmed.runtime.run import preflight
    from fedmed.study.outputs import serving_preprocessing

    cfg, tables = preflight(csv_study)
    return Path(_run(csv_study, serving=serving_preprocessing(cfg, tables))["_dir"])


@pytest.fixture
def server(run_dir: Path):
    handle = start_in_thread(create_app(ServedModel(run_dir)))
    try:
        yield handle
    finally:
        handle.stop()


def _expected(run_dir: Path) -> np.ndarray:
    served = ServedModel(run_dir)
    x = served.pre.transform(pd.DataFrame(ROWS))
    with torch.no_grad():
        return torch.sigmoid(served.model(torch.from_numpy(x)).squeeze(-1)).numpy()


def test_predictions_over_http_equal_the_in_process_model(server, run_dir: Path) -> None:
    reply = httpx.post(f"{server.url}/predict", json={"rows": ROWS}, timeout=10)

    assert reply.status_code == 200
    probs = [p["probability"] for p in reply.json()["predictions"]]
    np.testing.assert_allclose(probs, _expected(run_dir), rtol=1e-6)
    assert [p["label"] for p in reply.json()["predictions"]] == [int(p >= 0.5) for p in probs]


def test_explanations_are_exact_for_logistic_regression(server, run_dir: Path) -> None:
    reply = httpx.post(f"{server.url}/predict", json={"rows": ROWS, "explain": True}, timeout=10)

    served = ServedModel(run_dir)
    z = served.pre.transform(pd.DataFrame(ROWS))
    weight = served.model[0].weight.detach().numpy()[0]
    for pred, zrow in zip(reply.json()["predictions"], z, strict=True):
        contrib = dict(zip(served.pre.input_names, weight * zrow, strict=True))
        assert pred["explanation"]["age"] == pytest.approx(contrib["age"], abs=1e-4)
        assert pred["explanation"]["smoker"] == pytest.approx(contrib["smoker=yes"], abs=1e-4)


@pytest.mark.parametrize(
    ("row", "field", "kind"),
    [
        ({"age": 70.0, "bp": 140.0, "smoker": "yes", "weight": 80}, "weight", "extra_forbidden"),
        ({"age": 70.0, "smoker": "yes"}, "bp", "missing"),
        ({"age": "old", "bp": 140.0, "smoker": "yes"}, "age", "float_parsing"),
        ({"age": 70.0, "bp": 140.0, "smoker": "sometimes"}, "smoker", "literal_error"),
    ],
)
def test_bad_rows_get_422_naming_the_field(server, row: dict, field: str, kind: str) -> None:
    reply = httpx.post(f"{server.url}/predict", json={"rows": [row]}, timeout=10)

    assert reply.status_code == 422
    detail = reply.json()["detail"][0]
    assert detail["loc"][-1] == field and detail["type"] == kind


def test_model_card_and_health(server, run_dir: Path) -> None:
    card = httpx.get(f"{server.url}/model", timeout=10).json()
    health = httpx.get(f"{server.url}/health", timeout=10).json()

    assert card["study"]["sites"] == ["alpha", "beta", "gamma"]
    assert set(card["metrics"]["sites"]) == {"alpha", "beta", "gamma"}
    assert card["signature"]["algorithm"] == "ed25519"
    assert card["plan_hash"].startswith("sha256:") and card["created"]
    assert health["status"] == "ok" and health["weights_sha256"] == card["weights_sha256"]
    assert httpx.get(f"{server.url}/openapi.json", timeout=10).status_code == 200


def test_tampered_card_is_refused(run_dir: Path) -> None:
    card_path = run_dir / "model.card.json"
    card = json.loads(card_path.read_text())
    card["metrics"]["average"]["accuracy"] = 0.999  # a too-good-to-be-true edit
    card_path.write_text(json.dumps(card))

    with pytest.raises(ConfigError, match="signature is invalid"):
        ServedModel(run_dir)


def test_tampered_weights_are_refused_even_when_unsigned_is_allowed(run_dir: Path) -> None:
    weights = run_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-2] ^= 0x01
    weights.write_bytes(bytes(data))

    with pytest.raises(ConfigError, match="SHA-256"):
        ServedModel(run_dir, allow_unsigned=True)


def test_unsigned_model_needs_allow_unsigned(run_dir: Path, capsys) -> None:
    card_path = run_dir / "model.card.json"
    card = json.loads(card_path.read_text())
    del card["signature"]
    card_path.write_text(json.dumps(card))

    assert main(["predict", str(run_dir), str(run_dir / "nope.csv")]) == 2
    assert "not signed" in capsys.readouterr().err
    assert ServedModel(run_dir, allow_unsigned=True).card["study"]["name"] == "csvstudy"


def test_model_signed_by_an_untrusted_key_is_refused(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMED_KEY_DIR", str(tmp_path / "another-coordinator"))

    with pytest.raises(ConfigError, match="untrusted key"):
        ServedModel(run_dir)


def test_predict_cli_writes_probabilities(run_dir: Path, tmp_path: Path) -> None:
    rows = tmp_path / "patients.csv"
    pd.DataFrame(ROWS).to_csv(rows, index=False)
    out = tmp_path / "scored.csv"

    assert main(["predict", str(run_dir), str(rows), "--output", str(out)]) == 0

    scored = pd.read_csv(out)
    np.testing.assert_allclose(scored["probability"], _expected(run_dir), atol=1e-6)


def test_predict_cli_names_bad_rows(run_dir: Path, tmp_path: Path, capsys) -> None:
    rows = tmp_path / "patients.csv"
    rows.write_text("age,bp,smoker\n70,140,yes\n71,high,no\n")

    assert main(["predict", str(run_dir), str(rows)]) == 2
    err = capsys.readouterr().err
    assert "column 'bp'" in err and "row 3" in err


def test_predict_cli_explain_adds_exact_attribution_columns(run_dir: Path, tmp_path: Path) -> None:
    rows = tmp_path / "patients.csv"
    pd.DataFrame(ROWS).to_csv(rows, index=False)
    out = tmp_path / "scored.csv"

    assert main(["predict", str(run_dir), str(rows), "--output", str(out), "--explain"]) == 0

    scored = pd.read_csv(out)
    served = ServedModel(run_dir)
    z = served.pre.transform(pd.DataFrame(ROWS))
    weight = served.model[0].weight.detach().numpy()[0]
    names = served.pre.input_names
    np.testing.assert_allclose(
        scored["explain:age"], weight[names.index("age")] * z[:, 0], atol=1e-5
    )
    smoker = names.index("smoker=yes")
    np.testing.assert_allclose(scored["explain:smoker"], weight[smoker] * z[:, smoker], atol=1e-5)


def test_binding_beyond_loopback_warns_that_the_port_has_no_login() -> None:
    from fedmed.serving.server import exposure_warning

    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert exposure_warning(host, "the dashboard") is None
    for host in ("0.0.0.0", "::", "10.1.2.3", "clinic.example.org"):
        warning = exposure_warning(host, "the dashboard")
        assert warning and "no login" in warning and host in warning
