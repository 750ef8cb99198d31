"""The hospital side: a thin Flower ClientApp (data -> privacy -> train -> reply).

The study plan (RunConfig as JSON) arrives in every message from the coordinator; the site's own
identity comes from its node config: ``partition-id`` in a simulation, ``fedmed-site`` (the path
of the site daemon's own TOML) in a deployment, where the site's policy and audit mods run first
(fedmed.security.policy) and the table comes from the site's dataset registry. Failures are
answered with a short, wire-safe reason: details (paths, rows, stack traces) stay in the site's
own log.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmed.config import RunConfig, SiteSpec, plan_from_json
from fedmed.data.table import SiteData
from fedmed.errors import DataError, PolicyViolation, PrivacyBudgetExceeded
from fedmed.privacy.accounting import at_site_delta, planned_round, site_delta
from fedmed.privacy.dpsgd import train_private
from fedmed.privacy.ledger import LedgerDamaged, PrivacyLedger, fingerprint
from fedmed.protocol import (
    RUN_KEY,
    SITE_KEY,
    STATISTICS_KEY,
    STATS_EDGES_KEY,
    STATS_KEY,
    STATS_PASSES,
    STUDY_KEY,
    WORDS_KEY,
    SiteReason,
    encode_word_counts,
    flatten,
    site_error,
)
from fedmed.security.policy import message_plan, site_audit_mod, site_config, site_policy_mod
from fedmed.site.fedbn import (
    LocalLayerStore,
    initial_local_state,
    simulation_state_dir,
    site_model_state,
)
from fedmed.site.inputs import NOISE_KEY, site_inputs, site_of, site_secret  # noqa: F401 (NOISE_KEY: its old home)
from fedmed.site.personalize import personalize
from fedmed.site.stats import statistics_reply
from fedmed.tasks import build_model, get_task
from fedmed.tasks.local_layers import local_keys, split
from fedmed.train import derive_seed, evaluate, resolve_device, train_plain

log = logging.getLogger("fedmed.site")
app = ClientApp(mods=[site_audit_mod, site_policy_mod])


# -- what a message needs ------------------------------------------------------------------------


def _site_inputs(run_json: str, context: Context) -> tuple[RunConfig, SiteSpec, SiteData]:
    """The study plan (as this site runs it), this node's site and its data (fedmed.site.inputs:
    parsed and loaded once per plan, not per message)."""
    inputs = site_inputs(run_json, context)
    return inputs.run, inputs.site, inputs.data


def _keyed_inputs(run_json: str, context: Context) -> tuple[RunConfig, SiteSpec, SiteData, str]:
    """``_site_inputs`` and the key of the site's privacy ledger for this data.

    The key is the dataset's identity BEFORE any split or preprocessing (its registered files'
    SHA-256 in a deployment, the file's in a simulation), so a plan with another split_seed,
    test_fraction or schema spends from the same budget.
    """
    inputs = site_inputs(run_json, context)
    return inputs.run, inputs.site, inputs.data, inputs.ledger_key


def _inputs(msg: Message, context: Context) -> tuple[RunConfig, SiteSpec, SiteData]:
    return _site_inputs(str(msg.content["config"][RUN_KEY]), context)


def _metrics_reply(msg: Message, site: SiteSpec, metrics: dict[str, float]) -> Message:
    content = RecordDict(
        {"metrics": MetricRecord(metrics), SITE_KEY: ConfigRecord({"name": site.name})}
    )
    return Message(content, reply_to=msg)


def _release(state: dict[str, torch.Tensor], seed: int, plan_digest: str) -> str:
    """What this round computes: the global model it starts from, its seed and the plan
    (``plan_digest``: the SHA-256 of the plan's exact text, taken once per plan).

    The ledger charges a release once (a resumed coordinator may ask for a round again).
    """
    digest = hashlib.sha256(f"{seed}/{plan_digest}".encode())
    digest.update(fingerprint(*(state[k].detach().cpu().numpy() for k in sorted(state))).encode())
    return digest.hexdigest()


def _fail_closed(handler: Callable[[Message, Context], Message]) -> Callable[..., Message]:
    """Turn any failure into an error reply that names the site and says little else."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            site = ""  # not known: the coordinator names the site from the replying node
            with contextlib.suppress(Exception):
                own = site_config(context)
                site = (
                    own.name if own else site_of(plan_from_json(message_plan(msg)), context)[1].name
                )
            log.error("site %s: %s failed: %s", site or "?", msg.metadata.message_type, exc)
            if isinstance(exc, PrivacyBudgetExceeded):
                code, reason = SiteReason.BUDGET_EXHAUSTED, "privacy budget exhausted"
            elif isinstance(exc, PolicyViolation):
                code, reason = SiteReason.POLICY_REFUSED, str(exc)
            elif isinstance(exc, LedgerDamaged):  # the operator's fix is in the site's log
                code = SiteReason.LEDGER_DAMAGED
                reason = (
                    "privacy ledger failed verification; the site trains no more until restored"
                )
            elif isinstance(exc, DataError):
                code = SiteReason.DATA_INVALID
                reason = "site data failed validation (details in the site's log)"
            else:
                code, reason = SiteReason.FAILED, "site failed (details in the site's log)"
            return Message(site_error(site, code, reason), reply_to=msg)

    return wrapped


def fail_closed_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    """``_fail_closed`` as a mod, for apps whose handlers are not ours (the legacy SecAgg+ app)."""
    return _fail_closed(call_next)(msg, context)


def central_clipping_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    """Flower's fixedclipping_mod, but only when the coordinator asks for client-side clipping.

    One ClientApp then serves studies with and without central DP.
    """
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    if KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


class LocalLayers:
    """This site's own normalization layers for one study (FedBN; fedmed.local_layers).

    Built only when the study sets personalize.local_normalization. The store lives in the
    site's state_dir in a deployment, else in the simulation's RUN_DIR/sites/<site>.
    """

    def __init__(self, run: RunConfig, site: SiteSpec, context: Context, study: str) -> None:
        own = site_config(context)
        root = own.state_path if own else simulation_state_dir(run, study) / site.name
        self.run = run
        self.store = LocalLayerStore(root / "local-layers", study)

    def own(self, up_to: int) -> dict[str, torch.Tensor]:
        """The site's layers saved for the latest round <= ``up_to`` (initial ones at first)."""
        local = self.store.latest(up_to)
        return initial_local_state(self.run) if local is None else local

    def start(
        self, model: torch.nn.Module, shared: Mapping[str, torch.Tensor], up_to: int
    ) -> dict[str, torch.Tensor]:
        """The global shared arrays with the site's own layers as of round ``up_to``."""
        return site_model_state(shared, self.own(up_to), local_keys(model))

    def keep(self, server_round: int, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Store the trained local layers at the site; return the shared part, the reply."""
        shared, local = split(model.state_dict(), local_keys(model))
        self.store.save(server_round, local)
        return shared


def _local_layers(
    run: RunConfig, site: SiteSpec, context: Context, config: Mapping[str, Any]
) -> LocalLayers | None:
    if not run.personalize.local_normalization:
        return None
    return LocalLayers(run, site, context, str(config.get(STUDY_KEY, "unnamed")))


def _training_seed(seed: int, context: Context) -> int:
    """The seed a site trains with: ``seed`` (from the plan) keyed by the site's own secret.

    Without DP-SGD's noise being secret, DP means nothing: the plan's seed is the coordinator's
    choice, and Opacus (without secure_mode) draws its noise and its Poisson batches from
    torch's RNG, so a coordinator that knows the seed can regenerate every noise vector and
    subtract it from the update. A deployed site therefore mixes in a 256-bit secret kept in
    its state_dir (created 0600 on first use) and uses 63 bits of the HMAC: still the same seed
    for the same round (a replayed release reproduces its update), unpredictable to anyone else.
    Simulations (one owner of all data) keep the plan's seed, for reproducible experiments.
    """
    own = site_config(context)
    if own is None:
        return seed
    secret = site_secret(own)
    digest = hmac.new(secret, str(seed).encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _proximal_mu(run: RunConfig, config: Mapping[str, Any]) -> float:
    """FedProx's mu as the approved plan sets it (the hash binds it).

    Flower's FedProx also sends its mu with every train message; a value that differs from the
    plan's would train outside what the site approved, so the round is refused.
    """
    planned = run.strategy.proximal_mu if run.strategy.name == "fedprox" else 0.0
    sent = config.get("proximal-mu")
    if sent is not None and float(sent) != planned:
        raise PolicyViolation("the message's proximal-mu differs from the approved plan's")
    return planned


# -- handlers ------------------------------------------------------------------------------------


def local_round(
    run_json: str, context: Context, state: dict[str, torch.Tensor], config: Mapping[str, Any]
) -> tuple[SiteSpec, dict[str, torch.Tensor], dict[str, float]]:
    """One round of local training at this site, whatever carried the message.

    ``state`` is the global model, ``config`` the coordinator's train config (server-round,
    FedProx's proximal-mu, the study id). Returns the site, the trained state to send (without
    the normalization layers when the site keeps them) and the metrics to report. Under DP the
    site's ledger guards and records the round first.
    """
    inputs = site_inputs(run_json, context)
    run, site, data, dataset = inputs.run, inputs.site, inputs.data, inputs.ledger_key
    model = build_model(run)
    server_round = int(config["server-round"])
    this_round = inputs.plan.at_round(run, server_round)  # train.lr_decay
    local = _local_layers(run, site, context, config)
    if local is not None:  # FedBN: this site's own normalization layers, from its last round
        state = local.start(model, state, server_round - 1)
    model.load_state_dict(state)
    proximal_mu = _proximal_mu(run, config)
    seed = _training_seed(derive_seed(run.seed, server_round, site.name), context)
    device = resolve_device(run.device)
    task = get_task(run.task)
    epsilon = epsilon_total = 0.0
    if run.privacy.enabled:
        # Budget guard first: the site's own cap, against everything ever spent on this data.
        own = site_config(context)
        # A deployed site accounts at its own δ; a simulated one at the plan's.
        privacy = (
            at_site_delta(run.privacy, site_delta(own.delta, data.n_train))
            if own is not None
            else run.privacy
        )
        ledger = PrivacyLedger(site.name, own.state_path / "ledger" if own else None)
        # Spending recorded before ledgers were keyed by the registered files still counts.
        legacy = (fingerprint(data.x_train, data.y_train),)
        study = str(config.get(STUDY_KEY, "unnamed"))
        release = _release(state, seed, inputs.plan.digest)
        held = ledger.reserve(
            dataset,
            study,
            server_round,
            planned_round(data.n_train, run),
            privacy,
            site.epsilon_cap,
            release=release,
            aliases=legacy,
        )  # None: a replay of a round already charged, free (see fedmed.ledger)
        try:
            result, entries = train_private(
                model,
                data.x_train,
                data.y_train,
                task,
                this_round,
                seed=seed,
                device=device,
                proximal_mu=proximal_mu,
            )
        except BaseException:
            if held is not None:  # nothing left the site: the reservation is released
                ledger.cancel(held)
            raise
        if held is not None:
            ledger.settle(held, entries)
        epsilon, epsilon_total = ledger.spending(dataset, privacy, study, aliases=legacy)
    else:
        result = train_plain(
            model,
            data.x_train,
            data.y_train,
            task,
            this_round.train,
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
    model = model.cpu()
    reply = local.keep(server_round, model) if local is not None else model.state_dict()
    return site, reply, metrics


@app.train(mods=[central_clipping_mod])
@_fail_closed
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    site, state, metrics = local_round(
        str(config[RUN_KEY]), context, msg.content["arrays"].to_torch_state_dict(), config
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord(metrics),
            SITE_KEY: ConfigRecord({"name": site.name}),
        }
    )
    return Message(content, reply_to=msg)


def local_evaluate(
    run_json: str,
    context: Context,
    state: dict[str, torch.Tensor],
    config: Mapping[str, Any] | None = None,
) -> tuple[SiteSpec, dict[str, float]]:
    """Metrics of the global model ``state`` on this site's own test split.

    With local normalization the site evaluates with its own layers of this round (``config``
    carries server-round and the study id).
    """
    run, site, data = _site_inputs(run_json, context)
    model = build_model(run)
    local = _local_layers(run, site, context, config or {})
    if local is not None:
        state = local.start(model, state, int((config or {})["server-round"]))
    model.load_state_dict(state)
    metrics = evaluate(
        model,
        data.x_test,
        data.y_test,
        get_task(run.task),
        resolve_device(run.device),
        train=(data.x_train, data.y_train),
        horizons=run.data.schema.horizons,
    )
    metrics["num-examples"] = len(data.y_test)
    return site, metrics


@app.evaluate()
@_fail_closed
def evaluate_global(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    state = msg.content["arrays"].to_torch_state_dict()
    site, metrics = local_evaluate(str(config[RUN_KEY]), context, state, config)
    return _metrics_reply(msg, site, metrics)


@app.evaluate("personalize")
@_fail_closed
def personalize_final(msg: Message, context: Context) -> Message:
    """This site's model vs the final global model; only test metrics leave the site.

    "Before" is the global model as the coordinator holds it. "After" is this site's own: with
    local normalization its own normalization layers, then fine-tuned for
    personalize.local_epochs (if set) on its train split.
    """
    run, site, data = _inputs(msg, context)
    model = build_model(run)
    shared = msg.content["arrays"].to_torch_state_dict()
    local = _local_layers(run, site, context, msg.content["config"])
    own = None
    if local is None:
        model.load_state_dict(shared)
    else:  # the coordinator's model holds the study's initial normalization layers
        keys = local_keys(model)
        model.load_state_dict(site_model_state(shared, initial_local_state(run), keys))
        own = local.own(run.rounds)
    result = personalize(model, data, run, site.name, resolve_device(run.device), own)
    return _metrics_reply(msg, site, flatten(result))


@app.query("statistics")
@_fail_closed
def feature_statistics(msg: Message, context: Context) -> Message:
    """This site's own preprocessing statistics, for the served model (deployment; opt-in)."""
    own = site_config(context)
    if own is not None and not own.share_statistics:
        raise PolicyViolation("the site does not share feature statistics (share_statistics)")
    _, site, data = _inputs(msg, context)
    stats = json.dumps({**data.preprocessing, "n": data.n_train})
    content = RecordDict({SITE_KEY: ConfigRecord({"name": site.name, STATISTICS_KEY: stats})})
    return Message(content, reply_to=msg)


@app.query("vocabulary")
@_fail_closed
def shared_words(msg: Message, context: Context) -> Message:
    """This site's part of the study's text vocabulary (deployment: opt-in, share_statistics).

    Only the words of its TRAIN texts that it counts at least data.text.min_count times (the
    approved plan's threshold) leave the site, with their counts: a rarer word (a name, a record
    number) never does. Test texts are not counted, so the vocabulary learns nothing of them.
    """
    from fedmed.data.text import TextTable, shared_word_counts
    from fedmed.tasks import load_site_table

    own = site_config(context)
    if own is not None and not own.share_statistics:
        raise PolicyViolation("the site does not share word counts (share_statistics)")
    run, site, _ = site_of(plan_from_json(message_plan(msg)), context)
    table = load_site_table(run, site)
    if not isinstance(table, TextTable):
        raise PolicyViolation("the plan's task has no text vocabulary")
    if own is not None and len(table.y_train) + len(table.y_test) < own.min_rows:
        raise PolicyViolation(
            f"the dataset has fewer rows than the site's minimum ({own.min_rows})"
        )
    counts = shared_word_counts(table, run.data.text.min_count)
    log.info("site %s shares %d words for the text vocabulary", site.name, len(counts))
    record = ConfigRecord({"name": site.name, WORDS_KEY: encode_word_counts(counts)})
    return Message(RecordDict({SITE_KEY: record}), reply_to=msg)


def _statistics_pass(msg: Message, context: Context, phase: str) -> Message:
    """One pass of the study's federated statistics (fedmed.site.stats): counts only."""
    config = msg.content["config"]
    site, reply = statistics_reply(
        str(config[RUN_KEY]),
        context,
        phase,
        str(config.get(STUDY_KEY, "unnamed")),
        str(config.get(STATS_EDGES_KEY, "")),
    )
    return Message(
        RecordDict({SITE_KEY: ConfigRecord({"name": site.name, STATS_KEY: reply})}), reply_to=msg
    )


@app.query(STATS_PASSES[0])
@_fail_closed
def stats_cells(msg: Message, context: Context) -> Message:
    """Pass 1: cohort, missing, categories, outcome and coarse cells (public edges)."""
    return _statistics_pass(msg, context, STATS_PASSES[0])


@app.query(STATS_PASSES[1])
@_fail_closed
def stats_histograms(msg: Message, context: Context) -> Message:
    """Pass 2: histograms on the study's shared edges and the life table (survival)."""
    return _statistics_pass(msg, context, STATS_PASSES[1])
