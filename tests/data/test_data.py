"""Site data: every malformed input gives one DataError naming file, column and rows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmed.config import RunConfig, SchemaConfig
from fedmed.data.partition import partition_rows
from fedmed.data.sources import builtin_table, read_table
from fedmed.data.table import Preprocessor, validate_table
from fedmed.errors import ConfigError, DataError
from fedmed.tasks import load_site_data, load_site_table
from tests.conftest import HEART_DIR, needs_shared_data

SCHEMA = SchemaConfig(target="outcome", categorical={"smoker": ("no", "yes")}, min_rows=5)


def _frame(tmp_path: Path, text: str) -> tuple[pd.DataFrame, str]:
    path = tmp_path / "site.csv"
    path.write_text(text)
    return read_table(str(path), SCHEMA), str(path)


def _good_rows(n: int = 12) -> str:
    return "".join(f"{50 + i},{120 + i},{'yes' if i % 2 else 'no'},{i % 2}\n" for i in range(n))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere\.csv: file not found"):
        read_table(str(tmp_path / "nowhere.csv"), SCHEMA)


def test_empty_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("")

    with pytest.raises(DataError, match="empty"):
        read_table(str(path), SCHEMA)


def test_header_without_rows(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no data rows"):
        _frame(tmp_path, "age,bp,smoker,outcome\n")


def test_missing_column_lists_columns_present(tmp_path: Path) -> None:
    df, origin = _frame(tmp_path, "age,smoker,outcome\n" + "50,no,0\n" * 3)

    with pytest.raises(DataError) as err:
        validate_table("s", df, SCHEMA.__class__(target="outcome", features=("age", "bp")), origin)

    msg = str(err.value)
    assert "column 'bp' is missing" in msg and "site.csv" in msg and "age, smoker, outcome" in msg


def test_text_in_numeric_column_names_column_and_file_rows(tmp_path: Path) -> None:
    text = "age,bp,smoker,outcome\n" + _good_rows(4) + "61,high,no,1\n" + _good_rows(4)
    df, origin = _frame(tmp_path, text)

    with pytest.raises(DataError) as err:
        validate_table("s", df, SCHEMA, origin)

    msg = str(err.value)
    # Line 6 of the file: header + 4 good rows, then the bad one.
    assert "column 'bp'" in msg and "'high'" in msg and "row 6" in msg and "site.csv" in msg


def test_all_empty_column(tmp_path: Path) -> None:
    df, origin = _frame(tmp_path, "age,bp,smoker,outcome\n" + "50,,no,0\n60,,yes,1\n" * 5)

    with pytest.raises(DataError, match="column 'bp' is empty in all 10 rows"):
        validate_table("s", df, SCHEMA, origin)


def test_too_few_rows_after_dropping_missing(tmp_path: Path) -> None:
    df, origin = _frame(tmp_path, "age,bp,smoker,outcome\n" + "50,120,no,0\n60,,yes,1\n" * 3)

    with pytest.raises(DataError, match=r"only 3 usable rows.*at least 5"):
        validate_table("s", df, SCHEMA, origin)


def test_table_sites_refuse_a_validation_split_they_would_ignore(tmp_path: Path) -> None:
    df, origin = _frame(tmp_path, "age,bp,smoker,outcome\n" + _good_rows())
    schema = replace(SCHEMA, validation_fraction=0.2)

    with pytest.raises(ConfigError, match="implemented for image, series and text sites"):
        validate_table("s", df, schema, origin)


def test_single_class_is_refused(tmp_path: Path) -> None:
    df, origin = _frame(tmp_path, "age,bp,smoker,outcome\n" + "50,120,no,1\n" * 12)

    with pytest.raises(DataError, match="every usable row has label 1"):
        validate_table("s", df, SCHEMA, origin)


def test_undeclared_category_names_value_and_rows(tmp_path: Path) -> None:
    df, origin = _frame(tmp_path, "age,bp,smoker,outcome\n" + _good_rows(6) + "50,120,maybe,0\n")

    with pytest.raises(DataError, match=r"'maybe' at row 8.*data\.schema\.categorical\.smoker"):
        validate_table("s", df, SCHEMA, origin)


def test_non_binary_target_suggests_positive_above(tmp_path: Path) -> None:
    df, origin = _frame(tmp_path, "age,bp,smoker,outcome\n" + _good_rows(10) + "50,120,no,3\n")

    with pytest.raises(DataError, match="positive_above"):
        validate_table("s", df, SCHEMA, origin)


def test_missing_policy_error_names_rows(tmp_path: Path) -> None:
    df, origin = _frame(tmp_path, "age,bp,smoker,outcome\n" + _good_rows(10) + ",120,no,0\n")
    schema = SchemaConfig(target="outcome", categorical={"smoker": ("no", "yes")}, missing="error")

    with pytest.raises(DataError, match="column 'age' has missing values at row 12"):
        validate_table("s", df, schema, origin)


def test_mean_imputation_uses_train_mean_only(tmp_path: Path) -> None:
    df, origin = _frame(tmp_path, "age,bp,smoker,outcome\n" + _good_rows(30) + ",120,no,0\n")
    schema = SchemaConfig(target="outcome", categorical={"smoker": ("no", "yes")}, missing="mean")
    table = validate_table("s", df, schema, origin)

    pre = Preprocessor(table.features, schema).fit(table.x_train)

    assert pre.fill["age"] == pytest.approx(table.x_train["age"].mean())
    assert np.isfinite(pre.transform(table.x_test)).all()


def test_preprocessing_is_fitted_on_train_split_only(csv_study: RunConfig) -> None:
    site = csv_study.sites[0]
    table = load_site_table(csv_study, site)
    data = load_site_data(csv_study, site)

    age = data.input_names.index("age")
    assert data.x_train[:, age].mean() == pytest.approx(0.0, abs=1e-5)
    assert data.x_train[:, age].std() == pytest.approx(1.0, abs=1e-3)
    expected = (table.x_test["age"] - table.x_train["age"].mean()) / table.x_train["age"].std(
        ddof=0
    )
    np.testing.assert_allclose(data.x_test[:, age], expected.to_numpy(), rtol=1e-4)
    # One-hot with drop_first: only "smoker=yes" remains, and it is not standardized.
    assert "smoker=yes" in data.input_names and "smoker=no" not in data.input_names
    assert set(np.unique(data.x_train[:, data.input_names.index("smoker=yes")])) <= {0.0, 1.0}


def test_split_column_overrides_ratio(tmp_path: Path) -> None:
    rows = "".join(
        f"{50 + i},{120 + i},no,{i % 2},{'test' if i < 4 else 'train'}\n" for i in range(20)
    )
    path = tmp_path / "s.csv"
    path.write_text("age,bp,smoker,outcome,split\n" + rows)
    schema = SchemaConfig(target="outcome", split_column="split", categorical={"smoker": ("no",)})

    table = validate_table("s", read_table(str(path), schema), schema, str(path))

    assert len(table.y_test) == 4 and len(table.y_train) == 16
    assert "split" not in table.features


def test_partition_has_size_and_label_skew_and_covers_rows_once() -> None:
    labels = builtin_table("sklearn:breast_cancer")["malignant"].to_numpy()

    shards = partition_rows(labels, sizes=(0.4, 0.3, 0.2, 0.1), alpha=3.0, seed=0)

    all_rows = np.concatenate(shards)
    assert len(all_rows) == len(labels) == len(np.unique(all_rows))
    sizes = [len(s) for s in shards]
    rates = [labels[s].mean() for s in shards]
    assert sizes[0] > sizes[-1] * 2
    assert max(rates) - min(rates) > 0.2
    assert all((labels[s] == c).sum() >= 5 for s in shards for c in (0, 1))


def test_demo_sites_differ_and_do_not_overlap(demo_config: RunConfig) -> None:
    tables = [load_site_table(demo_config, s) for s in demo_config.sites]

    indices = [set(t.x_train.index) | set(t.x_test.index) for t in tables]
    for i in range(len(indices)):
        for j in range(i + 1, len(indices)):
            assert not indices[i] & indices[j]


@needs_shared_data
def test_heart_disease_follows_flamby_protocol() -> None:
    from fedmed.config import load_run_config, resolve_config_path

    cfg = load_run_config(resolve_config_path("heart_disease"))

    sizes = []
    for site in cfg.sites:
        data = load_site_data(cfg, site)
        sizes.append((len(data.y_train), len(data.y_test)))
        assert len(data.input_names) == 13
    # FLamby's published train/test sizes per center.
    assert sizes == [(199, 104), (172, 89), (30, 16), (85, 45)]
    assert HEART_DIR.is_dir()


def test_parquet_site_reads_like_csv(csv_study: RunConfig, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason="Parquet support is the optional 'parquet' extra")
    csv_path = Path(csv_study.sites[0].path)
    parquet_path = tmp_path / "alpha.parquet"
    pd.read_csv(csv_path).to_parquet(parquet_path)
    from dataclasses import replace

    as_parquet = replace(csv_study.sites[0], path=str(parquet_path))

    a = load_site_data(csv_study, csv_study.sites[0])
    b = load_site_data(csv_study, as_parquet)

    np.testing.assert_allclose(a.x_train, b.x_train, rtol=1e-6)
    np.testing.assert_array_equal(a.y_test, b.y_test)
