"""Predictions and saliency maps for an imaging model, from its saved file.

``fedmed predict MODEL images.npz [--explain] --output preds.csv`` writes one row per image
(probability, label) and, with --explain, one PNG per image next to the CSV: the image, 8x
enlarged, with the integrated-gradients magnitude overlaid in red (per image, scaled to its
99th percentile). Magnitude, not sign: it shows WHERE the model looked, which is what a
clinician can check against the anatomy; the sign (towards label 1 or 0) is in the raw map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedmed.data.images import _checked_images, resize, to_model_input
from fedmed.errors import ConfigError, DataError
from fedmed.serving.export import load_model
from fedmed.tasks import get_task
from fedmed.tasks.imaging import integrated_gradients

SCALE = 8  # overlay pixels per image pixel


def read_images(path: Path) -> np.ndarray:
    """Every '*images' array of a .npz (labels, if any, are ignored), as uint8 (N, H, W, C)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    with archive:
        keys = sorted(k for k in archive.files if k.endswith("images"))
        if not keys:
            raise DataError(
                f"{path}: no array named 'images' or '<split>_images' (found: "
                f"{', '.join(archive.files) or 'none'}); save the images under 'images'"
            )
        return np.concatenate([_checked_images(archive[k], f"{path}: {k}") for k in keys])


def overlay(image: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """uint8 RGB (H*SCALE, W*SCALE, 3): the grayscale image with the saliency in red."""
    gray = image.astype(np.float32).mean(axis=-1) / 255.0
    top = np.percentile(saliency, 99)
    heat = np.clip(saliency / top, 0.0, 1.0) if top > 0 else np.zeros_like(saliency)
    rgb = np.stack([gray * (1 - heat) + heat, gray * (1 - heat), gray * (1 - heat)], axis=-1)
    big = rgb.repeat(SCALE, axis=0).repeat(SCALE, axis=1)
    return (big * 255).round().astype(np.uint8)


def predict_images(
    model_path: Path, images: Path, output: Path | None, *, explain: bool, allow_unsigned: bool
) -> pd.DataFrame:
    """Probabilities per image; with ``explain``, saliency PNGs in ``<output stem>-saliency/``."""
    from PIL import Image

    model, card = load_model(model_path, require_signature=not allow_unsigned)
    if card["task"] != "imaging-classification":
        raise ConfigError(
            f"{model_path} is a '{card['task']}' model; give it a CSV of patient rows, not images"
        )
    if explain and output is None:
        raise ConfigError("--explain writes saliency PNGs next to --output; give --output")
    task = get_task(card["task"])
    size = int((card.get("preprocessing") or {}).get("size", 0))
    raw = read_images(images)
    if size:
        raw = np.stack(resize(list(raw), size)).reshape(len(raw), size, size, raw.shape[-1])
    x = torch.from_numpy(to_model_input(raw))
    with torch.no_grad():
        scores = task.scores(model(x))
    result = pd.DataFrame({"image": np.arange(len(raw))})
    for name, values in task.predictions(scores, 0.0).items():
        result[name] = np.round(values, 6) if values.dtype.kind == "f" else values
    if explain:
        assert output is not None
        folder = output.with_name(output.stem + "-saliency")
        folder.mkdir(parents=True, exist_ok=True)
        maps = integrated_gradients(model, x).abs().sum(dim=1).numpy()
        files = []
        for i, (image, saliency) in enumerate(zip(raw, maps, strict=True)):
            file = folder / f"image-{i:05d}.png"
            Image.fromarray(overlay(image, saliency)).save(file)
            files.append(str(file))
        result["saliency_png"] = files
    if output is not None:
        result.to_csv(output, index=False)
    return result
