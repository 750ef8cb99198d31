"""Secure aggregation (SecAgg+): the coordinator learns only the SUM of the sites' updates.

Flower 1.41 implements SecAgg+ only on its legacy API (``LegacyContext`` + ``DefaultWorkflow`` +
``SecAggPlusWorkflow`` on the server, a ``client_fn`` ClientApp with ``secaggplus_mod`` at the
sites); with the Message API it fails. So a secure study runs this separate, thin pair of apps
around the same site logic (``client_app.local_round`` / ``local_evaluate``) and the same
history, report and outputs as every other run.

What composes with it (checked in config.py, each refusal names the fix): FedAvg only, because
the server sees only the weighted mean (median, Krum and the server optimizers need the
individual updates or are not written for the legacy strategy here); local DP-SGD at the sites
(noise is added before masking); no update validation, no central DP, no personalization and no
--resume on this path yet. Site-level train metrics still arrive (they are not masked), so ε per
site is reported as usual. A site that drops out mid-protocol is tolerated while at least
``reconstruction_threshold`` of its neighbours' shares arrive.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    EvaluateRes,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedmed.client_app import RUN_KEY, STUDY_KEY, local_evaluate, local_round
from fedmed.report import RunHistory
from fedmed.study import RunPlan, finish_run

SITE = "site"  # metrics key naming the replying site (legacy metrics may be strings)


def _state(keys: list[str], arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(a).copy()) for k, a in zip(keys, arrays, strict=True)}


class SiteClient(NumPyClient):
    """One hospital on the legacy API; the work is client_app's, shared with every other path."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        run_json = str(config[RUN_KEY])
        keys = str(config["keys"]).split(",")
        site, state, metrics = local_round(run_json, self.context, _state(keys, parameters), config)
        arrays = [v.numpy() for v in state.values()]
        return arrays, int(metrics["num-examples"]), {**metrics, SITE: site.name}

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        keys = str(config["keys"]).split(",")
        site, metrics = local_evaluate(str(config[RUN_KEY]), self.context, _state(keys, parameters))
        return float(metrics["loss"]), int(metrics["num-examples"]), {**metrics, SITE: site.name}


client_app = ClientApp(
    client_fn=lambda context: SiteClient(context).to_client(), mods=[secaggplus_mod]
)


class RecordingFedAvg(FedAvg):
    """Flower's legacy FedAvg, recording each site's metrics into the run's history."""

    def __init__(self, history: RunHistory, on_round: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.history = history
        self.on_round = on_round
        self.latest: Parameters | None = None

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self._record(server_round, "train", [res.metrics for _, res in results], failures)
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is not None:
            self.latest = parameters
        return parameters, metrics

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        self._record(server_round, "evaluate", [res.metrics for _, res in results], failures)
        out = super().aggregate_evaluate(server_round, results, failures)
        self.on_round(server_round)
        return out

    def _record(
        self, server_round: int, phase: str, replies: list[dict[str, Scalar]], failures: list
    ) -> None:
        """Each site's metrics; every site without a reply is named as failed.

        Flower's failures here are bare exceptions without a node, so the missing sites are
        found by name instead (a site dropped mid-protocol still answered nothing usable).
        """
        for metrics in replies:
            numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            self.history.record(server_round, phase, str(metrics[SITE]), numbers)
        answered = {str(m[SITE]) for m in replies}
        for site in self.history.sites:
            if site not in answered:
                reason = f"site '{site}': no {phase} result (dropped out, failed or timed out)"
                self.history.record_failure(server_round, phase, reason)


def run_secure(grid: Grid, plan: RunPlan, context: Context, on_round: Any) -> dict:
    """The study's rounds with SecAgg+ FedAvg; same outputs as ``server_app.run_federated``."""
    from fedmed.server_app import initial_model
    from fedmed.study import live_reporter

    started = time.time()
    cfg = plan.config
    history = RunHistory(sites=cfg.site_names)
    model = initial_model(plan)
    keys = list(model.state_dict())
    report = live_reporter(plan, on_round)
    n = len(cfg.sites)
    needed = cfg.strategy.min_sites or n

    def round_config(server_round: int) -> dict[str, Scalar]:
        return {
            RUN_KEY: cfg.to_json(),
            STUDY_KEY: plan.run_dir.name,
            "server-round": server_round,
            "keys": ",".join(keys),
        }

    strategy = RecordingFedAvg(
        history,
        lambda rnd: report(rnd, history),
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=n,
        min_evaluate_clients=needed,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters([v.numpy() for v in model.state_dict().values()]),
        on_fit_config_fn=round_config,
        on_evaluate_config_fn=round_config,
        accept_failures=True,
    )
    legacy = LegacyContext(
        context,
        config=ServerConfig(num_rounds=cfg.rounds, round_timeout=cfg.strategy.round_timeout),
        strategy=strategy,
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=n,
            # Flower needs threshold < shares; below min_sites survivors the round is lost anyway.
            reconstruction_threshold=max(1, min(needed, n - 1)),
            timeout=cfg.strategy.round_timeout,
        )
    )
    workflow(grid, legacy)
    if strategy.latest is not None:
        arrays = parameters_to_ndarrays(strategy.latest)
        model.load_state_dict(_state(keys, [a.astype(np.float32) for a in arrays]))
    return finish_run(plan, history, {"model": model}, started)
