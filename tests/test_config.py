"""Config: parsed once, unknown keys and bad values rejected with the fix in the message."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pytest

from fedmed.config import (
    FrozenMap,
    RunConfig,
    SchemaConfig,
    SimulationConfig,
    SiteConfig,
    apply_override,
    load_run_config,
    parse_run_config,
    resolve_config_path,
)
from fedmed.errors import ConfigError


def test_shipped_demo_parses_with_four_sites_and_privacy() -> None:
    cfg = load_run_config(resolve_config_path(None))

    assert cfg.name == "demo"
    assert len(cfg.sites) == 4
    assert cfg.privacy.enabled is True
    assert cfg.data.builtin == "sklearn:breast_cancer"


def test_unknown_key_names_the_key_and_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\nrounds = 2\nroundz = 3\n[[sites]]\nname = "a"\npath = "a.csv"\n')

    with pytest.raises(ConfigError) as err:
        load_run_config(path)

    assert "roundz" in str(err.value)
    assert "rounds" in str(err.value)  # the valid keys are listed


def test_unknown_nested_key_names_its_table() -> None:
    with pytest.raises(ConfigError, match=r"train\.lrr.*valid keys: .*lr"):
        parse_run_config({"train": {"lrr": 0.1}, "sites": [{"name": "a", "path": "a.csv"}]})


def test_bad_choice_lists_the_valid_choices() -> None:
    with pytest.raises(ConfigError, match="optimizer='rmsprop'.*sgd"):
        parse_run_config(
            {"train": {"optimizer": "rmsprop"}, "sites": [{"name": "a", "path": "a.csv"}]}
        )


def test_wrong_type_is_rejected() -> None:
    with pytest.raises(ConfigError, match="rounds must be an integer"):
        parse_run_config({"rounds": "many", "sites": [{"name": "a", "path": "a.csv"}]})


def test_override_sets_nested_values_and_is_validated() -> None:
    cfg = load_run_config(
        resolve_config_path("demo"), ["rounds=20", "train.lr=0.01", "privacy.enabled=false"]
    )

    assert cfg.rounds == 20
    assert cfg.train.lr == pytest.approx(0.01)
    assert cfg.privacy.enabled is False
    with pytest.raises(ConfigError, match="unknown config key 'privacy.epsilon'"):
        load_run_config(resolve_config_path("demo"), ["privacy.epsilon=1"])


def test_override_needs_key_value() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "rounds")


def test_local_steps_and_epochs_are_exclusive() -> None:
    with pytest.raises(ConfigError, match="only one of"):
        load_run_config(resolve_config_path("demo"), ["train.local_steps=10"])
    cfg = load_run_config(
        resolve_config_path("demo"), ["train.local_steps=10", "train.local_epochs=none"]
    )
    assert cfg.train.local_steps == 10


def test_json_round_trip_is_exact(demo_config: RunConfig) -> None:
    again = RunConfig.from_json(demo_config.to_json())

    assert again == demo_config


def _mutable_parts(obj: Any, where: str = "cfg") -> list[str]:
    """Every list, dict or set inside a config, at any depth (there should be none)."""
    if dataclasses.is_dataclass(obj):
        return [
            p
            for f in dataclasses.fields(obj)
            for p in _mutable_parts(getattr(obj, f.name), f"{where}.{f.name}")
        ]
    if isinstance(obj, list | dict | set):
        return [where]
    if isinstance(obj, FrozenMap):
        return [p for k, v in obj.items() for p in _mutable_parts(v, f"{where}[{k!r}]")]
    if isinstance(obj, tuple):
        return [p for i, v in enumerate(obj) for p in _mutable_parts(v, f"{where}[{i}]")]
    return []


@pytest.mark.parametrize("name", ["demo", "federation", "heart_disease", "lung", "physionet2012"])
def test_config_is_hashable_all_the_way_down(name: str) -> None:
    cfg = load_run_config(
        resolve_config_path(name),
        ['data.schema.categorical={sex = ["F", "M"], grade = [1, [2, 3]]}'],
    )
    again = RunConfig.from_json(cfg.to_json())

    assert _mutable_parts(cfg) == []
    assert again == cfg and hash(again) == hash(cfg)
    assert {cfg: 1}[again] == 1  # usable as a cache key
    assert again.to_json() == cfg.to_json()
    assert hash(cfg.replace(rounds=cfg.rounds + 1)) != hash(cfg)


def test_categorical_reads_like_a_dict_but_cannot_change() -> None:
    schema = SchemaConfig(categorical={"smoker": ["no", "yes"]}, features=["age", "smoker"])

    assert _mutable_parts(schema) == []  # frozen even when built in code with lists and dicts
    assert schema.categorical["smoker"] == ("no", "yes")
    assert schema.categorical.get("age") is None and "smoker" in schema.categorical
    assert dict(schema.categorical.items()) == {"smoker": ("no", "yes")}
    assert schema.categorical == {"smoker": ("no", "yes")}
    assert hash(schema) == hash(
        SchemaConfig(categorical={"smoker": ("no", "yes")}, features=("age", "smoker"))
    )
    with pytest.raises(TypeError):
        schema.categorical["smoker"] = ("maybe",)  # type: ignore[index]
    site = SiteConfig(name="lakeview", insecure=True, approved_plans=["sha256:" + "0" * 64])
    assert hash(site) == hash(dataclasses.replace(site))


# Computed with fedmed as of 4409f87, before the config's tables were frozen: the wire
# JSON and the plan hash a site approves must not move for an unchanged config.
PINNED = {
    "name": "pinned",
    "rounds": 3,
    "privacy": {"enabled": True, "target_epsilon": 2.0},
    "data": {
        "site_column": "hospital",
        "schema": {
            "target": "outcome",
            "features": ["age", "sex", "grade"],
            "categorical": {"sex": ["F", "M"], "grade": [1, 2, 3]},
            "event_value": "dead",
        },
    },
    "sites": [
        {"name": "alpha", "path": "all.csv", "site_values": [1, "a"]},
        {"name": "beta", "path": "all.csv", "site_values": [2]},
    ],
}


def test_wire_json_and_plan_hash_are_unchanged() -> None:
    from fedmed.security.policy import plan_hash

    cfg = parse_run_config(PINNED)
    text = cfg.to_json()

    assert hashlib.sha256(text.encode()).hexdigest() == (
        "87c1a78ff13fadd672535d17831b5fc40575f092f585413cdf7c466681826a72"
    )
    assert plan_hash(cfg) == (
        "sha256:f426621aee5cb35fcc5643ddfb168c3d9c2f02f26934f93b9b8442b966cfef23"
    )
    assert plan_hash(RunConfig.from_json(text)) == plan_hash(cfg)


def test_simulation_resources_travel_only_when_set_and_are_not_in_the_plan_hash() -> None:
    from fedmed.security.policy import plan_hash

    plain = parse_run_config(PINNED)
    on_a_cluster = parse_run_config(
        {**PINNED, "simulation": {"cpus_per_site": 2, "gpus_per_site": 0.5}}
    )

    assert plain.simulation == SimulationConfig(cpus_per_site=1.0, gpus_per_site=None)
    assert "simulation" not in plain.to_dict()  # the wire JSON pinned above stays as it was
    assert on_a_cluster.to_dict()["simulation"] == {"cpus_per_site": 2.0, "gpus_per_site": 0.5}
    assert RunConfig.from_json(on_a_cluster.to_json()) == on_a_cluster
    assert plan_hash(on_a_cluster) == plan_hash(plain)  # where sites run, not what they compute


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "simulation.cpus_per_site=0",
            r"simulation.cpus_per_site = 0.0 is out of range.*0.5 = two",
        ),
        ("simulation.cpus_per_site=2048", r"\[0.0001, 1024\].*--set simulation.cpus_per_site="),
        (
            "simulation.gpus_per_site=-1",
            r"simulation.gpus_per_site = -1.0 is out of range.*0 = none",
        ),
        ("simulation.gpus_per_site=0.00001", r"finer than Ray's 0.0001 of a GPU; give at least"),
        ("simulation.cpus=2", r"unknown config key 'simulation.cpus'.*cpus_per_site, gpus_per"),
    ],
)
def test_simulation_resources_are_refused_naming_the_fix(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_run_config(resolve_config_path("demo"), [override])


def test_config_is_frozen(demo_config: RunConfig) -> None:
    with pytest.raises(AttributeError):
        demo_config.rounds = 3  # type: ignore[misc]


def test_missing_config_file_lists_shipped_configs() -> None:
    with pytest.raises(ConfigError, match="demo.*heart_disease|heart_disease.*demo"):
        resolve_config_path("no_such_study.toml")


def test_federated_needs_two_sites_and_unique_names() -> None:
    with pytest.raises(ConfigError, match="at least 2 sites"):
        parse_run_config({"sites": [{"name": "a", "path": "a.csv"}]})
    with pytest.raises(ConfigError, match="unique"):
        parse_run_config({"sites": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]})


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("rounds = = 3\n")

    with pytest.raises(ConfigError, match="not valid TOML"):
        load_run_config(path)


def test_a_site_parses_and_hashes_a_plan_once_however_many_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployed site's audit mod, policy mod and handlers all read the plan each message
    carries: one process parses it and computes its plan hash once (fedmed.config.plan_from_json
    and plan_digest), then reuses both for every later message with the same plan."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedmed import config
    from fedmed.data.registry import DatasetRegistry
    from fedmed.protocol import RUN_KEY, SITE_CONFIG_KEY, STUDY_KEY
    from fedmed.security import policy
    from fedmed.site.app import app
    from fedmed.tasks import build_model
    from tests.conftest import write_site_csv

    cfg = parse_run_config(
        {
            "model": {"kind": "logreg"},
            "train": {"batch_size": 8},
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
    )
    state = tmp_path / "state" / "alpha"
    DatasetRegistry(state).add("cohort", write_site_csv(tmp_path / "alpha.csv", 60, seed=1))
    site = tmp_path / "alpha.toml"
    site.write_text(
        f'name = "alpha"\ninsecure = true\nstate_dir = "{state}"\n'
        f'approved_plans = ["{policy.plan_hash(cfg)}"]\nmin_rows = 10\n'
    )
    parses: list[str] = []
    hashes: list[RunConfig] = []
    from_json, plan_hash = RunConfig.from_json, policy.plan_hash
    monkeypatch.setattr(
        RunConfig, "from_json", classmethod(lambda _, text: parses.append(text) or from_json(text))
    )
    monkeypatch.setattr(policy, "plan_hash", lambda run: hashes.append(run) or plan_hash(run))
    config.plan_from_json.cache_clear()
    policy.plan_digest.cache_clear()
    for key, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, key, value)  # what a runtime sets, restored after
    context = Context(1, 1001, {SITE_CONFIG_KEY: str(site)}, RecordDict(), {})
    text = cfg.to_json()
    arrays = ArrayRecord(build_model(cfg).state_dict())

    for server_round in (1, 2):
        for kind in ("train", "evaluate"):
            plan = ConfigRecord({RUN_KEY: text, STUDY_KEY: "s1", "server-round": server_round})
            TaskIdentity.node_id = SUPERLINK_NODE_ID  # the coordinator sends ...
            msg = Message(RecordDict({"arrays": arrays, "config": plan}), 1001, kind, group_id="1")
            TaskIdentity.node_id = 1001  # ... the site handles and replies
            reply = app(msg, context)
            assert not reply.has_error(), reply.error.reason

    assert parses == [text]  # 4 messages, each read by 2 mods and a handler: 1 parse
    assert len(hashes) == 1
    assert config.plan_from_json.cache_info().misses == 1
    assert policy.plan_digest.cache_info().misses == 1
    # A plan that does not parse is not cached: it raises every time it arrives.
    for _ in range(2):
        with pytest.raises(ConfigError, match="roundz"):
            config.plan_from_json('{"roundz": 1}')
    assert config.plan_from_json.cache_info().currsize == 1


def test_an_omop_visit_study_keeps_its_plan_when_condition_indexes_exist() -> None:
    """[data.omop] grew index and condition_concept_ids: a study that leaves them alone sends
    the plan (and so the hash a site approved) it sent before they existed."""
    from fedmed.security.policy import plan_hash

    cfg = load_run_config(resolve_config_path("physionet2012-omop"))
    text = cfg.to_json()

    assert hashlib.sha256(text.encode()).hexdigest() == (
        "cfaaa3b33119cfde73dc3c3734fa51c49689dfb597912bcde17dc2aec37517ca"
    )
    assert plan_hash(cfg) == (
        "sha256:94e964e07742ee1ee47ddb3fe550979501fb94492cadeceed0da3dfe54b9a3a9"
    )
    assert not {"index", "condition_concept_ids"} & set(cfg.to_dict()["data"]["omop"])


def test_an_omop_condition_index_travels_in_the_plan_and_changes_its_hash() -> None:
    from fedmed.security.policy import plan_hash

    visit = load_run_config(resolve_config_path("physionet2012-omop"))
    omop = dataclasses.replace(
        visit.data.omop, visit_concept_ids=(), index="condition", condition_concept_ids=(201826,)
    )
    cfg = visit.replace(data=dataclasses.replace(visit.data, omop=omop))

    sent = cfg.to_dict()["data"]["omop"]
    assert sent["index"] == "condition" and sent["condition_concept_ids"] == [201826]
    assert RunConfig.from_json(cfg.to_json()) == cfg
    assert plan_hash(cfg) != plan_hash(visit)
    assert cfg.data.omop.active and cfg.data.omop.index_concept_ids == (201826,)


@pytest.mark.parametrize(
    ("omop", "message"),
    [
        ({"index": "condition"}, "set data.omop.condition_concept_ids"),
        (
            {"index": "condition", "condition_concept_ids": [201826], "visit_concept_ids": [9201]},
            "remove data.omop.visit_concept_ids",
        ),
        ({"condition_concept_ids": [201826], "visit_concept_ids": [9201]}, 'set index = "cond'),
        ({"index": "drug", "condition_concept_ids": [1]}, "choose one of: visit, condition"),
        ({"index": "condition", "condition_concept_ids": ["201826) OR (1=1"]}, "an integer"),
        (
            {"index": "condition", "condition_concept_ids": [201826], "outcome": "condition",
             "outcome_concept_ids": [197320, 201826]},
            "share concept 201826",
        ),
        (
            {"visit_concept_ids": [9201],
             "features": [{"name": "smoker", "domain": "observation", "aggregate": "presence",
                           "concept_ids": [1]}]},
            "choose one of: last, first, mean, min, max, count",
        ),
        (
            {"visit_concept_ids": [9201],
             "features": [{"name": "smoker", "domain": "observation", "aggregate": "count"}]},
            "list its concept_ids",
        ),
    ],
)  # fmt: skip
def test_omop_index_and_observation_mistakes_name_the_fix(
    omop: dict[str, Any], message: str
) -> None:
    raw = {"mode": "local", "sites": [{"name": "a", "path": "duckdb:///a.duckdb"}]}
    raw["data"] = {"omop": {"features": [{"name": "age", "domain": "person",
                                          "aggregate": "age"}]} | omop}  # fmt: skip

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_run_config(raw)
