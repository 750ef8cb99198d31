"""The wire between sites and coordinator: record keys, message actions and how replies decode.

Both wings import this module and nothing of each other: a key spelled here is the one spelling
of it on either side. It holds no logic beyond encoding and decoding what crosses the wire.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # Flower is imported where an Error is made: reports read history without it
    from flwr.app import Error

# --- what the coordinator sends -----------------------------------------------------------------
SITE_CONFIG_KEY = "fedmed-site"  # node config entry: path to the site's own TOML
RUN_KEY = "fedmed.run"  # ConfigRecord entry carrying the study plan as JSON
STUDY_KEY = "fedmed.study"  # ConfigRecord entry: this study's id
PLAN_RECORD = "fedmed.plan"  # RecordDict entry the secure coordinator adds to every message
SECAGG_RECORD = "secaggplus_configs"  # Flower's SecAgg+ record (flwr...secaggplus_constants)

# --- what a site replies ------------------------------------------------------------------------
SITE_KEY = "site"  # reply record (and SecAgg+ metrics key) naming the replying site
STATISTICS_KEY = "statistics"  # reply ConfigRecord entry: the site's fitted statistics as JSON
PHASES = ("before", "after")  # personalization metrics: the global model, then fine-tuned

# --- the text vocabulary, built before round 1 (fedmed.data.text) -------------------------------
# The coordinator asks each site with a "query.vocabulary" message (fedmed.site.app.shared_words).
WORDS_KEY = "words"  # reply ConfigRecord entry: {word: count} as JSON, only counts >= min_count
MAX_SHARED_WORDS = 1_000_000  # a reply with more words than this is not a site's vocabulary


def encode_word_counts(counts: dict[str, int]) -> str:
    """A site's shared word counts as the JSON text its reply carries (sorted: reproducible)."""
    return json.dumps(dict(sorted(counts.items())), ensure_ascii=False, separators=(",", ":"))


def decode_word_counts(text: str, min_count: int) -> dict[str, int]:
    """A site's word counts, checked: a JSON object of words to whole counts >= ``min_count``.

    A reply is a peer's data: anything else (a list, a float, a count below the threshold the
    plan set, an absurd number of words) is a ValueError, and the site's counts are not used.
    """
    counts = json.loads(text)
    if not isinstance(counts, dict) or len(counts) > MAX_SHARED_WORDS:
        raise ValueError("word counts must be a JSON object of at most 1,000,000 words")
    for word, count in counts.items():
        if not word or isinstance(count, bool) or not isinstance(count, int):
            raise ValueError("every word count must be a non-empty word with a whole count")
        if count < min_count:
            raise ValueError(f"a word counted {count} times is below min_count = {min_count}")
    return counts


# --- federated statistics before training (fedmed stats; docs/statistics.md) --------------------
# Two queries to every site: "query.stats_cells" (pass 1: counts on public coarse edges) and
# "query.stats_histograms" (pass 2: counts on the study's shared edges, carried under
# STATS_EDGES_KEY). Replies carry only counts (None = suppressed at the site) and sums.
STATS_PASSES = ("stats_cells", "stats_histograms")
STATS_KEY = "stats"  # reply ConfigRecord entry: {"cells", "sums", "epsilon"} as JSON
STATS_EDGES_KEY = "fedmed.stats-edges"  # pass 2: {"features": {name: edges}, "km": starts}
MAX_STATS_VECTORS = 10_000  # count vectors in one reply (features x kinds)
MAX_STATS_CELLS = 1_002  # cells in one vector (edges + tails)
MAX_STATS_COUNT = 10**9  # no site holds more patients than this


def encode_stats(
    cells: dict[str, list[int | None]],
    sums: dict[str, list[float] | None],
    *,
    epsilon: float,
    min_cell: int,
) -> str:
    """A site's statistics reply as JSON (sorted keys: the same release, the same bytes):
    its counts, sums, the ε it has spent on the study's statistics and the minimum cell count
    it applied (a deployed site's own may be above the plan's)."""
    body = {"cells": cells, "sums": sums, "epsilon": float(epsilon), "min_cell": min_cell}
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def decode_stats(text: str, shape: Callable[[str], int | None]) -> dict[str, Any]:
    """A site's statistics reply, checked: a ValueError unless every vector is one the
    coordinator asked for (``shape(key)``: its length, None = not asked for), every count a
    whole number in [0, 1e9] or None, every sum pair finite (sum of squares >= 0), ε >= 0 and
    the site's minimum cell count a whole number >= 1."""
    body = json.loads(text)
    if not isinstance(body, dict) or set(body) != {"cells", "sums", "epsilon", "min_cell"}:
        raise ValueError("a statistics reply is an object of cells, sums, epsilon and min_cell")
    cells, sums, epsilon, min_cell = body["cells"], body["sums"], body["epsilon"], body["min_cell"]
    if not _count(min_cell) or min_cell < 1:
        raise ValueError("min_cell must be a whole number >= 1")
    if not isinstance(cells, dict) or not isinstance(sums, dict) or len(cells) > MAX_STATS_VECTORS:
        raise ValueError("cells and sums must be objects of at most 10,000 vectors")
    for key, values in cells.items():
        length = shape(key)
        if length is None or not isinstance(values, list) or len(values) != length:
            raise ValueError(f"count vector {key[:80]!r} was not asked for in this shape")
        if not all(v is None or _count(v) for v in values):
            raise ValueError(f"count vector {key[:80]!r} holds a value that is not a count")
    for name, pair in sums.items():
        if shape(f"bins/{name}") is None:
            raise ValueError(f"sums of {name[:80]!r} were not asked for")
        if pair is not None and not (
            isinstance(pair, list)
            and len(pair) == 2
            and all(_finite(v) for v in pair)
            and pair[1] >= 0
        ):
            raise ValueError(f"sums of {name[:80]!r} must be [sum, sum of squares] or null")
    if not _finite(epsilon) or epsilon < 0:
        raise ValueError("epsilon must be a finite number >= 0")
    return {"cells": cells, "sums": sums, "epsilon": float(epsilon), "min_cell": min_cell}


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STATS_COUNT


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def encode_edges(edges: dict[str, Any]) -> str:
    """The shared edges of pass 2, as the coordinator sends them."""
    return json.dumps(edges, sort_keys=True, separators=(",", ":"))


def decode_edges(text: str) -> dict[str, Any]:
    """Pass 2's edges, checked at the site: finite, strictly increasing, at most 1,001 each."""
    body = json.loads(text)
    if not isinstance(body, dict) or set(body) != {"features", "km"}:
        raise ValueError("stats edges are an object of features and km")
    features, km = body["features"], body["km"]
    if not isinstance(features, dict) or len(features) > MAX_STATS_VECTORS:
        raise ValueError("stats edges: features must be an object")
    for edges in [*features.values(), *([km] if km is not None else [])]:
        if not (
            isinstance(edges, list)
            and 2 <= len(edges) < MAX_STATS_CELLS
            and all(_finite(v) for v in edges)
            and all(a < b for a, b in itertools.pairwise(edges))
        ):
            raise ValueError("stats edges must be 2 to 1,001 finite, increasing numbers")
    return body


# --- federated statistics under SecAgg+ (docs/statistics.md) ------------------------------------
# Each pass is one round of Flower's SecAgg+ workflow: a site's FitIns carries the pass and the
# layout of the count vectors (STATS_LAYOUT_KEY: {key: length}); it replies with ONE float
# vector, its unsuppressed counts in that layout (sorted keys), weight 1. Flower quantizes
# x -> (clip(x, -C, C) + C) * T / (2C) with stochastic rounding; with T = 2C (a step of 1) an
# integer count lands exactly on the lattice, so the unmasked sum is exact while every site's
# |count| <= C and the sum of the shifted counts stays below the modulus (n * 2C < 2^32).
STATS_PASS_KEY = "fedmed.stats-pass"  # FitIns config: which pass (STATS_PASSES) to mask
STATS_LAYOUT_KEY = "fedmed.stats-layout"  # FitIns config: {vector key: length}, as JSON
SECURE_STATS_CLIPPING = 2**24  # C: the largest |count| a site may mask (16,777,216)
SECURE_STATS_QUANTIZATION = 2 * SECURE_STATS_CLIPPING  # T = 2C: quantizer 1, counts stay exact
SECURE_STATS_MODULUS = 2**32  # Flower's largest modulus
SECURE_STATS_MAX_SITES = SECURE_STATS_MODULUS // SECURE_STATS_QUANTIZATION - 1  # 127


def encode_layout(shapes: dict[str, int]) -> str:
    """The count vectors a secure pass asks for, as the coordinator sends them."""
    return json.dumps(dict(sorted(shapes.items())), separators=(",", ":"))


def flatten_counts(cells: dict[str, list[int]], layout_json: str) -> np.ndarray:
    """A site's counts as the one vector it masks: ValueError unless ``cells`` has exactly the
    vectors and lengths the layout asks for, each count an integer with |count| <= C."""
    layout = json.loads(layout_json)
    if not isinstance(layout, dict) or {k: len(v) for k, v in cells.items()} != layout:
        raise ValueError("the secure statistics query asks for vectors this site does not count")
    flat = [int(c) for key in sorted(layout) for c in cells[key]]
    if any(abs(c) > SECURE_STATS_CLIPPING for c in flat):
        raise ValueError(
            f"a count above {SECURE_STATS_CLIPPING:,} cannot be summed exactly under SecAgg+; "
            "split the site's dataset or set [stats] secure_aggregation = false"
        )
    return np.asarray(flat, dtype=np.float64)


def unflatten_sum(mean: np.ndarray, sites: int, shapes: dict[str, int]) -> dict[str, list[int]]:
    """The pooled counts from Flower's unmasked aggregate (the mean of ``sites`` weight-1
    vectors): each the sum, an integer. ValueError if a cell is off the integer lattice (a
    site masked something other than counts), so a corrupted sum is never reported."""
    total = np.asarray(mean, dtype=np.float64).ravel() * sites
    if total.size != sum(shapes.values()):
        raise ValueError("the unmasked sum does not have the layout the pass asked for")
    counts = np.rint(total)
    if not np.all(np.abs(total - counts) < 1e-3):
        raise ValueError("the unmasked sum is not a vector of whole counts")
    out: dict[str, list[int]] = {}
    start = 0
    for key in sorted(shapes):
        out[key] = [int(c) for c in counts[start : start + shapes[key]]]
        start += shapes[key]
    return out


# --- why a site did not contribute -------------------------------------------------------------


class SiteReason(IntEnum):
    """Why a site did not contribute to a round: the ``code`` of Flower's ``Error`` (an int).

    The numbers borrow HTTP's meaning where one fits and stay clear of Flower's own ErrorCode
    (0-8), which the runtime gives the errors it makes up itself (a node unavailable, a crashed
    ClientApp); such codes pass through ``read_error`` unchanged. Each number means one thing,
    so a site's policy refusal (451) is not the coordinator's impersonation refusal (403).
    """

    # A site replies with these (fedmed.site.app._fail_closed, fedmed.security.policy.refuse).
    PLAN_UNREADABLE = 400  # the message's study plan could not be read
    POLICY_REFUSED = 451  # the site's policy refuses the plan (not approved, not listed, ...)
    DATA_INVALID = 422  # the site's data failed validation (details in the site's log)
    BUDGET_EXHAUSTED = 429  # the round would take the site's ε past its cap
    FAILED = 500  # anything else; the details stay in the site's log
    LEDGER_DAMAGED = 503  # the privacy ledger failed verification: no training until restored
    # The coordinator records these itself (fedmed.coordinator).
    IMPERSONATION = 403  # a node's reply named another site, or came from no registered site
    UPDATE_REJECTED = 406  # a model update was malformed, not finite or an outlier
    REPLY_REJECTED = 502  # a reply's metrics were malformed or inconsistent
    NO_REPLY = 504  # timed out, disconnected or dropped out
    NON_FINITE_AGGREGATE = 507  # the aggregated model had NaN or Inf weights


# The decoded text of an Error reason is cut to this many characters (a site's reason is a short
# sentence; anything longer is not ours), and a reason longer than MAX_WIRE_CHARS is not parsed.
MAX_DETAIL_CHARS = 500
MAX_SITE_CHARS = 64  # fedmed.config.SITE_NAME allows 63
MAX_WIRE_CHARS = 4096


@dataclass(frozen=True)
class SiteFailure:
    """A decoded error reply: who failed, why (``code``) and the site's own short words."""

    site: str | None  # None: the error names no site (a Flower runtime error, a malformed reply)
    code: int  # a SiteReason where it is one of fedmed's; Flower's ErrorCode passes through
    detail: str

    @property
    def reason(self) -> SiteReason | None:
        """``code`` as a SiteReason, or None for a code fedmed does not define."""
        return SiteReason(self.code) if self.code in SiteReason._value2member_map_ else None

    def __str__(self) -> str:
        return failure_text(self.site, self.detail) if self.site else self.detail


def failure_text(site: str, detail: str) -> str:
    """How a site's failure reads for people (metrics.json, the CLI and the dashboard)."""
    return f"site '{site}': {detail}"


def _clean(text: str, limit: int) -> str:
    """``text`` on one line of printable characters, cut to ``limit`` (marked with '…')."""
    text = "".join(c if c.isprintable() else " " for c in text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def site_error(site: str, code: int, detail: str) -> Error:
    """The error a site replies with: ``code`` (a SiteReason) and a reason naming the site.

    Flower's Error has only a code and a reason text, so the reason is a small JSON object,
    {"site": ..., "reason": ...}: the site is a field of its own, never parsed out of words.
    ``site`` is "" when a site cannot tell its own name (the coordinator names it then).
    ``detail`` must be safe to send: no paths, rows or stack traces.
    """
    from flwr.app import Error

    body = {"site": _clean(site, MAX_SITE_CHARS), "reason": _clean(detail, MAX_DETAIL_CHARS)}
    return Error(code=int(code), reason=json.dumps(body))


def read_error(error: Error) -> SiteFailure:
    """The site, code and detail of an error reply; never raises, whatever the reply holds.

    A reason that is not fedmed's JSON is read as an older site's text (``read_legacy``), or
    kept whole (cut to MAX_DETAIL_CHARS) with no site: the caller attributes it by node.
    """
    code = int(error.code)
    text = str(error.reason or "")
    body = None
    if text.startswith("{") and len(text) <= MAX_WIRE_CHARS:
        try:
            body = json.loads(text)
        except ValueError:
            body = None
    if not isinstance(body, dict):
        return read_legacy(code, text)
    site, detail = body.get("site"), body.get("reason")
    detail = _clean(detail, MAX_DETAIL_CHARS) if isinstance(detail, str) and detail else "failed"
    return SiteFailure(site if _is_name(site) else None, code, detail)


def _is_name(site: object) -> bool:
    """A plausible site name: a cut or garbled one would blame the wrong site."""
    return isinstance(site, str) and 0 < len(site) <= MAX_SITE_CHARS and site.isprintable()


# Replies of fedmed sites from before site_error said "site 'NAME': detail" in plain text. A
# coordinator reads them here, and only here, while sites upgrade; remove once none are left.
_LEGACY_PREFIX = "site '"
_LEGACY_CODES = {  # what an older site's fixed texts (and codes) meant
    "privacy budget exhausted": SiteReason.BUDGET_EXHAUSTED,
    "privacy ledger failed verification": SiteReason.LEDGER_DAMAGED,
    "site data failed validation": SiteReason.DATA_INVALID,
}


def read_legacy(code: int, text: str) -> SiteFailure:
    """An older site's "site 'NAME': detail" text; any other text names no site.

    Older sites refused a plan with 403 (now POLICY_REFUSED: 403 is the coordinator's
    IMPERSONATION) and sent every handler failure as 500, told apart only by fixed texts.
    """
    text = _clean(text, MAX_DETAIL_CHARS) or "failed"
    if text.startswith(_LEGACY_PREFIX):
        name, sep, detail = text[len(_LEGACY_PREFIX) :].partition("': ")
        if sep and _is_name(name) and "'" not in name and name != "?":  # '?': did not know
            if code == 403:
                code = SiteReason.POLICY_REFUSED
            elif code == SiteReason.FAILED:
                code = next(
                    (c for start, c in _LEGACY_CODES.items() if detail.startswith(start)), code
                )
            return SiteFailure(name, int(code), detail or "failed")
    return SiteFailure(None, code, text)


def flatten(result: dict[str, dict[str, float]]) -> dict[str, float]:
    """{"before": {...}, "after": {...}} -> {"before/accuracy": ...} (a flat MetricRecord)."""
    return {f"{phase}/{k}": v for phase in PHASES for k, v in result[phase].items()}


def unflatten(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """The inverse of ``flatten``; keys of no known phase are dropped."""
    out: dict[str, dict[str, float]] = {phase: {} for phase in PHASES}
    for key, value in metrics.items():
        phase, _, name = key.partition("/")
        if phase in out and name:
            out[phase][name] = value
    return out


def to_state(keys: list[str], arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Flower's legacy parameter list (in state_dict order) -> a state dict of tensors."""
    return {k: torch.from_numpy(np.asarray(a).copy()) for k, a in zip(keys, arrays, strict=True)}
