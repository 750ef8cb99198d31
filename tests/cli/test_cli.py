"""The `fedmed` command as a user runs it: outputs, last line, one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmed.cli.main import main


def _write_toml(cfg, path: Path) -> Path:
    """Write a RunConfig back as TOML (via JSON -> TOML for the simple types we use)."""
    lines = []

    def emit(prefix: str, table: dict) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and k != "sites"}
        if prefix:
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            if v is None:
                continue
            lines.append(f"{k} = {json.dumps(v)}")
        for k, v in table.items():
            if isinstance(v, dict) and k != "categorical":
                emit(f"{prefix}.{k}" if prefix else k, v)
            elif isinstance(v, dict):
                inner = ", ".join(f"{ck} = {json.dumps(cv)}" for ck, cv in v.items())
                lines.append(f"{k} = {{ {inner} }}")

    raw = cfg.to_dict()
    emit("", {k: v for k, v in raw.items()})
    for site in raw["sites"]:
        lines.append("[[sites]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in site.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_simulate_writes_outputs_and_prints_run_dir_last(csv_study, tmp_path, capsys) -> None:
    config = _write_toml(csv_study, tmp_path / "study.toml")

    code = main(["simulate", str(config), "--set", "rounds=2"])

    out = capsys.readouterr().out.strip().splitlines()
    run_dir = Path(out[-1])
    assert code == 0 and run_dir.is_dir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["final"]["round"] == 2
    assert set(metrics["final"]["sites"]) == {"alpha", "beta", "gamma"}
    assert "accuracy" in metrics["final"]["average"]
    csv = (run_dir / "metrics.csv").read_text().splitlines()
    assert csv[0] == "round,site,phase,metric,value" and len(csv) > 30
    card = json.loads((run_dir / "model.card.json").read_text())
    assert card["study"]["rounds"] == 2 and card["inputs"] == ["age", "bp", "smoker=yes"]


@pytest.mark.parametrize("mode", ["pooled", "local"])
def test_baseline_modes_report_on_the_same_site_test_sets(
    csv_study, tmp_path, capsys, mode
) -> None:
    config = _write_toml(csv_study, tmp_path / "study.toml")

    assert main(["simulate", str(config), "--mode", mode, "--quiet"]) == 0

    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mode"] == mode
    assert {s: m["num-examples"] for s, m in metrics["final"]["sites"].items()} == {
        "alpha": 36,
        "beta": 27,
        "gamma": 18,
    }
    models = sorted(p.name for p in run_dir.glob("*.safetensors"))
    expected = (
        ["model.safetensors"]
        if mode == "pooled"
        else ["model-alpha.safetensors", "model-beta.safetensors", "model-gamma.safetensors"]
    )
    assert models == expected


def test_quiet_prints_only_the_run_dir(csv_study, tmp_path, capsys) -> None:
    config = _write_toml(csv_study, tmp_path / "study.toml")

    main(["simulate", str(config), "--quiet", "--set", "rounds=1"])

    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 1
    assert captured.err == ""


def _error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


def test_unknown_config_key_is_one_line(csv_study, tmp_path, capsys) -> None:
    config = _write_toml(csv_study, tmp_path / "study.toml")

    err = _error(["simulate", str(config), "--set", "train.learning_rate=0.1"], capsys)

    assert "unknown config key 'train.learning_rate'" in err and "lr" in err


def test_text_in_numeric_column_is_one_line(csv_study, tmp_path, capsys) -> None:
    path = Path(csv_study.sites[1].path)
    lines = path.read_text().splitlines()
    lines[4] = "61,high,no,1"
    path.write_text("\n".join(lines) + "\n")
    config = _write_toml(csv_study, tmp_path / "study.toml")

    err = _error(["simulate", str(config)], capsys)

    assert "beta.csv" in err and "column 'bp'" in err and "row 5" in err
    assert not list((tmp_path / "runs").glob("*")), "a failed run leaves no run directory"


def test_missing_column_and_empty_file_are_one_line(csv_study, tmp_path, capsys) -> None:
    Path(csv_study.sites[0].path).write_text("age,smoker,outcome\n50,no,1\n")
    config = _write_toml(csv_study, tmp_path / "study.toml")
    assert "column 'bp' is missing" in _error(["check-data", str(config)], capsys)

    Path(csv_study.sites[0].path).write_text("")
    assert "file is empty" in _error(["check-data", str(config)], capsys)


def test_check_data_summarizes_sites(csv_study, tmp_path, capsys) -> None:
    config = _write_toml(csv_study, tmp_path / "study.toml")

    assert main(["check-data", str(config)]) == 0

    out = capsys.readouterr().out
    assert "alpha: 84 train / 36 test rows" in out and "ok: 3 sites" in out


def test_every_subcommand_has_help() -> None:
    for sub in ([], ["simulate"], ["check-data"], ["show-config"]):
        result = subprocess.run(
            [sys.executable, "-m", "fedmed.cli", *sub, "--help"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0 and "usage: fedmed" in result.stdout


def test_demo_data_omop_writes_four_databases_then_refuses_without_force(
    tmp_path, capsys, monkeypatch
) -> None:
    pytest.importorskip("duckdb", reason="OMOP databases are the optional 'omop' extra")
    from tests.data.test_omop import _write_small_set

    _write_small_set(tmp_path / "datasets")
    monkeypatch.setenv("FEDMED_DATA_DIR", str(tmp_path / "datasets"))
    out = tmp_path / "omop"

    assert main(["demo-data", "--omop", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out)
    assert lines[1].startswith("cardiac-surgery: 1 stays, 1 in-hospital deaths, 4 measurements")
    assert sorted(p.name for p in out.iterdir()) == [
        "cardiac-surgery.duckdb", "coronary-care.duckdb", "medical-icu.duckdb",
        "surgical-icu.duckdb",
    ]  # fmt: skip

    assert main(["demo-data", "--omop", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists" in err and "--force" in err
    assert main(["demo-data", "--omop", str(out), "--force", "--limit", "1"]) == 0
    assert main(["demo-data", "--omop", str(out), "demo"]) == 2
    assert "takes no OUT, CONFIG or --set" in capsys.readouterr().err
