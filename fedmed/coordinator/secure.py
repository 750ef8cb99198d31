"""Secure aggregation (SecAgg+): the coordinator learns only the SUM of the sites' updates.

Flower 1.41 implements SecAgg+ only on its legacy API (``LegacyContext`` + ``DefaultWorkflow`` +
``SecAggPlusWorkflow`` on the server, a ``client_fn`` ClientApp with ``secaggplus_mod`` at the
sites); with the Message API it fails. So a secure study's rounds are driven by that workflow,
but they are the same rounds as every other study's (``rounds.StudyRounds``: the strategy built
from the config, central DP, the recorder, the round offset on resume, the checkpoint), reached
through ``LegacyAdapter``; the sites run the same site logic (``site.app.local_round`` /
``local_evaluate``). Same history, report and outputs, in simulation and in deployment.

One secure round is four ``train`` exchanges (setup: public keys; share keys: encrypted key
shares; collect masked vectors: the site trains and uploads its masked update; unmask: shares to
remove the masks) and one ``evaluate``. The site's policy and audit mods sit outside
``secaggplus_mod``, so every stage is audited and a site that has not approved the plan refuses
at setup, before it holds anyone's key shares or reads a row. The setup and unmask messages
carry no fit config, so the coordinator stamps the plan on every message (``PlanStampingGrid``).

What composes with it (checked in config.py, each refusal names the fix): FedAvg only, because
the server sees only the mean (median, Krum and the server optimizers need the individual
updates); local DP-SGD at the sites (noise is added before masking); central DP with CLIENT-side
clipping: each site clips its update and gives it unit weight BEFORE masking
(``secure_clipping_mod`` inside ``secaggplus_mod``), the coordinator adds Gaussian noise to the
unmasked mean (``strategies.SecureCentralDP``). No update validation, no server-side clipping
(the server never sees an individual update), no personalization. The coordinator checkpoints
every round, so --resume works here too. Site-level train metrics still arrive (they are not
masked), so ε per site is reported and every reply's metrics are judged as usual, before the
sum is unmasked (``SecureRounds``). A site that
drops out after sharing its keys is tolerated while at least ``reconstruction_threshold``
(= ``strategy.min_sites``, at least 2) of its neighbours' shares arrive; one that refuses or
fails at setup is simply left out of the round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
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
from flwr.compat.common.recorddict_compat import recorddict_to_fitres
from flwr.server import ClientManager, LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedmed.coordinator.grid import GridWrapper
from fedmed.coordinator.rounds import StudyRounds
from fedmed.flower_compat import replace_with_error
from fedmed.protocol import PLAN_RECORD, SITE_KEY, SiteReason, read_error, site_error
from fedmed.study.plan import RunPlan

log = logging.getLogger("fedmed.coordinator")


class LegacyAdapter(Strategy):
    """Flower's legacy Strategy API in front of the study's own rounds (``StudyRounds``).

    Flower's SecAgg+ workflow drives only a legacy ``flwr.server.strategy.Strategy``: it asks
    for (ClientProxy, FitIns) pairs and hands back (ClientProxy, FitRes) results, where every
    FitRes carries the already unmasked mean. The study's strategy, recorder, round offset and
    checkpoint speak Messages. This translates and decides nothing: the legacy parameter list <->
    the model's named arrays (the sites get the names as ``keys``), instructions <-> Messages,
    results <-> replies (the FedAvg below then averages identical copies of the unmasked mean).

    The one thing that cannot cross: Flower's legacy failures are bare errors without a node (and
    SecAgg+ lists some twice), so the recorder, which names silent NODES, cannot be told whose
    they are. The sites without a result are named here instead, per site (``_record``), and
    the recorder is built not to name missing nodes (``SiteRecorder(name_missing=False)``).

    Two consequences of the shared stack: between rounds the global model keeps the model's
    dtypes (``KeepDtypes`` casts the float64 unmasked mean, as in plain rounds and the
    checkpoint); and the recorder's judgement of a reply's metrics is made earlier, by
    ``SecureRounds`` while the masked updates are collected, because once the sum is unmasked
    one site's update can no longer be taken back out of it.
    """

    def __init__(self, rounds: StudyRounds, grid: Grid) -> None:
        self.rounds = rounds
        self.history = rounds.history
        self.grid = grid
        self.keys = list(rounds.initial_arrays.keys())
        self._sent: dict[int, Message] = {}  # node -> this phase's instruction

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self._parameters(self.rounds.initial_arrays)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        arrays, config = self._arrays(parameters), ConfigRecord(dict(self.rounds.study))
        nodes = _Registered(self.grid, client_manager)
        messages = self.rounds.strategy.configure_train(server_round, arrays, config, nodes)
        return self._instructions(messages, client_manager, FitIns)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        true_round = server_round + self.rounds.done
        self._record(true_round, "train", [res.metrics for _, res in results], failures)
        arrays, metrics = self.rounds.strategy.aggregate_train(server_round, self._replies(results))
        return (None if arrays is None else self._parameters(arrays)), dict(metrics or {})

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        arrays, config = self._arrays(parameters), ConfigRecord(dict(self.rounds.study))
        nodes = _Registered(self.grid, client_manager)
        messages = self.rounds.strategy.configure_evaluate(server_round, arrays, config, nodes)
        return self._instructions(messages, client_manager, EvaluateIns)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        # Failures first: the recorder checkpoints and reports the round when it is done.
        true_round = server_round + self.rounds.done
        self._record(true_round, "evaluate", [res.metrics for _, res in results], failures)
        metrics = self.rounds.strategy.aggregate_evaluate(server_round, self._replies(results))
        return None, dict(metrics or {})

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None  # no central evaluation: the coordinator holds no data

    def _arrays(self, parameters: Parameters) -> ArrayRecord:
        arrays = parameters_to_ndarrays(parameters)
        return ArrayRecord({k: Array(a) for k, a in zip(self.keys, arrays, strict=True)})

    def _parameters(self, arrays: ArrayRecord) -> Parameters:
        return ndarrays_to_parameters([arrays[k].numpy() for k in self.keys])

    def _instructions(
        self, messages: Iterable[Message], client_manager: ClientManager, kind: type
    ) -> list:
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        self._sent = {msg.metadata.dst_node_id: msg for msg in messages}
        return [
            (
                proxies[node],
                kind(
                    self._parameters(msg.content["arrays"]),
                    {**msg.content["config"], "keys": ",".join(self.keys)},
                ),
            )
            for node, msg in self._sent.items()
        ]

    def _replies(self, results: list[tuple[ClientProxy, FitRes | EvaluateRes]]) -> list[Message]:
        """Each result as the reply a site sends in a plain round (metrics, site, arrays)."""
        replies = []
        for proxy, res in results:
            numbers = {k: v for k, v in res.metrics.items() if isinstance(v, int | float)}
            content = RecordDict(
                {
                    "metrics": MetricRecord(numbers),
                    SITE_KEY: ConfigRecord({"name": str(res.metrics[SITE_KEY])}),
                }
            )
            if isinstance(res, FitRes):
                content["arrays"] = self._arrays(res.parameters)
            replies.append(Message(content, reply_to=self._sent[proxy.node_id]))
        return replies

    def _record(
        self, server_round: int, phase: str, replies: list[dict[str, Scalar]], failures: list
    ) -> None:
        """Every site without a reply is named as failed (its metrics: the recorder's).

        Flower's failures here are bare errors without a node (and SecAgg+ lists some twice):
        a site's own wire-safe reason (its site_error) is kept, every other missing site gets
        a generic one.
        """
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
                self.history.record_failure(server_round, phase, site, reasons.get(site, generic))


class SecureRoundLost(RuntimeError):
    """Too few sites got through a SecAgg+ stage to unmask the sum: the round aggregates nothing."""


def _site_reasons(failures: list) -> dict[str, str]:
    """Site name -> the reason it sent, for failures that carry one."""
    out: dict[str, str] = {}
    for failure in failures:
        error = failure.args[0] if isinstance(failure, BaseException) and failure.args else None
        if isinstance(error, Error):
            told = read_error(error)
            if told.site:
                out.setdefault(told.site, told.detail)
    return out


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


class SecureRounds(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, with three changes for sites that say no or cannot be believed.

    - A site that refuses (or fails) at setup holds no key shares yet: it is taken out of the
      round's neighbour graph. Flower would keep it as a "dropped" site whose masks must be
      reconstructed from shares nobody holds, and lose the round for everyone.
    - A masked update whose reply metrics the recorder rejects (``judge``: a NaN loss, a row
      count that changed, ...) is turned into that site's error reply before Flower sums the
      masked vectors. Flower then treats the site as dropped out after sharing its keys: its
      vector stays out of the sum and its pairwise masks are removed with its neighbours'
      shares (only its pairwise-mask key is rebuilt, never its self-mask seed, so the rejected
      update stays hidden). Judged after unmasking, it could no longer be taken out.
    - A round that halts (fewer sites than the reconstruction threshold) is still reported to
      the strategy, so the history names the sites and their reasons instead of going silent.
    """

    def __init__(self, *, judge: Callable[[str, str, dict[str, float]], str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.judge = judge

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

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        return super().collect_masked_vectors_stage(_Judged(grid, self.judge), context, state)

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


class _Judged(GridWrapper):
    """The masked-vector replies, each judged by its metrics; a rejected one becomes an error.

    The metrics travel unmasked beside the masked vector (Flower's legacy FitRes layout), so the
    coordinator can judge them without seeing the update. The error names the site and the
    problem (``SiteReason.REPLY_REJECTED``), which the history records as the site's failure.
    """

    def __init__(self, grid: Grid, judge: Callable[[str, str, dict[str, float]], str]) -> None:
        super().__init__(grid)
        self.judge = judge

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return [self._judged(m) for m in self.grid.send_and_receive(messages, timeout=timeout)]

    def _judged(self, reply: Message) -> Message:
        if reply.has_error():
            return reply
        try:
            metrics = recorddict_to_fitres(reply.content, keep_input=True).metrics
        except (KeyError, TypeError, ValueError) as e:  # not a FitRes: not fit to be summed
            return replace_with_error(
                reply,
                site_error("", SiteReason.REPLY_REJECTED, f"reply rejected: unreadable ({e})"),
            )
        site = str(metrics.get(SITE_KEY, f"node-{reply.metadata.src_node_id}"))
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        problem = self.judge("train", site, numbers)
        if not problem:
            return reply
        log.warning("secure round: masked update from %s rejected: %s", site, problem)
        error = site_error(site, SiteReason.REPLY_REJECTED, f"reply rejected: {problem}")
        return replace_with_error(reply, error)


class _Registered(GridWrapper):
    """The grid, listing the nodes Flower's legacy client manager holds: the strategy samples
    from them, so every sampled node has the ClientProxy the legacy workflow needs."""

    def __init__(self, grid: Grid, client_manager: ClientManager) -> None:
        super().__init__(grid)
        self.client_manager = client_manager

    def get_node_ids(self) -> Iterable[int]:
        return [proxy.node_id for proxy in self.client_manager.all().values()]


def run_secure_rounds(grid: Grid, plan: RunPlan, context: Context, rounds: StudyRounds) -> None:
    """The study's remaining rounds, each a SecAgg+ round of Flower's legacy workflow.

    SecAgg+ quantizes with stochastic rounding, so a resumed secure run matches an uninterrupted
    one to ~1e-5, not bit for bit.
    """
    cfg = plan.config
    if rounds.done >= cfg.rounds:
        return
    needed = cfg.strategy.min_sites or len(cfg.sites)
    stamping = PlanStampingGrid(grid, rounds.study, cfg.strategy.round_timeout, rounds.done)
    legacy = LegacyContext(
        context,
        config=ServerConfig(
            num_rounds=cfg.rounds - rounds.done, round_timeout=cfg.strategy.round_timeout
        ),
        strategy=LegacyAdapter(rounds, stamping),
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecureRounds(
            judge=rounds.recorder.judge,
            num_shares=1.0,  # every sampled site is every other's neighbour
            # Shares needed to unmask a dropped site: min_sites (Flower needs at least 2).
            reconstruction_threshold=max(2, needed),
            # A site's masked vector is weight/max_weight x its parameters, quantized to 2^22
            # levels: central DP weighs every site 1, so max_weight 1 keeps full precision.
            max_weight=1.0 if cfg.privacy.central != "off" else 1000.0,
            timeout=cfg.strategy.round_timeout,
        )
    )
    workflow(stamping, legacy)
