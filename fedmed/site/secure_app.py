"""A site's SecAgg+ ClientApp: the same local round (or a pass of the study's statistics,
fedmed.site.stats.masked_statistics), masked by Flower's secaggplus_mod."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.client import NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    Scalar,
)
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedmed.errors import PolicyViolation
from fedmed.protocol import (
    RUN_KEY,
    SECAGG_RECORD,
    SITE_KEY,
    STATS_EDGES_KEY,
    STATS_LAYOUT_KEY,
    STATS_PASS_KEY,
    STATS_PASSES,
    STUDY_KEY,
    to_state,
)
from fedmed.security.policy import site_audit_mod, site_policy_mod
from fedmed.site.app import fail_closed_mod, local_evaluate, local_round
from fedmed.site.stats import masked_statistics


class SiteClient(NumPyClient):
    """One hospital on the legacy API; the work is client_app's, shared with every other path."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        run_json = str(config[RUN_KEY])
        if STATS_PASS_KEY in config:  # a pass of the study's statistics: counts, not a model
            site, vector, numbers = masked_statistics(
                run_json,
                self.context,
                str(config[STATS_PASS_KEY]),
                str(config.get(STUDY_KEY, "")),
                str(config.get(STATS_EDGES_KEY, "")),
                str(config[STATS_LAYOUT_KEY]),
            )
            return [vector], 1, {**numbers, SITE_KEY: site.name}  # weight 1: Flower sums exactly
        keys = str(config["keys"]).split(",")
        site, state, metrics = local_round(
            run_json, self.context, to_state(keys, parameters), config
        )
        arrays = [v.numpy() for v in state.values()]
        return arrays, int(metrics["num-examples"]), {**metrics, SITE_KEY: site.name}

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        keys = str(config["keys"]).split(",")
        site, metrics = local_evaluate(
            str(config[RUN_KEY]), self.context, to_state(keys, parameters)
        )
        return (
            float(metrics["loss"]),
            int(metrics["num-examples"]),
            {**metrics, SITE_KEY: site.name},
        )


def secure_clipping_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    """Central DP under SecAgg+: clip the update and give it unit weight, before it is masked.

    Runs INSIDE ``secaggplus_mod`` (Flower: fixedclipping_mod "should be the last to operate on
    params"), so what gets masked is already clipped: the coordinator cannot clip what it cannot
    see. Unit weight makes the unmasked aggregate the UNWEIGHTED mean of the clipped updates,
    whose sensitivity (clipping norm / sites) is what the coordinator's noise is scaled to; a
    weighted mean would let a large site move it by more. Only when the coordinator asks for
    clipping (Flower's wrapper sends the norm), so one app serves studies with and without it.
    """
    config = msg.content.config_records.get("fitins.config")
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    reply = fixedclipping_mod(msg, context, call_next)
    if not reply.has_error():
        reply.content["fitres.num_examples"] = MetricRecord({"num_examples": 1})
    return reply


SUMMED = "fedmed.stats-summed"  # context.state: the statistics pass masked, pass 1's sum


def same_sum_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    """Unmask pass 2 of the study's statistics only for the sites whose vectors pass 1 summed.

    Pass 2's histograms add up to what pass 1 counted, so sums over two different sets of sites
    would give a site's counts away by subtraction. The coordinator checks this itself
    (coordinator.secure_stats), but a site cannot rely on that: at the unmask stage it is told
    whose vectors are in the sum (the active list) and whose masks to remove (the dead list),
    and without its shares a sum with a site left out cannot be unmasked (the threshold is
    every remaining site). It remembers pass 1's lists and refuses pass 2's if they differ.
    The check covers this site's neighbours, which fedmed's coordinator makes every site.
    """
    record = msg.content.config_records.get(SECAGG_RECORD) if msg.has_content() else None
    stage = str(record.get(Key.STAGE, "")) if record is not None else ""
    memory = context.state.config_records.get(SUMMED)
    if stage == Stage.COLLECT_MASKED_VECTORS:
        fit = msg.content.config_records.get("fitins.config")
        if fit is not None and STATS_PASS_KEY in fit:
            memory = ConfigRecord({**(memory or {}), "phase": str(fit[STATS_PASS_KEY])})
            context.state.config_records[SUMMED] = memory
    elif stage == Stage.UNMASK and memory is not None and "phase" in memory:
        assert record is not None
        summed = sorted(int(n) for n in record[Key.ACTIVE_NODE_ID_LIST])  # type: ignore[union-attr]
        if memory["phase"] == STATS_PASSES[0]:
            memory["first"] = summed
        elif sorted(memory.get("first", [])) != summed:  # type: ignore[arg-type]
            raise PolicyViolation(
                "this site unmasks statistics only for the sites the first pass summed"
            )
    return call_next(msg, context)


# Outside in: audit every stage -> refuse an unapproved plan before SecAgg+ state or data is
# touched -> turn any failure into a wire-safe reason -> the same sites in both statistics
# passes -> SecAgg+ -> clip (central DP) -> train.
SITE_MODS = [
    site_audit_mod,
    site_policy_mod,
    fail_closed_mod,
    same_sum_mod,
    secaggplus_mod,
    secure_clipping_mod,
]

client_app = ClientApp(client_fn=lambda context: SiteClient(context).to_client(), mods=SITE_MODS)
