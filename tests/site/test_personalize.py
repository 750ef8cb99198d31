"""Personalization: sites fine-tune the final model locally and report before/after metrics."""

from __future__ import annotations

import threading

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmed.cli.main import main
from fedmed.config import (
    PersonalizeConfig,
    PrivacyConfig,
    RunConfig,
    StrategyConfig,
    load_run_config,
    resolve_config_path,
)
from fedmed.errors import ConfigError
from fedmed.site.app import evaluate_global, personalize_final, train
from tests.runtime.test_runtime import _run


def test_each_site_reports_before_and_after_fine_tuning(csv_study: RunConfig) -> None:
    cfg = csv_study.replace(rounds=2, personalize=PersonalizeConfig(local_epochs=3, lr=0.2))

    out = _run(cfg)

    personalized = out["final"]["personalized"]
    assert set(personalized["sites"]) == set(cfg.site_names)
    for site, result in personalized["sites"].items():
        # "before" is the final global model on the site's test split: the last round's numbers.
        assert result["before"]["loss"] == pytest.approx(out["final"]["sites"][site]["loss"])
    assert any(r["after"]["loss"] != r["before"]["loss"] for r in personalized["sites"].values())
    mean_after = sum(r["after"]["accuracy"] for r in personalized["sites"].values()) / 3
    assert personalized["average"]["after"]["accuracy"] == pytest.approx(mean_after)


def test_personalization_is_refused_under_differential_privacy() -> None:
    path = resolve_config_path("demo")  # local DP on
    with pytest.raises(ConfigError, match="outside the study's privacy calibration"):
        load_run_config(path, ["personalize.local_epochs=1"])
    cfg = load_run_config(path, ["privacy.enabled=false"])
    with pytest.raises(ConfigError, match="set personalize.local_epochs = 0"):
        cfg.replace(
            privacy=PrivacyConfig(central="client-side"),
            personalize=PersonalizeConfig(local_epochs=1),
        )


def test_cli_summary_shows_the_personalized_table(tmp_path, capsys) -> None:
    args = ["simulate", "demo", "--set", "rounds=1", "--set", "privacy.enabled=false"]
    args += ["--set", "personalize.local_epochs=1", "--output-dir", str(tmp_path)]

    assert main(args) == 0

    out = capsys.readouterr().out
    assert "personalized: 1 local epoch(s) per site" in out and "→" in out


def test_a_site_that_hangs_in_personalization_is_named(csv_study: RunConfig) -> None:
    released = threading.Event()
    app = ClientApp()
    app.train()(train)
    app.evaluate()(evaluate_global)

    @app.evaluate("personalize")
    def hang_gamma(msg: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) == 2:
            released.wait(timeout=60)  # far beyond the deadline
        return personalize_final(msg, context)

    cfg = csv_study.replace(
        rounds=1,
        personalize=PersonalizeConfig(local_epochs=1),
        # Long enough for the healthy sites on 2 busy cores (1 s timed them out, e.g. under -n 2).
        strategy=StrategyConfig(round_timeout=10.0),
    )
    try:
        out = _run(cfg, app)
    finally:
        released.set()

    assert set(out["final"]["personalized"]["sites"]) == {"alpha", "beta"}
    (failure,) = out["history"][-1]["failures"]
    assert failure["site"] == "gamma" and failure["phase"] == "personalize"
