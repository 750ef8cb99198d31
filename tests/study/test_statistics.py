"""Serving preprocessing from the sites' own statistics equals the union's fit (no missing data)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from fedmed.config import SchemaConfig
from fedmed.data.table import Preprocessor
from fedmed.study.statistics import combine_site_statistics


def test_combined_site_statistics_match_the_union_fit() -> None:
    rng = np.random.default_rng(0)
    schema = SchemaConfig(target="y", categorical={"smoker": ("no", "yes")})
    features = ("age", "bp", "smoker")
    frames = [
        pd.DataFrame(
            {
                "age": rng.normal(50 + 10 * i, 5 + i, n),
                "bp": rng.normal(120, 10, n),
                "smoker": rng.choice(["no", "yes"], n, p=[0.3 + 0.2 * i, 0.7 - 0.2 * i]),
            }
        )
        for i, n in enumerate((30, 70, 11))
    ]
    sites = [{**Preprocessor(features, schema).fit(f).to_dict(), "n": len(f)} for f in frames]
    combined = json.loads(combine_site_statistics(sites))
    union = Preprocessor(features, schema).fit(pd.concat(frames, ignore_index=True)).to_dict()

    assert combined["inputs"] == union["inputs"]
    np.testing.assert_allclose(combined["mean"], union["mean"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(combined["std"], union["std"], rtol=1e-10)
    for col, value in union["impute_mean"].items():
        assert abs(combined["impute_mean"][col] - value) < 1e-9
    # And it rebuilds into the preprocessor a served model uses.
    pre = Preprocessor.from_dict(features, schema, combined)
    assert pre.transform(frames[0]).shape == (30, len(union["inputs"]))


def test_no_site_sharing_means_no_serving_preprocessing() -> None:
    assert combine_site_statistics([]) == ""
