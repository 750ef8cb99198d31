"""Text sites: a table with a text column and a label column -> validated texts -> token ids.

Two steps, because the vocabulary does not exist when a site first reads its table:

1. ``read_text_table``: the table is read (CSV/TSV/Parquet, through fedmed.data.sources), every
   text and label checked (a missing column, an empty text, a NUL byte, a label outside
   data.text.classes is an error naming the rows and the fix), repeated texts handled
   (data.text.duplicates), and the rows split into train/test (split column, or stratified by
   class). This is what preflight, ``fedmed check-data`` and the vocabulary step read.
2. ``encode_table``: with the study's vocabulary, each text becomes data.text.max_tokens token
   ids (0 = padding); longer texts are cut and counted.

The vocabulary is built WITHOUT downloads and without moving a rare word off its site
(``shared_word_counts`` at each site, ``build_vocabulary`` at the coordinator): a site counts
the words of its own train texts and shares only words it counts at least data.text.min_count
times; the coordinator builds a WordPiece vocabulary (encoded with HuggingFace ``tokenizers``)
from the sum of those counts: the most frequent shared words and the characters they are made
of. Every token is then a piece of some shared word, so a name or a record number seen a
few times at one hospital never becomes a token (it is split into pieces, or [UNK]). This is a
k-anonymity-style threshold on what the vocabulary reveals, not differential privacy: a word
that one site writes often (a surgeon's name in every one of its notes) passes it.

Digits are split one by one before counting, so no number (a record number, a date) can be a
token; every digit is.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from fedmed.config import RunConfig, SiteSpec, TextConfig, echo
from fedmed.data.arrays import shard
from fedmed.data.sources import load_site_frame, read_table, resolve_site_path
from fedmed.data.table import SiteData, _rows, _split
from fedmed.errors import ConfigError, DataError

log = logging.getLogger("fedmed.data")

PAD, UNK = "[PAD]", "[UNK]"  # ids 0 and 1 of every vocabulary
SPECIAL = (PAD, UNK)
PREFIX = "##"  # WordPiece: a piece that continues a word


# -- reading and checking a site's texts ---------------------------------------------------------


@dataclass(frozen=True)
class TextTable:
    """A validated text table, split into train and test: raw texts and class indices."""

    name: str
    origin: str
    features: tuple[str, ...]  # (the text column,): what preflight compares across sites
    texts_train: tuple[str, ...]
    y_train: np.ndarray
    texts_test: tuple[str, ...]
    y_test: np.ndarray
    classes: tuple[Any, ...]
    duplicates_dropped: int = 0
    target: str = "text"

    def outcome_summary(self) -> str:
        return class_summary(np.concatenate([self.y_train, self.y_test]), self.classes)


def class_summary(y: np.ndarray, classes: tuple[Any, ...]) -> str:
    counts = np.bincount(y.astype(np.int64), minlength=len(classes))
    return "classes " + ", ".join(f"{c}: {n}" for c, n in zip(classes, counts, strict=True))


def read_text_table(cfg: RunConfig, site: SiteSpec) -> TextTable:
    """One site's texts and labels: checked, de-duplicated, split (no vocabulary needed)."""
    text = cfg.data.text
    if cfg.data.partition_file:  # one file split across simulated sites (label skew)
        path = resolve_site_path(cfg.data.partition_file)
        frame = read_table(path, cfg.data.schema)
        texts, labels, dropped = _checked(frame, cfg, path)
        rows = shard(cfg, site, labels)
        texts, labels, origin = texts.iloc[rows], labels[rows], f"{path}[{site.name}]"
    else:
        frame, origin = load_site_frame(cfg, site)
        texts, labels, dropped = _checked(frame, cfg, origin)
    schema = cfg.data.schema
    if len(labels) < schema.min_rows:
        raise DataError(
            f"{origin}: only {len(labels)} usable texts (need at least {schema.min_rows}); add "
            "texts or lower data.schema.min_rows"
        )
    if len(np.unique(labels)) < 2:
        raise DataError(
            f"{origin}: every text has label {echo(text.classes[int(labels[0])])}; a site needs "
            "two classes to train a classifier (check the label column data.schema.target)"
        )
    split = frame.loc[texts.index, schema.split_column] if schema.split_column else None
    x = pd.DataFrame({"text": texts})
    x_tr, y_tr, x_te, y_te = _split(x, labels, labels, split, schema, origin)
    if schema.validation_fraction:  # settings are chosen on train texts only (as for arrays)
        inner = replace(schema, test_fraction=schema.validation_fraction, split_column="")
        x_tr, y_tr, x_te, y_te = _split(x_tr, y_tr, y_tr, None, inner, f"{origin} (validation)")
    return TextTable(
        name=site.name,
        origin=origin,
        features=(text.column,),
        texts_train=tuple(x_tr["text"]),
        y_train=np.asarray(y_tr, dtype=np.float32),
        texts_test=tuple(x_te["text"]),
        y_test=np.asarray(y_te, dtype=np.float32),
        classes=text.classes,
        duplicates_dropped=dropped,
    )


def _checked(frame: pd.DataFrame, cfg: RunConfig, origin: str) -> tuple[pd.Series, np.ndarray, int]:
    """(texts, class indices, rows dropped as duplicates) of a raw table; DataError if bad."""
    text, schema = cfg.data.text, cfg.data.schema
    needed = [text.column, schema.target] + ([schema.split_column] if schema.split_column else [])
    absent = [c for c in needed if c not in frame.columns]
    if absent:
        key = "data.text.column" if absent[0] == text.column else "data.schema.target"
        raise DataError(
            f"{origin}: column '{absent[0]}' is missing (columns present: "
            f"{', '.join(map(str, frame.columns))}); add it to the table or set {key}"
        )
    raw = frame[text.column]
    texts = raw.astype("string").str.strip()
    refuse_blank_or_binary(texts, frame.index, origin, text.column)
    labels = class_indices(frame[schema.target], text.classes, schema.target, origin)
    texts, labels, dropped = _duplicates(texts.astype(str), labels, text.duplicates, origin)
    return texts, labels, dropped


def refuse_blank_or_binary(texts: pd.Series, index: pd.Index, origin: str, column: str) -> None:
    """A DataError naming the rows if a text is missing, blank or holds a NUL byte: a site's
    table and a CSV given to a served model are checked alike."""
    empty = texts.isna() | (texts.str.strip() == "")
    if empty.any():
        raise DataError(
            f"{origin}: column '{column}' is empty at {_rows(index[empty])}; fill in those texts "
            "or remove the rows"
        )
    nul = texts.str.contains("\x00", regex=False).astype(bool)
    if nul.any():
        raise DataError(
            f"{origin}: column '{column}' has a NUL byte at {_rows(index[nul])} (a binary or "
            "corrupted export); export the table again as plain UTF-8 text"
        )


def class_indices(raw: pd.Series, classes: tuple[Any, ...], column: str, origin: str) -> np.ndarray:
    """Each label's position in the declared ``classes``; a value outside them names the rows."""
    if raw.isna().any():
        raise DataError(
            f"{origin}: label column '{column}' is empty at {_rows(raw.index[raw.isna()])}; "
            "fill in the labels or remove the rows"
        )
    numeric = all(isinstance(c, int | float) and not isinstance(c, bool) for c in classes)
    if numeric:
        values = pd.to_numeric(raw.astype("string").str.strip(), errors="coerce")
        keys: list[Any] = [float(c) for c in classes]
    else:
        values = raw.astype("string").str.strip()
        keys = [str(c) for c in classes]
    index = {k: i for i, k in enumerate(keys)}
    mapped = values.map(index)
    bad = mapped.isna()
    if bad.any():
        shown = raw[bad].iloc[0]
        raise DataError(
            f"{origin}: label {echo(shown)} in column '{column}' at {_rows(raw.index[bad])} is "
            f"not one of data.text.classes {echo(list(classes))}; fix those rows or add the "
            "value to data.text.classes"
        )
    return mapped.to_numpy(dtype=np.int64)


def _duplicates(
    texts: pd.Series, labels: np.ndarray, policy: str, origin: str
) -> tuple[pd.Series, np.ndarray, int]:
    """Texts that occur more than once (data.text.duplicates says what to do with them)."""
    if policy == "keep":
        return texts, labels, 0
    frame = pd.DataFrame({"text": texts.to_numpy(), "label": labels}, index=texts.index)
    repeated = frame["text"].duplicated(keep=False)
    if not repeated.any():
        return texts, labels, 0
    if policy == "error":
        raise DataError(
            f"{origin}: {int(repeated.sum())} rows repeat another row's text (first at "
            f"{_rows(frame.index[repeated])}); remove the copies, or set data.text.duplicates = "
            "'drop' (one copy kept; texts with two labels dropped)"
        )
    labels_per_text = frame.groupby("text", sort=False)["label"].nunique()
    conflicting = frame["text"].map(labels_per_text) > 1
    keep = ~conflicting & ~frame["text"].duplicated(keep="first")
    dropped = int((~keep).sum())
    log.info(
        "%s: %d rows dropped as repeated texts (%d with conflicting labels)",
        origin,
        dropped,
        int(conflicting.sum()),
    )
    return texts[keep.to_numpy()], labels[keep.to_numpy()], dropped


# -- words, vocabulary and token ids -------------------------------------------------------------


@functools.cache
def _pipeline() -> tuple[Any, Any]:
    """The normalizer and pre-tokenizer shared by counting, training and encoding.

    Lower-cased, accents stripped, control characters removed; split on whitespace and
    punctuation, and every digit on its own.
    """
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True
    )
    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.BertPreTokenizer(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return normalizer, pre


def words(text: str) -> list[str]:
    """The words of ``text`` exactly as the tokenizer sees them (normalized, pre-tokenized)."""
    normalizer, pre = _pipeline()
    return [w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text))]


def word_counts(texts: Iterable[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(words(text))
    return counts


def shared_word_counts(table: TextTable, min_count: int) -> dict[str, int]:
    """What a site may share: the words of its TRAIN texts that it counts >= ``min_count``."""
    return {w: c for w, c in sorted(word_counts(table.texts_train).items()) if c >= min_count}


def build_vocabulary(site_counts: list[dict[str, int]], text: TextConfig) -> tuple[str, ...]:
    """The WordPiece vocabulary (tokens in id order) from the sum of the sites' counts.

    Every character of the shared words, alone (a word's first piece) and ``##``-prefixed (a
    piece inside a word), so any word the counts allow can be spelled; then whole shared words,
    the most frequent first (ties in alphabetical order), up to ``vocab_size`` tokens. A word
    outside it is split by WordPiece's longest-match into the longest known pieces.

    Why not a trained WordPiece/BPE vocabulary (``tokenizers``' trainers, used at first): their
    merges between equally frequent pairs follow a hash map's order, which changes from process
    to process, so the same study and seed gave different vocabularies, models and metrics
    (measured: 3 of 4 runs differed on a small vocabulary). This one is a pure function of the
    summed counts.

    Each site's counts are checked against the threshold again here: a site that sent a word
    below ``min_count`` (an older or misconfigured site) does not get it into the vocabulary.
    """
    summed: Counter[str] = Counter()
    for counts in site_counts:
        summed.update({w: int(c) for w, c in counts.items() if int(c) >= text.min_count})
    if not summed:
        raise DataError(
            f"no site shares any word counted at least data.text.min_count = {text.min_count} "
            "times; lower data.text.min_count or add texts"
        )
    alphabet = sorted({ch for word in summed for ch in word})
    pieces = {*alphabet, *(PREFIX + ch for ch in alphabet)}
    room = max(0, text.vocab_size - len(SPECIAL) - len(pieces))
    by_use = sorted((w for w in summed if w not in pieces), key=lambda w: (-summed[w], w))
    return (*SPECIAL, *sorted(pieces | set(by_use[:room])))


@functools.lru_cache(maxsize=4)
def tokenizer_for(vocabulary: tuple[str, ...]) -> Any:
    """The study's tokenizer (a ``tokenizers.Tokenizer``) from its vocabulary."""
    from tokenizers import Tokenizer, models

    if not vocabulary:
        raise ConfigError(
            "data.text.vocabulary is empty: a federated study builds it from the sites' shared "
            "word counts before round 1 (fedmed simulate / fedmed run do this); to encode texts "
            "outside a study, set data.text.vocabulary"
        )
    if tuple(vocabulary[: len(SPECIAL)]) != SPECIAL:
        raise ConfigError(
            f"data.text.vocabulary must start with {list(SPECIAL)} (ids 0 and 1); rebuild it"
        )
    model = models.WordPiece(
        {t: i for i, t in enumerate(vocabulary)}, unk_token=UNK, continuing_subword_prefix=PREFIX
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer, tokenizer.pre_tokenizer = _pipeline()
    return tokenizer


def tokenizer_json(vocabulary: tuple[str, ...]) -> str:
    """The tokenizer as ``tokenizers``' own JSON (saved with a model; no pickle)."""
    return str(tokenizer_for(vocabulary).to_str())


def encode(
    texts: tuple[str, ...], vocabulary: tuple[str, ...], max_tokens: int
) -> tuple[np.ndarray, int]:
    """(token ids of shape (texts, max_tokens), padded with 0; how many texts were cut)."""
    encodings = tokenizer_for(vocabulary).encode_batch(list(texts))
    ids, lengths = token_ids(encodings, max_tokens)
    return ids, int((lengths > max_tokens).sum())


def token_ids(encodings: Sequence[Any], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``tokenizers`` encodings -> (ids (texts, max_tokens): the first max_tokens of each text,
    padded with 0; each text's token count before the cut). Training and serving both cut here.
    """
    ids = np.zeros((len(encodings), max_tokens), dtype=np.int64)
    lengths = np.zeros(len(encodings), dtype=np.int64)
    for row, encoding in enumerate(encodings):
        tokens = encoding.ids
        lengths[row] = len(tokens)
        tokens = tokens[:max_tokens]
        ids[row, : len(tokens)] = tokens
    return ids, lengths


def encode_table(table: TextTable, text: TextConfig) -> SiteData:
    """Model-ready token ids for one site; the number of cut texts is logged and kept."""
    x_train, cut_train = encode(table.texts_train, text.vocabulary, text.max_tokens)
    x_test, cut_test = encode(table.texts_test, text.vocabulary, text.max_tokens)
    if cut_train or cut_test:
        total = len(table.texts_train) + len(table.texts_test)
        log.warning(
            "%s: %d of %d texts are longer than data.text.max_tokens = %d tokens and were cut",
            table.origin,
            cut_train + cut_test,
            total,
            text.max_tokens,
        )
    return SiteData(
        name=table.name,
        x_train=x_train,
        y_train=table.y_train,
        x_test=x_test,
        y_test=table.y_test,
        input_names=table.features,
        preprocessing={
            "max_tokens": text.max_tokens,
            "vocabulary_size": len(text.vocabulary),
            "truncated_train": cut_train,
            "truncated_test": cut_test,
        },
    )


def with_vocabulary(cfg: RunConfig, site_counts: list[dict[str, int]]) -> RunConfig:
    """``cfg`` with the vocabulary trained on the sites' shared counts."""
    text = replace(cfg.data.text, vocabulary=build_vocabulary(site_counts, cfg.data.text))
    return cfg.replace(data=replace(cfg.data, text=text))
