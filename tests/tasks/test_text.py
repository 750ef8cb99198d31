"""The text task: both models take one Opacus step (the Transformer with DPMultiheadAttention),
padding never changes a prediction, the metrics against scikit-learn, what is refused and why,
the vocabulary's round trip through a checkpoint, and short federated studies (plain and DP)
whose vocabulary is built over Flower messages and saved with the model as tokenizer JSON."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.layers import DPMultiheadAttention
from sklearn.metrics import f1_score, roc_auc_score

from fedmed.cli.main import main
from fedmed.config import ModelConfig, RunConfig, parse_run_config
from fedmed.errors import ConfigError
from fedmed.tasks import build_model, get_task, load_site_table
from fedmed.tasks.local_layers import check_model
from fedmed.tasks.text import BagOfEmbeddings, TextTransformer, frozen_table
from tests.data.test_text import PLANTED, site_texts, text_study
from tests.tasks.test_imaging import _to_toml

VOCABULARY = ("[PAD]", "[UNK]", *(f"w{i}" for i in range(30)))


def _cfg(tmp_path: Path, **model: object) -> RunConfig:
    raw = text_study(tmp_path, [site_texts(0), site_texts(1)])
    raw["model"] = {"kind": "bag", "hidden": [8], **model}
    raw["data"]["text"]["vocabulary"] = list(VOCABULARY)
    return parse_run_config(raw)


def _ids(n: int = 12, tokens: int = 24, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, len(VOCABULARY), (n, tokens), generator=gen)
    lengths = torch.randint(1, tokens + 1, (n,), generator=gen)
    ids[torch.arange(tokens)[None, :] >= lengths[:, None]] = 0  # padding after each text
    return ids


def _one_dp_step(model: torch.nn.Module, cfg: RunConfig):
    """One Opacus DP-SGD step of ``model`` on 6 of 12 random texts: (engine, the wrapped model,
    the batch's labels, its weights before the step). The backward pass is done; the caller
    looks at the per-text gradients, then calls ``optimizer.step()``."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, y = _ids(), torch.arange(12) % 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, y), batch_size=6)
    engine = PrivacyEngine()
    dp_model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    xb, yb = next(iter(loader))
    get_task(cfg.task).loss(dp_model(xb), yb).backward()
    return engine, dp_model, optimizer, yb, before


@pytest.mark.parametrize("kind", ["bag", "transformer"])
def test_each_model_takes_a_dp_sgd_step_with_opacus(tmp_path: Path, kind: str) -> None:
    cfg = _cfg(tmp_path, kind=kind, hidden=[8, 8] if kind == "transformer" else [8])
    private = cfg.replace(privacy=replace(cfg.privacy, enabled=True))
    torch.manual_seed(0)
    model = build_model(private)
    if kind == "transformer":  # nn.MultiheadAttention was swapped for Opacus' own
        assert sum(isinstance(m, DPMultiheadAttention) for m in model.modules()) == 2
    engine, dp_model, optimizer, yb, before = _one_dp_step(model, cfg)
    for name, param in dp_model.named_parameters():  # per-text gradients for every weight
        assert param.grad_sample is not None and param.grad_sample.shape[0] == len(yb), name
    optimizer.step()
    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert engine.get_epsilon(1e-5) > 0


@pytest.mark.parametrize("kind", ["bag", "transformer"])
def test_padding_never_changes_a_prediction(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(tmp_path, kind=kind)).eval()
    ids = _ids(4, 12)
    padded = torch.cat([ids, torch.zeros(4, 12, dtype=torch.long)], dim=1)[:, :24]
    with torch.no_grad():
        logits = model(ids)
        assert logits.shape == (4, 3)
        # Same texts, more padding (max_tokens 24 fits 24 positions): same logits.
        torch.testing.assert_close(model(padded), logits, rtol=1e-5, atol=1e-5)
        # An all-padding text gives finite logits, never NaN.
        assert torch.isfinite(model(torch.zeros(1, 24, dtype=torch.long))).all()


def test_metrics_match_scikit_learn() -> None:
    task = get_task("text-classification")
    rng = np.random.default_rng(0)
    y = np.array([0, 0, 1, 1, 2, 2, 2, 0, 1, 2], dtype=np.float32)
    scores = rng.dirichlet(np.ones(3), size=len(y))
    got = task.evaluate(y, scores, loss=0.7)
    expect_auc = roc_auc_score(y, scores, multi_class="ovr", average="macro")
    assert got["roc_auc"] == pytest.approx(expect_auc)
    assert got["macro_f1"] == pytest.approx(f1_score(y, scores.argmax(1), average="macro"))
    assert got["accuracy"] == pytest.approx(np.mean(scores.argmax(1) == y))
    # A class the site's test split does not hold is not averaged in as a 0 ...
    two = task.evaluate(y[y < 2], scores[y < 2], 0.7)
    pred = scores[y < 2].argmax(1)
    assert two["macro_f1"] == pytest.approx(
        f1_score(y[y < 2], pred, labels=[0, 1], average="macro", zero_division=0)
    )
    # ... and one class alone has no ROC-AUC (NaN, as for the binary tasks).
    assert math.isnan(task.evaluate(y[y == 2], scores[y == 2], 0.7)["roc_auc"])


def test_what_cannot_work_is_refused_with_the_fix(tmp_path: Path) -> None:
    task = get_task("text-classification")
    with pytest.raises(ConfigError, match="model.kind 'bag' or 'transformer'"):
        task.check(_cfg(tmp_path, kind="mlp"))
    with pytest.raises(ConfigError, match="model.members = 1"):
        task.check(_cfg(tmp_path, members=3))
    with pytest.raises(ConfigError, match="must divide model.hidden"):
        task.check(_cfg(tmp_path, kind="transformer", hidden=[10], heads=4))
    with pytest.raises(ConfigError, match="share one width"):
        task.check(_cfg(tmp_path, kind="transformer", hidden=[8, 16]))
    # FedBN keeps normalization layers at the sites: the Transformer has LayerNorms, the bag none.
    assert check_model(build_model(_cfg(tmp_path, kind="transformer")))
    with pytest.raises(ConfigError, match="no normalization layer"):
        check_model(build_model(_cfg(tmp_path)))
    cfg = _cfg(tmp_path)
    text = replace(cfg.data.text, vocabulary=())
    secure = cfg.replace(
        strategy=replace(cfg.strategy, secure_aggregation=True, validate_updates=False),
        data=replace(cfg.data, text=text),
    )
    with pytest.raises(ConfigError, match="SecAgg"):
        task.check(secure)
    with pytest.raises(ConfigError, match="data.schema.time/event"):
        task.check(cfg.replace(data=replace(cfg.data, schema=replace(cfg.data.schema, time="t"))))


def test_a_frozen_embedding_outside_a_text_study_is_refused(demo_config: RunConfig) -> None:
    frozen = demo_config.replace(model=replace(demo_config.model, frozen_embedding=True))

    with pytest.raises(ConfigError, match="task 'tabular-classification' has none: remove it"):
        load_site_table(frozen, frozen.sites[0])
    assert load_site_table(demo_config, demo_config.sites[0]).y_train.size  # the rest is fine


def test_the_vocabulary_is_left_out_of_the_hashes_and_kept_by_the_checkpoint(
    tmp_path: Path,
) -> None:
    from fedmed.coordinator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from fedmed.security.policy import plan_hash
    from fedmed.study.history import RunHistory

    cfg = _cfg(tmp_path)
    bare = cfg.replace(data=replace(cfg.data, text=replace(cfg.data.text, vocabulary=())))
    # Sites approve the plan before the vocabulary exists; its threshold is bound, though.
    assert plan_hash(cfg) == plan_hash(bare)
    stricter = replace(bare.data.text, min_count=50)
    assert plan_hash(bare.replace(data=replace(bare.data, text=stricter))) != plan_hash(bare)
    state = {"w": np.zeros(2, dtype=np.float32)}
    save_checkpoint(tmp_path, cfg, Checkpoint(1, state, RunHistory(cfg.site_names)))
    # The run's own config file (no vocabulary) resumes it, with the vocabulary it trained with.
    assert load_checkpoint(tmp_path, bare).vocabulary == VOCABULARY


def _write_study(tmp_path: Path, **extra: object) -> Path:
    frames = [site_texts(0, n=60, planted=3), site_texts(1, n=45)]
    raw = text_study(tmp_path, frames, min_count=5, vocab_size=60)
    raw.update(extra)
    toml = tmp_path / "notes.toml"
    toml.write_text(_to_toml(raw))
    return toml


def test_a_federated_text_study_builds_its_vocabulary_over_messages_and_saves_the_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedmed.data.text

    monkeypatch.setenv("FEDMED_SIM_WORKERS", "1")  # sites in this process: their calls are seen
    shared: list[dict[str, int]] = []
    original = fedmed.data.text.shared_word_counts

    def spy(table, min_count):  # what each site's vocabulary reply is made of
        shared.append(original(table, min_count))
        return shared[-1]

    monkeypatch.setattr(fedmed.data.text, "shared_word_counts", spy)
    toml = _write_study(tmp_path)

    assert main(["simulate", str(toml), "--quiet"]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])

    metrics = json.loads((run_dir / "metrics.json").read_text())
    vocabulary = metrics["config"]["data"]["text"]["vocabulary"]
    assert len(shared) == 2  # one query per site, before round 1
    assert PLANTED.lower() not in vocabulary and all(PLANTED.lower() not in s for s in shared)
    assert set(metrics["final"]["average"]) >= {"accuracy", "macro_f1", "roc_auc", "loss"}
    card = json.loads((run_dir / "model.card.json").read_text())
    saved = run_dir / card["tokenizer"]["file"]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(saved))
    assert tokenizer.get_vocab() == {t: i for i, t in enumerate(vocabulary)}
    assert card["tokenizer"]["classes"] == [1, 2, 3] and card["tokenizer"]["max_tokens"] == 24
    from fedmed.serving.text import ServedText

    served = ServedText(run_dir)  # the saved tokenizer and weights serve raw text
    (prediction,) = served.predict(["cardiac infarction in the patients"])
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    ids, _ = fedmed.data.text.encode(("cardiac infarction in the patients",), tuple(vocabulary), 24)
    assert prediction["class"] in (1, 2, 3) and prediction["tokens"] == (ids != 0).sum()


def test_a_private_text_study_spends_epsilon_and_pooled_uses_the_same_vocabulary(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    toml = _write_study(tmp_path, privacy={"enabled": True, "target_epsilon": 5.0})
    assert main(["simulate", str(toml), "--quiet"]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    epsilons = [s["epsilon"] for s in metrics["final"]["sites"].values()]
    assert all(0 < eps <= 5.0 + 1e-6 for eps in epsilons)

    assert main(["simulate", str(toml), "--quiet", "--mode", "pooled"]) == 0
    pooled = Path(capsys.readouterr().out.strip().splitlines()[-1])
    data = json.loads((pooled / "metrics.json").read_text())["config"]["data"]
    assert data["text"]["vocabulary"][:2] == ["[PAD]", "[UNK]"]  # built the same way ...
    assert PLANTED.lower() not in data["text"]["vocabulary"]  # ... with the same threshold


# SHA-256 of frozen_table(10, 4, seed=0)'s bytes. A served model rebuilds its table from the
# seed on its card: were the drawing to change, every frozen-embedding model ever exported
# would meet another table (loading refuses it, by the card's hash; this catches it first).
FROZEN_10x4_SEED0 = "f32a6b0b620660f4345d777c00ff62e1cbe2bf2dcb2ecc4b0d106935c2bc27b5"


@pytest.mark.parametrize("kind", ["bag", "transformer"])
def test_a_frozen_table_comes_from_the_seed_and_only_the_rest_trains_under_dp(
    tmp_path: Path, kind: str
) -> None:
    cfg = _cfg(tmp_path, kind=kind, frozen_embedding=True).replace(seed=7)
    private = cfg.replace(privacy=replace(cfg.privacy, enabled=True))
    torch.manual_seed(0)
    model = build_model(private)
    torch.manual_seed(1)  # the table does not depend on torch's generator ...
    twin = build_model(private)

    table = model.embed.weight.clone()
    assert torch.equal(table, twin.embed.weight) and torch.equal(table, frozen_table(32, 8, 7))
    assert not torch.equal(table, build_model(cfg.replace(seed=8)).embed.weight)  # ... but the seed
    assert hashlib.sha256(frozen_table(10, 4, 0).numpy().tobytes()).hexdigest() == FROZEN_10x4_SEED0
    # Not a weight: nothing sends, averages, checkpoints or saves it.
    assert not [k for k in model.state_dict() if k.startswith("embed")]
    _, _, optimizer, _, before = _one_dp_step(model, cfg)
    optimizer.step()
    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert torch.equal(model.embed.weight, table)  # no noise, no step
    if kind == "bag":  # only the head learns: 3 classes x 8 + 3
        assert sum(p.numel() for p in model.parameters()) == 27


def test_a_frozen_bag_reads_the_same_mean_as_its_explanations(tmp_path: Path) -> None:
    model = build_model(_cfg(tmp_path, frozen_embedding=True, hidden=[16])).eval()
    ids = _ids()
    ids[0] = 0  # an empty text pools to 0, as on an explanation's path

    with torch.no_grad():  # forward sums rows from the table; explanations pass embeddings
        summed = model(ids)
        embedded = model.from_embeddings(model.embed(ids), (ids != 0).float())

    torch.testing.assert_close(summed, embedded, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(summed[0], model.head.bias)


def test_a_frozen_table_is_the_same_at_every_site_and_in_the_served_model(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedmed.site.app
    from fedmed.serving.export import load_model

    monkeypatch.setenv("FEDMED_SIM_WORKERS", "1")  # sites in this process: their models are seen
    built: list[torch.nn.Module] = []
    original = fedmed.site.app.build_model

    def spy(run: RunConfig) -> torch.nn.Module:  # every model a site trains or evaluates
        built.append(original(run))
        return built[-1]

    monkeypatch.setattr(fedmed.site.app, "build_model", spy)
    private = {"enabled": True, "target_epsilon": 5.0}
    toml = _write_study(tmp_path, model={"kind": "bag", "hidden": [8], "frozen_embedding": True},
                        privacy=private)  # fmt: skip

    assert main(["simulate", str(toml), "--quiet"]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])

    served, card = load_model(run_dir / "model.safetensors")
    table = served.embed.weight
    assert len(built) >= 4  # 2 sites x (train + evaluate), DP-SGD steps taken in each round
    assert all(torch.equal(model.embed.weight, table) for model in built)
    assert card["frozen_embedding"]["sha256"] == hashlib.sha256(table.numpy().tobytes()).hexdigest()
    assert (
        card["model"]["frozen_embedding"]
        and card["frozen_embedding"]["seed"] == card["study"]["seed"]
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert all(0 < s["epsilon"] <= 5.0 + 1e-6 for s in metrics["final"]["sites"].values())


def test_the_private_text_study_is_the_text_study_with_dp_and_a_frozen_table() -> None:
    from fedmed.config import load_run_config

    shipped = Path(__file__).parents[2] / "simulations"
    plain = load_run_config(shipped / "clinical_text.toml")
    private = load_run_config(shipped / "clinical_text-dp.toml")

    assert private.data == plain.data and private.sites == plain.sites  # same texts, same split
    assert private.privacy.enabled and private.privacy.target_epsilon == 8.0
    assert private.model.frozen_embedding and private.model.hidden == (4096,)
    assert (private.train.batch_size, private.train.local_epochs) == (64, 2)


def test_model_sizes_follow_the_study(tmp_path: Path) -> None:
    bag = build_model(_cfg(tmp_path))
    assert isinstance(bag, BagOfEmbeddings) and bag.embed.num_embeddings == len(VOCABULARY)
    transformer = build_model(_cfg(tmp_path, kind="transformer", hidden=[8, 8]))
    assert isinstance(transformer, TextTransformer) and len(transformer.layers) == 2
    assert transformer.position.num_embeddings == 24 and transformer.head.out_features == 3
    with pytest.raises(ConfigError, match="build_model"):
        get_task("text-classification").build_model(10, ModelConfig(kind="bag"))


def test_a_killed_text_study_resumes_with_the_vocabulary_it_started_with(tmp_path: Path) -> None:
    from fedmed.config import load_run_config
    from fedmed.coordinator.checkpoint import load_checkpoint
    from fedmed.runtime.run import preflight
    from fedmed.study.plan import RunPlan, new_run_dir
    from tests.coordinator.test_checkpoint import Killed, _kill_after, _metrics, _numbers, _run

    cfg, _ = preflight(load_run_config(_write_study(tmp_path)).replace(rounds=3))
    run_dir = new_run_dir(cfg)
    with pytest.raises(Killed):
        _run(RunPlan(cfg, run_dir), _kill_after(1))
    vocabulary = load_checkpoint(run_dir, cfg).vocabulary  # the run's own config resumes it
    assert vocabulary[:2] == ("[PAD]", "[UNK]")

    _run(RunPlan(cfg, run_dir, resume=True))

    resumed = _metrics(run_dir)
    assert tuple(resumed["config"]["data"]["text"]["vocabulary"]) == vocabulary
    text = replace(cfg.data.text, vocabulary=vocabulary)  # the same study, uninterrupted
    pinned = cfg.replace(data=replace(cfg.data, text=text))
    reference = _run(RunPlan(pinned, new_run_dir(pinned)))
    assert _numbers(resumed) == _numbers(_metrics(reference))


def test_fedbn_keeps_the_transformers_layer_norms_at_the_sites(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    toml = _write_study(
        tmp_path,
        model={"kind": "transformer", "hidden": [8], "heads": 2},
        personalize={"local_normalization": True},
    )
    assert main(["simulate", str(toml), "--quiet"]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    personalized = json.loads((run_dir / "metrics.json").read_text())["final"]["personalized"]
    assert set(personalized["sites"]) == {"site0", "site1"}
    assert "macro_f1" in personalized["sites"]["site0"]["after"]
    kept = list((tmp_path / "sites").rglob("*.safetensors"))  # FEDMED_SITE_STATE_DIR (conftest)
    assert kept, "no site kept its own normalization layers"


def test_binary_text_with_named_labels_is_the_two_class_case(tmp_path: Path) -> None:
    from fedmed.data.text import read_text_table

    frame = site_texts(0)
    frame["dx"] = np.where(frame["dx"] == 1, "malignant", "benign")
    raw = text_study(tmp_path, [frame], classes=["benign", "malignant"])
    cfg = parse_run_config({**raw, "mode": "local"})
    table = read_text_table(cfg, cfg.sites[0])
    labels = np.concatenate([table.y_train, table.y_test])
    assert set(labels) == {0.0, 1.0} and labels.sum() == (frame["dx"] == "malignant").sum()
    task = get_task("text-classification")
    y = np.array([0, 1, 1, 0, 1], dtype=np.float32)
    p1 = np.array([0.2, 0.9, 0.4, 0.5, 0.7])
    got = task.evaluate(y, np.stack([1 - p1, p1], axis=1), loss=0.5)
    assert got["roc_auc"] == pytest.approx(roc_auc_score(y, p1))  # the binary AUC
    assert got["accuracy"] == pytest.approx(0.8)


# Task-generic features a text study must run with (issue #19): each changes how updates are
# aggregated or privatized, never what the text task computes.
GENERIC = {
    "secure-aggregation": {"strategy": {"secure_aggregation": True, "validate_updates": False}},
    "central-dp-client-side": {
        "privacy": {"central": "client-side", "central_noise_multiplier": 0.5}
    },
    "central-dp-server-side": {
        "privacy": {"central": "server-side", "central_noise_multiplier": 0.5}
    },
    "fedprox": {"strategy": {"name": "fedprox"}},
    "fedadam": {"strategy": {"name": "fedadam", "server_lr": 0.1}},
    "fedtrimmedavg": {"strategy": {"name": "fedtrimmedavg"}},
    "fedmedian": {"strategy": {"name": "fedmedian"}},
    "multikrum": {"strategy": {"name": "multikrum", "num_malicious": 0}},
}


@pytest.mark.parametrize("feature", list(GENERIC))
def test_text_studies_run_with_every_aggregation_and_central_privacy(
    tmp_path: Path, capsys: pytest.CaptureFixture, feature: str
) -> None:
    frames = [site_texts(0, n=60), site_texts(1, n=45), site_texts(2, n=50)]
    raw = text_study(tmp_path, frames, min_count=5, vocab_size=60)
    raw.update(GENERIC[feature])
    toml = tmp_path / "notes.toml"
    if feature == "secure-aggregation":  # no vocabulary query on Flower's SecAgg+ path ...
        toml.write_text(_to_toml(raw))
        assert main(["simulate", str(toml), "--quiet"]) == 2
        assert "write an agreed vocabulary in data.text.vocabulary" in capsys.readouterr().err
        raw["data"]["text"]["vocabulary"] = list(VOCABULARY)  # ... so the study brings its own
    toml.write_text(_to_toml(raw))

    assert main(["simulate", str(toml), "--quiet"]) == 0

    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [h["round"] for h in metrics["history"]] == [1, 2]
    assert not [f for h in metrics["history"] for f in h.get("failures", [])]
    assert set(metrics["final"]["sites"]) == {"site0", "site1", "site2"}
    average = metrics["final"]["average"]
    assert all(math.isfinite(average[k]) for k in ("accuracy", "macro_f1", "roc_auc", "loss"))
    from fedmed.serving.text import ServedText

    (prediction,) = ServedText(run_dir).predict(["cardiac infarction in the patients"])
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
