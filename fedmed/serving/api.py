"""Model as a service: a FastAPI app that serves one exported federated model.

The request schema is generated from the model card, so a clinic's app gets a 422 naming the
exact field when it sends an unknown field, misses one, or sends text where a number belongs;
OpenAPI docs (/docs) describe the same schema. Raw patient values are transformed with the
preprocessing stored in the card, never with statistics of the request itself.

(No ``from __future__ import annotations`` here: FastAPI must see the request models, which are
built per model card inside create_app, as real classes.)
"""

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedmed.config import SchemaConfig, echo
from fedmed.data.table import OUTCOMES, Preprocessor
from fedmed.errors import ConfigError, DataError
from fedmed.serving.arrays import ServedImages, ServedSeries
from fedmed.serving.export import load_model, malformed_card, resolve_model_path
from fedmed.serving.text import ServedText
from fedmed.tasks import get_task

IG_STEPS = 32
MAX_BODY_BYTES = 5_000_000  # default request-body limit (fedmed serve --max-body-mb)
MAX_ERRORS = 20  # validation errors listed in one 422; the rest are counted
FLOAT32_MAX = float(np.finfo(np.float32).max)

# A clinical value the model can compute with: finite and inside float32 (the model's dtype), so
# Infinity, "Infinity", 1e300 or NaN never become "probability: null, label: 0".
Finite = Annotated[float, Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]


def _nan_is_missing(value: Any) -> Any:
    """With missing = "mean", NaN (a JSON NaN or the text "NaN") means "not measured": None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and value.strip().lower() == "nan":
        return None
    return value


class ServedModel:
    """A loaded model with its card: raw rows in, the task's predictions (and attributions) out."""

    def __init__(self, path: Path, *, allow_unsigned: bool = False) -> None:
        self.path = resolve_model_path(path)
        self.model, self.card = load_model(self.path, require_signature=not allow_unsigned)
        self.task = get_task(self.card["task"])
        if self.task.target not in OUTCOMES:  # images, series, text: not rows of variables
            raise ConfigError(
                f"{self.path}: a '{self.card['task']}' model is not served from table rows; "
                "open it with fedmed.serving.api.open_model (as `fedmed serve` does)"
            )
        with malformed_card(self.path):
            raw = self.card["schema"]
            self.schema = SchemaConfig(
                target=raw["target"],
                features=tuple(raw["features"]),
                categorical={k: tuple(v) for k, v in raw["categorical"].items()},
                drop_first=raw["drop_first"],
                missing=raw["missing"],
                standardize=raw["standardize"],
            )
            params = self.card.get("preprocessing")
            if not params:
                raise ConfigError(
                    f"{self.path}: the model card has no serving preprocessing; re-run the study "
                    "with this fedmed version to export it"
                )
            self.pre = Preprocessor.from_dict(self.schema.features, self.schema, params)

    def frame(self, rows: list[dict[str, Any]]) -> pd.DataFrame:
        df = pd.DataFrame(rows, columns=list(self.schema.features))
        for col in self.schema.features:
            if col not in self.schema.categorical:
                df[col] = pd.to_numeric(df[col], errors="raise").astype(float)
        return df

    def predict(self, rows: list[dict[str, Any]], explain: bool = False) -> list[dict[str, Any]]:
        """Predictions per row; ``imputed`` lists the fields filled with the train mean."""
        numeric = [c for c in self.schema.features if c not in self.schema.categorical]
        x = torch.from_numpy(self.pre.transform(self.frame(rows)))
        out = self.outputs(x)
        for item, row in zip(out, rows, strict=True):
            item["imputed"] = [c for c in numeric if row.get(c) is None]
        if explain:
            for item, attr in zip(out, self.attributions(x), strict=True):
                item["explanation"] = attr
        return out

    def outputs(self, x: torch.Tensor) -> list[dict[str, Any]]:
        """The task's prediction fields per row of model inputs ``x``.

        A row whose output is not a finite number (inputs far outside anything the model was
        trained on can overflow it) is an error naming the row, never a null probability.
        """
        with torch.no_grad():
            raw = self.model(x)
            scores = self.task.scores(raw)
            reference = float(self.task.scores(self.model(torch.zeros(1, x.shape[1])))[0])
        broken = ~torch.isfinite(raw.reshape(len(x), -1)).all(dim=1)
        if broken.any():
            row = int(broken.nonzero()[0, 0])
            raise DataError(
                f"row {row}: the model's output is not a finite number for these values (far "
                "outside the range it was trained on?); check the row's units and values"
            )
        columns = self.task.predictions(scores, reference)
        return [{k: v[i].item() for k, v in columns.items()} for i in range(len(x))]

    def attributions(self, x: torch.Tensor) -> list[dict[str, float]]:
        """Integrated gradients (baseline: the average patient, 0 after standardization).

        In the model's output units (logit; log hazard for survival); one-hot columns are summed
        back to their clinical variable. The attributions of a row add up to its output minus
        the baseline's; for a linear model each is exactly weight x standardized value.
        """
        baseline = torch.zeros_like(x)
        total = torch.zeros_like(x)
        for alpha in torch.linspace(1.0 / IG_STEPS, 1.0, IG_STEPS):
            point = (baseline + alpha * (x - baseline)).requires_grad_(True)
            self.model(point).sum().backward()
            total += point.grad
        attr = ((x - baseline) * total / IG_STEPS).numpy()
        names = self.pre.input_names
        result = []
        for row in attr:
            per_feature: dict[str, float] = {}
            for name, value in zip(names, row, strict=True):
                feature = name.split("=")[0] if name not in self.schema.features else name
                per_feature[feature] = per_feature.get(feature, 0.0) + float(value)
            result.append(per_feature)
        return result


def _row_model(served: ServedModel) -> type[BaseModel]:
    """A pydantic model of one patient row, from the card's schema."""
    fields: dict[str, Any] = {}
    optional = served.schema.missing == "mean"
    for col in served.schema.features:
        cats = served.schema.categorical.get(col)
        tp: Any = Literal[tuple(cats)] if cats else Finite  # type: ignore[valid-type]
        if optional and not cats:
            fields[col] = (
                Annotated[Finite | None, BeforeValidator(_nan_is_missing)],
                Field(default=None, description="null, NaN or absent = the train mean (imputed)"),
            )
        else:
            fields[col] = (tp, ...)
    return create_model("PatientRow", __config__=ConfigDict(extra="forbid", strict=False), **fields)


Served = ServedModel | ServedImages | ServedSeries | ServedText


def open_model(path: Path, *, allow_unsigned: bool = False) -> Served:
    """The served form of a model file, by what its task reads (rows, images, series or text)."""
    import json

    from fedmed.tasks import TASKS

    weights = resolve_model_path(path)
    card = weights.with_name(weights.name.removesuffix(".safetensors") + ".card.json")
    try:  # only to pick the class: loading it checks the card, its signature and the weights
        task = TASKS.get(json.loads(card.read_text()).get("task", ""))
    except (OSError, ValueError, AttributeError):
        task = None
    kind = {"image": ServedImages, "series": ServedSeries, "text": ServedText}.get(
        task.target if task else ""
    )
    return (kind or ServedModel)(weights, allow_unsigned=allow_unsigned)


def create_app(served: Served, *, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The HTTP API around ``served``: /predict, /model, /health, and OpenAPI docs at /docs.

    /predict takes what the model reads: table rows, images (plus /predict/png for one PNG
    file), patients' series or raw texts. A body over ``max_body_bytes`` gets 413 before it is
    parsed; a 422 names each bad field without echoing more than a short excerpt of what was sent.
    """
    card = served.card
    study = card["study"]
    app = FastAPI(
        title=f"fedmed model: {study['name']}",
        description=(
            f"{card['task']} trained by {study['mode']} learning across "
            f"{len(study['sites'])} sites ({', '.join(study['sites'])}), {study['rounds']} rounds. "
            f"{served.task.prediction_doc}. Not a substitute for clinical judgement."
        ),
        version=card.get("fedmed_version", ""),
    )
    identity = {"study": study["name"], "weights_sha256": card["weights_sha256"]}
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_exception_handler(RequestValidationError, _short_422)
    app.add_exception_handler(DataError, _data_422)
    if isinstance(served, ServedImages):
        _image_routes(app, served, identity)
    elif isinstance(served, ServedSeries):
        _series_routes(app, served, identity)
    elif isinstance(served, ServedText):
        _text_routes(app, served, identity)
    else:
        _table_routes(app, served, identity)

    @app.get("/model")
    def model_card() -> dict[str, Any]:
        return card

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", **identity}

    return app


class BodyLimit:
    """413 for a request body over ``max_bytes``, checked before anything parses it.

    A declared Content-Length is checked up front; a chunked body is counted as it arrives,
    so a client cannot make the server hold (or the validator echo) megabytes of JSON.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = f"{self.max_bytes / 1e6:g} MB"
        response = JSONResponse(
            status_code=413,
            content={"detail": f"request body over {limit}; send fewer rows per request"},
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _short(value: Any) -> Any:
    """A validation error's ``input`` or ``loc`` item as JSON, at most ~200 characters."""
    if value is None or (isinstance(value, bool | int) and abs(value) < 10**15):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, str) and len(value) <= 200:
        return value
    return echo(value)


async def _short_422(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 shape (loc, msg, type, input), but never an echo of a large input.

    The default handler returns each error's whole ``input``: a 5 MB row would come back as
    a 5 MB error (and a non-finite number would not even serialize as JSON).
    """
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    detail = [
        {
            "loc": [_short(part) for part in error.get("loc", ())],
            "msg": str(error.get("msg", ""))[:200],
            "type": error.get("type", ""),
            "input": _short(error.get("input")),
        }
        for error in errors[:MAX_ERRORS]
    ]
    if len(errors) > MAX_ERRORS:
        detail.append(
            {"loc": ["body"], "msg": f"and {len(errors) - MAX_ERRORS} more", "type": "more"}
        )
    return JSONResponse(status_code=422, content={"detail": detail})


async def _data_422(request: Request, exc: Exception) -> JSONResponse:
    """Values that pass the schema but not the model (e.g. an overflowing output): 422, one line."""
    return JSONResponse(status_code=422, content={"detail": str(exc)[:300]})


def _prediction_model(served: Served, **extra: Any) -> type[BaseModel]:
    """The task's fields, e.g. probability + label, or hazard ratio."""
    return create_model(
        "Prediction", **{k: (tp, ...) for k, tp in served.task.prediction_fields.items()}, **extra
    )


def _table_routes(app: FastAPI, served: ServedModel, identity: dict[str, str]) -> None:
    row_model = _row_model(served)

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        rows: list[row_model] = Field(min_length=1, max_length=10_000)  # type: ignore[valid-type]
        explain: bool = False

    prediction = _prediction_model(
        served,
        explanation=(dict[str, float] | None, None),
        imputed=(
            list[str],
            Field(default_factory=list, description="fields filled with the train mean"),
        ),
    )

    class PredictResponse(BaseModel):
        predictions: list[prediction]  # type: ignore[valid-type]
        model: dict[str, Any]

    @app.post("/predict", response_model=PredictResponse)
    def predict(request: PredictRequest) -> dict[str, Any]:
        rows = [r.model_dump() for r in request.rows]
        return {"predictions": served.predict(rows, explain=request.explain), "model": identity}


def _image_routes(app: FastAPI, served: ServedImages, identity: dict[str, str]) -> None:
    prediction = _prediction_model(served, saliency=(list[list[float]] | None, None))

    class ImageRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        images: list[Any] = Field(
            min_length=1,
            max_length=256,
            description=f"8-bit pixels (0-255), H x W or H x W x C each; {served.expects}",
        )
        explain: bool = False

    class ImageResponse(BaseModel):
        predictions: list[prediction]  # type: ignore[valid-type]
        model: dict[str, Any]

    @app.post("/predict", response_model=ImageResponse)
    def predict(request: ImageRequest) -> dict[str, Any]:
        images = served.from_json(request.images)
        return {"predictions": served.predict(images, request.explain), "model": identity}

    @app.post(
        "/predict/png",
        response_model=ImageResponse,
        openapi_extra={"requestBody": {"content": {"image/png": {"schema": {"type": "string"}}}}},
        description=f"The body is one PNG file's bytes; {served.expects}.",
    )
    async def predict_png(request: Request, explain: bool = False) -> dict[str, Any]:
        images = served.from_png(await request.body())
        return {"predictions": served.predict(images, explain), "model": identity}


class Observation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    time: Finite = Field(description="minutes since admission")
    variable: str = Field(max_length=200)
    value: Finite


def _series_routes(app: FastAPI, served: ServedSeries, identity: dict[str, str]) -> None:
    prediction = _prediction_model(
        served,
        explanation=(dict[str, float] | None, None),
        explanation_bins=(dict[str, list[float]] | None, None),
    )

    class Patient(BaseModel):
        model_config = ConfigDict(extra="forbid")
        observations: list[Observation] = Field(
            max_length=100_000,
            description=f"variables: {', '.join(served.variables)}; observations after "
            f"{served.series.hours} h are not used",
        )

    class SeriesRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        patients: list[Patient] = Field(min_length=1, max_length=1000)
        explain: bool = Field(
            default=False,
            description="add per-variable integrated gradients against a patient with nothing "
            "observed (explanation), and per time bin for the 5 largest (explanation_bins)",
        )

    class SeriesResponse(BaseModel):
        predictions: list[prediction]  # type: ignore[valid-type]
        model: dict[str, Any]

    @app.post("/predict", response_model=SeriesResponse)
    def predict(request: SeriesRequest) -> dict[str, Any]:
        patients = [[o.model_dump() for o in p.observations] for p in request.patients]
        return {"predictions": served.predict(patients, request.explain), "model": identity}


class TokenAttribution(BaseModel):
    token: str
    start: int = Field(description="the token's first character in the text as sent")
    end: int = Field(description="one past its last character")
    attribution: float


class TextExplanation(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    explained_class: Any = Field(alias="class", description="the predicted class, explained")
    logit: float
    empty_text_logit: float
    steps: int = Field(description="integrated-gradients points used for this text")
    completeness_gap: float = Field(
        description="sum of the attributions minus (logit - empty_text_logit): the "
        "integration error, within 1e-3 x max(1, |difference|) unless the steps ran out"
    )
    tokens: list[TokenAttribution]


def _text_routes(app: FastAPI, served: ServedText, identity: dict[str, str]) -> None:
    prediction = create_model(
        "TextPrediction",
        __config__=ConfigDict(populate_by_name=True),
        label=(int, Field(description="index of the class in the card's classes")),
        predicted_class=(Any, Field(alias="class", description="the most probable class")),
        probability=(float, Field(description="its probability")),
        probabilities=(dict[str, float], Field(description="every class's probability")),
        tokens=(int, Field(description="tokens the model read")),
        truncated=(bool, Field(description="the text had more tokens than it reads")),
        explanation=(TextExplanation | None, None),
    )

    class TextRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: Any = Field(
            description=served.expects,
            json_schema_extra={"type": "array", "items": {"type": "string"}},
        )
        explain: bool = Field(
            default=False,
            description="add per-token integrated gradients of the predicted class's logit from "
            "the empty text (they add up to logit - empty_text_logit)",
        )

    class TextResponse(BaseModel):
        predictions: list[prediction]  # type: ignore[valid-type]
        model: dict[str, Any]

    @app.post("/predict", response_model=TextResponse, response_model_by_alias=True)
    def predict(request: TextRequest) -> dict[str, Any]:
        texts = served.checked(request.texts, explain=request.explain)
        return {"predictions": served.predict(texts, request.explain), "model": identity}


def predict_csv(
    served: ServedModel, rows_csv: Path, output: Path | None, *, explain: bool = False
) -> pd.DataFrame:
    """Batch prediction for the command line; bad rows are named like in site data checks.

    ``explain`` adds one ``explain:<feature>`` column per clinical variable (integrated
    gradients, as in the HTTP API), so a clinician can see what drove each prediction offline.
    """
    from fedmed.data.sources import read_table
    from fedmed.data.table import parse_column

    df = read_table(str(rows_csv), SchemaConfig())
    missing = [c for c in served.schema.features if c not in df.columns]
    if missing:
        raise DataError(
            f"{rows_csv}: column '{missing[0]}' is missing; the model needs: "
            f"{', '.join(served.schema.features)}"
        )
    parsed = pd.DataFrame(index=df.index)
    for col in served.schema.features:
        parsed[col] = parse_column(df[col], col, served.schema, str(rows_csv))
    if served.schema.missing != "mean" and parsed.isna().any().any():
        col = parsed.columns[parsed.isna().any()][0]
        rows = ", ".join(map(str, parsed.index[parsed[col].isna()][:5]))
        raise DataError(f"{rows_csv}: column '{col}' is empty at row(s) {rows}; fill it in")
    x = torch.from_numpy(served.pre.transform(parsed))
    outputs = served.outputs(x)
    result = df.copy()
    for name, tp in served.task.prediction_fields.items():
        values = np.array([o[name] for o in outputs])
        result[name] = np.round(values, 6) if tp is float else values
    if explain:
        attributions = pd.DataFrame(served.attributions(x), index=result.index)
        for feature in attributions.columns:
            result[f"explain:{feature}"] = attributions[feature].round(6)
    if output is not None:
        result.to_csv(output, index=False)
    return result
