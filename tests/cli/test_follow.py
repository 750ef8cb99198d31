"""`fedmed run` follows a deployed run through live.json; the last round must not be lost."""

import json
from pathlib import Path

import pytest

from fedmed.cli import federation
from fedmed.runtime import deployment


def _history(rounds: int) -> list[dict]:
    return [
        {"round": r, "average": {"accuracy": 0.5 + r / 10}, "failures": []}
        for r in range(1, rounds + 1)
    ]


def test_a_run_that_ends_between_polls_still_shows_its_last_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The run wrote round 3 and its metrics, and Flower says it finished, all between two polls;
    # live.json was last seen at round 2 (its final replace raced the poll).
    (tmp_path / "live.json").write_text(json.dumps({"history": _history(2)}))
    (tmp_path / "metrics.json").write_text(json.dumps({"history": _history(3)}))
    monkeypatch.setattr(deployment, "run_status", lambda c, run_id: "finished:completed")
    status = federation._follow(None, 7, tmp_path, quiet=False, timeout=30)
    assert status == "finished:completed"
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" · ")[0] for line in lines] == ["round 1", "round 2", "round 3"]


def test_a_run_still_going_after_the_timeout_is_an_error_that_says_it_keeps_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deployment, "run_status", lambda c, run_id: "running")
    with pytest.raises(federation.FedmedError, match="keeps running"):
        federation._follow(None, 7, tmp_path, quiet=True, timeout=0.6)
