"""Site tables are read strictly, and every failure is one short line naming file, column, row."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from fedmed.cli.main import main
from fedmed.config import RunConfig, SchemaConfig
from fedmed.data.sources import read_table
from fedmed.data.table import validate_table
from fedmed.errors import DataError

SCHEMA = SchemaConfig(
    target="outcome", features=("age", "bp"), test_fraction=0.3, min_rows=4, stratify=False
)


def _table(tmp_path: Path, rows: list[str], header: str = "age,bp,outcome") -> Path:
    path = tmp_path / "site.csv"
    path.write_bytes((header + "\n" + "\n".join(rows) + "\n").encode())
    return path


GOOD = [f"{50 + i},{120 + i},{i % 2}" for i in range(10)]


def _check(path: Path, schema: SchemaConfig = SCHEMA) -> None:
    validate_table("site", read_table(str(path), schema), schema, str(path))


@pytest.mark.parametrize(
    ("cell", "what"),
    [
        ("inf", "float32"),
        ("-inf", "float32"),
        ("Infinity", "float32"),
        ("1e39", "float32"),
        ("-5e300", "float32"),
        ("1e400", "float32"),
        ("7\x003", "NUL byte"),
    ],
)
def test_bad_number_names_file_column_and_line(tmp_path: Path, cell: str, what: str) -> None:
    rows = [*GOOD[:3], f"60,{cell},1", *GOOD[3:]]  # the 4th data row: line 5 of the file
    path = _table(tmp_path, rows)

    with pytest.raises(DataError) as info:
        _check(path)

    message = str(info.value)
    assert str(path) in message and "column 'bp'" in message and "row 5" in message
    assert what in message and "\n" not in message


def test_a_huge_bad_cell_gives_a_short_message(tmp_path: Path) -> None:
    path = _table(tmp_path, [*GOOD, "60," + "x" * 20_000_000 + ",1"])

    with pytest.raises(DataError) as info:
        _check(path)

    message = str(info.value)
    assert "column 'bp'" in message and "non-numeric" in message
    assert len(message) < 1000


def test_a_huge_bad_category_gives_a_short_message(tmp_path: Path) -> None:
    schema = replace(SCHEMA, categorical={"bp": ("low", "high")})
    path = _table(tmp_path, [*GOOD, "60," + "y" * 1_000_000 + ",1"])

    with pytest.raises(DataError) as info:
        _check(path, schema)

    assert "column 'bp'" in str(info.value) and len(str(info.value)) < 1000


def test_duplicated_header_column_is_reported_as_such(tmp_path: Path) -> None:
    path = _table(tmp_path, [f"{r},5" for r in GOOD], header="age,bp,outcome,age")

    with pytest.raises(DataError, match="names column 'age' twice"):
        _check(path)


def test_duplicated_configured_column_name_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    path.write_text("\n".join(GOOD) + "\n")
    schema = replace(SCHEMA, column_names=("age", "bp", "age"))

    with pytest.raises(DataError, match="data.schema.column_names names column 'age' twice"):
        _check(path, schema)


def test_small_table_without_missing_values_does_not_suggest_mean(tmp_path: Path) -> None:
    path = _table(tmp_path, GOOD[:3])

    with pytest.raises(DataError) as info:
        _check(path)

    assert "only 3 rows" in str(info.value) and "missing='mean'" not in str(info.value)


def test_rows_dropped_for_missing_features_suggest_mean(tmp_path: Path) -> None:
    path = _table(tmp_path, [*GOOD[:3], "60,,1", ",130,0"])

    with pytest.raises(DataError) as info:
        _check(path)

    message = str(info.value)
    assert "only 3 usable rows after removing 2" in message and "missing='mean'" in message


def test_rows_dropped_only_for_missing_outcome_do_not_suggest_mean(tmp_path: Path) -> None:
    path = _table(tmp_path, [*GOOD[:3], "60,125,", "61,126,"])

    with pytest.raises(DataError) as info:
        _check(path)

    message = str(info.value)
    assert "after removing 2" in message and "missing='mean'" not in message


def _write_study(csv_study: RunConfig, tmp_path: Path) -> Path:
    from tests.cli.test_cli import _write_toml

    return _write_toml(csv_study, tmp_path / "study.toml")


def test_check_data_reports_every_failing_site_in_one_line(
    csv_study: RunConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alpha, gamma = (Path(s.path) for s in csv_study.sites if s.name in ("alpha", "gamma"))
    df = pd.read_csv(alpha, dtype=str)
    df.loc[4, "bp"] = "inf"
    df.to_csv(alpha, index=False)
    df = pd.read_csv(gamma, dtype=str)
    df.loc[1, "age"] = "old"
    df.to_csv(gamma, index=False)
    config = _write_study(csv_study, tmp_path)

    code = main(["check-data", str(config)])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "2 of 3 sites failed" in err[0]
    assert "[alpha]" in err[0] and "column 'bp'" in err[0] and "row 6" in err[0]
    assert "[gamma]" in err[0] and "'old'" in err[0] and "row 3" in err[0]
    assert "[beta]" not in err[0]


def test_check_data_with_one_failing_site_keeps_its_own_message(
    csv_study: RunConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    beta = next(Path(s.path) for s in csv_study.sites if s.name == "beta")
    df = pd.read_csv(beta, dtype=str)
    df.loc[0, "age"] = "1e39"
    df.to_csv(beta, index=False)
    config = _write_study(csv_study, tmp_path)

    code = main(["check-data", str(config)])

    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"fedmed: error: {beta}: column 'age'")


def test_check_data_names_all_eight_too_small_sites_of_67_in_one_run(
    csv_study: RunConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A consortium-sized study: one check-data run lists every site to fix, not the first."""
    from tests.conftest import write_site_csv

    small = {f"h{i:02d}" for i in (3, 11, 19, 27, 35, 43, 51, 66)}
    sites = []
    for i in range(67):
        name = f"h{i:02d}"
        path = write_site_csv(tmp_path / f"{name}.csv", 3 if name in small else 40, seed=i)
        sites.append(replace(csv_study.sites[0], name=name, path=str(path)))
    config = _write_study(csv_study.replace(sites=tuple(sites)), tmp_path)

    code = main(["check-data", str(config)])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "8 of 67 sites failed the data checks" in err[0]
    named = {name for name in (f"h{i:02d}" for i in range(67)) if f"[{name}]" in err[0]}
    assert named == small
    assert err[0].count("only 3 rows") == 8
