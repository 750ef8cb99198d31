"""A site's plan and data are worked out once per plan, however many sites and messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedmed import config
from fedmed.config import RunConfig, parse_run_config
from fedmed.data.registry import DatasetRegistry
from fedmed.privacy.accounting import CACHE_ENV
from fedmed.protocol import RUN_KEY, SITE_CONFIG_KEY, STUDY_KEY
from fedmed.site import inputs
from fedmed.site.app import app
from fedmed.tasks import build_model
from tests.conftest import write_site_csv

SITES = 40  # more than the 32 sites the former per-site LRU held


def _study(tmp_path: Path, sites: int, **changes: object) -> RunConfig:
    listed = [
        {"name": f"h{i:02d}", "path": str(write_site_csv(tmp_path / f"h{i:02d}.csv", 40, seed=i))}
        for i in range(sites)
    ]
    raw = {
        "model": {"kind": "logreg"},
        "train": {"batch_size": 8, "local_steps": 1},
        "data": {
            "schema": {
                "target": "outcome",
                "features": ["age", "bp", "smoker"],
                "categorical": {"smoker": ["no", "yes"]},
            }
        },
        "sites": listed,
        **changes,
    }
    return parse_run_config(raw)


def _deliver(text: str, cfg: RunConfig, site: int, server_round: int, kind: str) -> Message:
    """One coordinator message to simulated site ``site`` (partition-id), as a runtime sends it."""
    plan = ConfigRecord({RUN_KEY: text, STUDY_KEY: "s1", "server-round": server_round})
    arrays = ArrayRecord(build_model(cfg).state_dict())
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    msg = Message(RecordDict({"arrays": arrays, "config": plan}), 1001 + site, kind, group_id="1")
    TaskIdentity.node_id = 1001 + site
    context = Context(1, 1001 + site, {"partition-id": site}, RecordDict(), {})
    reply = app(msg, context)
    assert not reply.has_error(), reply.error.reason
    return reply


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch, task_identity: None) -> dict[str, list]:
    """Every table load, RunConfig validation and whole-plan serialization, recorded."""
    seen: dict[str, list] = {"loads": [], "checks": [], "serialized": []}
    load, check, to_dict = inputs.load_site_data, config._check_run, RunConfig.to_dict
    monkeypatch.setattr(
        inputs,
        "load_site_data",
        lambda run, site: seen["loads"].append(site.name) or load(run, site),
    )
    monkeypatch.setattr(config, "_check_run", lambda cfg: seen["checks"].append(cfg) or check(cfg))
    monkeypatch.setattr(
        RunConfig, "to_dict", lambda self: seen["serialized"].append(self) or to_dict(self)
    )
    inputs.plan_inputs.cache_clear()
    yield seen
    inputs.plan_inputs.cache_clear()


def test_every_site_loads_its_data_once_for_the_whole_run(
    tmp_path: Path, counted: dict[str, list]
) -> None:
    cfg = _study(tmp_path, SITES)
    text = cfg.to_json()
    config.plan_from_json(text)  # the coordinator's own process parsed it already
    for seen in counted.values():
        seen.clear()

    for server_round in (1, 2):
        for kind in ("train", "evaluate"):
            for site in range(SITES):
                _deliver(text, cfg, site, server_round, kind)

    assert sorted(counted["loads"]) == sorted(s.name for s in cfg.sites)  # 160 messages
    assert counted["checks"] == []  # no RunConfig rebuilt (and revalidated) per message
    assert counted["serialized"] == []  # nor the whole plan serialized again


def test_a_decaying_learning_rate_builds_one_config_per_round_not_per_message(
    tmp_path: Path, counted: dict[str, list]
) -> None:
    cfg = _study(tmp_path, 3, train={"batch_size": 8, "local_steps": 1, "lr_decay": 0.5})
    text = cfg.to_json()
    config.plan_from_json(text)
    counted["checks"].clear()

    for server_round in (1, 2, 3):
        for site in range(3):
            _deliver(text, cfg, site, server_round, "train")

    assert [c.train.lr for c in counted["checks"]] == [cfg.train.lr * 0.5, cfg.train.lr * 0.25]


def test_a_new_plan_evicts_the_oldest_and_its_data_reloads(
    tmp_path: Path, counted: dict[str, list]
) -> None:
    plans = [_study(tmp_path, 2, seed=seed) for seed in range(inputs.PLANS_KEPT + 1)]
    texts = [p.to_json() for p in plans]

    for cfg, text in zip(plans, texts, strict=True):
        _deliver(text, cfg, 0, 1, "evaluate")
    _deliver(texts[-1], plans[-1], 0, 2, "evaluate")  # the newest plan: still in memory
    before = len(counted["loads"])
    _deliver(texts[0], plans[0], 0, 2, "evaluate")  # the oldest: dropped, loaded again

    assert inputs.plan_inputs.cache_info().currsize == inputs.PLANS_KEPT
    assert before == inputs.PLANS_KEPT + 1
    assert len(counted["loads"]) == before + 1


# -- a deployed site: every message in a fresh forked child, sharing the executor's cache folder --


def _deployed_site(tmp_path: Path, seed: int = 1) -> tuple[Context, Path, DatasetRegistry]:
    state = tmp_path / "state"
    registry = DatasetRegistry(state)
    registry.add("cohort", write_site_csv(tmp_path / "alpha.csv", 60, seed=seed), replace=True)
    site = tmp_path / "alpha.toml"
    site.write_text(f'name = "alpha"\ninsecure = true\nstate_dir = "{state}"\nmin_rows = 10\n')
    return Context(1, 1001, {SITE_CONFIG_KEY: str(site)}, RecordDict(), {}), state, registry


def _deployed_plan(seed: int = 0) -> str:
    raw = {
        "seed": seed,
        "model": {"kind": "logreg"},
        "data": {
            "dataset": "cohort",
            "schema": {
                "target": "outcome",
                "features": ["age", "bp", "smoker"],
                "categorical": {"smoker": ["no", "yes"]},
            },
        },
        "sites": [{"name": "alpha"}, {"name": "beta"}],
    }
    return parse_run_config(raw).to_json()


def _fresh_child() -> None:
    """What a forked child of the site executor starts with: no plan in memory."""
    inputs.plan_inputs.cache_clear()


def test_a_deployed_sites_children_share_its_prepared_data_through_its_cache_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted: dict[str, list]
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "state" / "cache"))
    context, state, registry = _deployed_site(tmp_path)
    text = _deployed_plan()

    first = inputs.site_inputs(text, context)
    _fresh_child()
    second = inputs.site_inputs(text, context)
    (cached,) = (state / "cache" / "site-data").glob("*/*.npz")

    assert counted["loads"] == ["alpha"]  # the second child read the first one's arrays
    assert second.data is not first.data
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(second.data, name), getattr(first.data, name))
        assert getattr(second.data, name).dtype == getattr(first.data, name).dtype
    assert second.data.input_names == first.data.input_names
    assert second.data.preprocessing == first.data.preprocessing
    assert second.ledger_key == first.ledger_key == registry.verify("cohort").sha256
    assert cached.stat().st_mode & 0o077 == 0  # derived from patient rows: the site's only

    _deployed_site(tmp_path, seed=7)  # the steward re-registers a new export at the same path
    _fresh_child()
    third = inputs.site_inputs(text, context)

    assert counted["loads"] == ["alpha", "alpha"]
    assert not np.array_equal(third.data.x_train, first.data.x_train)


def test_a_damaged_cache_file_is_ignored_and_old_plans_folders_are_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted: dict[str, list]
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "state" / "cache"))
    context, state, _ = _deployed_site(tmp_path)
    texts = [_deployed_plan(seed) for seed in range(inputs.PLANS_KEPT + 1)]
    first = inputs.site_inputs(texts[0], context)
    (cached,) = (state / "cache" / "site-data").glob("*/*.npz")
    cached.write_bytes(b"not an npz")

    _fresh_child()
    again = inputs.site_inputs(texts[0], context)
    for text in texts[1:]:
        _fresh_child()
        inputs.site_inputs(text, context)

    assert counted["loads"] == ["alpha"] * (len(texts) + 1)  # the damaged file: loaded again
    assert np.array_equal(again.data.x_train, first.data.x_train)
    assert len(list((state / "cache" / "site-data").iterdir())) == inputs.PLANS_KEPT
