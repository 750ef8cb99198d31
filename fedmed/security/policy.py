"""The hospital decides: site policy and audit as ClientApp mods (deployment only).

A site daemon's SuperNode carries ``fedmed-site=<path to sites/NAME.toml>`` in its node config.
With it, every message passes two mods before any handler runs:

- ``site_audit_mod`` (outermost) writes what arrived and what leaves to the site's hash-chained
  audit log — including refusals;
- ``site_policy_mod`` refuses a plan the site has not approved (by content hash), a study that
  does not list the site, or one without local DP when the site requires it — BEFORE any data is
  read, with a reason that is safe to send.

Both read the plan wherever a message carries it: the Message API's ``config`` record, the
legacy API's ``fitins.config`` / ``evaluateins.config`` (SecAgg+, fedmed.site.secure_app), and
the ``fedmed.plan`` record that the secure coordinator stamps on every SecAgg+ stage message
(setup, share keys and unmask carry no fit config of their own). A message that carries no plan,
or two different ones, is refused: a site never runs a protocol step it cannot tie to a plan.

Without ``fedmed-site`` (simulations) both mods step aside.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message

from fedmed.config import RunConfig, SiteConfig, SiteSpec, load_site_config, plain, plan_from_json
from fedmed.errors import PolicyViolation
from fedmed.protocol import (
    RUN_KEY,
    SECAGG_RECORD,
    SITE_CONFIG_KEY,
    STUDY_KEY,
    SiteReason,
    read_error,
    site_error,
)
from fedmed.security.audit import AuditLog

log = logging.getLogger("fedmed.site")


@functools.lru_cache(maxsize=4)
def _load(path: str) -> SiteConfig:
    return load_site_config(Path(path))


def site_config(context: Context) -> SiteConfig | None:
    """The site daemon's own config, or None in a simulation."""
    path = context.node_config.get(SITE_CONFIG_KEY)
    return _load(str(path)) if path else None


def refuse(msg: Message, site: str, reason: str, code: int = SiteReason.POLICY_REFUSED) -> Message:
    return Message(site_error(site, code, reason), reply_to=msg)


def check_plan(site: SiteConfig, run: RunConfig, digest: str = "") -> None:
    """Raise PolicyViolation unless ``site`` agreed to run ``run`` on its data.

    ``digest``: ``run``'s plan hash when the caller has it already (plan_digest), else computed.
    """
    digest = digest or plan_hash(run)
    if digest not in site.approved_plans:
        raise PolicyViolation(
            f"plan {digest} is not approved by this site (its data steward can add it to "
            "approved_plans after review)"
        )
    if site.name not in run.site_names:
        raise PolicyViolation("this study does not list the site")
    if site.require_privacy and not run.privacy.enabled:
        raise PolicyViolation("the site only trains with local differential privacy")
    if run.privacy.enabled and site.delta is not None:
        # Known before any data is read when the site sets its δ (else fedmed.privacy's
        # at_site_delta refuses the same plan once the training rows are counted).
        from fedmed.privacy.accounting import at_site_delta

        at_site_delta(run.privacy, site.delta)
    if run.task == "text-classification" and run.data.text.min_count < site.min_word_count:
        raise PolicyViolation(
            f"the plan shares words a site counts only {run.data.text.min_count} times "
            f"(data.text.min_count); this site shares none counted fewer than "
            f"{site.min_word_count} times (min_word_count)"
        )
    if site.require_secure_aggregation and not run.strategy.secure_aggregation:
        raise PolicyViolation(
            "the site only sends masked updates (strategy.secure_aggregation = true)"
        )
    if run.data.builtin or not run.data.dataset:
        raise PolicyViolation("the plan must name a registered dataset (data.dataset)")
    if run.data.partition_file or run.data.series.outcomes:
        # Paths chosen by the coordinator: a site reads only the files it registered.
        raise PolicyViolation("the plan names data files; a site reads only its registered data")


def plan_records(msg: Message) -> list[ConfigRecord]:
    """Every ConfigRecord of ``msg`` that carries a study plan (Message API and legacy layouts)."""
    if msg.has_error() or not msg.has_content():
        return []
    return [rec for rec in msg.content.config_records.values() if RUN_KEY in rec]


def message_plan(msg: Message) -> str:
    """The one plan (JSON) ``msg`` carries; PolicyViolation if it carries none or several."""
    plans = {str(rec[RUN_KEY]) for rec in plan_records(msg)}
    if not plans:
        raise PolicyViolation("the message carries no study plan")
    if len(plans) > 1:
        raise PolicyViolation("the message carries two different study plans")
    return plans.pop()


def secagg_stage(msg: Message) -> str:
    """The SecAgg+ stage a coordinator message asks for ("" outside secure aggregation)."""
    if msg.has_error() or not msg.has_content():
        return ""
    record = msg.content.config_records.get(SECAGG_RECORD)
    return str(record.get("stage", "")) if record is not None else ""


def site_policy_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    site = site_config(context)
    if site is None or msg.has_error():
        return call_next(msg, context)
    try:
        text = message_plan(msg)
        check_plan(site, plan_from_json(text), plan_digest(text))  # parsed and hashed once
    except PolicyViolation as exc:
        log.warning("site %s refused %s: %s", site.name, msg.metadata.message_type, exc)
        return refuse(msg, site.name, str(exc))
    except Exception as exc:  # an unreadable plan is refused too, without details
        log.warning("site %s could not read the plan: %s", site.name, exc)
        return refuse(msg, site.name, "the plan could not be read", SiteReason.PLAN_UNREADABLE)
    return call_next(msg, context)


# -- audit ---------------------------------------------------------------------------------------


def _wire_bytes(msg: Message) -> int:
    from flwr.common.serde import message_to_proto

    try:
        return message_to_proto(msg).ByteSize()
    except Exception:  # a message Flower itself cannot serialize is logged with size -1
        return -1


def _update_sha256(msg: Message) -> str:
    """SHA-256 over the model arrays a message carries (names, dtypes, shapes and bytes).

    A SecAgg+ reply carries no arrays but its masked vector: that is hashed instead.
    """
    if msg.has_error() or not msg.has_content():
        return ""
    digest = hashlib.sha256()
    found = False
    for _, record in sorted(msg.content.array_records.items()):
        for name, arr in sorted(record.items()):
            digest.update(f"{name}|{arr.dtype}|{list(arr.shape)}|".encode())
            digest.update(arr.data)
            found = True
    secagg = msg.content.config_records.get(SECAGG_RECORD)
    masked = secagg.get("masked_params") if secagg is not None else None
    if isinstance(masked, list):
        for chunk in masked:
            digest.update(bytes(chunk))
            found = True
    return "sha256:" + digest.hexdigest() if found else ""


def _plan_fields(msg: Message) -> dict[str, object]:
    """Round, study and plan hash, wherever the message carries them.

    Legacy (secure) messages carry the round only as their group id.
    """
    records = plan_records(msg)
    if not records:
        return {}
    config = records[0]
    out: dict[str, object] = {"study": str(config.get(STUDY_KEY, ""))}
    round_ = next((rec["server-round"] for rec in records if "server-round" in rec), None)
    if round_ is None and msg.metadata.group_id.isdigit():
        round_ = int(msg.metadata.group_id)
    out["round"] = int(round_ or 0)
    try:
        out["plan_hash"] = plan_digest(message_plan(msg))
    except Exception:
        out["plan_hash"] = "unreadable"
    return out


def site_audit_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    site = site_config(context)
    if site is None:
        return call_next(msg, context)
    audit = AuditLog(site.state_path)
    common = {
        "site": site.name,
        "run_id": int(msg.metadata.run_id),
        "message_type": msg.metadata.message_type,
        **_plan_fields(msg),
    }
    stage = secagg_stage(msg)
    if stage:  # one secure round is four train exchanges: setup, share keys, masked, unmask
        common["secagg_stage"] = stage
    audit.append(
        direction="received",
        message_id=msg.metadata.message_id,
        bytes=_wire_bytes(msg),
        update_sha256=_update_sha256(msg),
        **common,
    )
    reply = call_next(msg, context)
    sent: dict[str, object] = {
        "direction": "sent",
        "bytes": _wire_bytes(reply),
        "update_sha256": _update_sha256(reply),
    }
    if reply.has_error():
        sent["outcome"] = f"refused: {read_error(reply.error)}"
    else:
        sent["outcome"] = "ok"
        metrics = _reply_metrics(reply)
        if metrics is not None:
            sent["metrics"] = metrics
            sent["epsilon"] = float(metrics.get("epsilon", 0.0))
    audit.append(**sent, **common)
    return reply


def _reply_metrics(reply: Message) -> dict[str, int | float] | None:
    """The numbers a reply reports (Message API ``metrics``, or the legacy result records)."""
    for name in ("metrics", "fitres.metrics", "evaluateres.metrics"):
        record = reply.content.get(name)
        if record is not None:
            return {
                k: v
                for k, v in record.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
    return None


def _asdict(obj: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON values (tuples -> lists), like RunConfig.to_dict."""
    return json.loads(json.dumps(plain(obj)))


def _defaults(cls: type) -> dict[str, Any]:
    """The default values of a config dataclass's fields as plain JSON (required ones left out)."""
    import dataclasses

    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return json.loads(
        json.dumps(out, default=lambda o: _asdict(o) if dataclasses.is_dataclass(o) else list(o))
    )


def plan_hash(cfg: RunConfig) -> str:
    """Content hash of everything a site is asked to run and spend on its data.

    A hospital approves one hash, so the hash must bind every setting that determines what is
    computed on its data, what leaves the site and its privacy loss: the task, model and data
    schema, and also rounds, local steps/epochs, batch size, learning rate schedule, the seed,
    local and central DP settings, personalization, FedProx's mu and secure aggregation. Left
    out are only the output settings (name, output_dir), where simulated sites run ([simulation]:
    Ray resources) and the coordinator's own aggregation knobs (PLAN_OUTPUT_ONLY,
    PLAN_RUNTIME_ONLY, COORDINATOR_ONLY_STRATEGY), plus the files and columns a site maps
    from its own registry. Other settings left at their defaults are omitted, so a fedmed
    upgrade that adds an unrelated config key does not void every approval; the privacy-binding
    ones (PRIVACY_BINDING, RELEASE_STRATEGY) are always hashed with their values.
    """
    import hashlib

    from fedmed.config import ImageConfig, SeriesConfig, TextConfig

    default = _defaults(RunConfig)

    def changed(values: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict) and base[key]:
                nested = changed(value, base[key])
                if nested:
                    out[key] = nested
            elif base.get(key) != value:
                out[key] = value
        return out

    spec = cfg.to_dict()
    content: dict[str, Any] = {
        key: value
        for key, value in changed(spec, default).items()
        if key not in PLAN_OUTPUT_ONLY | PLAN_RUNTIME_ONLY
        and key not in ("strategy", "data", "sites")
    }
    for key in PRIVACY_BINDING:
        content[key] = spec[key]
    content["strategy"] = {k: spec["strategy"][k] for k in RELEASE_STRATEGY}
    content["sites"] = [
        # Defaults of a site entry (its name is always "changed": every site is listed).
        changed(site, {**_asdict(SiteSpec("site")), "name": None})
        for site in spec["sites"]
    ]
    data = changed(spec["data"], default["data"])
    # What images and series become (size; window, bins, missing code) is part of what runs;
    # file names and columns are the site's own (its registry), so they are left out.
    site_owned = {
        "outcomes",
        "column",
        "mean",  # the consortium reference: derived from the sites' statistics during the run
        "std",
        *(k for k in spec["data"]["series"] if k.endswith("_column")),
    }
    # The text vocabulary is derived during the run from the sites' own shared word counts (its
    # size, threshold and every other text setting are hashed).
    derived = {"images": site_owned, "series": site_owned, "text": {"vocabulary"}}
    for key, base in (
        ("images", ImageConfig()),
        ("series", SeriesConfig()),
        ("text", TextConfig()),
    ):
        values = {k: v for k, v in spec["data"].get(key, {}).items() if k not in derived[key]}
        data.pop(key, None)
        if changed(values, _asdict(base)):
            data[key] = changed(values, _asdict(base))
    content["data"] = data
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# What a plan hash leaves out: where results go, and how the coordinator combines what sites send
# (these never reach a site's data, its privacy loss or what it releases).
PLAN_OUTPUT_ONLY = frozenset({"name", "output_dir"})
# How many CPUs/GPUs a simulated site's Ray actor reserves changes where it runs, not what it
# computes on the data or releases.
PLAN_RUNTIME_ONLY = frozenset({"simulation"})

COORDINATOR_ONLY_STRATEGY = frozenset(
    {
        "min_sites",
        "server_lr",
        "server_momentum",
        "beta_1",
        "beta_2",
        "tau",
        "trim_beta",
        "num_malicious",
        "krum_select",
        "validate_updates",
        "max_norm_ratio",
        "round_timeout",
        "average_last",
    }
)

# Settings that set a site's privacy loss or its release: hashed with their values even at
# their defaults, so an approved hash means the same ε whichever fedmed version parsed the plan.
PRIVACY_BINDING = ("rounds", "seed", "train", "privacy", "personalize")

RELEASE_STRATEGY = ("name", "proximal_mu", "secure_aggregation")


@functools.lru_cache(maxsize=8)
def plan_digest(text: str) -> str:
    """The plan hash a site approves of plan ``text`` (its JSON), computed once per text."""
    return plan_hash(plan_from_json(text))
