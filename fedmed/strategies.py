"""Coordinator strategies: a registry over Flower's own implementations, plus a recording wrapper.

Aggregation itself is Flower's. What fedmed adds is a wrapper (``SiteRecorder``) that keeps every
site's reply per round (Flower only keeps the weighted mean) and how privacy numbers aggregate:
ε is a MAX over sites (averaging ε would understate the worst-off hospital's exposure).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fedmed.config import RunConfig
from fedmed.errors import ConfigError
from fedmed.report import RunHistory

MAX_KEYS = ("epsilon", "epsilon_total")
log = logging.getLogger("fedmed.coordinator")


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Unweighted mean over sites (FLamby's 'average over centers'); ε as max; NaN-aware."""
    values: dict[str, list[float]] = {}
    for record in records:
        for metric_record in record.metric_records.values():
            for key, value in metric_record.items():
                if key != weight_key and isinstance(value, int | float):
                    values.setdefault(key, []).append(float(value))
    out = MetricRecord()
    for key, vals in values.items():
        finite = [v for v in vals if not math.isnan(v)]
        if not finite:
            out[key] = math.nan
        elif key in MAX_KEYS:
            out[key] = max(finite)
        else:
            out[key] = sum(finite) / len(finite)
    return out


def _common(cfg: RunConfig) -> dict[str, Any]:
    n = len(cfg.sites)
    needed = cfg.strategy.min_sites or n
    return {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": needed,
        "min_evaluate_nodes": needed,
        "min_available_nodes": needed,  # start once enough sites are online
        "train_metrics_aggr_fn": aggregate_metrics,
        "evaluate_metrics_aggr_fn": aggregate_metrics,
    }


def _fedopt(cls: type) -> Callable[[RunConfig], Strategy]:
    """Flower's FedOpt family (FedAdam, FedYogi, FedAdagrad), keeping the model's dtypes.

    Their server step adds float64 NumPy scalars to float32 arrays, which NumPy 2 promotes to
    float64: from round 2 on, the update validator would then reject every float32 reply.
    """

    class KeepDtypes(cls):  # type: ignore[misc, valid-type]
        def aggregate_train(
            self, server_round: int, replies: Iterable[Message]
        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            dtypes = {k: v.dtype for k, v in (self.current_arrays or {}).items()}
            arrays, metrics = super().aggregate_train(server_round, replies)
            if arrays is not None and dtypes:
                arrays = ArrayRecord(
                    {k: Array(arrays[k].numpy().astype(dtypes[k], copy=False)) for k in arrays}
                )
            return arrays, metrics

    KeepDtypes.__name__ = KeepDtypes.__qualname__ = cls.__name__

    def build(cfg: RunConfig) -> Strategy:
        return KeepDtypes(
            **_common(cfg), eta=cfg.strategy.server_lr, eta_l=cfg.train.lr, tau=cfg.strategy.tau
        )

    return build


STRATEGIES: dict[str, Callable[[RunConfig], Strategy]] = {
    "fedavg": lambda cfg: FedAvg(**_common(cfg)),
    "fedavgm": lambda cfg: FedAvgM(
        **_common(cfg),
        server_learning_rate=cfg.strategy.server_lr,
        server_momentum=cfg.strategy.server_momentum,
    ),
    "fedprox": lambda cfg: FedProx(**_common(cfg), proximal_mu=cfg.strategy.proximal_mu),
    "fedadam": _fedopt(FedAdam),
    "fedyogi": _fedopt(FedYogi),
    "fedadagrad": _fedopt(FedAdagrad),
    # Robust aggregation: tolerate a minority of broken or hostile sites.
    "fedmedian": lambda cfg: FedMedian(**_common(cfg)),
    "fedtrimmedavg": lambda cfg: FedTrimmedAvg(**_common(cfg), beta=cfg.strategy.trim_beta),
    "krum": lambda cfg: Krum(**_common(cfg), num_malicious_nodes=cfg.strategy.num_malicious),
    "multikrum": lambda cfg: MultiKrum(
        **_common(cfg),
        num_malicious_nodes=cfg.strategy.num_malicious,
        num_nodes_to_select=cfg.strategy.krum_select or len(cfg.sites) - cfg.strategy.num_malicious,
    ),
}


def build_strategy(cfg: RunConfig) -> Strategy:
    """The configured strategy, wrapped for central DP when the study asks for it."""
    try:
        factory = STRATEGIES[cfg.strategy.name]
    except KeyError:
        raise ConfigError(
            f"unknown strategy.name '{cfg.strategy.name}'; valid: {', '.join(sorted(STRATEGIES))}"
        ) from None
    strategy = factory(cfg)
    privacy = cfg.privacy
    if privacy.central == "off":
        return strategy
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    wrapper = (
        DifferentialPrivacyClientSideFixedClipping
        if privacy.central == "client-side"
        else DifferentialPrivacyServerSideFixedClipping
    )
    return wrapper(
        strategy,
        noise_multiplier=privacy.central_noise_multiplier,
        clipping_norm=privacy.central_clipping_norm,
        num_sampled_clients=len(cfg.sites),
    )


def central_epsilon(cfg: RunConfig, rounds: int) -> float:
    """Site-level ε of central DP after ``rounds`` rounds (every site sampled every round).

    Each round releases the clipped mean plus Gaussian noise whose std is the noise multiplier
    times the sensitivity (norm / sites): one Gaussian mechanism per round, composed with RDP.
    """
    from fedmed.privacy import epsilon_spent

    if cfg.privacy.central == "off" or rounds == 0:
        return 0.0
    return epsilon_spent([(cfg.privacy.central_noise_multiplier, 1.0, rounds)], cfg.privacy)


def _site_name(msg: Message) -> str:
    record = msg.content.get("site")
    return (
        str(record["name"])
        if isinstance(record, ConfigRecord)
        else f"node-{msg.metadata.src_node_id}"
    )


def _site_metrics(msg: Message) -> dict[str, float]:
    out: dict[str, float] = {}
    for record in msg.content.metric_records.values():
        out.update({k: float(v) for k, v in record.items() if isinstance(v, int | float)})
    return out


class StrategyWrapper(Strategy):
    """Delegates every step to ``inner``; subclasses override only the step they change.

    The same pattern as Flower's DP wrappers: a cross-cutting concern wraps any strategy.
    """

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


class SiteRecorder(StrategyWrapper):
    """Wraps any strategy; records each site's train and evaluate replies and failures."""

    def __init__(
        self, inner: Strategy, history: RunHistory, on_round: Callable[[int], None] | None = None
    ) -> None:
        super().__init__(inner)
        self.history = history
        self.on_round = on_round

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._record(server_round, "train", replies)
        return self.inner.aggregate_train(server_round, replies)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self._record(server_round, "evaluate", replies)
        aggregated = self.inner.aggregate_evaluate(server_round, replies)
        if self.on_round:
            self.on_round(server_round)
        return aggregated

    def _record(self, server_round: int, phase: str, replies: list[Message]) -> None:
        for msg in replies:
            if msg.has_error():
                self.history.record_failure(server_round, phase, msg.error.reason or "failed")
            else:
                self.history.record(server_round, phase, _site_name(msg), _site_metrics(msg))


class UpdateValidator(StrategyWrapper):
    """Rejects malformed or outlying model updates before any strategy aggregates them.

    Checks, in order: the reply carries exactly the global model's keys, with the same shapes and
    dtypes; every value is finite; and (with 3+ valid replies) the update's L2 norm is at most
    ``max_norm_ratio`` times the round's median norm. A rejected update is recorded with the site
    and reason and never aggregated; if fewer than ``min_sites`` remain, the round keeps the
    previous global model instead of aggregating a rump.
    """

    def __init__(
        self, inner: Strategy, history: RunHistory, *, max_norm_ratio: float, min_sites: int
    ) -> None:
        super().__init__(inner)
        self.history = history
        self.max_norm_ratio = max_norm_ratio
        self.min_sites = min_sites
        self._global: dict[str, np.ndarray] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = {k: arrays[k].numpy() for k in arrays}
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        kept: list[Message] = []
        norms: dict[int, float] = {}
        for msg in replies:
            if msg.has_error():
                kept.append(msg)
                continue
            problem, norm = self._check(msg)
            if problem:
                self._reject(server_round, msg, problem)
            else:
                norms[id(msg)] = norm
                kept.append(msg)
        if len(norms) >= 3:
            limit = self.max_norm_ratio * float(np.median(list(norms.values())))
            for msg in [m for m in kept if id(m) in norms and norms[id(m)] > limit]:
                self._reject(
                    server_round,
                    msg,
                    f"update norm {norms[id(msg)]:.3g} is over "
                    f"{self.max_norm_ratio:g}x the round's median",
                )
                kept.remove(msg)
        valid = sum(1 for m in kept if not m.has_error())
        if valid < self.min_sites:
            # Still let the inner strategy see the replies (for recording), but aggregate none.
            self.inner.aggregate_train(server_round, [m for m in kept if m.has_error()])
            return None, None
        return self.inner.aggregate_train(server_round, kept)

    def _check(self, msg: Message) -> tuple[str, float]:
        records = list(msg.content.array_records.values())
        if len(records) != 1:
            return "reply must carry exactly one set of model arrays", 0.0
        update = records[0]
        keys = list(update.keys())
        if set(keys) != set(self._global):
            odd = sorted(set(keys) ^ set(self._global))
            return f"parameter names differ from the global model ({', '.join(odd[:3])})", 0.0
        total = 0.0
        for key in keys:
            array = update[key]
            expected = self._global[key]
            if tuple(array.shape) != tuple(expected.shape) or array.dtype != str(expected.dtype):
                return (
                    f"'{key}' is {array.dtype}{list(array.shape)}, expected "
                    f"{expected.dtype}{list(expected.shape)}"
                ), 0.0
            values = array.numpy()
            if not np.isfinite(values).all():
                return f"'{key}' contains NaN or Inf", 0.0
            total += float(np.sum((values.astype(np.float64) - expected) ** 2))
        return "", float(np.sqrt(total))

    def _reject(self, server_round: int, msg: Message, problem: str) -> None:
        site = _site_name(msg)
        log.warning("round %d: update from %s rejected: %s", server_round, site, problem)
        self.history.record_failure(
            server_round, "train", f"site '{site}': update rejected: {problem}"
        )
