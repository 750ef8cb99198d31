"""Image sites: a MedMNIST-format .npz, or a folder of PNGs listed in a labels CSV.

Pixels become float32 in [-1, 1] ((x/255 - 0.5) / 0.5): a fixed transform, not fitted on any
site, so every hospital and the served model see the same input scale and no statistic of a
site's images leaves it. Arrays are (N, C, H, W); C = 1 (grayscale) or 3 (RGB).

A .npz's own train/val/test split is not kept: the arrays are pooled and each site draws its
test split with data.schema.test_fraction (stratified), exactly as a table site does, so every
site is evaluated the same way whatever file format it exports.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from fedmed.config import RunConfig, SiteSpec
from fedmed.data.arrays import ArrayTable, binary_labels, shard, split_checked
from fedmed.data.sources import read_table, resolve_site_path
from fedmed.data.table import SiteData
from fedmed.errors import DataError

SPLITS = ("train", "val", "test")
CHANNELS = {1: ("gray",), 3: ("red", "green", "blue")}
PIXELS = "float32 (x / 255 - 0.5) / 0.5, channels first"
NPZ_FIX = (
    "save the file with numpy.savez(path, train_images=..., train_labels=..., test_images=..., "
    "test_labels=...) as MedMNIST does: uint8 images (N, H, W) or (N, H, W, C) with C = 1 or 3, "
    "and 0/1 labels (N,) or (N, 1)"
)


def read_image_site(cfg: RunConfig, site: SiteSpec) -> ArrayTable:
    """One site's images and labels: validated, split, scaled to the model's input range."""
    path = resolve_site_path(cfg.data.partition_file or site.path)
    images, labels = load_images(
        path, cfg.data.schema.target, cfg.data.images.column, cfg.data.images.size
    )
    origin = path
    if cfg.data.partition_file:
        rows = shard(cfg, site, labels)
        images, labels = images[rows], labels[rows]
        origin = f"{path}[{site.name}]"
    x_tr, y_tr, x_te, y_te = split_checked(images, labels, cfg.data.schema, origin)
    channels = CHANNELS[images.shape[-1]]
    data = SiteData(
        name=site.name,
        x_train=to_model_input(x_tr),
        y_train=y_tr,
        x_test=to_model_input(x_te),
        y_test=y_te,
        input_names=channels,
        preprocessing={**preprocessing(cfg), "height": x_tr.shape[1], "width": x_tr.shape[2]},
    )
    return ArrayTable(site.name, origin, channels, data, "image")


def preprocessing(cfg: RunConfig) -> dict[str, object]:
    """What a served model must do to a raw image (recorded in the model card)."""
    return {"pixels": PIXELS, "size": cfg.data.images.size}


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    x = images.astype(np.float32) / 255.0
    return np.ascontiguousarray(((x - 0.5) / 0.5).transpose(0, 3, 1, 2))


def resize(images: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Bilinear resize of uint8 (H, W) / (H, W, C) images to size x size (0 = keep)."""
    from PIL import Image

    if not size:
        return images
    return [
        img
        if img.shape[:2] == (size, size)
        else np.asarray(
            Image.fromarray(
                img.squeeze(-1) if img.ndim == 3 and img.shape[-1] == 1 else img
            ).resize((size, size), Image.Resampling.BILINEAR)
        ).reshape(size, size, *img.shape[2:])
        for img in images
    ]


@functools.lru_cache(maxsize=8)
def load_images(
    path: str, target: str = "label", column: str = "image", size: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, H, W, C), float32 0/1 labels) from a .npz or a labels CSV.

    Cached per process: simulated sites that share one file read it once.
    """
    if path.lower().endswith(".npz"):
        images, labels = load_npz(path)
        if size and images.shape[1:3] != (size, size):
            images = _checked_images(np.stack(resize(list(images), size)), path)
        return images, labels
    if path.lower().endswith((".csv", ".tsv")):
        return load_png_folder(path, target, column, size)
    raise DataError(
        f"{path}: an image site is a .npz (MedMNIST format) or a .csv listing PNG files and "
        "labels; convert the data to one of them"
    )


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """All splits of a MedMNIST-format file, pooled. Never unpickles (allow_pickle=False)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found (set FEDMED_DATA_DIR to the datasets folder)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc}); {NPZ_FIX}") from None
    with archive:
        keys = set(archive.files)
        found = [s for s in SPLITS if f"{s}_images" in keys or f"{s}_labels" in keys]
        if not found:
            raise DataError(
                f"{path}: no '<split>_images' / '<split>_labels' keys (found: "
                f"{', '.join(sorted(keys)) or 'none'}); {NPZ_FIX}"
            )
        images, labels = [], []
        for split in found:
            for kind in ("images", "labels"):
                if f"{split}_{kind}" not in keys:
                    raise DataError(
                        f"{path}: key '{split}_{kind}' is missing next to its pair; {NPZ_FIX}"
                    )
            imgs = _checked_images(archive[f"{split}_images"], f"{path}: {split}_images")
            labs = binary_labels(archive[f"{split}_labels"], f"{path}: {split}_labels", NPZ_FIX)
            if len(labs) != len(imgs):
                raise DataError(
                    f"{path}: {split}_labels has {len(labs)} entries but {split}_images has "
                    f"{len(imgs)} images; give one label per image"
                )
            images.append(imgs)
            labels.append(labs)
    shapes = {i.shape[1:] for i in images}
    if len(shapes) > 1:
        raise DataError(f"{path}: the splits hold images of different shapes {sorted(shapes)}")
    return np.concatenate(images), np.concatenate(labels)


def _checked_images(arr: np.ndarray, origin: str) -> np.ndarray:
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in CHANNELS or min(arr.shape[1:3]) < 4:
        raise DataError(
            f"{origin}: shape {arr.shape} is not (N, H, W) or (N, H, W, 1|3); {NPZ_FIX}"
        )
    if arr.dtype != np.uint8:
        raise DataError(f"{origin}: dtype {arr.dtype}, expected uint8 pixels 0-255; {NPZ_FIX}")
    return arr


def load_png_folder(
    path: str, target: str, column: str, size: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A labels CSV (``column`` = PNG path relative to the CSV, ``target`` = 0/1) and its PNGs."""
    from PIL import Image, UnidentifiedImageError

    from fedmed.config import SchemaConfig

    table = read_table(path, SchemaConfig())
    for col in (column, target):
        if col not in table.columns:
            raise DataError(
                f"{path}: column '{col}' is missing (columns: {', '.join(table.columns)}); set "
                "data.images.column (PNG paths) and data.schema.target (0/1 labels)"
            )
    fix = f"set column '{target}' to 0 or 1 in every row"
    labels = binary_labels(
        np.asarray(pd_numeric(table[target], path, target)), f"{path}: column '{target}'", fix
    )
    folder = Path(path).parent
    images = []
    for line, name in zip(table.index, table[column], strict=True):
        file = folder / str(name)
        try:
            with Image.open(file) as img:
                mode = "L" if img.mode in ("L", "I", "I;16", "1", "P") else "RGB"
                images.append(np.asarray(img.convert(mode)))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
            raise DataError(
                f"{path}: row {line}: cannot read image {file} ({type(exc).__name__}); fix the "
                "path (relative to the CSV's folder) or the file"
            ) from None
    images = resize(images, size)
    shapes = {i.shape for i in images}
    if len(shapes) > 1:
        raise DataError(
            f"{path}: the PNGs have different shapes {sorted(shapes)[:3]}; set data.images.size "
            "to resize them to one size, and export them in one color mode"
        )
    return _checked_images(np.stack(images), path), labels


def pd_numeric(values: object, path: str, column: str) -> np.ndarray:
    import pandas as pd

    parsed = pd.to_numeric(values, errors="coerce")  # type: ignore[call-overload]
    if parsed.isna().any():
        raise DataError(
            f"{path}: column '{column}' has a non-numeric or empty label at row "
            f"{parsed.index[parsed.isna()][0]}; labels must be 0 or 1"
        )
    return parsed.to_numpy()
