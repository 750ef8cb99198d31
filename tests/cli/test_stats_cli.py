"""`fedmed stats` from the command line: the shipped studies' reports, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from fedmed.cli.main import main
from tests.conftest import needs_shared_data
from tests.coordinator.test_stats import _study


def _stats(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["stats", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@needs_shared_data
@pytest.mark.parametrize(
    ("study", "plots", "sites"),
    [
        ("heart_disease", {"histograms.png"}, 4),
        ("lung", {"histograms.png", "km.png"}, 6),
        ("physionet2012", {"histograms.png"}, 4),
    ],
)
def test_a_shipped_study_gets_per_site_and_pooled_tables_and_plots(
    study: str,
    plots: set[str],
    sites: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDMED_SIM_WORKERS", "1")

    code, out, err = _stats([study, "--output-dir", str(tmp_path)], capsys)

    assert code == 0, err
    run_dir = Path(out.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path and run_dir.name.startswith(f"{study}-stats-")
    assert plots <= {p.name for p in run_dir.glob("*.png")}
    stats = json.loads((run_dir / "stats.json").read_text())
    assert len(stats["sites"]) == sites and not stats["refused"]
    assert stats["cohort"]["pooled"]["count"] == sum(stats["cohort"]["sites"].values())
    # Each feature has a pooled histogram, unless every site's coarse cells were small
    # (PhysioNet's TroponinI: 205 stays spread over 4 ICUs and many cells).
    shown = [bool(f.get("histogram", {}).get("pooled")) for f in stats["features"].values()]
    assert sum(shown) >= len(shown) - 1
    assert all(ok or "note" in f for ok, f in zip(shown, stats["features"].values(), strict=True))
    report = (run_dir / "stats.md").read_text()
    assert "| **pooled** |" in report and all(s in report for s in stats["sites"])
    assert ("## Kaplan-Meier survival" in report) == (study == "lung")
    assert "pass 2: histograms on shared edges" in err and "pooled" in err


def test_an_unknown_study_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _stats(["no-such-study"], capsys)

    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("fedmed: error: ") and "no-such-study" in err


def test_a_site_whose_data_fails_validation_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _study(tmp_path)
    beta = Path(cfg.sites[1].path)
    frame = pd.read_csv(beta, dtype=str)
    frame.loc[4, "age"] = "sixty"
    frame.to_csv(beta, index=False)
    config = tmp_path / "study.toml"
    sites = "".join(f'[[sites]]\nname = "{s.name}"\npath = "{s.path}"\n' for s in cfg.sites)
    config.write_text(
        'name = "bad"\n[data.schema]\ntarget = "outcome"\nfeatures = ["age", "bp"]\n' + sites
    )

    code, _, err = _stats([str(config), "--quiet", "--output-dir", str(tmp_path / "out")], capsys)

    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "beta.csv" in err and "'age'" in err and "sixty" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_minimum_cell_below_one_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = _stats(["demo", "--min-cell", "0"], capsys)

    assert code == 2 and "stats.min_cell" in err and len(err.strip().splitlines()) == 1


@needs_shared_data
def test_a_secure_report_shows_only_pooled_counts_and_each_sites_epsilon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMED_SIM_WORKERS", "1")
    argv = ["lung", "--output-dir", str(tmp_path), "--set", "stats.secure_aggregation=true"]

    code, out, err = _stats(argv, capsys)

    assert code == 0, err
    stats = json.loads((Path(out.strip().splitlines()[-1]) / "stats.json").read_text())
    assert stats["cohort"]["pooled"]["count"] == 227  # R's lung table, every row summed
    assert len(stats["secure_aggregation"]["passes"]["stats_cells"]) == 6
    assert err.count("masked") >= 6 and "pass 1 under SecAgg+" in err
    # Exact pooled life table where the small sites publish no interval's events in the clear.
    assert not stats["km"]["pooled"]["approximate"][0]
