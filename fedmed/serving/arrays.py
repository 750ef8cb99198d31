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
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastapi import HTTPException

from fedmed.config import SeriesConfig
from fedmed.data.images import resize, to_model_input
from fedmed.data.series import bin_means, features_of, read_header
from fedmed.errors import ConfigError, DataError
from fedmed.serving.export import load_model, resolve_model_path
from fedmed.tasks import get_task
from fedmed.tasks.imaging import integrated_gradients
from fedmed.tasks.sequence import INPUTS_PER_VARIABLE

MAX_PIXELS = 4096 * 4096  # per image: a bound on what one request may make the server decode
TOP_BINNED = 5  # variables whose per-bin attributions a series explanation carries
EXPLAIN_CHUNK = 256  # patients per integrated-gradients pass
_SERIES = SeriesConfig()  # a long CSV's columns when the card names none: the sites' defaults
DEFAULT_COLUMNS = (
    _SERIES.id_column,
    _SERIES.time_column,
    _SERIES.variable_column,
    _SERIES.value_column,
)


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
                    f"no observation in the model's {self.window}",
                    "series_empty",
                )
            rows += [(p, o["time"], o["variable"], o["value"]) for o in usable]
        obs = pd.DataFrame(rows, columns=["id", "time", "variable", "value"])
        return self.binned(obs, len(patients))

    @property
    def window(self) -> str:
        return (
            f"window (time 0 to {self.series.hours * 60} minutes after admission, values other "
            f"than the missing code {self.series.missing_code})"
        )

    def binned(self, obs: pd.DataFrame, n_patients: int) -> np.ndarray:
        """Observations with ids 0..n_patients-1 -> model inputs, by the data layer's own code."""
        ids = np.arange(n_patients)
        sums, counts = bin_means(obs, ids, self.variables, self.series, self.bins)
        return features_of(sums, counts, self.mean, self.std)

    def baseline(self) -> np.ndarray:
        """The patient with nothing observed, (1, bins, 3 x variables): values at the train
        mean, no masks, time since admission. Built by features_of from zero counts, so a
        variable a patient never had is identical to it and gets exactly 0 attribution."""
        zeros = np.zeros((1, self.bins, len(self.variables)))
        return features_of(zeros, zeros, self.mean, self.std)

    def attributions(self, x: torch.Tensor) -> np.ndarray:
        """Integrated gradients per (patient, bin, variable), the value, mask and delta channels
        summed: a clinician asks which measurement mattered, not which encoding of it. A
        patient's attributions add up to logit(patient) - logit(nothing observed)."""
        baseline = torch.from_numpy(self.baseline())
        parts = [
            integrated_gradients(self.model, chunk, baseline=baseline)
            for chunk in torch.split(x, EXPLAIN_CHUNK)  # bounds the GRU's stored activations
        ]
        ig = torch.cat(parts).detach()
        n, bins, _ = x.shape
        return ig.reshape(n, bins, INPUTS_PER_VARIABLE, len(self.variables)).sum(dim=2).numpy()

    def predict(
        self, patients: list[list[dict[str, Any]]], explain: bool = False
    ) -> list[dict[str, Any]]:
        x = torch.from_numpy(self.inputs(patients))
        out = self.outputs(x)
        if explain:
            for item, per_bin in zip(out, self.attributions(x), strict=True):
                item.update(series_explanation(self.variables, per_bin))
        return out

    def from_csv(
        self, path: Path, columns: tuple[str, ...] | None = None
    ) -> tuple[np.ndarray, str, np.ndarray, list[str]]:
        """A long CSV (patient id, time in minutes, variable, value per row) -> (patient ids in
        file order, the id column's name, model inputs, the variables ignored). Checked like the
        HTTP request, naming the file and the data row or patient; missing-code values and the
        rows of variables the model does not read are dropped as at the sites."""
        cols = columns or tuple(self.pre.get("columns") or DEFAULT_COLUMNS)
        header = read_header(str(path))
        absent = [c for c in cols if c not in header]
        if absent:
            raise DataError(
                f"{path}: column '{absent[0]}' is missing (columns: {', '.join(header)}); name "
                "the columns with --id-column, --time-column, --variable-column, --value-column"
            )
        raw = pd.read_csv(path, usecols=list(set(cols)), dtype={cols[2]: str})
        names = ("id", "time", "variable", "value")
        df = pd.DataFrame({k: raw[c] for k, c in zip(names, cols, strict=True)})
        if df.empty:
            raise DataError(f"{path}: no observations; add rows (one observation each)")
        if df["id"].isna().any():
            raise DataError(
                f"{path}: column '{cols[0]}' is empty at data row "
                f"{int(df['id'].isna().idxmax()) + 1}; give every row its patient id"
            )
        # Rows of variables the model does not read (PhysioNet's RecordID and ICUType descriptor
        # rows, another model's variables) are skipped, as training skips them; the caller
        # lists them. The index is kept, so later errors still name the file's data row.
        # Patients are numbered first: one with descriptor rows only is still named below.
        codes, ids = pd.factorize(df["id"])
        df["id"] = codes
        unused = ~df["variable"].isin(self.variables)
        ignored = df["variable"][unused].drop_duplicates().astype(str).tolist()
        df = df[~unused].copy()
        if df.empty:
            raise DataError(
                f"{path}: no observation of a variable the model reads ({', '.join(self.variables)}"
                f"; found only: {_listed(ignored)}); rename the variables or use another file"
            )
        for key, col in (("time", cols[1]), ("value", cols[3])):
            parsed = pd.to_numeric(df[key], errors="coerce")
            # An empty value is "not measured" and dropped, as at the sites; an empty time is
            # an error: nothing says which bin the observation belongs to.
            bad = parsed.isna() & (df[key].notna() if key == "value" else True)
            if bad.any():
                row = int(bad.idxmax())
                what = "is empty" if pd.isna(df[key][row]) else f"has {df[key][row]!r}"
                unit = " (minutes since admission)" if key == "time" else ""
                raise DataError(
                    f"{path}: column '{col}' {what} at data row {row + 1}; give a number{unit} "
                    "or remove the row"
                )
            # inf, -inf and values beyond float32 parse as numbers but no model can read them:
            # refused, as the sites refuse them, never binned into a score.
            unusable = parsed.notna() & ~(np.isfinite(parsed) & (parsed.abs() <= FLOAT32_MAX))
            if unusable.any():
                row = int(unusable.idxmax())
                raise DataError(
                    f"{path}: column '{col}' has {str(df[key][row])[:40]!r} at data row "
                    f"{row + 1}, not a finite number a model can read; fix or remove the row"
                )
            df[key] = parsed.astype(np.float64)
        codes = df["id"].to_numpy()
        usable = df["time"].between(0, self.series.hours * 60) & df["value"].notna()
        if self.series.missing_code is not None:
            usable &= df["value"] != self.series.missing_code
        seen = np.bincount(codes[usable.to_numpy()], minlength=len(ids)) > 0
        if not seen.all():
            raise DataError(
                f"{path}: patient {ids[np.argmin(seen)]} has no observation in the model's "
                f"{self.window}; check that times are minutes since admission, or leave the "
                "patient out"
            )
        return np.asarray(ids), cols[0], self.binned(df[usable], len(ids)), ignored


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _listed(names: list[str], limit: int = 8) -> str:
    """Up to ``limit`` names, then how many more: keeps a note about a messy file to one line."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def series_explanation(variables: tuple[str, ...], per_bin: np.ndarray) -> dict[str, Any]:
    """One patient's (bins, variables) attributions -> every variable's total, and the per-bin
    course of the TOP_BINNED largest only: a 40-variable x 48-bin reply would be noise."""
    totals = per_bin.sum(axis=0)
    top = np.argsort(-np.abs(totals), kind="stable")[:TOP_BINNED]
    return {
        "explanation": {v: round(float(a), 6) for v, a in zip(variables, totals, strict=True)},
        "explanation_bins": {variables[i]: np.round(per_bin[:, i], 6).tolist() for i in top},
    }


def predict_series_csv(
    served: ServedSeries,
    path: Path,
    output: Path | None,
    *,
    explain: bool = False,
    columns: tuple[str, ...] | None = None,
) -> pd.DataFrame:
    """Batch prediction for the command line: one row per patient of a long CSV, in file order.

    ``explain`` adds one ``explain:<variable>`` column per variable (the totals the HTTP API
    returns; the per-bin course stays an HTTP feature: 48 columns per variable help no one).
    """
    ids, id_column, x, ignored = served.from_csv(path, columns)
    if ignored:  # said once, so a misspelt variable is not dropped unnoticed
        print(
            f"note: {path}: ignored the rows of {len(ignored)} variable(s) the model does not "
            f"read: {_listed(ignored)}",
            file=sys.stderr,
        )
    inputs = torch.from_numpy(x)
    outputs = served.outputs(inputs)
    result = pd.DataFrame({id_column: ids})
    for name, tp in served.task.prediction_fields.items():
        values = np.array([o[name] for o in outputs])
        result[name] = np.round(values, 6) if tp is float else values
    if explain:
        totals = served.attributions(inputs).sum(axis=1)
        for v, variable in enumerate(served.variables):
            result[f"explain:{variable}"] = np.round(totals[:, v], 6)
    if output is not None:
        result.to_csv(output, index=False)
    return result
