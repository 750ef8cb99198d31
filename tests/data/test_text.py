"""Text sites: the vocabulary's privacy threshold (no rare word leaves a site, a planted patient
name included), the checks on a site's table (each error names the rows and the fix), repeated
texts, truncation, and the Medical Abstracts file's conflicting labels."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmed.config import parse_run_config
from fedmed.data.text import (
    SPECIAL,
    build_vocabulary,
    encode,
    read_text_table,
    shared_word_counts,
    word_counts,
    words,
)
from fedmed.errors import ConfigError, DataError
from fedmed.protocol import decode_word_counts, encode_word_counts
from fedmed.tasks import load_site_data, load_site_table
from tests.conftest import DATA_DIR, needs_shared_data

# Words that say which class a text is; every text also gets common filler words.
TOPICS = {
    "tumor": ("tumor", "carcinoma", "metastasis", "chemotherapy", "oncology"),
    "heart": ("cardiac", "myocardial", "infarction", "arrhythmia", "coronary"),
    "brain": ("neuronal", "seizure", "cerebral", "epilepsy", "dementia"),
}
FILLER = ("the", "patients", "were", "treated", "with", "and", "study", "results", "of", "in")
PLANTED = "Wojciechowskaite"  # a fake patient name: 3 times at one site, never elsewhere
RECORD = "MRN 88412739"  # a record number: digits are split, so no number can be a token


def site_texts(seed: int, n: int = 60, *, planted: int = 0) -> pd.DataFrame:
    """``n`` texts of three topics (labels 1/2/3); ``planted`` of them mention PLANTED."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = 1 + i % 3
        topic = list(TOPICS.values())[label - 1]
        chosen = [*rng.choice(topic, 4), *rng.choice(FILLER, 6)]
        if i < planted:
            chosen += [PLANTED, RECORD]
        rng.shuffle(chosen)
        rows.append({"note": " ".join(chosen) + f" case {i}.", "dx": label})
    return pd.DataFrame(rows)


def text_study(tmp_path: Path, frames: list[pd.DataFrame], **text: object) -> dict:
    """A study config over one CSV per site (as hospitals export them)."""
    sites = []
    for i, frame in enumerate(frames):
        path = tmp_path / f"site{i}.csv"
        frame.to_csv(path, index=False)
        sites.append({"name": f"site{i}", "path": str(path)})
    return {
        "name": "notes",
        "task": "text-classification",
        "rounds": 2,
        "output_dir": str(tmp_path / "runs"),
        "model": {"kind": "bag", "hidden": [8]},
        "train": {"local_steps": 3, "batch_size": 16, "optimizer": "adam", "lr": 0.05},
        "data": {
            "schema": {"target": "dx", "min_rows": 10},
            "text": {"column": "note", "classes": [1, 2, 3], "max_tokens": 24, **text},
        },
        "sites": sites,
    }


def _tables(tmp_path: Path, frames: list[pd.DataFrame], **text: object) -> list:
    cfg = parse_run_config(text_study(tmp_path, frames, **text))
    return [read_text_table(cfg, site) for site in cfg.sites]


def test_no_word_rarer_than_min_count_at_every_site_enters_the_vocabulary(tmp_path: Path) -> None:
    frames = [site_texts(0, planted=3), site_texts(1), site_texts(2, n=45)]
    min_count = 5
    tables = _tables(tmp_path, frames)
    per_site = [word_counts(t.texts_train) for t in tables]

    shared = [shared_word_counts(t, min_count) for t in tables]
    vocabulary = build_vocabulary(shared, parse_run_config(text_study(tmp_path, frames)).data.text)

    planted = words(PLANTED)[0]
    assert per_site[0][planted] == sum(c[planted] for c in per_site) > 0  # only at site 0 ...
    assert per_site[0][planted] < min_count  # ... and rare there
    assert all(planted not in s for s in shared)  # so it never left site 0
    rare = {w for counts in per_site for w in counts if all(c[w] < min_count for c in per_site)}
    whole_words = {t for t in vocabulary if t not in SPECIAL and not t.startswith("##")}
    assert "case" in whole_words and planted in rare
    # Every token is a piece of some shared word (subwords come from shared words only) ...
    pieces_of_shared = {w for s in shared for w in s}
    for token in vocabulary[len(SPECIAL) :]:
        piece = token.removeprefix("##")
        assert any(piece in w for w in pieces_of_shared), token
    # ... so a rare word is a token only where it is also a piece of a shared word.
    for word in rare & whole_words:
        assert any(word in w and word != w for w in pieces_of_shared), word
    assert planted not in vocabulary and "88412739" not in vocabulary
    assert max(len(t.removeprefix("##")) for t in vocabulary if t.isdigit()) == 1
    # The planted name is split into pieces (or [UNK]): never one token of its own.
    ids, _ = encode((PLANTED,), vocabulary, 16)
    assert (ids > 0).sum() > 1 or ids[0, 0] == 1


def test_a_site_shares_only_train_words_and_the_coordinator_rechecks_the_threshold(
    tmp_path: Path,
) -> None:
    frame = site_texts(0)
    frame.loc[frame.index[-1], "note"] = "onlyinthetestsplit " * 9  # 9 times, in one row
    frame["split"] = ["train"] * (len(frame) - 1) + ["test"]
    raw = text_study(tmp_path, [frame])
    raw["data"]["schema"]["split_column"] = "split"
    cfg = parse_run_config({**raw, "mode": "local"})
    shared = shared_word_counts(read_text_table(cfg, cfg.sites[0]), 5)
    assert "onlyinthetestsplit" not in shared and min(shared.values()) >= 5

    # The wire: sorted JSON both ways; a reply below the plan's threshold is refused.
    assert decode_word_counts(encode_word_counts(shared), 5) == shared
    with pytest.raises(ValueError, match="below min_count"):
        decode_word_counts(json.dumps({"smith": 2}), 5)
    with pytest.raises(ValueError, match="whole count"):
        decode_word_counts(json.dumps({"smith": 7.5}), 5)
    # A site that sent a rare word anyway does not get it into the vocabulary.
    text = cfg.data.text
    assert "smith" not in build_vocabulary([shared, {"smith": 2}], text)


def test_the_vocabulary_is_capped_and_numbered_the_same_way_every_time(tmp_path: Path) -> None:
    """Ids are [PAD], [UNK], then the tokens sorted; the cap binds the whole words."""
    frames = [site_texts(0), site_texts(1)]
    tables = _tables(tmp_path, frames)
    counts = [shared_word_counts(t, 2) for t in tables]
    text = parse_run_config(text_study(tmp_path, frames, vocab_size=40)).data.text
    vocabulary = build_vocabulary(counts, text)
    assert vocabulary[:2] == SPECIAL and list(vocabulary[2:]) == sorted(vocabulary[2:])
    assert len(vocabulary) == len(set(vocabulary))
    # The cap binds the whole words; every character of the shared words is always kept.
    larger = parse_run_config(text_study(tmp_path, frames, vocab_size=80)).data.text
    assert len(vocabulary) < len(build_vocabulary(counts, larger)) <= 80


TIED_COUNTS = """
import hashlib
from fedmed.config import TextConfig
from fedmed.data.text import build_vocabulary
words = ["cardiac", "cardio", "carcinoma", "colon", "colitis", "neural", "neuron", "nerve",
         "tumor", "tumour", "renal", "rectal", "liver", "lung", "lesion"]
counts = [{w: 5 for w in words}, {w: 7 for w in words[::2]}]
for size in (40, 60):  # 40: the cap binds; 60: what a trained vocabulary broke ties in
    vocabulary = build_vocabulary(counts, TextConfig(vocab_size=size, min_count=5))
    print(hashlib.sha256("\\n".join(vocabulary).encode()).hexdigest())
"""


def test_the_same_counts_give_the_same_vocabulary_in_every_process() -> None:
    """Equal counts everywhere (ties), with and without a binding cap: a trained BPE/WordPiece
    vocabulary broke such ties in hash-map order, which changed from process to process (3 of 4 runs
    differed); the same study must give the same vocabulary, model and metrics."""
    import subprocess
    import sys

    runs = {
        subprocess.run(
            [sys.executable, "-c", TIED_COUNTS], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(6)
    }
    assert len(runs) == 1, runs


def test_most_frequent_words_fill_the_vocabulary_ties_alphabetically() -> None:
    from fedmed.config import TextConfig

    counts = [{"tumor": 9, "colon": 6, "liver": 6, "lung": 5}, {"tumor": 5}]
    vocabulary = build_vocabulary(counts, TextConfig(vocab_size=2 + 2 * 12 + 2, min_count=5))
    # 12 distinct letters, alone and ##-prefixed, then room for two words: tumor (14), colon
    # (6; 'liver' ties with it and loses alphabetically)
    assert {"tumor", "colon"} < set(vocabulary)
    assert "liver" not in vocabulary and "lung" not in vocabulary
    assert {"l", "##v", "##g"} < set(vocabulary)  # every word can still be spelled


def test_long_texts_are_cut_to_max_tokens_and_counted(tmp_path: Path) -> None:
    frame = site_texts(0)
    for i in range(5):  # 81 tokens > 24 (each text its own: copies would be dropped)
        frame.loc[i, "note"] = " ".join(["tumor carcinoma"] * 40) + f" {i}"
    raw = text_study(tmp_path, [frame], min_count=2)
    cfg = parse_run_config({**raw, "mode": "local"})
    from fedmed.study.baselines import consortium_vocabulary

    cfg = consortium_vocabulary(cfg)
    data = load_site_data(cfg, cfg.sites[0])
    cut = data.preprocessing["truncated_train"] + data.preprocessing["truncated_test"]
    assert cut == 5
    assert data.x_train.shape[1] == 24 and data.x_train.dtype == np.int64
    assert (data.x_train[:, 0] > 1).all()  # every text starts with a known token


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f.drop(columns=["note"]), r"column 'note' is missing .*set data.text.column"),
        (lambda f: f.assign(note=f["note"].mask(f.index == 3, "  ")), r"'note' is empty at row 5"),
        (lambda f: f.assign(dx=f["dx"].mask(f.index == 0, 9)), r"label '9' .* at row 2 is not one"),
        (lambda f: f.assign(dx=f["dx"].astype(object).mask(f.index == 1, "")), r"empty at row 3"),
    ],
)
def test_a_bad_table_is_one_line_naming_rows_and_fix(tmp_path: Path, edit, message: str) -> None:
    cfg = parse_run_config({**text_study(tmp_path, [edit(site_texts(0))]), "mode": "local"})
    with pytest.raises(DataError, match=message) as info:
        load_site_table(cfg, cfg.sites[0])
    assert "\n" not in str(info.value) and ";" in str(info.value)  # one line, then the fix


def test_non_utf8_and_nul_bytes_are_refused(tmp_path: Path) -> None:
    cfg = parse_run_config({**text_study(tmp_path, [site_texts(0)]), "mode": "local"})
    path = Path(cfg.sites[0].path)
    path.write_bytes(path.read_bytes().replace(b"tumor", "tumeur é".encode("latin-1"), 1))
    with pytest.raises(DataError, match="not UTF-8 text; save it as UTF-8"):
        load_site_table(cfg, cfg.sites[0])
    path.write_bytes(b"note,dx\nbad\x00text,1\n")
    with pytest.raises(DataError, match="NUL byte"):
        load_site_table(cfg, cfg.sites[0])


def test_repeated_texts_keep_one_copy_and_drop_conflicting_labels(tmp_path: Path) -> None:
    frame = site_texts(0)
    copies = frame.iloc[[0, 1, 2]].copy()
    copies.loc[copies.index[0], "dx"] = 2 if frame["dx"].iloc[0] != 2 else 3  # a new label
    frame = pd.concat([frame, copies], ignore_index=True)
    kept = read_text_table(*_one(tmp_path, frame, duplicates="drop"))
    # text 0 (two labels): both copies dropped; texts 1, 2: one copy kept.
    assert kept.duplicates_dropped == 4
    assert len(kept.texts_train) + len(kept.texts_test) == len(frame) - 4
    assert frame["note"].iloc[0].strip() not in kept.texts_train + kept.texts_test
    with pytest.raises(DataError, match=r"6 rows repeat another row's text .*duplicates = 'drop'"):
        read_text_table(*_one(tmp_path, frame, duplicates="error"))
    assert read_text_table(*_one(tmp_path, frame, duplicates="keep")).duplicates_dropped == 0


def test_a_validation_split_is_carved_from_train_texts_and_never_shows_test(
    tmp_path: Path,
) -> None:
    cfg, site = _one(tmp_path, site_texts(0, n=80))
    tuning = cfg.replace(data=replace(cfg.data, schema=replace(cfg.data.schema, **VALIDATION)))

    full, carved = read_text_table(cfg, site), read_text_table(tuning, site)

    assert sorted(carved.texts_train + carved.texts_test) == sorted(full.texts_train)
    assert not set(carved.texts_test) & set(full.texts_test)
    assert not set(carved.texts_test) & set(carved.texts_train)  # nor counted for the vocabulary
    assert len(carved.texts_test) == round(0.25 * len(full.texts_train))


VALIDATION = {"validation_fraction": 0.25}


def _one(tmp_path: Path, frame: pd.DataFrame, **text: object) -> tuple:
    cfg = parse_run_config({**text_study(tmp_path, [frame], **text), "mode": "local"})
    return cfg, cfg.sites[0]


def test_text_settings_are_checked_when_the_study_is_read(tmp_path: Path) -> None:
    raw = text_study(tmp_path, [site_texts(0), site_texts(1)])
    with pytest.raises(ConfigError, match=r"data.text.min_count = 0 is out of range"):
        parse_run_config({**raw, "data": {**raw["data"], "text": {"min_count": 0}}})
    cfg = parse_run_config({**raw, "data": {**raw["data"], "text": {"classes": [1]}}})
    with pytest.raises(ConfigError, match=r"declare the label values, at least two"):
        load_site_table(cfg, cfg.sites[0])
    cfg = parse_run_config({**text_study(tmp_path, [site_texts(0)]), "mode": "local"})
    with pytest.raises(ConfigError, match="vocabulary is empty"):
        load_site_data(cfg, cfg.sites[0])  # token ids need the study's vocabulary


CLINICAL = DATA_DIR / "clinical_text" / "medical_abstracts_test.csv"


@needs_shared_data
def test_medical_abstracts_lose_their_multi_label_texts_and_split_by_site(tmp_path: Path) -> None:
    if not CLINICAL.is_file():
        pytest.skip(f"{CLINICAL} not found (set FEDMED_DATA_DIR to the shared datasets)")
    from fedmed.config import load_run_config

    cfg = load_run_config(Path(__file__).parents[2] / "simulations" / "clinical_text.toml")
    tables = [load_site_table(cfg, s) for s in cfg.sites]
    texts = [t for table in tables for t in table.texts_train + table.texts_test]
    frame = pd.read_csv(CLINICAL)
    multi = frame["labels_for_text"].astype(str).str.contains("|", regex=False)
    assert len(texts) == len(set(texts)) == int((~multi).sum()) == 2657
    assert not set(texts) & set(frame.loc[multi, "text"].str.strip())
    assert all(t.duplicates_dropped == 231 for t in tables)  # counted on the whole file
    sizes = [len(t.texts_train) + len(t.texts_test) for t in tables]
    assert sizes == sorted(sizes, reverse=True)  # size skew, as documented
