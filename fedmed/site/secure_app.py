"""A site's SecAgg+ ClientApp: the same local round (or a pass of the study's statistics,
fedmed.site.stats.masked_statistics), masked by Flower's secaggplus_mod."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Context, Message, MetricRecord
from flwr.client import NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    Scalar,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedmed.protocol import (
    RUN_KEY,
    SITE_KEY,
    STATS_EDGES_KEY,
    STATS_LAYOUT_KEY,
    STATS_PASS_KEY,
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


# Outside in: audit every stage -> refuse an unapproved plan before SecAgg+ state or data is
# touched -> turn any failure into a wire-safe reason -> SecAgg+ -> clip (central DP) -> train.
SITE_MODS = [site_audit_mod, site_policy_mod, fail_closed_mod, secaggplus_mod, secure_clipping_mod]

client_app = ClientApp(client_fn=lambda context: SiteClient(context).to_client(), mods=SITE_MODS)
