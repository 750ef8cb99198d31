"""The imaging task: image loaders and their errors, augmentation, federated training with and
without DP, saliency maps from a saved model, and the BreastMNIST demo sites."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fedmed.cli.main import main
from fedmed.config import AugmentConfig, load_run_config, parse_run_config, resolve_config_path
from fedmed.data.images import load_npz, load_png_folder
from fedmed.errors import ConfigError, DataError
from fedmed.tasks import build_model, load_site_table
from fedmed.tasks.imaging import Augment, integrated_gradients
from tests.conftest import DATA_DIR, needs_shared_data


def _images(n: int, seed: int, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Class 1 has a bright 3x3 square somewhere; class 0 is noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (n, size, size), dtype=np.uint8)
    labels = (np.arange(n) % 2).astype(np.uint8)
    for i in np.flatnonzero(labels):
        r, c = rng.integers(0, size - 3, 2)
        images[i, r : r + 3, c : c + 3] = 250
    return images, labels


def _npz(path: Path, n: int = 80, **overrides: np.ndarray) -> Path:
    images, labels = _images(n, seed=0)
    arrays = {
        "train_images": images[: n // 2],
        "train_labels": labels[: n // 2],
        "test_images": images[n // 2 :],
        "test_labels": labels[n // 2 :].reshape(-1, 1),  # the official MedMNIST shape
    }
    arrays.update(overrides)
    np.savez(path, **arrays)
    return path


def _study(tmp_path: Path, **extra: object) -> dict:
    raw: dict = {
        "name": "img",
        "task": "imaging-classification",
        "rounds": 2,
        "output_dir": str(tmp_path / "runs"),
        "model": {"kind": "cnn", "hidden": [4, 8]},
        "train": {"local_steps": 3, "batch_size": 16, "optimizer": "adam", "lr": 0.01},
        "data": {
            "partition_file": str(_npz(tmp_path / "img.npz")),
            "dirichlet_alpha": 100.0,
            "schema": {"features": ["gray"], "min_rows": 10},
        },
        "sites": [{"name": "a"}, {"name": "b"}],
    }
    raw.update(extra)
    return raw


def test_npz_loads_every_split_and_accepts_both_label_shapes(tmp_path: Path) -> None:
    images, labels = load_npz(str(_npz(tmp_path / "ok.npz")))

    assert images.shape == (80, 8, 8, 1) and images.dtype == np.uint8
    assert labels.shape == (80,) and set(np.unique(labels)) == {0.0, 1.0}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"test_images": None}, "key 'test_images' is missing"),
        ({"train_images": np.zeros((40, 8), np.uint8)}, "shape (40, 8) is not"),
        ({"train_images": np.zeros((40, 8, 8), np.float32)}, "dtype float32, expected uint8"),
        ({"train_labels": np.full(40, 2, np.uint8)}, "label 2 at position 0"),
        ({"train_labels": np.zeros(39, np.uint8)}, "has 39 entries but train_images has 40"),
    ],
)
def test_malformed_npz_names_the_file_and_the_fix(
    tmp_path: Path, overrides: dict, message: str
) -> None:
    path = tmp_path / "bad.npz"
    _npz(path, **{k: v for k, v in overrides.items() if v is not None})
    if any(v is None for v in overrides.values()):  # drop a key entirely
        kept = {k: v for k, v in np.load(path).items() if k not in overrides}
        np.savez(path, **kept)

    with pytest.raises(DataError) as err:
        load_npz(str(path))

    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert "numpy.savez" in str(err.value) or "label" in str(err.value)


def test_npz_without_image_keys_lists_what_it_found(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", pictures=np.zeros((3, 8, 8), np.uint8))

    with pytest.raises(DataError, match="found: pictures"):
        load_npz(str(tmp_path / "x.npz"))


def test_png_folder_with_labels_csv(tmp_path: Path) -> None:
    images, labels = _images(12, seed=1)
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"p{i}.png")
    pd.DataFrame({"image": [f"p{i}.png" for i in range(12)], "label": labels}).to_csv(
        tmp_path / "labels.csv", index=False
    )

    x, y = load_png_folder(str(tmp_path / "labels.csv"), "label", "image")
    x16, _ = load_png_folder(str(tmp_path / "labels.csv"), "label", "image", size=16)

    assert np.array_equal(x[..., 0], images)
    assert np.array_equal(y, labels.astype(np.float32))
    assert x16.shape == (12, 16, 16, 1)
    (tmp_path / "p3.png").unlink()
    with pytest.raises(DataError, match="row 5: cannot read image"):
        load_png_folder(str(tmp_path / "labels.csv"), "label", "image")


def test_augment_flips_left_right_and_shifts_only_in_training() -> None:
    torch.manual_seed(0)
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5).repeat(50, 1, 1, 1)
    flip_only = Augment(AugmentConfig(hflip=True, vflip=False, max_shift=0))

    out = flip_only(x)

    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) < len(x)
    assert torch.equal(flip_only.eval()(x), x)
    shifted = Augment(AugmentConfig(hflip=False, max_shift=1))(x)
    assert shifted.shape == x.shape and not torch.equal(shifted, x)


def test_imaging_refuses_a_non_cnn_model(tmp_path: Path) -> None:
    cfg = parse_run_config(_study(tmp_path, model={"kind": "mlp"}))

    with pytest.raises(ConfigError, match="model.kind = 'cnn'"):
        load_site_table(cfg, cfg.sites[0])


@pytest.mark.parametrize("private", [False, True])
def test_federated_imaging_study_trains_with_and_without_dp(
    tmp_path: Path, capsys: pytest.CaptureFixture, private: bool
) -> None:
    extra = {"privacy": {"enabled": private, "target_epsilon": 5.0}}
    raw = _study(tmp_path, **extra)
    toml = tmp_path / "img.toml"
    toml.write_text(_to_toml(raw))

    code = main(["simulate", str(toml), "--quiet"])

    assert code == 0, capsys.readouterr().err
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    final = metrics["final"]["sites"]
    assert set(final) == {"a", "b"}
    assert all(0.0 <= m["roc_auc"] <= 1.0 for m in final.values())
    eps = [m["train"]["epsilon"] for h in metrics["history"] for m in h["sites"].values()]
    assert (max(eps) > 0) == private and max(eps) <= 5.0 + 1e-6
    assert (run_dir / "model.safetensors").is_file()


def _to_toml(raw: dict) -> str:
    """A tiny TOML writer for the nested dicts these tests build (no extra dependency)."""
    lines: list[str] = []
    tables: list[tuple[str, dict]] = []

    def value(v: object) -> str:
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    for k, v in raw.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif k != "sites":
            lines.append(f"{k} = {value(v)}")
    while tables:
        name, table = tables.pop(0)
        lines.append(f"[{name}]")
        for k, v in table.items():
            if isinstance(v, dict):
                tables.append((f"{name}.{k}", v))
            else:
                lines.append(f"{k} = {value(v)}")
    for site in raw["sites"]:
        lines.append("[[sites]]")
        lines += [f"{k} = {value(v)}" for k, v in site.items()]
    return "\n".join(lines) + "\n"


def test_integrated_gradients_add_up_to_the_logit_difference(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = parse_run_config(_study(tmp_path))
    model = build_model(cfg).eval()
    x = torch.rand(3, 1, 8, 8) * 2 - 1

    attr = integrated_gradients(model, x, steps=256)

    with torch.no_grad():
        gap = (model(x) - model(torch.full_like(x, -1.0))).squeeze(-1)
    assert attr.shape == x.shape
    # Completeness holds up to the Riemann error at ReLU/max-pool kinks (~2 % here).
    error = (attr.sum(dim=(1, 2, 3)) - gap).abs().max()
    assert float(error) < 0.05 * float(gap.abs().max())


def test_predict_explain_writes_saliency_pngs(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    toml = tmp_path / "img.toml"
    toml.write_text(_to_toml(_study(tmp_path)))
    assert main(["simulate", str(toml), "--quiet"]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    images, _ = _images(4, seed=3)
    np.savez(tmp_path / "new.npz", images=images)
    out = tmp_path / "preds.csv"

    code = main(["predict", str(run_dir), str(tmp_path / "new.npz"), "--explain",
                 "--output", str(out)])  # fmt: skip

    assert code == 0, capsys.readouterr().err
    preds = pd.read_csv(out)
    assert len(preds) == 4 and preds["probability"].between(0, 1).all()
    png = Image.open(preds["saliency_png"][0])
    assert png.size == (64, 64) and png.mode == "RGB"
    assert main(["predict", str(run_dir), str(tmp_path / "new.npz"), "--explain"]) == 2
    (tmp_path / "rows.csv").write_text("x\n1\n")
    assert main(["predict", str(run_dir), str(tmp_path / "rows.csv")]) == 2
    assert "give it a .npz of images" in capsys.readouterr().err


@needs_shared_data
def test_breastmnist_demo_splits_all_780_images_across_three_sites() -> None:
    assert (DATA_DIR / "medmnist" / "breastmnist.npz").is_file()
    cfg = load_run_config(resolve_config_path("breastmnist"))

    tables = [load_site_table(cfg, s) for s in cfg.sites]

    total = sum(len(t.y_train) + len(t.y_test) for t in tables)
    assert total == 780
    assert all(t.data.x_train.shape[1:] == (1, 28, 28) for t in tables)
    assert all(t.data.x_train.min() >= -1.0 and t.data.x_train.max() <= 1.0 for t in tables)
    positives = [float(np.concatenate([t.y_train, t.y_test]).mean()) for t in tables]
    assert max(positives) - min(positives) > 0.05  # Dirichlet label skew across the sites
