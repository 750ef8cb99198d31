"""Secure aggregation (SecAgg+): the coordinator learns only the SUM of the sites' updates.

Flower 1.41 implements SecAgg+ only on its legacy API (``LegacyContext`` + ``DefaultWorkflow`` +
``SecAggPlusWorkflow`` on the server, a ``client_fn`` ClientApp with ``secaggplus_mod`` at the
sites); with the Message API it fails. So a secure study runs this separate, thin pair of apps
around the same site logic (``client_app.local_round`` / ``local_evaluate``) and the same
history, report and outputs as every other run, in simulation and in deployment.

One secure round is four ``train`` exchanges (setup: public keys; share keys: encrypted key
shares; collect masked vectors: the site trains and uploads its masked update; unmask: shares to
remove the masks) and one ``evaluate``. The site's policy and audit mods sit outside
``secaggplus_mod``, so every stage is audited and a site that has not approved the plan refuses
at setup, before it holds anyone's key shares or reads a row. The setup and unmask messages
carry no fit config, so the coordinator stamps the plan on every message (``PlanStampingGrid``).

What composes with it (checked in config.py, each refusal names the fix): FedAvg only, because
the server sees only the mean (median, Krum and the server optimizers need the individual
updates or are not written for the legacy strategy here); local DP-SGD at the sites (noise is
added before masking); central DP with CLIENT-side clipping: each site clips its update and
gives it unit weight BEFORE masking (``secure_clipping_mod`` inside ``secaggplus_mod``), the
coordinator adds Gaussian noise to the unmasked mean (``SecureCentralDP``). No update
validation, no server-side clipping (the server never sees an individual update), no
personalization. The coordinator checkpoints every round, so --resume works here too.
Site-level train metrics still arrive (they are not masked), so ε per site is reported as
usual. A site that drops out after sharing its keys is tolerated while at least
``reconstruction_threshold`` (= ``strategy.min_sites``, at least 2) of its neighbours' shares
arrive; one that refuses or fails at setup is simply left out of the round.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.common import (
    EvaluateRes,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import add_gaussian_noise_to_params

from fedmed.coordinator.grid import GridWrapper
from fedmed.protocol import PLAN_RECORD, RUN_KEY, SITE_KEY, STUDY_KEY, to_state
from fedmed.study.history import RunHistory
from fedmed.study.outputs import finish_run
from fedmed.study.plan import RunPlan


class RecordingFedAvg(FedAvg):
    """Flower's legacy FedAvg, recording each site's metrics (and who failed, why) per round."""

    def __init__(self, history: RunHistory, on_round: Callable[[int], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.history = history
        self.on_round = on_round

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self._record(server_round, "train", [res.metrics for _, res in results], failures)
        return super().aggregate_fit(server_round, results, failures)

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

        Flower's failures here are bare errors without a node (and SecAgg+ lists some twice):
        a site's own wire-safe reason ("site 'x': ...") is kept, every other missing site gets
        a generic one.
        """
        for metrics in replies:
            numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            self.history.record(server_round, phase, str(metrics[SITE_KEY]), numbers)
        answered = {str(m[SITE_KEY]) for m in replies}
        reasons = _site_reasons(failures)
        lost = any(isinstance(f, SecureRoundLost) for f in failures)
        for site in self.history.sites:
            if site not in answered:
                generic = (
                    "secure round lost: fewer sites than strategy.min_sites completed SecAgg+"
                    if lost
                    else f"no {phase} result (dropped out, failed or timed out)"
                )
                self.history.record_failure(
                    server_round, phase, reasons.get(site, f"site '{site}': {generic}")
                )


class SecureRoundLost(RuntimeError):
    """Too few sites got through a SecAgg+ stage to unmask the sum: the round aggregates nothing."""


_SITE_REASON = re.compile(r"site '([^']+)': ")


def _site_reasons(failures: list) -> dict[str, str]:
    """Site name -> the reason it sent, for failures that carry one."""
    out: dict[str, str] = {}
    for failure in failures:
        error = failure.args[0] if isinstance(failure, BaseException) and failure.args else None
        reason = str(getattr(error, "reason", "") or "")
        match = _SITE_REASON.match(reason)
        if match:
            out.setdefault(match.group(1), reason)
    return out


class SecureCentralDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping wrapper, made to survive a dropout honestly.

    Flower's legacy wrapper sends the clipping norm (kept) and adds noise of std
    σ·C/num_sampled_clients, but drops the whole round when any site failed, because with fewer
    sites that noise would be too small for the mean it protects. Here the noise is scaled to the
    sites actually aggregated (σ·C/k for a mean of k clipped updates), so the Gaussian mechanism
    keeps multiplier σ each round and ``strategies.central_epsilon`` stays the true ε.
    """

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        parameters, metrics = self.strategy.aggregate_fit(server_round, results, failures)
        if parameters is None or not results:
            return parameters, metrics
        noised = add_noise(parameters, self.noise_multiplier, self.clipping_norm, len(results))
        return noised, metrics


def add_noise(parameters: Parameters, sigma: float, clipping_norm: float, sites: int) -> Parameters:
    """Gaussian noise of std σ·C/sites on the mean of ``sites`` clipped updates (Flower's)."""
    return add_gaussian_noise_to_params(parameters, sigma, clipping_norm, sites)


class PlanStampingGrid(GridWrapper):
    """Every message the secure workflow sends carries the plan; every wait has a deadline.

    SecAgg+'s setup, share-keys and unmask messages carry only protocol data, so a site could
    not tell which study they belong to: stamping the plan (``PLAN_RECORD``) lets its policy mod
    check it and its audit log name it at every stage. Flower's legacy evaluate step waits for
    replies without a timeout (a site that died would hang the study): give it the round's.
    """

    def __init__(self, grid: Grid, plan: dict[str, str], timeout: float, done: int = 0) -> None:
        super().__init__(grid)
        self.plan = plan
        self.timeout = timeout
        self.done = done  # rounds completed before a resume: Flower's workflow counts from 1

    def _stamp(self, messages: Iterable[Message]) -> list[Message]:
        out = list(messages)
        for msg in out:  # the workflow sends every message of a round with the round as group
            true_round = int(msg.metadata.group_id) + self.done
            msg.content[PLAN_RECORD] = ConfigRecord({**self.plan, "server-round": true_round})
        return out

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(self._stamp(messages))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.grid.send_and_receive(self._stamp(messages), timeout=timeout or self.timeout)


class ResumedRounds(Strategy):
    """Rounds numbered from ``done + 1`` after a resume (Flower's legacy workflow counts from 1),
    so seeds, history, checkpoints and central ε see the true round."""

    def __init__(self, inner: Strategy, done: int) -> None:
        self.inner = inner
        self.done = done

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any):
        return self.inner.configure_fit(server_round + self.done, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list, failures: list):
        return self.inner.aggregate_fit(server_round + self.done, results, failures)

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any):
        return self.inner.configure_evaluate(server_round + self.done, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: list, failures: list):
        return self.inner.aggregate_evaluate(server_round + self.done, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters):
        return self.inner.evaluate(server_round + self.done, parameters)


class SecureRounds(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, with two changes for sites that say no.

    - A site that refuses (or fails) at setup holds no key shares yet: it is taken out of the
      round's neighbour graph. Flower would keep it as a "dropped" site whose masks must be
      reconstructed from shares nobody holds, and lose the round for everyone.
    - A round that halts (fewer sites than the reconstruction threshold) is still reported to
      the strategy, so the history names the sites and their reasons instead of going silent.
    """

    def __call__(self, grid: Grid, context: Context) -> None:
        assert isinstance(context, LegacyContext)
        state = WorkflowState()
        steps = (
            self.setup_stage,
            self.share_keys_stage,
            self.collect_masked_vectors_stage,
            self.unmask_stage,
        )
        for step in steps:
            if not step(grid, context, state):
                current = int(
                    context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND]
                )
                lost = SecureRoundLost(f"secure aggregation halted at {step.__name__}")
                context.strategy.aggregate_fit(current, [], [*state.failures, lost])
                return

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        super().setup_stage(grid, context, state)
        if not state.nid_to_neighbours:  # nothing was sent (fewer than 2 sites sampled)
            return False
        refused = state.sampled_node_ids - state.active_node_ids
        state.sampled_node_ids = set(state.active_node_ids)
        for nid in refused:
            del state.nid_to_neighbours[nid]
        for neighbours in state.nid_to_neighbours.values():
            neighbours -= refused
        return self._check_threshold(state)


def build_secure_strategy(
    cfg: Any, history: RunHistory, on_round: Callable[[int], None], **kwargs: Any
) -> Strategy:
    """Recording FedAvg, wrapped for central DP (client-side clipping) when the study asks."""
    n = len(cfg.sites)
    needed = cfg.strategy.min_sites or n  # start once enough sites are online; ask all of them
    strategy: Strategy = RecordingFedAvg(
        history,
        on_round,
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=needed,
        min_evaluate_clients=needed,
        min_available_clients=needed,
        accept_failures=True,
        **kwargs,
    )
    if cfg.privacy.central == "off":
        return strategy
    return SecureCentralDP(
        strategy,
        noise_multiplier=cfg.privacy.central_noise_multiplier,
        clipping_norm=cfg.privacy.central_clipping_norm,
        num_sampled_clients=n,
    )


def run_secure(grid: Grid, plan: RunPlan, context: Context, on_round: Any) -> dict:
    """The study's rounds with SecAgg+ FedAvg; same outputs as ``server_app.run_federated``.

    Like it, checkpoints after every round (FedAvg has no state beyond the model) and, with
    ``plan.resume``, runs only the rounds that remain. SecAgg+ quantizes with stochastic
    rounding, so a resumed secure run matches an uninterrupted one to ~1e-5, not bit for bit.
    """
    from fedmed.coordinator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from fedmed.privacy.accounting import central_epsilon
    from fedmed.study.outputs import live_reporter
    from fedmed.study.plan import initial_model

    started = time.time()
    cfg = plan.config
    model = initial_model(plan)
    keys = list(model.state_dict())
    done, history = 0, RunHistory(sites=cfg.site_names)
    if plan.resume:
        checkpoint = load_checkpoint(plan.run_dir, cfg)
        done, history = checkpoint.round, checkpoint.history
        model.load_state_dict({k: torch.from_numpy(v) for k, v in checkpoint.arrays.items()})
    report = live_reporter(plan, on_round)
    needed = cfg.strategy.min_sites or len(cfg.sites)

    def round_config(server_round: int) -> dict[str, Scalar]:
        return {
            RUN_KEY: cfg.to_json(),
            STUDY_KEY: plan.run_dir.name,
            "server-round": server_round,
            "keys": ",".join(keys),
        }

    def round_done(server_round: int) -> None:
        if cfg.privacy.central != "off":
            history.central_epsilon[server_round] = central_epsilon(cfg, server_round)
        state = dict(zip(keys, _global_arrays(legacy), strict=True))
        save_checkpoint(plan.run_dir, cfg, Checkpoint(server_round, state, history))
        report(server_round, history)

    strategy = build_secure_strategy(
        cfg,
        history,
        round_done,
        initial_parameters=ndarrays_to_parameters([v.numpy() for v in model.state_dict().values()]),
        on_fit_config_fn=round_config,
        on_evaluate_config_fn=round_config,
    )
    legacy = LegacyContext(
        context,
        config=ServerConfig(num_rounds=cfg.rounds - done, round_timeout=cfg.strategy.round_timeout),
        strategy=ResumedRounds(strategy, done) if done else strategy,
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecureRounds(
            num_shares=1.0,  # every sampled site is every other's neighbour
            # Shares needed to unmask a dropped site: min_sites (Flower needs at least 2).
            reconstruction_threshold=max(2, needed),
            # A site's masked vector is weight/max_weight x its parameters, quantized to 2^22
            # levels: central DP weighs every site 1, so max_weight 1 keeps full precision.
            max_weight=1.0 if cfg.privacy.central != "off" else 1000.0,
            timeout=cfg.strategy.round_timeout,
        )
    )
    if plan.engine == "deployment":
        from fedmed.coordinator.grid import PromptGrid

        grid = PromptGrid(grid, nodes=plan.site_nodes())
    stamp = {RUN_KEY: cfg.to_json(), STUDY_KEY: plan.run_dir.name}
    if done < cfg.rounds:
        workflow(PlanStampingGrid(grid, stamp, cfg.strategy.round_timeout, done), legacy)
        model.load_state_dict(to_state(keys, _global_arrays(legacy)))
    return finish_run(plan, history, {"model": model}, started)


def _global_arrays(legacy: LegacyContext) -> list[np.ndarray]:
    """The workflow's current global model (float32, in the model's key order)."""
    record = legacy.state.array_records[MAIN_PARAMS_RECORD]
    parameters = compat.arrayrecord_to_parameters(record, keep_input=True)
    return [np.asarray(a, dtype=np.float32) for a in parameters_to_ndarrays(parameters)]
