"""Federated statistics under SecAgg+: the coordinator learns the pooled counts, no site's own.

Each pass (``query.stats_cells``, then ``query.stats_histograms``) is one round of Flower's
SecAgg+ workflow, the one secure training uses (``coordinator.secure.SecureRounds`` through
``DefaultWorkflow``), not a protocol of our own: every site masks ONE vector, its unsuppressed
counts in the layout the coordinator sent (``protocol.flatten_counts``), with weight 1, and
Flower unmasks only their sum. Flower's quantization carries whole counts exactly with
``protocol.SECURE_STATS_*`` (quantizer 1: a count is already on the lattice), so the pooled
counts are exact sums, checked cell by cell when they are unflattened
(``protocol.unflatten_sum``).

What the coordinator still sees in the clear, beside each masked vector: the site's name, the
ε its ledger holds for these statistics and the minimum cell count it asks the pooled report
to apply. A site that drops out after sharing its keys is handled as Flower's SecAgg+ handles
it: its vector stays out of the sum and its pairwise masks are removed with its neighbours'
shares, while at least ``reconstruction_threshold`` of them answer (here: every site but one,
and at least 2, so a pass survives one dropout); below that the pass is lost and every site is
named.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import ClientManager, LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedmed.coordinator.secure import PlanStampingGrid, SecureRoundLost, SecureRounds, _site_reasons
from fedmed.errors import ConfigError
from fedmed.protocol import (
    RUN_KEY,
    SECURE_STATS_CLIPPING,
    SECURE_STATS_MAX_SITES,
    SECURE_STATS_MODULUS,
    SECURE_STATS_QUANTIZATION,
    SITE_KEY,
    STATS_LAYOUT_KEY,
    STATS_PASS_KEY,
    STUDY_KEY,
    encode_layout,
    unflatten_sum,
)
from fedmed.study.history import RunHistory
from fedmed.study.plan import RunPlan

QUERY_TIMEOUT = 300.0  # seconds a pass waits for the sites to register and for each stage


class SecurePass:
    """What one masked pass produced: the pooled counts (None if the pass was lost), the sites
    in the sum, and what each sent in the clear (its ε and its minimum cell count)."""

    def __init__(self) -> None:
        self.pooled: dict[str, list[int]] | None = None
        self.error = ""  # why the unmasked sum could not be read as counts
        self.sites: list[str] = []
        self.clear: dict[str, dict[str, float]] = {}


def secure_pass(
    grid: Grid,
    context: Context,
    plan: RunPlan,
    history: RunHistory,
    phase: str,
    shapes: dict[str, int],
    extra: dict[str, str] | None = None,
    same_as: list[str] | None = None,
) -> SecurePass:
    """Pass ``phase`` as one SecAgg+ round: the sum of every answering site's counts.

    ``same_as``: the sites an earlier pass summed. Where both passes count the same rows (a
    histogram adds up to a feature's present values, its open tails are coarse cells), sums
    over two different sets of sites would give the difference away: one site's counts. So
    the pass is unmasked only if exactly those sites sent masked vectors, and is lost
    otherwise (the sites' vectors stay masked)."""
    cfg = plan.config
    if not 2 <= len(cfg.sites) <= SECURE_STATS_MAX_SITES:
        raise ConfigError(
            f"SecAgg+ sums counts exactly for 2 to {SECURE_STATS_MAX_SITES} sites (a sum of one "
            f"is that site's counts), not {len(cfg.sites)}; set [stats] secure_aggregation = "
            "false or change the consortium"
        )
    study = {RUN_KEY: cfg.to_json(), STUDY_KEY: plan.run_dir.name}
    result = SecurePass()
    strategy = _PassStrategy(cfg.site_names, history, phase, shapes, result)
    strategy.config = {
        **study,
        STATS_PASS_KEY: phase,
        STATS_LAYOUT_KEY: encode_layout(shapes),
        **(extra or {}),
    }
    legacy = LegacyContext(
        context, config=ServerConfig(num_rounds=1, round_timeout=QUERY_TIMEOUT), strategy=strategy
    )
    workflow = DefaultWorkflow(
        fit_workflow=_SameSites(
            same_as=None if same_as is None else set(same_as),
            judge=strategy.judge,
            num_shares=1.0,  # every site is every other's neighbour
            # Shares of every site but one: a pass survives one dropout, and a sum with a site
            # left out needs the shares of EVERY remaining site, so one that refuses (a site's
            # same_sum_mod) keeps it masked.
            reconstruction_threshold=max(2, len(cfg.sites) - 1),
            max_weight=1.0,  # weight 1 for every site: Flower's scaling factor is exactly 1
            clipping_range=float(SECURE_STATS_CLIPPING),
            quantization_range=SECURE_STATS_QUANTIZATION,
            modulus_range=SECURE_STATS_MODULUS,
            timeout=QUERY_TIMEOUT,
        )
    )
    workflow(PlanStampingGrid(grid, study, QUERY_TIMEOUT), legacy)
    return result


class SitesChanged(RuntimeError):
    """A pass's masked vectors came from other sites than the earlier pass summed."""


class _SameSites(SecureRounds):
    """SecAgg+ that unmasks the sum only if the sites in it are ``same_as`` (None: any)."""

    def __init__(self, *, same_as: set[str] | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.same_as = same_as

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        summed = {str(res.metrics[SITE_KEY]) for _, res in state.legacy_results}
        if self.same_as is not None and summed != self.same_as:
            changed = ", ".join(sorted(summed ^ self.same_as))
            state.failures.append(SitesChanged(f"{changed} in one pass but not the other"))
            return False
        return super().unmask_stage(grid, context, state)


class _PassStrategy(Strategy):
    """Flower's legacy Strategy for one masked pass: asks every registered site, and reads the
    unmasked aggregate (the mean of the weight-1 vectors) back into whole pooled counts."""

    def __init__(
        self,
        sites: tuple[str, ...],
        history: RunHistory,
        phase: str,
        shapes: dict[str, int],
        result: SecurePass,
    ) -> None:
        self.sites, self.history, self.phase, self.shapes = sites, history, phase, shapes
        self.result = result
        self.config: dict[str, Scalar] = {}

    def judge(self, _phase: str, site: str, metrics: dict[str, float]) -> str:
        """A masked vector whose clear metrics are not a study site's is left out of the sum."""
        if site not in self.sites:
            return f"'{site[:40]}' is not a site of this study"
        epsilon, min_cell = metrics.get("epsilon", -1.0), metrics.get("min-cell", 0.0)
        if not (math.isfinite(epsilon) and epsilon >= 0):
            return "its ε is not a finite number >= 0"
        if not (min_cell >= 1 and float(min_cell).is_integer()):
            return "its minimum cell count is not a whole number >= 1"
        return ""

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters([np.zeros(1)])  # the sites need none: no model

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        client_manager.wait_for(len(self.sites), timeout=int(QUERY_TIMEOUT))
        return [
            (proxy, FitIns(parameters, dict(self.config)))
            for proxy in client_manager.all().values()
        ]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        names = [str(res.metrics[SITE_KEY]) for _, res in results]
        lost = any(isinstance(f, SecureRoundLost) for f in failures)
        changed = [str(f) for f in failures if isinstance(f, SitesChanged)]
        reasons = _site_reasons(failures)
        for site in self.sites:
            if site not in names or lost:
                generic = (
                    f"{self.phase} not unmasked: {changed[0]} (the difference of the two sums "
                    "would be a site's counts)"
                    if changed
                    else "secure statistics lost: too few sites completed SecAgg+"
                    if lost
                    else f"no masked {self.phase} counts (dropped out, refused or timed out)"
                )
                self.history.record_failure(0, self.phase, site, reasons.get(site, generic))
        if results and not lost:
            mean = parameters_to_ndarrays(results[0][1].parameters)[0]
            try:
                self.result.pooled = unflatten_sum(mean, len(results), self.shapes)
            except ValueError as exc:  # raised after the workflow, which must end cleanly
                self.result.error = str(exc)
                return None, {}
            self.result.sites = names
            self.result.clear = {
                str(res.metrics[SITE_KEY]): {
                    k: float(v) for k, v in res.metrics.items() if isinstance(v, int | float)
                }
                for _, res in results
            }
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []  # nothing to evaluate: statistics train no model

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> Any:
        return None
