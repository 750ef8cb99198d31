"""Serving the models that do not read table rows: images and patients' time series.

Both take a clinic's RAW input and apply exactly the preprocessing recorded in the model card:

- an image: its 8-bit pixels (a PNG upload, or a JSON array H x W [x C]) -> the fixed
  (x/255 - 0.5)/0.5 transform, resized like the sites' images when the study resized them;
- a series: (time, variable, value) observations -> the training bins, masks, carried-forward
  values and time-since-observed, standardized with the sites' combined train statistics.

Bad input is answered with a 422 in FastAPI's own error shape ({"detail": [{"loc", "msg",
"type"}]}) whose message names the fix (wrong size or channels, unknown variable, no
observation in the window), never with a 500 or a silently reshaped input.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastapi import HTTPException

from fedmed.config import SeriesConfig
from fedmed.data.images import resize, to_model_input
from fedmed.errors import ConfigError
from fedmed.serving.export import load_model, resolve_model_path
from fedmed.tasks import get_task
from fedmed.tasks.imaging import integrated_gradients

MAX_PIXELS = 4096 * 4096  # per image: a bound on what one request may make the server decode


def invalid(loc: list[str | int], msg: str, kind: str) -> HTTPException:
    """A 422 shaped like FastAPI's request-validation errors."""
    detail = [{"loc": ["body", *loc], "msg": msg, "type": kind}]
    return HTTPException(status_code=422, detail=detail)


class ServedArrays:
    """A loaded image or series model with its card; subclasses turn raw input into tensors."""

    def __init__(self, path: Path, *, allow_unsigned: bool = False) -> None:
        self.path = resolve_model_path(path)
        self.model, self.card = load_model(self.path, require_signature=not allow_unsigned)
        self.task = get_task(self.card["task"])
        self.pre: dict[str, Any] = self.card.get("preprocessing") or {}

    def outputs(self, x: torch.Tensor) -> list[dict[str, Any]]:
        with torch.no_grad():
            scores = self.task.scores(self.model(x))
        columns = self.task.predictions(scores, 0.0)
        return [{k: v[i].item() for k, v in columns.items()} for i in range(len(x))]


class ServedImages(ServedArrays):
    """An imaging model: 8-bit images in, probabilities (and saliency maps) out."""

    def __init__(self, path: Path, *, allow_unsigned: bool = False) -> None:
        super().__init__(path, allow_unsigned=allow_unsigned)
        self.channels = len(self.card["inputs"])
        self.size = int(self.pre.get("size") or 0)
        height, width = self.pre.get("height"), self.pre.get("width")
        self.shape = (int(height), int(width)) if height and width and not self.size else None

    @property
    def expects(self) -> str:
        color = "grayscale (1 channel)" if self.channels == 1 else "RGB (3 channels)"
        if self.size:
            return f"{color} images of any size (resized to {self.size}x{self.size})"
        if self.shape:
            return f"{color} images of {self.shape[0]}x{self.shape[1]} pixels"
        return f"{color} images"

    def from_json(self, images: list[Any]) -> np.ndarray:
        """Nested lists (H x W, or H x W x C) of 0-255 integers -> uint8 (N, H, W, C)."""
        out = []
        for i, raw in enumerate(images):
            try:
                arr = np.asarray(raw, dtype=np.float64)
            except (ValueError, TypeError):
                raise invalid(
                    ["images", i],
                    "not a rectangular array of numbers; send rows of equal length, H x W "
                    f"(grayscale) or H x W x C; the model reads {self.expects}",
                    "image_array",
                ) from None
            if arr.ndim == 2:
                arr = arr[..., None]
            if arr.ndim != 3:
                raise invalid(
                    ["images", i],
                    f"array of shape {list(arr.shape)}; send H x W (grayscale) or H x W x C "
                    f"(channels last); the model reads {self.expects}",
                    "image_shape",
                )
            if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
                raise invalid(["images", i], "pixels must be integers 0-255", "image_pixels")
            if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
                raise invalid(["images", i], "pixels must be integers 0-255", "image_pixels")
            out.append(self._checked(arr.astype(np.uint8), ["images", i]))
        return self._stack(out)

    def from_png(self, data: bytes) -> np.ndarray:
        """One PNG (or any image PIL reads) -> uint8 (1, H, W, C), in the model's color mode."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise invalid(["png"], "image too large", "image_shape")
                gray = img.mode in ("L", "I", "I;16", "1", "P")  # as the sites read PNGs
                arr = np.asarray(img.convert("L" if gray else "RGB"))
        except (UnidentifiedImageError, OSError):
            raise invalid(
                ["png"], "not a readable image; send the PNG file's bytes as the body", "png"
            ) from None
        return self._stack([self._checked(arr if arr.ndim == 3 else arr[..., None], ["png"])])

    def _checked(self, img: np.ndarray, loc: list[str | int]) -> np.ndarray:
        if img.shape[-1] != self.channels:
            have = {1: "grayscale (1 channel)", 3: "RGB (3 channels)"}.get(
                img.shape[-1], f"{img.shape[-1]} channels"
            )
            convert = "grayscale" if self.channels == 1 else "RGB"
            raise invalid(
                loc,
                f"the image is {have} but the model reads {self.expects}; convert it to {convert}",
                "image_channels",
            )
        if min(img.shape[:2]) < 4:
            raise invalid(loc, f"{img.shape[0]}x{img.shape[1]} pixels is too small", "image_shape")
        if self.shape and img.shape[:2] != self.shape:
            raise invalid(
                loc,
                f"the image is {img.shape[0]}x{img.shape[1]} pixels but the model was trained on "
                f"{self.shape[0]}x{self.shape[1]}; resize it to {self.shape[0]}x{self.shape[1]}",
                "image_size",
            )
        return img

    def _stack(self, images: list[np.ndarray]) -> np.ndarray:
        if self.size:
            images = [
                r.reshape(self.size, self.size, img.shape[-1])
                for r, img in zip(resize(images, self.size), images, strict=True)
            ]
        if len({i.shape for i in images}) > 1:
            raise invalid(
                ["images"],
                "the images have different sizes; send one size per request",
                "image_size",
            )
        return np.stack(images)

    def predict(self, images: np.ndarray, explain: bool = False) -> list[dict[str, Any]]:
        x = torch.from_numpy(to_model_input(images))
        out = self.outputs(x)
        if explain:  # where the model looked: |integrated gradients| summed over channels
            maps = integrated_gradients(self.model, x).abs().sum(dim=1).numpy()
            for item, saliency in zip(out, maps, strict=True):
                item["saliency"] = np.round(saliency, 6).tolist()
        return out


class ServedSeries(ServedArrays):
    """A sequence model: one patient's observations in, a probability out."""

    def __init__(self, path: Path, *, allow_unsigned: bool = False) -> None:
        super().__init__(path, allow_unsigned=allow_unsigned)
        if "variables" not in self.pre:
            raise ConfigError(
                f"{self.path}: the model card has no series statistics (means/stds of each "
                "variable), so raw observations cannot be scaled as in training; re-run the "
                "study with at least one site sharing them (share_statistics = true)"
            )
        self.variables: tuple[str, ...] = tuple(self.pre["variables"])
        self.series = SeriesConfig(
            hours=int(self.pre["hours"]),
            bin_minutes=int(self.pre["bin_minutes"]),
            missing_code=self.pre.get("missing_code"),
            log_variables=tuple(self.pre.get("log_variables", ())),
        )
        self.bins = int(self.pre["bins"])
        self.mean = np.asarray(self.pre["mean"], dtype=np.float64)
        self.std = np.asarray(self.pre["std"], dtype=np.float64)

    def inputs(self, patients: list[list[dict[str, Any]]]) -> np.ndarray:
        """Observations per patient -> (patients, bins, 3 x variables), as the sites built them."""
        from fedmed.data.series import bin_means, features_of

        rows = []
        window = self.series.hours * 60
        for p, observations in enumerate(patients):
            if not observations:
                raise invalid(
                    ["patients", p, "observations"],
                    "no observations; send at least one {time, variable, value} (time in "
                    "minutes since admission)",
                    "series_empty",
                )
            for o, obs in enumerate(observations):
                if obs["variable"] not in self.variables:
                    raise invalid(
                        ["patients", p, "observations", o, "variable"],
                        f"unknown variable '{obs['variable']}'; the model reads: "
                        f"{', '.join(self.variables)}",
                        "series_variable",
                    )
            usable = [
                o
                for o in observations
                if 0 <= o["time"] <= window and o["value"] != self.series.missing_code
            ]
            if not usable:
                raise invalid(
                    ["patients", p, "observations"],
                    f"no observation in the model's window (time 0 to {window} minutes after "
                    f"admission, values other than the missing code {self.series.missing_code})",
                    "series_empty",
                )
            rows += [(p, o["time"], o["variable"], o["value"]) for o in usable]
        obs = pd.DataFrame(rows, columns=["id", "time", "variable", "value"])
        ids = np.arange(len(patients))
        sums, counts = bin_means(obs, ids, self.variables, self.series, self.bins)
        return features_of(sums, counts, self.mean, self.std)

    def predict(self, patients: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        return self.outputs(torch.from_numpy(self.inputs(patients)))
