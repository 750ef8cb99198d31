"""The hospital side: a thin Flower ClientApp (data -> privacy -> train -> reply).

The study plan (RunConfig as JSON) arrives in every message from the coordinator; the site's own
identity comes from its node config (``partition-id`` in simulation). Failures are answered with
a short, wire-safe reason: details (paths, rows, stack traces) stay in the site's own log.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmed.config import RunConfig, SiteSpec
from fedmed.data import SiteData, load_site_data
from fedmed.errors import DataError, FedmedError, PrivacyBudgetExceeded
from fedmed.ledger import PrivacyLedger, fingerprint
from fedmed.personalize import flatten, personalize
from fedmed.privacy import planned_round, train_private
from fedmed.tasks import build_model, get_task
from fedmed.train import derive_seed, evaluate, resolve_device, train_plain

RUN_KEY = "fedmed.run"  # ConfigRecord entry carrying the study plan as JSON
SITE_KEY = "site"  # reply ConfigRecord naming the replying site
STUDY_KEY = (
    "fedmed.study"  # ConfigRecord entry: this study's id (ledger entries are tagged with it)
)

log = logging.getLogger("fedmed.site")
app = ClientApp()


# -- what a message needs ------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _parse_run(text: str) -> RunConfig:
    return RunConfig.from_json(text)


@functools.lru_cache(maxsize=32)
def _site_data(run_json: str, site_name: str) -> SiteData:
    run = _parse_run(run_json)
    return load_site_data(run, next(s for s in run.sites if s.name == site_name))


def _site_of(run: RunConfig, context: Context) -> SiteSpec:
    index = int(context.node_config.get("partition-id", -1))
    if not 0 <= index < len(run.sites):
        raise FedmedError(
            f"node has partition-id {index} but the study lists {len(run.sites)} sites"
        )
    return run.sites[index]


def _site_inputs(run_json: str, context: Context) -> tuple[RunConfig, SiteSpec, SiteData]:
    """The study plan, this node's site and its data."""
    run = _parse_run(run_json)
    site = _site_of(run, context)
    return run, site, _site_data(run_json, site.name)


def _inputs(msg: Message, context: Context) -> tuple[RunConfig, SiteSpec, SiteData]:
    return _site_inputs(str(msg.content["config"][RUN_KEY]), context)


def _metrics_reply(msg: Message, site: SiteSpec, metrics: dict[str, float]) -> Message:
    content = RecordDict(
        {"metrics": MetricRecord(metrics), SITE_KEY: ConfigRecord({"name": site.name})}
    )
    return Message(content, reply_to=msg)


def _model(run: RunConfig, msg: Message) -> torch.nn.Module:
    model = build_model(run)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


def _release(state: dict[str, torch.Tensor], seed: int, run_json: str) -> str:
    """What this round computes: the global model it starts from, its seed and the plan.

    The ledger charges a release once (a resumed coordinator may ask for a round again).
    """
    digest = hashlib.sha256(f"{seed}/{run_json}".encode())
    digest.update(fingerprint(*(state[k].detach().cpu().numpy() for k in sorted(state))).encode())
    return digest.hexdigest()


def _fail_closed(handler: Callable[[Message, Context], Message]) -> Callable[..., Message]:
    """Turn any failure into an error reply that names the site and says little else."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            site = "?"
            with contextlib.suppress(Exception):
                site = _site_of(_parse_run(msg.content["config"][RUN_KEY]), context).name
            log.error("site %s: %s failed: %s", site, msg.metadata.message_type, exc)
            if isinstance(exc, PrivacyBudgetExceeded):
                reason = "privacy budget exhausted"
            elif isinstance(exc, DataError):
                reason = "site data failed validation (details in the site's log)"
            else:
                reason = "site failed (details in the site's log)"
            return Message(Error(code=500, reason=f"site '{site}': {reason}"), reply_to=msg)

    return wrapped


def central_clipping_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    """Flower's fixedclipping_mod, but only when the coordinator asks for client-side clipping.

    One ClientApp then serves studies with and without central DP.
    """
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    if KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


# -- handlers ------------------------------------------------------------------------------------


def local_round(
    run_json: str, context: Context, state: dict[str, torch.Tensor], config: Mapping[str, Any]
) -> tuple[SiteSpec, torch.nn.Module, dict[str, float]]:
    """One round of local training at this site, whatever carried the message.

    ``state`` is the global model, ``config`` the coordinator's train config (server-round,
    FedProx's proximal-mu, the study id). Returns the site, its trained model and the metrics
    to report. Under DP the site's ledger guards and records the round first.
    """
    run, site, data = _site_inputs(run_json, context)
    model = build_model(run)
    model.load_state_dict(state)
    server_round = int(config["server-round"])
    # FedProx: Flower's strategy sends its mu with every train message.
    proximal_mu = float(config.get("proximal-mu", 0.0))
    seed = derive_seed(run.seed, server_round, site.name)
    device = resolve_device(run.device)
    task = get_task(run.task)
    epsilon = epsilon_total = 0.0
    if run.privacy.enabled:
        # Budget guard first: the site's own cap, against everything ever spent on this data.
        ledger = PrivacyLedger(site.name)
        dataset = fingerprint(data.x_train, data.y_train)
        study = str(config.get(STUDY_KEY, "unnamed"))
        release = _release(state, seed, run_json)
        if not ledger.has_release(dataset, study, server_round, release):  # else a free replay
            ledger.check(dataset, run.privacy, planned_round(data.n_train, run), site.epsilon_cap)
        result, entries = train_private(
            model,
            data.x_train,
            data.y_train,
            task,
            run,
            seed=seed,
            device=device,
            proximal_mu=proximal_mu,
        )
        ledger.record(dataset, study, server_round, entries, release=release)
        epsilon = ledger.spent(dataset, run.privacy, study=study)
        epsilon_total = ledger.spent(dataset, run.privacy)
    else:
        result = train_plain(
            model,
            data.x_train,
            data.y_train,
            task,
            run.train,
            seed=seed,
            device=device,
            proximal_mu=proximal_mu,
        )
    metrics = {
        "num-examples": result.num_examples,
        "train_loss": result.loss,
        "steps": result.steps,
        "epsilon": epsilon,
        "epsilon_total": epsilon_total,
    }
    return site, model.cpu(), metrics


@app.train(mods=[central_clipping_mod])
@_fail_closed
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    site, model, metrics = local_round(
        str(config[RUN_KEY]), context, msg.content["arrays"].to_torch_state_dict(), config
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(metrics),
            SITE_KEY: ConfigRecord({"name": site.name}),
        }
    )
    return Message(content, reply_to=msg)


def local_evaluate(
    run_json: str, context: Context, state: dict[str, torch.Tensor]
) -> tuple[SiteSpec, dict[str, float]]:
    """Metrics of the global model ``state`` on this site's own test split."""
    run, site, data = _site_inputs(run_json, context)
    model = build_model(run)
    model.load_state_dict(state)
    metrics = evaluate(
        model, data.x_test, data.y_test, get_task(run.task), resolve_device(run.device)
    )
    metrics["num-examples"] = len(data.y_test)
    return site, metrics


@app.evaluate()
@_fail_closed
def evaluate_global(msg: Message, context: Context) -> Message:
    run_json = str(msg.content["config"][RUN_KEY])
    site, metrics = local_evaluate(run_json, context, msg.content["arrays"].to_torch_state_dict())
    return _metrics_reply(msg, site, metrics)


@app.evaluate("personalize")
@_fail_closed
def personalize_final(msg: Message, context: Context) -> Message:
    """Fine-tune the final global model on this site's train split; report test metrics only."""
    run, site, data = _inputs(msg, context)
    result = personalize(_model(run, msg), data, run, site.name, resolve_device(run.device))
    return _metrics_reply(msg, site, flatten(result))
