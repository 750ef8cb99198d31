"""`fedmed serve` / `fedmed predict` for text models: raw text in over real HTTP on 127.0.0.1,
the same probabilities as the in-process model on fedmed.data.text.encode's ids, explanations
that add up to logit(text) - logit(empty text), a tampered tokenizer refused, bad requests
answered with 422s naming the fix, and an HTML page that escapes what the texts hold."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from fedmed.cli.main import main
from fedmed.config import RunConfig, parse_run_config
from fedmed.data.text import build_vocabulary, encode, read_text_table, shared_word_counts
from fedmed.errors import ConfigError
from fedmed.serving.api import create_app, open_model
from fedmed.serving.export import load_model, save_model
from fedmed.serving.server import start_in_thread
from fedmed.serving.text import MAX_EXPLAINED_TEXTS, MAX_TEXT_BYTES, MAX_TEXTS, ServedText
from fedmed.tasks import build_model, get_task
from fedmed.tasks.text import COMPLETENESS_TOL, IG_STEPS, MAX_IG_STEPS
from tests.data.test_text import site_texts, text_study

TEXTS = [
    "The CARDIAC patients: myocardial infarction, coronary arrhythmia.",
    "Tumor treated with chemotherapy; carcinoma and metastasis (oncology study).",
    "seizure " * 40,  # longer than max_tokens (24): cut
    "Cérébral épilepsy, démentia",  # accents stripped, as in training
]
# Completeness: sum of attributions = logit(text) - logit(empty text) up to the quadrature
# error. Measured on these trained models (differences 1.2-10.9 logits), 64 Gauss-Legendre
# points split at the pooling's kink: the bag model to float32 rounding (<= 2e-6; it is linear
# or quadratic on each side of the kink); the Transformer to <= 2e-6 on most texts, but one
# trained Transformer's path on one text turns sharply and missed by 1.48 at 64 points, 0.25 at
# 128 and 0.02 at 256 (and fixed midpoints by 0.16 at 128): explain_tokens doubles the steps for
# such a text until it is within COMPLETENESS_TOL = 1e-3 x max(1, |difference|) (512 sufficed,
# gap 4e-5). The tests check that bound, recomputed here, not the server's own gap; any other
# baseline misses it by whole logits.
RELATIVE_TOL = COMPLETENESS_TOL


def _complete(total: float, difference: float) -> bool:
    return abs(total - difference) <= RELATIVE_TOL * max(1.0, abs(difference))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one intra-op thread is 100x faster than two
    contending ones (measured: 0.6 ms vs 80 ms per Transformer forward)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(
    tmp_path: Path, kind: str = "bag", private: bool = False, frozen: bool = False
) -> RunConfig:
    """A two-site text study whose vocabulary is built as the coordinator builds it."""
    raw = text_study(tmp_path, [site_texts(0, n=60), site_texts(1, n=45)], min_count=3)
    raw["model"] = {"kind": kind, "hidden": [8], "heads": 2, "frozen_embedding": frozen}
    cfg = parse_run_config(raw)
    tables = [read_text_table(cfg, site) for site in cfg.sites]
    counts = [shared_word_counts(t, cfg.data.text.min_count) for t in tables]
    text = replace(cfg.data.text, vocabulary=build_vocabulary(counts, cfg.data.text))
    cfg = cfg.replace(data=replace(cfg.data, text=text))
    if private:
        cfg = cfg.replace(privacy=replace(cfg.privacy, enabled=True))
    return cfg


def _trained(
    tmp_path: Path, kind: str = "bag", frozen: bool = False
) -> tuple[torch.nn.Module, RunConfig, Path]:
    """A model trained for a few full-batch Adam steps (under a second), exported and signed."""
    cfg = _cfg(tmp_path, kind, frozen=frozen)
    tables = [read_text_table(cfg, site) for site in cfg.sites]
    texts = tuple(t for table in tables for t in table.texts_train)
    ids, _ = encode(texts, cfg.data.text.vocabulary, cfg.data.text.max_tokens)
    y = torch.from_numpy(np.concatenate([table.y_train for table in tables]))
    x = torch.from_numpy(ids)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    task = get_task(cfg.task)
    for _ in range(25):
        optimizer.zero_grad()
        task.loss(model(x), y).backward()
        optimizer.step()
    model.eval()
    weights = save_model(tmp_path / "export", "model", model, cfg, {})
    return model, cfg, weights


def _in_process(model: torch.nn.Module, cfg: RunConfig, texts: list[str]) -> torch.Tensor:
    ids, _ = encode(tuple(texts), cfg.data.text.vocabulary, cfg.data.text.max_tokens)
    with torch.no_grad():
        return model(torch.from_numpy(ids))


@pytest.fixture
def trained(tmp_path: Path) -> tuple[torch.nn.Module, RunConfig, Path]:
    return _trained(tmp_path)


@pytest.fixture
def server(trained):
    handle = start_in_thread(create_app(open_model(trained[2])))
    try:
        yield handle
    finally:
        handle.stop()
    assert not handle.thread.is_alive()


def test_text_over_http_equals_the_in_process_model(server, trained) -> None:
    model, cfg, _ = trained

    reply = httpx.post(f"{server.url}/predict", json={"texts": TEXTS}, timeout=30)

    assert reply.status_code == 200, reply.text
    predictions = reply.json()["predictions"]
    expected = torch.softmax(_in_process(model, cfg, TEXTS), dim=-1).numpy()
    got = np.array([[p["probabilities"][str(c)] for c in (1, 2, 3)] for p in predictions])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert [p["label"] for p in predictions] == expected.argmax(axis=1).tolist()
    assert [p["class"] for p in predictions] == [(1, 2, 3)[i] for i in expected.argmax(axis=1)]
    assert [p["probability"] for p in predictions] == pytest.approx(expected.max(axis=1))
    ids, cut = encode(tuple(TEXTS), cfg.data.text.vocabulary, cfg.data.text.max_tokens)
    assert [p["tokens"] for p in predictions] == (ids != 0).sum(axis=1).tolist()
    assert [p["truncated"] for p in predictions] == [False, False, True, False] and cut == 1
    assert all(p["explanation"] is None for p in predictions)
    card = httpx.get(f"{server.url}/model", timeout=10).json()
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert card["task"] == "text-classification" and card["signature"]["algorithm"] == "ed25519"
    assert health["status"] == "ok" and health["weights_sha256"] == card["weights_sha256"]
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert "texts" in json.dumps(schema["components"]["schemas"]["TextRequest"])


def test_explanations_over_http_add_up_to_the_logit_difference_from_an_empty_text(
    server, trained
) -> None:
    model, cfg, _ = trained

    reply = httpx.post(f"{server.url}/predict", json={"texts": TEXTS, "explain": True}, timeout=60)

    assert reply.status_code == 200, reply.text
    logits = _in_process(model, cfg, TEXTS)
    with torch.no_grad():
        empty = model(torch.zeros(1, cfg.data.text.max_tokens, dtype=torch.long))[0]
    for i, prediction in enumerate(reply.json()["predictions"]):
        explanation = prediction["explanation"]
        label = prediction["label"]
        total = sum(t["attribution"] for t in explanation["tokens"])
        assert _complete(total, float(logits[i, label] - empty[label])), (i, total)
        assert explanation["completeness_gap"] == pytest.approx(
            total - float(logits[i, label] - empty[label]), abs=1e-5
        )
        assert IG_STEPS <= explanation["steps"] <= MAX_IG_STEPS
        assert explanation["logit"] == pytest.approx(float(logits[i, label]), abs=1e-6)
        assert explanation["empty_text_logit"] == pytest.approx(float(empty[label]), abs=1e-6)
        assert len(explanation["tokens"]) == prediction["tokens"]
        first = explanation["tokens"][0]  # spans point into the text as sent, not normalized
        assert TEXTS[i][first["start"] : first["end"]] == ["The", "Tumor", "seizure", "Cérébral"][i]


@pytest.mark.parametrize(
    ("kind", "frozen"), [("bag", False), ("transformer", False), ("bag", True)]
)
def test_explanations_add_up_for_both_models(tmp_path: Path, kind: str, frozen: bool) -> None:
    model, cfg, weights = _trained(tmp_path, kind, frozen)
    served = ServedText(weights)

    predictions = served.predict(TEXTS, explain=True)

    logits = _in_process(model, cfg, TEXTS)
    with torch.no_grad():
        empty = model(torch.zeros(1, cfg.data.text.max_tokens, dtype=torch.long))[0]
    for i, p in enumerate(predictions):
        total = sum(t["attribution"] for t in p["explanation"]["tokens"])
        assert _complete(total, float(logits[i, p["label"]] - empty[p["label"]])), (i, total)
    # Not trivially true: the tokens do move the logits, and by different amounts.
    assert (
        max(
            abs(float(logits[i, p["label"]] - empty[p["label"]])) for i, p in enumerate(predictions)
        )
        > 0.05
    )
    spread = [t["attribution"] for t in predictions[0]["explanation"]["tokens"]]
    assert np.std(spread) > 0


def test_a_private_transformer_loads_with_opacus_attention(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "transformer", private=True)
    torch.manual_seed(0)
    model = build_model(cfg).eval()  # DPMultiheadAttention, as a DP study trains and saves it
    weights = save_model(tmp_path / "export", "model", model, cfg, {})

    loaded, card = load_model(weights)

    assert card["privacy"]["enabled"]
    torch.testing.assert_close(
        loaded(torch.from_numpy(encode(tuple(TEXTS), cfg.data.text.vocabulary, 24)[0])),
        _in_process(model, cfg, TEXTS),
    )


def test_a_frozen_table_is_rebuilt_from_the_card_and_checked_against_its_hash(
    tmp_path: Path,
) -> None:
    model, cfg, weights = _trained(tmp_path, frozen=True)
    card_path = weights.with_name("model.card.json")

    loaded, card = load_model(weights)

    assert torch.equal(loaded.embed.weight, model.embed.weight)  # not in the weights file ...
    assert "embed.weight" not in load_file(str(weights))
    torch.testing.assert_close(loaded(_ids(cfg)), _in_process(model, cfg, TEXTS), rtol=0, atol=0)
    # ... so a table this fedmed would draw differently is refused, naming the version to use.
    card["frozen_embedding"]["sha256"] = "0" * 64
    del card["signature"]
    card_path.write_text(json.dumps(card))
    with pytest.raises(ConfigError, match=r"frozen token embedding rebuilt from seed 0 does not"):
        load_model(weights, require_signature=False)


def _ids(cfg: RunConfig) -> torch.Tensor:
    return torch.from_numpy(encode(tuple(TEXTS), cfg.data.text.vocabulary, 24)[0])


def test_a_tampered_tokenizer_file_is_refused(trained) -> None:
    weights = trained[2]
    path = weights.with_name("model.tokenizer.json")
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(t for t in vocab if not t.startswith("["))[:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two words swap ids
    path.write_text(json.dumps(tokenizer))

    for allow_unsigned in (False, True):
        with pytest.raises(ConfigError, match="tokenizer file was changed") as refused:
            ServedText(weights, allow_unsigned=allow_unsigned)
        assert "\n" not in str(refused.value) and "copy it again" in str(refused.value)
    path.unlink()
    with pytest.raises(ConfigError, match="tokenizer file not found"):
        open_model(weights)


def test_a_card_naming_a_tokenizer_outside_its_folder_is_refused(trained) -> None:
    weights = trained[2]
    card_path = weights.with_name("model.card.json")
    card = json.loads(card_path.read_text())
    del card["signature"]  # an unsigned card, served with --allow-unsigned
    card["tokenizer"]["file"] = "../../model.tokenizer.json"
    card_path.write_text(json.dumps(card))

    with pytest.raises(ConfigError, match="not a plain file name"):
        ServedText(weights, allow_unsigned=True)


def test_the_explained_texts_cap_binds_only_with_explain(server) -> None:
    texts = ["fever and cough", "seizure after a fall"] * (MAX_EXPLAINED_TEXTS // 2)

    explained = httpx.post(
        f"{server.url}/predict", json={"texts": texts, "explain": True}, timeout=120
    )
    plain = httpx.post(f"{server.url}/predict", json={"texts": [*texts, "fever"]}, timeout=60)

    assert explained.status_code == 200, explained.text
    assert all(p["explanation"] for p in explained.json()["predictions"])
    assert plain.status_code == 200, plain.text
    assert len(plain.json()["predictions"]) == MAX_EXPLAINED_TEXTS + 1


@pytest.mark.parametrize(
    ("body", "loc", "kind", "fix"),
    [
        ({"texts": "fever and cough"}, ["body", "texts"], "text_list", "send a list of strings"),
        ({"texts": []}, ["body", "texts"], "text_list", "at least one"),
        ({"texts": ["fever"] * (MAX_TEXTS + 1)}, ["body", "texts"], "text_list", "split the batch"),
        (  # explanations cost up to 1,024 passes per text: a few texts may hold a thread
            {"texts": ["fever"] * (MAX_EXPLAINED_TEXTS + 1), "explain": True},
            ["body", "texts"],
            "text_list",
            "leave explain off",
        ),
        ({"texts": ["fever", 3]}, ["body", "texts", 1], "text_type", "as a JSON string"),
        ({"texts": ["fever", None]}, ["body", "texts", 1], "text_type", "as a JSON string"),
        ({"texts": ["fever", " \n\t "]}, ["body", "texts", 1], "text_empty", "send the text"),
        ({"texts": ["\u0301"]}, ["body", "texts", 0], "text_empty", "send readable text"),
        (
            {"texts": ["é" * (MAX_TEXT_BYTES // 2 + 1)]},  # 2 bytes each in UTF-8
            ["body", "texts", 0],
            "text_too_long",
            "cut the text",
        ),
        ({"texts": ["a\x00b"]}, ["body", "texts", 0], "text_nul", "send plain text"),
    ],
)
def test_bad_requests_get_422s_that_name_the_fix(
    server, body: dict, loc: list, kind: str, fix: str
) -> None:
    reply = httpx.post(f"{server.url}/predict", json=body, timeout=10)

    assert reply.status_code == 422, reply.text
    detail = reply.json()["detail"][0]
    assert detail["loc"] == loc and detail["type"] == kind and fix in detail["msg"], detail


def test_unknown_fields_and_lone_surrogates_get_422s(server) -> None:
    extra = httpx.post(f"{server.url}/predict", json={"texts": ["x"], "note": 1}, timeout=10)
    lone = httpx.post(
        f"{server.url}/predict",
        content=b'{"texts": ["fever \\ud800"]}',
        headers={"Content-Type": "application/json"},
        timeout=10,
    )

    assert extra.status_code == 422 and extra.json()["detail"][0]["type"] == "extra_forbidden"
    assert lone.status_code == 422 and lone.json()["detail"][0]["type"] == "text_unicode"


def test_predict_cli_writes_probabilities_and_an_escaped_html_page(trained, tmp_path: Path) -> None:
    model, cfg, weights = trained
    hostile = "<script>alert('x')</script> tumor & carcinoma <img src=x onerror=alert(1)>"
    texts = [TEXTS[0], hostile, TEXTS[2]]
    rows = tmp_path / "notes.csv"
    pd.DataFrame({"id": [7, 8, 9], "note": texts}).to_csv(rows, index=False)
    out = tmp_path / "preds.csv"

    assert main(["predict", str(weights), str(rows), "--explain", "--output", str(out)]) == 0

    scored = pd.read_csv(out)
    expected = torch.softmax(_in_process(model, cfg, texts), dim=-1).numpy()
    for c, column in zip((1, 2, 3), expected.T, strict=True):
        np.testing.assert_allclose(scored[f"probability:{c}"], column, atol=1e-6)
    assert scored["id"].tolist() == [7, 8, 9] and scored["class"].tolist() == [
        (1, 2, 3)[i] for i in expected.argmax(axis=1)
    ]
    page = _Page((tmp_path / "preds-explanations.html").read_text())
    assert page.tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p"} | {
        "section",
        "span",
    }  # no <script>, no <img>: the texts came out as text
    assert page.paragraphs == texts  # every character of every text, in order
    assert page.highlighted >= 10  # tokens coloured


class _Page(HTMLParser):
    """What a browser would build from the page: its tags, and each text paragraph's text."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.paragraphs: list[str] = []
        self.highlighted = 0
        self._in_p = False
        self.feed(source)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "p" and dict(attrs).get("class") == "text":
            self._in_p = True
            self.paragraphs.append("")
        if tag == "span" and self._in_p and "rgba" in (dict(attrs).get("style") or ""):
            self.highlighted += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "p":
            self._in_p = False

    def handle_data(self, data: str) -> None:
        if self._in_p:
            self.paragraphs[-1] += data


def test_predict_cli_names_empty_texts_and_a_missing_column(
    trained, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    weights = trained[2]
    rows = tmp_path / "notes.csv"
    rows.write_text('note\nfever and cough\n""\n"  "\n')
    other = tmp_path / "other.csv"
    other.write_text("text\nfever\n")

    assert main(["predict", str(weights), str(rows)]) == 2
    err = capsys.readouterr().err
    assert "column 'note' is empty at rows 3, 4" in err and "fill in" in err
    assert main(["predict", str(weights), str(other)]) == 2
    assert "column 'note' is missing" in capsys.readouterr().err
    assert main(["predict", str(weights), str(other), "--explain"]) == 2
    assert "give --output" in capsys.readouterr().err
