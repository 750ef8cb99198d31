"""Serving a text model: raw text in, class probabilities (and per-token explanations) out.

A text goes through exactly the study's tokenizer, the one saved next to the weights and bound
to the signed card by its SHA-256 (normalization, WordPiece, the cut at max_tokens: the same
``fedmed.data.text.token_ids`` the sites trained with). Each prediction names its class with
the card's declared classes and says how many tokens the model read and whether the text was
cut.

Explanations are integrated gradients over the token embeddings from the empty text
(``fedmed.tasks.text.token_attributions``): per token, how much it moved the predicted class's
logit; a text's attributions add up to logit(text) - logit(empty text). ``fedmed predict
--explain`` also writes them as a small self-contained HTML page, each text with its tokens
highlighted (red: towards the predicted class, blue: against it); the texts are untrusted, so
everything in it is HTML-escaped.

Bad input gets a 422 in FastAPI's shape naming the fix (fedmed.serving.arrays.invalid), and
bad CSV rows a DataError naming the file's rows, as the sites' checks do.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedmed.config import SchemaConfig, echo
from fedmed.data.table import _rows
from fedmed.data.text import refuse_blank_or_binary, token_ids
from fedmed.errors import ConfigError, DataError
from fedmed.serving.arrays import invalid
from fedmed.serving.export import load_model_and_tokenizer, malformed_card, resolve_model_path
from fedmed.tasks import get_task
from fedmed.tasks.text import MAX_IG_STEPS, explain_tokens

MAX_TEXTS = 1000  # per request without explanations
# Per request with explanations: each text costs IG_STEPS to MAX_IG_STEPS forward and backward
# passes (64 to 1,024). Measured on one core, the study's Transformer (256 tokens, width 64)
# explains 64 texts at 64 steps in 8.6 s, so 16 texts hold a server thread ~2 s, and ~35 s if
# every text needs all 1,024 steps; 1,000 texts could take half an hour.
MAX_EXPLAINED_TEXTS = 16
MAX_TEXT_BYTES = 100_000  # per text (UTF-8): far beyond any max_tokens, and a bound on the work
EXPLAIN_CHUNK = 64  # texts per integrated-gradients pass (bounds the stored activations)


class ServedText:
    """A text model with its card and tokenizer: texts in, the task's predictions out."""

    def __init__(self, path: Path, *, allow_unsigned: bool = False) -> None:
        self.path = resolve_model_path(path)
        self.model, self.card, self.tokenizer = load_model_and_tokenizer(
            self.path, require_signature=not allow_unsigned
        )
        self.task = get_task(self.card["task"])
        with malformed_card(self.path):
            info = self.card["tokenizer"]
            self.classes: tuple[Any, ...] = tuple(info["classes"])
            self.max_tokens = int(info["max_tokens"])
            self.column = str(info["column"])

    @property
    def expects(self) -> str:
        return (
            f"texts as JSON strings, each at most {MAX_TEXT_BYTES:,} bytes of UTF-8 (the model "
            f"reads the first {self.max_tokens} tokens), at most {MAX_TEXTS} per request "
            f"({MAX_EXPLAINED_TEXTS} with explain)"
        )

    def checked(self, texts: Any, *, explain: bool = False) -> list[str]:
        """The request's ``texts`` as a list of usable strings, or a 422 naming the fix."""
        if not isinstance(texts, list):
            raise invalid(
                ["texts"],
                f"got {type(texts).__name__}; send a list of strings, e.g. "
                '{"texts": ["chest pain radiating to the left arm"]}',
                "text_list",
            )
        if not texts:
            raise invalid(["texts"], "no texts; send at least one string", "text_list")
        if len(texts) > MAX_TEXTS:
            raise invalid(
                ["texts"],
                f"{len(texts)} texts; send at most {MAX_TEXTS} per request (split the batch)",
                "text_list",
            )
        if explain and len(texts) > MAX_EXPLAINED_TEXTS:
            raise invalid(
                ["texts"],
                f"{len(texts)} texts with explain; explanations cost up to "
                f"{MAX_IG_STEPS:,} model passes per text, so send at most "
                f"{MAX_EXPLAINED_TEXTS} per request with explain (split the batch, or leave "
                "explain off for the rest)",
                "text_list",
            )
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise invalid(
                    ["texts", i],
                    f"got {type(text).__name__ if text is not None else 'null'}; send each "
                    "text as a JSON string",
                    "text_type",
                )
            if not text.strip():
                raise invalid(
                    ["texts", i],
                    "empty or whitespace-only text; send the text to classify, or leave it out",
                    "text_empty",
                )
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError:
                raise invalid(
                    ["texts", i],
                    "not valid Unicode (a lone surrogate escape such as \\ud800); send the text "
                    "as UTF-8",
                    "text_unicode",
                ) from None
            if size > MAX_TEXT_BYTES:
                raise invalid(
                    ["texts", i],
                    f"{size:,} bytes of UTF-8; send at most {MAX_TEXT_BYTES:,} (the model reads "
                    f"only the first {self.max_tokens} tokens: cut the text)",
                    "text_too_long",
                )
            if "\x00" in text:
                raise invalid(
                    ["texts", i],
                    "the text has a NUL byte (a binary or corrupted export); send plain text",
                    "text_nul",
                )
        return texts

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, list[Any], np.ndarray]:
        """(ids (texts, max_tokens), the tokenizer's encodings, token counts before the cut)."""
        encodings = self.tokenizer.encode_batch(texts)
        ids, lengths = token_ids(encodings, self.max_tokens)
        return torch.from_numpy(ids), encodings, lengths

    def predict(self, texts: list[str], explain: bool = False) -> list[dict[str, Any]]:
        """One prediction per (already checked) text; a text with no token left is a 422."""
        ids, encodings, lengths = self.encode(texts)
        empty = np.flatnonzero(lengths == 0)
        if len(empty):
            raise invalid(
                ["texts", int(empty[0])],
                "no token left after normalization (only control or combining characters?); "
                "send readable text",
                "text_empty",
            )
        return self.outputs(ids, encodings, lengths, explain=explain)

    def outputs(
        self, ids: torch.Tensor, encodings: list[Any], lengths: np.ndarray, *, explain: bool
    ) -> list[dict[str, Any]]:
        with torch.no_grad():
            logits = self.model(ids)
        probabilities = torch.softmax(logits, dim=-1).numpy()
        labels = probabilities.argmax(axis=1)
        out = []
        for i, p in enumerate(probabilities):
            label = int(labels[i])
            named = {str(c): float(v) for c, v in zip(self.classes, p, strict=True)}
            out.append(
                {
                    "label": label,
                    "class": self.classes[label],
                    "probability": float(p[label]),
                    "probabilities": named,
                    "tokens": int(min(lengths[i], self.max_tokens)),
                    "truncated": bool(lengths[i] > self.max_tokens),
                }
            )
        if explain:
            for item, explanation in zip(
                out, self.explanations(ids, encodings, logits, labels), strict=True
            ):
                item["explanation"] = explanation
        return out

    def explanations(
        self, ids: torch.Tensor, encodings: list[Any], logits: torch.Tensor, labels: np.ndarray
    ) -> list[dict[str, Any]]:
        """Per text: the predicted class's logit, the empty text's, the integration steps and
        completeness gap (sum of attributions minus the logit difference), and each token read
        with its attribution and its character span in the text as sent."""
        target = torch.from_numpy(labels)
        parts = [
            explain_tokens(self.model, chunk, goal)
            for chunk, goal in zip(
                torch.split(ids, EXPLAIN_CHUNK), torch.split(target, EXPLAIN_CHUNK), strict=True
            )
        ]
        attributions = torch.cat([p[0] for p in parts]).numpy()
        gaps = torch.cat([p[1] for p in parts]).numpy()
        steps = torch.cat([p[2] for p in parts]).numpy()
        with torch.no_grad():
            empty = self.model(torch.zeros(1, ids.shape[1], dtype=torch.long))[0].numpy()
        result = []
        for i, encoding in enumerate(encodings):
            label = int(labels[i])
            read = min(len(encoding.ids), self.max_tokens)
            result.append(
                {
                    "class": self.classes[label],
                    "logit": float(logits[i, label]),
                    "empty_text_logit": float(empty[label]),
                    "steps": int(steps[i]),
                    "completeness_gap": float(gaps[i]),
                    "tokens": [
                        {
                            "token": encoding.tokens[t],
                            "start": int(encoding.offsets[t][0]),
                            "end": int(encoding.offsets[t][1]),
                            "attribution": float(attributions[i, t]),
                        }
                        for t in range(read)
                    ],
                }
            )
        return result


def predict_text_csv(
    served: ServedText, path: Path, output: Path | None, *, explain: bool = False
) -> pd.DataFrame:
    """Batch prediction for the command line: the rows of a CSV with the card's text column.

    Writes the rows with label, class, probability, one ``probability:<class>`` column per
    class, tokens and truncated; ``explain`` writes ``<output stem>-explanations.html`` next to
    the output (each text with its tokens highlighted).
    """
    from fedmed.data.sources import read_table

    if explain and output is None:
        raise ConfigError(
            "--explain writes <output stem>-explanations.html next to --output; give --output"
        )
    df = read_table(str(path), SchemaConfig())
    if served.column not in df.columns:
        raise DataError(
            f"{path}: column '{served.column}' is missing (columns: "
            f"{', '.join(map(str, df.columns))}); the model reads its texts from "
            f"'{served.column}': rename that column"
        )
    texts = df[served.column].astype("string")
    refuse_blank_or_binary(texts, df.index, str(path), served.column)
    values = [str(t) for t in texts]
    ids, encodings, lengths = served.encode(values)
    if (lengths == 0).any():
        raise DataError(
            f"{path}: column '{served.column}' has no readable token at "
            f"{_rows(df.index[lengths == 0])}; fix or remove those rows"
        )
    outputs = served.outputs(ids, encodings, lengths, explain=explain)
    result = df.copy()
    for name in ("label", "class"):
        result[name] = [o[name] for o in outputs]
    result["probability"] = np.round([o["probability"] for o in outputs], 6)
    for c in served.classes:
        result[f"probability:{c}"] = np.round([o["probabilities"][str(c)] for o in outputs], 6)
    result["tokens"] = [o["tokens"] for o in outputs]
    result["truncated"] = [o["truncated"] for o in outputs]
    if output is not None:
        result.to_csv(output, index=False)
    if explain:
        assert output is not None
        page = output.with_name(output.stem + "-explanations.html")
        page.write_text(explanations_html(values, outputs, source=str(path)), encoding="utf-8")
    return result


def explanations_html(texts: list[str], outputs: list[dict[str, Any]], *, source: str) -> str:
    """A self-contained page: each text with every token read highlighted by its attribution.

    Red pushes towards the predicted class, blue away from it; the intensity is the token's
    |attribution| relative to the text's largest. Text the model did not read (beyond
    max_tokens) is grey. Everything from the texts and the card is escaped: a note can hold
    anything, a ``<script>`` included.
    """
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fedmed explanations</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.6}"
        "section{border-top:1px solid #ccc;padding:.5em 0}.unread{color:#999}"
        "h2{font-size:1em}</style></head><body>",
        f"<h1>Explanations: {html.escape(source)}</h1>",
        "<p>Integrated gradients of the predicted class's logit from the empty text: "
        "<span style='background:rgba(220,40,40,.6)'>red</span> pushes towards the predicted "
        "class, <span style='background:rgba(40,90,220,.6)'>blue</span> away from it. The "
        "attributions of a text add up to logit(text) &minus; logit(empty text).</p>",
    ]
    for i, (text, out) in enumerate(zip(texts, outputs, strict=True)):
        explanation = out["explanation"]
        cut = " (cut: the model read its first tokens only)" if out["truncated"] else ""
        parts.append(
            f"<section><h2>text {i + 1}: class {html.escape(echo(out['class']))}, probability "
            f"{out['probability']:.3f}{html.escape(cut)}; logit {explanation['logit']:.3f}, "
            f"empty text {explanation['empty_text_logit']:.3f}</h2><p class='text'>"
        )
        parts.append(_highlighted(text, explanation["tokens"], out["truncated"]))
        parts.append("</p></section>")
    parts.append("</body></html>\n")
    return "".join(parts)


def _highlighted(text: str, tokens: list[dict[str, Any]], truncated: bool) -> str:
    """``text`` escaped, each token's span in a coloured <span> (its token and value on hover);
    what follows the last token read is grey when the text was cut."""
    top = max((abs(t["attribution"]) for t in tokens), default=0.0) or 1.0
    pieces, at = [], 0
    for t in tokens:
        start, end = t["start"], t["end"]
        if start < at or end <= start:  # overlapping or empty span: nothing more to colour
            continue
        pieces.append(html.escape(text[at:start]))
        value = t["attribution"]
        rgb = "220,40,40" if value > 0 else "40,90,220"
        alpha = min(abs(value) / top, 1.0) * 0.8
        hover = html.escape(f"{t['token']}: {value:+.4f}", quote=True)
        pieces.append(
            f"<span style='background:rgba({rgb},{alpha:.2f})' title=\"{hover}\">"
            f"{html.escape(text[start:end])}</span>"
        )
        at = end
    rest = html.escape(text[at:])
    pieces.append(f"<span class='unread'>{rest}</span>" if truncated and rest else rest)
    return "".join(pieces)
