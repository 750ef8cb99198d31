"""Deployment-mode sites, run in-process: policy first, registry data, audit, nothing leaks.

The ClientApp behaves as under a real SuperNode (node config ``fedmed-site`` = the site's TOML);
the in-process grid stands in for the network so every byte a site sends can be inspected.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from fedmed.config import SiteSpec, parse_run_config
from fedmed.coordinator.app import build_server_app
from fedmed.data.registry import DatasetRegistry
from fedmed.errors import ConfigError, DataError, StudyFailed
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.protocol import SITE_CONFIG_KEY
from fedmed.runtime.inprocess import RUN_ID, InProcessGrid
from fedmed.security.audit import AuditLog
from fedmed.security.policy import plan_hash
from fedmed.site.app import app as client_app
from fedmed.study.plan import RunPlan, new_run_dir
from fedmed.tasks import load_site_table
from tests.conftest import write_site_csv

CANARY = 987.654321  # a blood pressure no hospital records: if it shows up, a row leaked
CANARY_TEXT = "CANARY-ROW-7f3a"


class RecordingGrid(InProcessGrid):
    """Keeps the wire encoding of every reply a site sends."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[bytes] = []

    def _deliver(self, msg):
        reply = super()._deliver(msg)
        self.sent.append(message_to_proto(reply).SerializeToString())
        return reply


def _study(tmp_path: Path) -> dict:
    return {
        "name": "cohort",
        "rounds": 2,
        "output_dir": str(tmp_path / "runs"),
        "model": {"kind": "logreg"},
        "train": {"local_epochs": 1, "batch_size": 8, "lr": 0.1},
        "strategy": {"min_sites": 2},
        "privacy": {"enabled": True, "target_epsilon": 4.0},
        "data": {
            "dataset": "cohort",
            "schema": {
                "target": "outcome",
                "features": ["age", "bp", "smoker"],
                "categorical": {"smoker": ["no", "yes"]},
            },
        },
        "sites": [{"name": n} for n in ("alpha", "beta", "gamma", "delta", "echo")],
    }


def _site(
    tmp_path: Path, name: str, approved: str, table: Path | None, share: bool = False
) -> Path:
    state = tmp_path / "state" / name
    if table is not None:
        DatasetRegistry(state).add("cohort", table)
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\ninsecure = true\nstate_dir = "{state}"\n'
        f'approved_plans = ["{approved}"]\nmin_rows = 10\n'
        f"share_statistics = {str(share).lower()}\n"
    )
    return path


def test_sites_decide_and_nothing_identifying_leaves(tmp_path: Path) -> None:
    cfg = parse_run_config(_study(tmp_path))
    approved = plan_hash(cfg)
    tables = tmp_path / "hospital-files"
    tables.mkdir()
    alpha = write_site_csv(tables / "alpha.csv", 80, seed=1)
    frame = pd.read_csv(alpha)
    frame.loc[5, "bp"] = CANARY  # a canary row inside a table that trains normally
    frame.to_csv(alpha, index=False)
    beta = write_site_csv(tables / "beta.csv", 60, seed=2)
    gamma = write_site_csv(tables / "gamma.csv", 60, seed=3)
    frame = pd.read_csv(gamma, dtype=str)
    frame.loc[7, "age"] = CANARY_TEXT  # fails validation: the error names file, row and value
    frame.to_csv(gamma, index=False)
    site_files = [
        _site(tmp_path, "alpha", approved, alpha, share=True),
        _site(tmp_path, "beta", approved, beta),
        _site(tmp_path, "gamma", approved, gamma),
        # delta never approved this plan and has no dataset: it must refuse on the plan alone.
        _site(tmp_path, "delta", "sha256:" + "1" * 64, None),
        # echo approved the plan but never registered the dataset the study names.
        _site(tmp_path, "echo", approved, None),
    ]

    grid, metrics, run_dir = _run_deployed(cfg, site_files)

    assert set(metrics["final"]["sites"]) == {"alpha", "beta"}
    reasons = {f["reason"] for h in metrics["history"] for f in h["failures"]}
    assert any("'gamma'" in r and "failed validation" in r for r in reasons), reasons
    assert any("'delta'" in r and "not approved" in r for r in reasons), reasons
    assert any("'echo'" in r and "'cohort' is not registered" in r for r in reasons), reasons
    assert (run_dir / "model.safetensors").is_file()
    # Serving statistics come only from sites that opted in (alpha); beta declined.
    card = json.loads((run_dir / "model.card.json").read_text())
    assert card["preprocessing"]["sites"] == 1
    assert any("'beta'" in r and "share feature statistics" in r for r in reasons), reasons

    # The site's own error names the file and row (for its data steward) ...
    with pytest.raises(DataError) as local:
        load_site_table(cfg, SiteSpec("gamma", path=str(gamma)))
    assert str(gamma) in str(local.value)
    # ... but nothing a site sent holds a row value, a file path or a stack trace.
    wire = b"".join(grid.sent)
    assert len(grid.sent) == (2 * 2 + 1) * 5  # 2 rounds x (train + evaluate) + statistics
    forbidden = [
        str(CANARY).encode(),
        struct.pack("<d", CANARY),
        struct.pack("<f", CANARY),
        CANARY_TEXT.encode(),
        str(tmp_path).encode(),
        b"hospital-files",
        b".csv",
        b"Traceback",
    ]
    for needle in forbidden:
        assert needle not in wire, f"{needle!r} left a site"

    # Each site's audit log holds every exchange, refusals included, and verifies.
    for name in ("alpha", "gamma", "delta"):
        log = AuditLog(tmp_path / "state" / name)
        entries = log.entries()
        assert log.verify() == []
        assert len(entries) == 2 * (2 * 2 + 1)  # received + sent, per message
        assert {e["plan_hash"] for e in entries} == {approved}
    delta = AuditLog(tmp_path / "state" / "delta").entries()
    assert all("not approved" in e["outcome"] for e in delta if e["direction"] == "sent")
    alpha_sent = [e for e in AuditLog(tmp_path / "state" / "alpha").entries() if "epsilon" in e]
    assert max(e["epsilon"] for e in alpha_sent) > 0
    assert all(
        e["update_sha256"].startswith("sha256:") for e in alpha_sent if "train" in e["message_type"]
    )


# -- image and series sites ----------------------------------------------------------------------

CANARY_ID = 8_675_309  # a patient id no test table otherwise holds


def _run_deployed(
    cfg, site_files: list[Path], app: ClientApp = client_app
) -> tuple[RecordingGrid, dict, Path]:
    """The study's ServerApp over in-process sites that each run with their own site TOML."""
    plan = RunPlan(cfg, new_run_dir(cfg), engine="deployment")
    grid = RecordingGrid(app, len(site_files), plan.to_run_config())
    for context, site_file in zip(grid.contexts.values(), site_files, strict=True):
        context.node_config = {SITE_CONFIG_KEY: str(site_file)}
    TaskIdentity.run_id, TaskIdentity.task_id = RUN_ID, 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    server = Context(RUN_ID, SUPERLINK_NODE_ID, {}, RecordDict(), plan.to_run_config())
    build_server_app(plan)(grid, server)
    return grid, json.loads((plan.run_dir / "metrics.json").read_text()), plan.run_dir


def _registered_site(
    tmp_path: Path, name: str, approved: str, path: Path, share: bool, **add: object
) -> Path:
    state = tmp_path / "state" / name
    DatasetRegistry(state).add("study-data", path, **add)
    site = tmp_path / f"{name}.toml"
    site.write_text(
        f'name = "{name}"\ninsecure = true\nstate_dir = "{state}"\n'
        f'approved_plans = ["{approved}"]\nmin_rows = 10\n'
        f"share_statistics = {str(share).lower()}\n"
    )
    return site


def _assert_nothing_leaked(wire: bytes, tmp_path: Path, extra: list[bytes]) -> None:
    for needle in [str(tmp_path).encode(), b"Traceback", *extra]:
        assert needle not in wire, f"{needle!r} left a site"


def test_image_sites_train_from_their_registered_npz_and_png_folder(tmp_path: Path) -> None:
    from tests.data.test_registry import _png_folder
    from tests.tasks.test_imaging import _images, _npz

    raw = {
        "name": "scans",
        "task": "imaging-classification",
        "rounds": 2,
        "output_dir": str(tmp_path / "runs"),
        "model": {"kind": "cnn", "hidden": [4]},
        "train": {"local_steps": 2, "batch_size": 8, "optimizer": "adam", "lr": 0.01},
        "privacy": {"enabled": True, "target_epsilon": 8.0},
        "data": {"dataset": "study-data", "schema": {"features": ["gray"], "min_rows": 10}},
        "sites": [{"name": "st-marys"}, {"name": "riverside"}],
    }
    cfg = parse_run_config(raw)
    approved = plan_hash(cfg)
    (tmp_path / "hospital-files").mkdir()
    npz = _npz(tmp_path / "hospital-files" / "scans.npz")
    folder = _png_folder(tmp_path / "hospital-files" / "export", n=40)
    # The PNG site names its label column "target" (the study's data.schema.target).
    labels = pd.read_csv(folder / "labels.csv").rename(columns={"label": "target"})
    labels.to_csv(folder / "labels.csv", index=False)
    sites = [
        _registered_site(tmp_path, "st-marys", approved, npz, share=True),
        _registered_site(tmp_path, "riverside", approved, folder, share=True),
    ]

    grid, metrics, run_dir = _run_deployed(cfg, sites)

    assert set(metrics["final"]["sites"]) == {"st-marys", "riverside"}, metrics["history"]
    assert all(not h["failures"] for h in metrics["history"]), metrics["history"]
    assert metrics["final"]["sites"]["st-marys"]["epsilon"] > 0
    card = json.loads((run_dir / "model.card.json").read_text())
    assert card["preprocessing"]["sites"] == 2 and card["preprocessing"]["height"] == 8
    # No image (as stored, or as the model's float32 input) and no file name left a site.
    images, _ = _images(80, seed=0)
    scaled = ((images[:3].astype(np.float32) / 255 - 0.5) / 0.5).tobytes()
    wire = b"".join(grid.sent)
    _assert_nothing_leaked(
        wire,
        tmp_path,
        [images[0].tobytes(), images[1].tobytes(), scaled[:32], b".npz", b".png", b"labels"],
    )


def _icu_study(tmp_path: Path, *, rounds: int, kind: str, **series: str) -> dict:
    """Two ICUs' series study, naming a dataset each site registered (deployment)."""
    from tests.tasks.test_sequence import VARIABLES

    return {
        "name": "icu",
        "task": "sequence-classification",
        "rounds": rounds,
        "output_dir": str(tmp_path / "runs"),
        "model": {"kind": kind, "hidden": [8]},
        "train": {"local_steps": 2, "batch_size": 16, "optimizer": "adam", "lr": 0.01},
        "data": {
            "dataset": "study-data",
            "schema": {"target": "In-hospital_death", "features": list(VARIABLES), "min_rows": 10},
            "series": {"hours": 12, "bin_minutes": 60, **series},
        },
        "sites": [{"name": "coronary"}, {"name": "surgical"}],
    }


def test_series_sites_train_with_their_own_outcomes_and_layout(tmp_path: Path) -> None:
    from tests.tasks.test_sequence import VARIABLES, _long_and_outcomes

    cfg = parse_run_config(_icu_study(tmp_path, rounds=2, kind="gru"))
    approved = plan_hash(cfg)
    a, b = tmp_path / "hospital-a", tmp_path / "hospital-b"
    a.mkdir(), b.mkdir()
    long_a, out_a = _long_and_outcomes(a, seed=1)
    frame = pd.read_csv(long_a)
    frame.loc[frame.index[frame["parameter"] == "HR"][0], "value"] = CANARY  # a canary reading
    frame.loc[frame["record_id"] == 1003, "record_id"] = CANARY_ID  # a canary patient
    frame.to_csv(long_a, index=False)
    outcomes = pd.read_csv(out_a)
    outcomes.loc[outcomes["RecordID"] == 1003, "RecordID"] = CANARY_ID
    outcomes.to_csv(out_a, index=False)
    # Hospital B exports other column names: its registration says which is which.
    long_b, out_b = _long_and_outcomes(b, seed=2)
    pd.read_csv(long_b).set_axis(["pid", "minute", "item", "reading"], axis=1).to_csv(
        long_b, index=False
    )
    columns = ("id_column", "time_column", "variable_column", "value_column")
    layout = dict(zip(columns, ("pid", "minute", "item", "reading"), strict=True))
    sites = [
        _registered_site(tmp_path, "coronary", approved, long_a, share=True, outcomes=out_a),
        _registered_site(
            tmp_path, "surgical", approved, long_b, share=False, outcomes=out_b, layout=layout
        ),
    ]

    grid, metrics, run_dir = _run_deployed(cfg, sites)

    assert set(metrics["final"]["sites"]) == {"coronary", "surgical"}, metrics["history"]
    reasons = [f["reason"] for h in metrics["history"] for f in h["failures"]]
    assert reasons == ["site 'surgical': the site does not share feature statistics "
                       "(share_statistics)"], reasons  # fmt: skip
    card = json.loads((run_dir / "model.card.json").read_text())
    assert card["preprocessing"]["variables"] == list(VARIABLES)
    assert card["preprocessing"]["sites"] == 1
    _assert_nothing_leaked(
        b"".join(grid.sent),
        tmp_path,
        [
            str(CANARY).encode(),
            struct.pack("<d", CANARY),
            struct.pack("<f", CANARY),
            str(CANARY_ID).encode(),
            struct.pack("<q", CANARY_ID),
            b"outcomes",
            b".csv",
        ],
    )


def test_consortium_scale_needs_every_site_and_then_trains_every_site_alike(
    tmp_path: Path,
) -> None:
    from tests.tasks.test_sequence import VARIABLES, _long_and_outcomes

    cfg = parse_run_config(_icu_study(tmp_path, rounds=1, kind="grud", standardize="consortium"))
    files = []
    for i, name in enumerate(("coronary", "surgical")):
        (tmp_path / name).mkdir()
        files.append(_long_and_outcomes(tmp_path / name, seed=i + 5))
    approved = plan_hash(cfg)

    def sites(share_surgical: bool) -> list[Path]:  # fresh site files: configs are cached
        base = tmp_path / f"share-{share_surgical}"
        base.mkdir()
        return [
            _registered_site(base, name, approved, long, share=share, outcomes=out)
            for name, (long, out), share in zip(
                ("coronary", "surgical"), files, (True, share_surgical), strict=True
            )
        ]

    with pytest.raises(ConfigError, match="surgical did not send them.*set share_statistics"):
        _run_deployed(cfg, sites(share_surgical=False))
    _, metrics, run_dir = _run_deployed(cfg, sites(share_surgical=True))

    assert set(metrics["final"]["sites"]) == {"coronary", "surgical"}, metrics["history"]
    used = metrics["config"]["data"]["series"]
    card = json.loads((run_dir / "model.card.json").read_text())["preprocessing"]
    assert len(used["mean"]) == len(VARIABLES) and card["mean"] == used["mean"]
    assert card["std"] == used["std"] and card["fitted_on"].startswith("the consortium")
    assert plan_hash(parse_run_config(metrics["config"])) == approved  # still the approved plan


def test_a_plan_naming_data_files_is_refused_before_any_data_is_read(tmp_path: Path) -> None:
    from tests.tasks.test_sequence import VARIABLES, _long_and_outcomes

    long, outcomes = _long_and_outcomes(tmp_path)
    raw = {
        "name": "icu",
        "task": "sequence-classification",
        "rounds": 1,
        "output_dir": str(tmp_path / "runs"),
        "model": {"kind": "gru", "hidden": [4]},
        "data": {
            "dataset": "study-data",
            # A coordinator pointing the site at a file of its choosing:
            "schema": {"target": "In-hospital_death", "features": list(VARIABLES), "min_rows": 10},
            "series": {"outcomes": str(tmp_path / "elsewhere.csv")},
        },
        "sites": [{"name": "coronary"}, {"name": "surgical"}],
    }
    cfg = parse_run_config(raw)
    approved = plan_hash(cfg)
    sites = [
        _registered_site(tmp_path, n, approved, long, share=False, outcomes=outcomes)
        for n in ("coronary", "surgical")
    ]

    with pytest.raises(StudyFailed, match="no round aggregated"):  # and so no model
        _run_deployed(cfg, sites)

    (run_dir,) = Path(cfg.output_dir).iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["final"]["sites"] == {}
    assert not (run_dir / "model.safetensors").exists()
    reasons = {f["reason"] for h in metrics["history"] for f in h["failures"]}
    assert any("reads only its registered data" in r for r in reasons), reasons


# -- each site's own δ ---------------------------------------------------------------------------


def _site_with(tmp_path: Path, name: str, approved: str, table: Path, extra: str) -> Path:
    """A deployment site whose config adds ``extra`` lines (its δ, its cap)."""
    path = _site(tmp_path, name, approved, table)
    path.write_text(path.read_text() + extra)
    return path


def test_a_site_accounts_at_its_own_delta_and_caps_there(tmp_path: Path) -> None:
    raw = _study(tmp_path)
    raw.update(rounds=1, sites=[{"name": n} for n in ("alpha", "beta", "gamma", "delta")])
    raw["strategy"]["min_sites"] = 1
    raw["privacy"]["delta"] = 1e-9  # noise calibrated for ε = 4 at δ = 1e-9
    cfg = parse_run_config(raw)
    approved = plan_hash(cfg)
    table = write_site_csv(tmp_path / "same.csv", 80, seed=1)  # same rows: same noise
    sites = [
        _site_with(tmp_path, "alpha", approved, table, ""),  # default: min(1e-5, 1/rows)
        _site_with(tmp_path, "beta", approved, table, "delta = 1e-9\n"),
        # The same cap below the plan's target ε: within it at δ = 1e-5, over it at δ = 1e-9.
        _site_with(tmp_path, "gamma", approved, table, "epsilon_cap = 3.9\n"),
        _site_with(tmp_path, "delta", approved, table, "delta = 1e-9\nepsilon_cap = 3.9\n"),
    ]

    _, metrics, _ = _run_deployed(cfg, sites)

    eps = metrics["history"][0]["epsilon"]
    assert 3.9 < eps["beta"] <= 4.0 + 1e-6  # the plan's calibration, at the plan's δ
    assert 0 < eps["alpha"] < 3.9  # the same noise and steps, stated at alpha's larger δ
    assert eps["gamma"] == eps["alpha"]
    reasons = [f["reason"] for f in metrics["history"][0]["failures"] if f["phase"] == "train"]
    assert reasons == ["site 'delta': privacy budget exhausted"]
    # The ledger is keyed by the registered files, before any split or preprocessing.
    registered = DatasetRegistry(tmp_path / "state" / "alpha").verify("cohort").sha256
    ledger = PrivacyLedger("alpha", tmp_path / "state" / "alpha" / "ledger")
    assert [r["round"] for r in ledger.records(registered)] == [1]


def test_a_plan_calibrated_at_a_larger_delta_is_refused_and_audited(tmp_path: Path) -> None:
    raw = _study(tmp_path)
    raw.update(rounds=1, sites=[{"name": n} for n in ("alpha", "beta")])
    raw["strategy"]["min_sites"] = 1
    raw["privacy"]["delta"] = 0.05  # the δ-bypass (0.1 is the parse-time limit; a site δ is ≤ 1e-5)
    cfg = parse_run_config(raw)
    approved = plan_hash(cfg)
    table = write_site_csv(tmp_path / "same.csv", 80, seed=1)
    sites = [
        _site_with(tmp_path, "alpha", approved, table, ""),
        # beta knowingly accepts δ = 0.95: it trains, and its ε (at 0.95) is never negative
        _site_with(tmp_path, "beta", approved, table, "delta = 0.95\n"),
    ]

    grid, metrics, _ = _run_deployed(cfg, sites)

    reasons = {
        f["reason"] for h in metrics["history"] for f in h["failures"] if f["phase"] == "train"
    }
    assert reasons == {
        "site 'alpha': the plan calibrates its noise at privacy.delta=0.05, larger than this "
        "site's δ; lower privacy.delta (e.g. 1e-6)"
    }
    assert 0.0 <= metrics["history"][0]["epsilon"]["beta"] <= 4.0
    refused = [
        e for e in AuditLog(tmp_path / "state" / "alpha").entries() if e["direction"] == "sent"
    ]
    assert any("privacy.delta=0.05" in e.get("outcome", "") for e in refused)
    _assert_nothing_leaked(b"".join(grid.sent), tmp_path, [b"Traceback"])


def test_a_deployed_site_trains_with_a_seed_the_coordinator_cannot_know(tmp_path: Path) -> None:
    from fedmed.site.app import NOISE_KEY, _training_seed

    def context(site: Path) -> Context:
        return Context(RUN_ID, 1, {SITE_CONFIG_KEY: str(site)}, RecordDict(), {})

    alpha = _site(tmp_path, "alpha", "sha256:" + "1" * 64, None)
    beta = _site(tmp_path, "beta", "sha256:" + "1" * 64, None)
    simulated = Context(RUN_ID, 1, {"partition-id": 0}, RecordDict(), {})

    seed = _training_seed(1234, context(alpha))

    assert seed == _training_seed(1234, context(alpha))  # a replayed round: the same update
    assert seed != 1234 and seed != _training_seed(1234, context(beta))
    assert 2**32 <= seed < 2**63  # 63 secret bits, not a 32-bit seed one could search
    assert (tmp_path / "state" / "alpha" / NOISE_KEY).stat().st_mode & 0o777 == 0o600
    assert _training_seed(1234, simulated) == 1234  # simulations stay reproducible


def test_text_sites_build_the_vocabulary_from_registered_tables_and_no_rare_word_leaves(
    tmp_path: Path,
) -> None:
    """Deployed text sites: the vocabulary query is answered from each site's registered table,
    only by sites that share statistics, and a name written 3 times at one site (below
    min_count) appears in nothing any site sends (plan, counts, updates, metrics)."""
    from tests.data.test_text import PLANTED, site_texts, text_study

    raw = text_study(tmp_path, [site_texts(0, planted=3), site_texts(1)])
    raw["data"]["dataset"] = "study-data"
    raw["sites"] = [{"name": "st-marys"}, {"name": "riverside"}]
    raw["privacy"] = {"enabled": True, "target_epsilon": 8.0}
    cfg = parse_run_config(raw)
    approved = plan_hash(cfg)
    (tmp_path / "exports").mkdir()
    tables = []
    for i in range(2):
        tables.append(tmp_path / "exports" / f"notes{i}.csv")
        (tmp_path / f"site{i}.csv").rename(tables[-1])

    def sites(share_riverside: bool) -> list[Path]:  # fresh site files: configs are cached
        base = tmp_path / f"share-{share_riverside}"
        base.mkdir()
        return [
            _registered_site(base, name, approved, table, share=share)
            for name, table, share in zip(
                ("st-marys", "riverside"), tables, (True, share_riverside), strict=True
            )
        ]

    with pytest.raises(ConfigError, match="riverside did not send them.*set share_statistics"):
        _run_deployed(cfg, sites(share_riverside=False))
    grid, metrics, run_dir = _run_deployed(cfg, sites(share_riverside=True))

    assert set(metrics["final"]["sites"]) == {"st-marys", "riverside"}, metrics["history"]
    vocabulary = metrics["config"]["data"]["text"]["vocabulary"]
    assert "tumor" in vocabulary and PLANTED.lower() not in vocabulary
    assert (run_dir / "model.tokenizer.json").is_file()
    _assert_nothing_leaked(
        b"".join(grid.sent), tmp_path, [PLANTED.encode(), PLANTED.lower().encode(), b"88412739"]
    )
