"""Clinical safety of the HTTP API and `fedmed predict`, over real HTTP on 127.0.0.1.

No input may come back as "probability: null, label: 0": a value the model cannot compute with
is a 422 naming the field and row (exit 2 on the command line); a missing value follows the
card's `missing` policy and is said in the response; oversized bodies get a short 413.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from fedmed.cli.main import main
from fedmed.config import RunConfig
from fedmed.serving.api import ServedModel, create_app
from fedmed.serving.server import start_in_thread
from tests.runtime.test_runtime import _run
from tests.serving.test_serving import ROWS, run_dir, server  # noqa: F401  (fixtures)


def _post(server, body: str) -> httpx.Response:  # noqa: F811
    return httpx.post(
        f"{server.url}/predict",
        content=body.encode(),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )


def _rows_json(bad: str, field: str = "bp") -> str:
    """Two rows, the second with ``bad`` (raw JSON text) as ``field``."""
    second = {"age": 45.0, "bp": 118.0, "smoker": "no"}
    text = json.dumps({"rows": [ROWS[0], second]})
    return text.replace(f'"{field}": {second[field]}', f'"{field}": {bad}')


@pytest.mark.parametrize(
    "bad",
    ["Infinity", "-Infinity", "1e300", "-1e300", "1e39", '"Infinity"', '"1e300"', "NaN", '"NaN"'],
)
def test_unusable_number_is_422_naming_field_and_row(server, bad: str) -> None:  # noqa: F811
    reply = _post(server, _rows_json(bad))

    assert reply.status_code == 422, reply.text
    detail = reply.json()["detail"]
    assert detail[0]["loc"] == ["body", "rows", 1, "bp"]
    assert "null" not in reply.text.replace('"input": null', "")


def test_age_1e300_is_refused_not_answered_with_null(server) -> None:  # noqa: F811
    reply = _post(server, _rows_json("1e300", field="age"))

    assert reply.status_code == 422
    assert reply.json()["detail"][0]["loc"] == ["body", "rows", 1, "age"]
    assert "probability" not in reply.text


@pytest.fixture
def mean_server(csv_study: RunConfig):
    """A model whose card says missing = "mean": a missing number is imputed, and said so."""
    from fedmed.runtime.run import preflight
    from fedmed.study.outputs import serving_preprocessing

    schema = replace(csv_study.data.schema, missing="mean")
    cfg = csv_study.replace(data=replace(csv_study.data, schema=schema), rounds=1)
    checked, tables = preflight(cfg)
    run = Path(_run(cfg, serving=serving_preprocessing(checked, tables))["_dir"])
    handle = start_in_thread(create_app(ServedModel(run)))
    try:
        yield handle
    finally:
        handle.stop()


@pytest.mark.parametrize("missing", ["NaN", '"NaN"', "null"])
def test_mean_policy_imputes_nan_and_says_so(mean_server, missing: str) -> None:
    reply = _post(mean_server, _rows_json(missing))

    assert reply.status_code == 200, reply.text
    first, second = reply.json()["predictions"]
    assert first["imputed"] == [] and second["imputed"] == ["bp"]
    assert 0.0 <= second["probability"] <= 1.0


def test_mean_policy_still_refuses_infinity(mean_server) -> None:
    reply = _post(mean_server, _rows_json("Infinity"))

    assert reply.status_code == 422
    assert reply.json()["detail"][0]["loc"] == ["body", "rows", 1, "bp"]


def test_absent_field_under_drop_policy_is_refused(server) -> None:  # noqa: F811
    reply = httpx.post(
        f"{server.url}/predict", json={"rows": [{"age": 50.0, "smoker": "no"}]}, timeout=10
    )

    assert reply.status_code == 422 and reply.json()["detail"][0]["loc"][-1] == "bp"


@pytest.fixture
def small_limit_server(run_dir: Path):  # noqa: F811
    handle = start_in_thread(create_app(ServedModel(run_dir), max_body_bytes=2_000))
    try:
        yield handle
    finally:
        handle.stop()


def test_body_over_the_limit_is_413_with_a_short_body(small_limit_server) -> None:
    rows = ROWS * 40  # ~2.5 kB of JSON
    reply = httpx.post(f"{small_limit_server.url}/predict", json={"rows": rows}, timeout=10)

    assert reply.status_code == 413
    assert len(reply.content) < 300 and "0.002 MB" in reply.json()["detail"]


def test_chunked_body_over_the_limit_is_413(small_limit_server) -> None:
    def chunks():
        yield b'{"rows": ['
        for _ in range(100):
            yield json.dumps(ROWS[0]).encode() + b","
        yield json.dumps(ROWS[0]).encode() + b"]}"

    reply = httpx.post(
        f"{small_limit_server.url}/predict",
        content=chunks(),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )

    assert reply.status_code == 413


def test_body_under_the_limit_still_works(small_limit_server) -> None:
    reply = httpx.post(f"{small_limit_server.url}/predict", json={"rows": ROWS}, timeout=10)

    assert reply.status_code == 200 and len(reply.json()["predictions"]) == 2


def test_default_limit_is_5_mb(server) -> None:  # noqa: F811
    body = '{"rows": [], "pad": "' + "x" * 5_100_000 + '"}'

    reply = _post(server, body)

    assert reply.status_code == 413 and len(reply.content) < 300


def test_validation_errors_never_echo_large_inputs(server) -> None:  # noqa: F811
    huge = "9" * 1_000_000
    body = json.dumps({"rows": [{"age": huge, "bp": 1.0, "smoker": "x" * 500_000}]})

    reply = _post(server, body)

    assert reply.status_code == 422
    assert len(reply.content) < 3_000
    locs = [d["loc"][-1] for d in reply.json()["detail"]]
    assert "age" in locs and "smoker" in locs


def test_many_bad_rows_are_counted_not_all_listed(server) -> None:  # noqa: F811
    rows = [{"age": "old", "bp": 1.0, "smoker": "no"}] * 500

    reply = httpx.post(f"{server.url}/predict", json={"rows": rows}, timeout=10)

    assert reply.status_code == 422
    detail = reply.json()["detail"]
    assert len(detail) == 21 and detail[-1]["msg"] == "and 480 more"


@pytest.mark.parametrize("cell", ["inf", "-inf", "Infinity", "1e300", "1e39"])
def test_predict_cli_refuses_unusable_numbers(
    run_dir: Path,  # noqa: F811
    tmp_path: Path,
    cell: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = tmp_path / "patients.csv"
    rows.write_text(f"age,bp,smoker\n70,140,yes\n71,{cell},no\n")

    assert main(["predict", str(run_dir), str(rows)]) == 2

    captured = capsys.readouterr()
    assert "column 'bp'" in captured.err and "row 3" in captured.err
    assert "probability" not in captured.out


def test_allow_unsigned_still_checks_a_present_signature(
    run_dir: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    card_path = run_dir / "model.card.json"
    card = json.loads(card_path.read_text())
    card["metrics"]["average"]["accuracy"] = 0.999  # edited after signing
    card_path.write_text(json.dumps(card))

    served = ServedModel(run_dir, allow_unsigned=True)

    err = capsys.readouterr().err
    assert served.card["study"]["name"] == "csvstudy"
    assert "WARNING: SIGNATURE CHECK FAILED" in err and "signature is invalid" in err


def test_allow_unsigned_is_quiet_for_a_valid_signature(
    run_dir: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    ServedModel(run_dir, allow_unsigned=True)

    assert "WARNING" not in capsys.readouterr().err
