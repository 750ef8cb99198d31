"""Model files: safetensors + card round trip; a changed file is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmed.config import RunConfig
from fedmed.errors import ConfigError
from fedmed.serving.export import load_model, save_model
from fedmed.tasks import get_task


def _saved(cfg: RunConfig, tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    cfg = cfg.replace(
        data=cfg.data.__class__(
            builtin=cfg.data.builtin,
            schema=cfg.data.schema.__class__(target="malignant", features=("a", "b", "c")),
        )
    )
    model = get_task(cfg.task).build_model(3, cfg.model)
    return model, save_model(tmp_path, "model", model, cfg, {"metrics": {"x": 1.0}})


def test_round_trip_gives_identical_predictions(demo_config: RunConfig, tmp_path: Path) -> None:
    model, path = _saved(demo_config, tmp_path)

    loaded, card = load_model(path)

    x = torch.randn(5, 3)
    assert torch.equal(model.eval()(x), loaded(x))
    assert card["inputs"] == ["a", "b", "c"] and card["study"]["sites"] == list(
        demo_config.site_names
    )
    assert card["privacy"]["enabled"] is True


def test_tampered_weights_are_refused(demo_config: RunConfig, tmp_path: Path) -> None:
    _, path = _saved(demo_config, tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(ConfigError, match="SHA-256 does not match"):
        load_model(path)


def test_missing_card_is_a_clear_error(demo_config: RunConfig, tmp_path: Path) -> None:
    _, path = _saved(demo_config, tmp_path)
    path.with_name("model.card.json").unlink()

    with pytest.raises(ConfigError, match="model card missing"):
        load_model(path)


def test_plan_hash_covers_what_runs_and_how_long_not_where_it_is_written(
    demo_config: RunConfig,
) -> None:
    from fedmed.security.policy import plan_hash

    longer = demo_config.replace(rounds=50)  # more rounds spend more of a site's privacy
    wider = demo_config.replace(model=demo_config.model.__class__(kind="mlp", hidden=(64,)))
    elsewhere = demo_config.replace(name="renamed", output_dir="/elsewhere")

    assert plan_hash(demo_config) != plan_hash(longer)
    assert plan_hash(demo_config) != plan_hash(wider)
    assert plan_hash(demo_config) == plan_hash(elsewhere)
    assert plan_hash(demo_config).startswith("sha256:")
