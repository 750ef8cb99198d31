"""Image and series datasets in a site's registry: `fedmed site data add|list|check`, a
fingerprint over every file (a changed image, label or outcome is refused), the errors a data
steward meets, and the study as a site runs it (paths and layout from the registry only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fedmed.cli.main import main
from fedmed.config import parse_run_config
from fedmed.data.registry import DatasetRegistry
from fedmed.errors import ConfigError, DataError
from fedmed.tasks import site_view
from tests.tasks.test_imaging import _images, _npz, _to_toml
from tests.tasks.test_imaging import _study as _image_study
from tests.tasks.test_sequence import _long_and_outcomes
from tests.tasks.test_sequence import _study as _series_study


def _site_toml(tmp_path: Path, name: str = "st-marys") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'name = "{name}"\ninsecure = true\nstate_dir = "{tmp_path / "state"}"\n')
    return path


def _png_folder(folder: Path, n: int = 24, rgb: bool = False) -> Path:
    """PNGs in a subfolder and a labels CSV naming them (paths relative to the CSV)."""
    images, labels = _images(n, seed=3)
    (folder / "png").mkdir(parents=True)
    names = []
    for i, img in enumerate(images):
        name = f"png/img-{i:03d}.png"
        Image.fromarray(np.stack([img] * 3, axis=-1) if rgb else img).save(folder / name)
        names.append(name)
    pd.DataFrame({"image": names, "label": labels}).to_csv(folder / "labels.csv", index=False)
    return folder


def _cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out + out.err


def _deployed(raw: dict, tmp_path: Path, dataset: str) -> Path:
    """The study as a coordinator submits it: a dataset name, no paths."""
    raw = {**raw, "sites": [{"name": "st-marys"}, {"name": "riverside"}]}
    data = {k: v for k, v in raw["data"].items() if k not in ("partition_file", "site_column")}
    data["dataset"] = dataset
    if "series" in data:
        data["series"] = {k: v for k, v in data["series"].items() if k != "outcomes"}
    raw["data"] = data
    path = tmp_path / f"{dataset}-study.toml"
    path.write_text(_to_toml(raw))
    return path


def test_npz_images_register_list_check_and_a_changed_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    site = _site_toml(tmp_path)
    npz = _npz(tmp_path / "scans.npz")
    study = _deployed(_image_study(tmp_path), tmp_path, "scans")

    code, out = _cli(capsys, "site", "data", "add", site, "scans", npz)
    assert code == 0 and "images, 80 images, 1 channels" in out
    code, out = _cli(capsys, "site", "data", "list", site)
    assert code == 0 and out.startswith("scans\timages, 80 images") and str(npz) in out
    code, out = _cli(capsys, "site", "data", "check", site, "--config", study)
    assert code == 0 and "scans: ok" in out and "valid for 'img'" in out

    images, labels = _images(80, seed=0)
    np.savez(npz, train_images=images, train_labels=1 - labels)  # same shapes, new labels
    code, out = _cli(capsys, "site", "data", "check", site)
    assert code == 1
    assert "dataset 'scans'" in out and "changed since it was registered" in out
    assert "--replace" in out
    code, out = _cli(capsys, "site", "data", "add", site, "scans", npz, "--replace")
    assert code == 0
    assert _cli(capsys, "site", "data", "check", site)[0] == 0


@pytest.mark.parametrize("changed", ["png/img-007.png", "labels.csv"])
def test_png_folder_fingerprints_every_image_and_the_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture, changed: str
) -> None:
    site = _site_toml(tmp_path)
    folder = _png_folder(tmp_path / "export")
    raw = _image_study(tmp_path)
    raw["data"]["schema"]["target"] = "label"
    study = _deployed(raw, tmp_path, "ultrasound")

    code, out = _cli(capsys, "site", "data", "add", site, "ultrasound", folder)
    assert code == 0 and "images, 24 images, 1 channels, 25 files" in out
    code, out = _cli(capsys, "site", "data", "check", site, "--config", study)
    assert code == 0 and "valid for 'img'" in out, out

    file = folder / changed
    if changed.endswith(".png"):
        Image.fromarray(np.full((8, 8), 255, np.uint8)).save(file)  # one pixel-level edit
    else:
        file.write_text(file.read_text().replace(",1\n", ",0\n", 1))  # one label flipped
    code, out = _cli(capsys, "site", "data", "check", site)
    assert code == 1
    assert f"dataset 'ultrasound': {file}" in out and "--replace" in out


def test_series_registers_with_its_own_outcomes_and_a_changed_outcome_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    site = _site_toml(tmp_path)
    long, outcomes = _long_and_outcomes(tmp_path)
    study = _deployed(_series_study(tmp_path), tmp_path, "icu")

    code, out = _cli(capsys, "site", "data", "add", site, "icu", long, "--outcomes", outcomes)
    assert code == 0 and "series, 60 patients, 4 variables, 2 files" in out
    code, out = _cli(capsys, "site", "data", "list", site)
    assert f"{long} + {outcomes}" in out
    code, out = _cli(capsys, "site", "data", "check", site, "--config", study)
    assert code == 0 and "valid for 'seq'" in out, out

    table = pd.read_csv(outcomes)
    table.loc[3, "In-hospital_death"] = 1 - table.loc[3, "In-hospital_death"]
    table.to_csv(outcomes, index=False)
    code, out = _cli(capsys, "site", "data", "check", site)
    assert code == 1 and f"dataset 'icu': {outcomes} changed" in out


def test_series_with_its_own_column_names(tmp_path: Path) -> None:
    long, outcomes = _long_and_outcomes(tmp_path)
    renamed = tmp_path / "renamed.csv"
    pd.read_csv(long).set_axis(["pid", "minute", "item", "reading"], axis=1).to_csv(
        renamed, index=False
    )
    registry = DatasetRegistry(tmp_path / "state")
    columns = ("id_column", "time_column", "variable_column", "value_column")
    layout = dict(zip(columns, ("pid", "minute", "item", "reading"), strict=True))
    ds = registry.add("icu", renamed, outcomes=outcomes, layout=layout)

    raw = _series_study(tmp_path)
    raw["data"]["dataset"] = "icu"
    run = parse_run_config(raw)
    local, spec = site_view(run, ds, "a")

    assert local.data.series.id_column == "pid" and local.data.series.value_column == "reading"
    assert spec.path == str(renamed) and spec.outcomes == str(outcomes)
    assert local.data.series.outcomes == "" and local.data.site_column == ""


def test_the_site_reads_only_registered_paths_and_the_right_kind(tmp_path: Path) -> None:
    registry = DatasetRegistry(tmp_path / "state")
    ds = registry.add("scans", _npz(tmp_path / "scans.npz"))
    raw = _image_study(tmp_path)  # a plan carrying a file of the coordinator's
    raw["data"]["dataset"] = "scans"
    run = parse_run_config(raw)

    local, spec = site_view(run, ds, "a")
    assert local.data.partition_file == "" and spec.path == ds.path

    with pytest.raises(DataError, match="registered as images but task 'sequence-classification'"):
        site_view(parse_run_config(_series_study(tmp_path)), ds, "a")


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "message"),
    [
        (lambda p: p / "nowhere", {"kind": "images"}, DataError, "image folder or .npz not found"),
        (lambda p: p / "exports", {}, DataError, "exports: file or folder not found"),
        (
            lambda p: _npz_without_test_images(p / "x.npz"),
            {},
            DataError,
            "key 'test_images' is missing",
        ),
        (
            lambda p: (np.savez(p / "y.npz", pixels=np.zeros((2, 8, 8))), p / "y.npz")[1],
            {},
            DataError,
            "no '<split>_images' / '<split>_labels' keys (found: pixels)",
        ),
        (
            lambda p: _labels_naming_a_missing_png(p),
            {"kind": "images"},
            DataError,
            "row 3 names image",
        ),
        (lambda p: p, {}, DataError, "expected one labels CSV in the folder (found: none)"),
        (
            lambda p: _long_and_outcomes(p)[0],
            {"kind": "series"},
            ConfigError,
            "pass --outcomes",
        ),
        (
            lambda p: _long_without_value(p),
            {"outcomes": "OUTCOMES"},
            DataError,
            "no column 'value' (columns: record_id, time_min, parameter); a long table",
        ),
        (
            lambda p: _npz(p / "scans.npz"),
            {"outcomes": "OUTCOMES"},
            DataError,
            "scans.npz: not a readable CSV table",
        ),
    ],
    ids=[
        "missing-folder",
        "missing-path",
        "npz-missing-array",
        "npz-no-image-arrays",
        "csv-names-missing-png",
        "folder-without-csv",
        "series-without-outcomes",
        "series-missing-column",
        "series-not-a-table",
    ],
)
def test_registration_errors_name_the_problem_and_the_fix(
    tmp_path: Path, make, kwargs: dict, error: type[Exception], message: str
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    path = make(folder)
    if kwargs.get("outcomes") == "OUTCOMES":
        _long_and_outcomes(tmp_path)  # an outcomes table next to the data
        kwargs = {"outcomes": tmp_path / "outcomes.csv"}
    registry = DatasetRegistry(tmp_path / "state")

    with pytest.raises(error) as exc:
        registry.add("data", path, **kwargs)

    assert message in str(exc.value)
    assert registry.list() == []


def _npz_without_test_images(path: Path) -> Path:
    images, labels = _images(20, seed=0)
    np.savez(path, train_images=images, train_labels=labels, test_labels=labels)
    return path


def _labels_naming_a_missing_png(folder: Path) -> Path:
    _png_folder(folder, n=6)
    (folder / "png" / "img-001.png").unlink()  # the 2nd data row: line 3 of the CSV
    return folder / "labels.csv"


def _long_without_value(folder: Path) -> Path:
    long, _ = _long_and_outcomes(folder)
    pd.read_csv(long).drop(columns="value").to_csv(long, index=False)
    return long


def test_tables_registered_before_kinds_existed_still_verify(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    pd.DataFrame({"a": range(12), "target": [0, 1] * 6}).to_csv(table, index=False)
    registry = DatasetRegistry(tmp_path / "state")
    registry.add("t", table)
    data = json.loads(registry.path.read_text())
    del data["datasets"]["t"]["kind"]  # an entry as fedmed wrote it before this change
    registry.path.write_text(json.dumps(data))

    ds = registry.verify("t")

    assert ds.kind == "table" and ds.files == {} and ds.rows == 12


def test_demo_data_exports_what_each_image_or_series_site_registers(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`fedmed demo-data` splits a simulation's files into hospital exports that register."""
    image_raw, series_raw = _image_study(tmp_path), _series_study(tmp_path)
    (tmp_path / "img.toml").write_text(_to_toml(image_raw))
    (tmp_path / "seq.toml").write_text(_to_toml(series_raw))

    assert main(["demo-data", str(tmp_path / "out-img"), str(tmp_path / "img.toml")]) == 0
    assert main(["demo-data", str(tmp_path / "out-seq"), str(tmp_path / "seq.toml")]) == 0

    capsys.readouterr()
    registry = DatasetRegistry(tmp_path / "state")
    a = registry.add("a", tmp_path / "out-img" / "a.npz")
    b = registry.add("b", tmp_path / "out-img" / "b.npz")
    assert a.kind == "images" and a.rows + b.rows == 80
    u1 = tmp_path / "out-seq" / "u1"
    icu = registry.add("u1", u1 / "long.csv.gz", outcomes=u1 / "outcomes.csv")
    assert icu.kind == "series" and icu.rows == 30  # Unit 1: every other patient of 60
    assert list(pd.read_csv(u1 / "outcomes.csv").columns) == ["RecordID", "In-hospital_death"]


@pytest.mark.parametrize("name", ["breastmnist-federation", "physionet2012-federation"])
def test_shipped_federation_plans_name_a_dataset_and_no_file(name: str) -> None:
    from fedmed.config import load_run_config, resolve_config_path

    cfg = load_run_config(resolve_config_path(name))

    assert cfg.data.dataset and not cfg.data.partition_file and not cfg.data.builtin
    assert not cfg.data.series.outcomes and not any(s.path for s in cfg.sites)
    assert cfg.data.schema.features


def test_the_plan_hash_covers_the_series_window_but_not_the_sites_files(tmp_path: Path) -> None:
    from fedmed.security.policy import plan_hash

    raw = _series_study(tmp_path)
    base = plan_hash(parse_run_config(raw))
    raw["data"]["series"]["hours"] = 6
    shorter = plan_hash(parse_run_config(raw))
    raw["data"]["series"]["hours"] = 12
    raw["data"]["series"]["outcomes"] = str(tmp_path / "other.csv")
    raw["data"]["series"]["id_column"] = "pid"

    assert shorter != base  # another window is another computation on the site's data
    assert plan_hash(parse_run_config(raw)) == base  # files and columns are the site's own


def test_a_site_never_trains_on_a_stale_copy_of_re_registered_files(tmp_path: Path) -> None:
    """The plan's data cache (fedmed.site.inputs) keys a site's data by its registered files."""
    from flwr.app import Context, RecordDict

    from fedmed.protocol import SITE_CONFIG_KEY
    from fedmed.site.inputs import site_inputs

    npz = _npz(tmp_path / "scans.npz")
    registry = DatasetRegistry(tmp_path / "state")
    registry.add("scans", npz)
    raw = _image_study(tmp_path)
    raw["data"]["dataset"] = "scans"
    text = parse_run_config(raw).to_json()  # one plan for the whole test: its cache is reused
    context = Context(1, 1, {SITE_CONFIG_KEY: str(_site_toml(tmp_path, "a"))}, RecordDict(), {})
    before = site_inputs(text, context).data
    again = site_inputs(text, context).data

    images, labels = _images(80, seed=11)  # a new export at the same path
    np.savez(npz, train_images=images, train_labels=labels)
    registry.add("scans", npz, replace=True)
    after = site_inputs(text, context).data

    assert again is before  # the same plan and files: served from memory ...
    assert not np.array_equal(before.x_train, after.x_train)  # ... re-registered: read afresh


def test_simulated_series_sites_can_name_their_own_outcomes(tmp_path: Path) -> None:
    """[[sites]] outcomes: a simulation laid out like a federation (one file pair per site)."""
    from fedmed.tasks import load_site_table

    sites = []
    for i, name in enumerate(("a", "b")):
        folder = tmp_path / name
        folder.mkdir()
        long, outcomes = _long_and_outcomes(folder, seed=i)
        sites.append({"name": name, "path": str(long), "outcomes": str(outcomes)})
    raw = _series_study(tmp_path)
    raw["data"] = {k: v for k, v in raw["data"].items() if k != "site_column"}
    raw["data"]["series"] = {"hours": 12, "bin_minutes": 60}  # no study-level outcomes
    raw["sites"] = sites
    cfg = parse_run_config(raw)

    tables = [load_site_table(cfg, s) for s in cfg.sites]

    assert [len(t.y_train) + len(t.y_test) for t in tables] == [60, 60]
    with pytest.raises(ConfigError, match="an outcomes path per \\[\\[sites\\]\\]"):
        load_site_table(cfg, cfg.sites[0].__class__("c", path=sites[0]["path"]))
