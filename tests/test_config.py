"""Config: parsed once, unknown keys and bad values rejected with the fix in the message."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmed.config import (
    RunConfig,
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
