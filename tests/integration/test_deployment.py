"""A real federation on 127.0.0.1: coordinator + 3 site daemons over TLS with node authentication.

Everything goes through the `fedmed` command as an operator would type it: PKI, coordinator,
site daemons (Flower SuperLink/SuperNodes in their own processes), a 3-round study of the demo
task, then the refusals: an unregistered key, a site without the consortium CA, a site that did
not approve the plan; finally the sites' audit logs verify, and an edited one does not.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fedmed.config import load_run_config, resolve_config_path
from fedmed.runtime.deployment import online_sites, wait_until_ready
from fedmed.security.audit import AuditLog
from fedmed.security.policy import plan_hash

from .ports import free_port

pytestmark = pytest.mark.integration

FEDMED = [sys.executable, "-m", "fedmed.cli"]
SITES = ("st-marys", "riverside", "northgate")
OPERATOR = ("--operator", "pki/operators/admin")  # `fedmed pki issue-operator admin`


def fedmed(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FEDMED, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


class Daemons:
    """Started daemons, stopped (with everything they started) however the test ends."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [*FEDMED, *args], cwd=self.root, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def _tree(self, proc: subprocess.Popen) -> list[psutil.Process]:
        """``proc`` and everything it started (its daemons run in sessions of their own, but
        stay its children)."""
        try:
            root = psutil.Process(proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def power_cut(self, name: str) -> None:
        """Everything of daemon ``name``'s dies at once: daemon, SuperNode, executor, apps.

        Only this test's processes: never ``pkill -f sites/NAME.toml``, which also killed the
        daemons of tests (and of other checkouts' test runs) running alongside this one.
        """
        victims: dict[int, psutil.Process] = {}
        pending = [self.procs[name].pid]
        while pending:  # stop each before listing its children: none starts another meanwhile
            pid = pending.pop()
            try:
                proc = psutil.Process(pid)
                proc.suspend()
                pending += [child.pid for child in proc.children()]
            except psutil.NoSuchProcess:
                continue
            victims[pid] = proc
        for proc in victims.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(list(victims.values()), timeout=30)

    def stop_all(self) -> None:
        started = [p for proc in self.procs.values() for p in self._tree(proc)]
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        # Belt and braces: nothing they started survives, nor anything whose command line
        # points into this test's folder.
        for p in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(started, timeout=30)
        subprocess.run(["pkill", "-KILL", "-f", f"{self.root}/"], check=False)


def _site_toml(root: Path, name: str, port: int, runtime_port: int, approved: str, **kw) -> Path:
    ca = kw.get("ca", f"pki/sites/{name}/ca.crt")
    key = kw.get("key", f"pki/sites/{name}/node.key")
    path = root / "sites" / f"{name}.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        f'name = "{name}"\ncoordinator = "127.0.0.1:{port}"\n'
        f'ca_certificate = "../{ca}"\nnode_key = "../{key}"\n'
        f'runtime_port = {runtime_port}\nstate_dir = "../state/{name}"\n'
        f'approved_plans = ["{approved}"]\nepsilon_cap = 10.0\n'
    )
    return path


def _study(root: Path) -> Path:
    """The shipped federation study with a third hospital."""
    text = resolve_config_path("federation").read_text()
    text += '[[sites]]\nname = "northgate"\n'
    path = root / "study.toml"
    path.write_text(text)
    return path


def require_nginx() -> None:
    """The coordinator's gate is nginx: skip where it is not installed, unless CI requires it."""
    from fedmed.errors import ConfigError
    from fedmed.runtime.gate import nginx_bin

    try:
        nginx_bin()
    except ConfigError as exc:
        if os.environ.get("FEDMED_REQUIRE_NGINX") == "1":
            raise
        pytest.skip(str(exc))


def _setup(
    root: Path, unapproved: set[str], overrides: tuple[str, ...] = ()
) -> tuple[int, Daemons]:
    """PKI, tables, site configs and a running coordinator (the caller stops the daemons).

    The sites approve study.toml with ``overrides`` (pass the same ones to `fedmed run --set`).
    """
    require_nginx()
    port = free_port()
    for cmd in (
        ["pki", "init"],
        ["pki", "issue-coordinator", "--host", "localhost", "--host", "127.0.0.1"],
        ["pki", "issue-operator", "admin"],
        *[["pki", "issue-site", s] for s in SITES],
        ["demo-data", "tables"],
    ):
        res = fedmed(*cmd, cwd=root)
        assert res.returncode == 0, res.stderr
    study = _study(root)
    approved = plan_hash(load_run_config(study, list(overrides)))
    for name in SITES:
        plan = approved if name not in unapproved else "sha256:" + "0" * 64
        res = fedmed(
            "site",
            "init",
            name,
            "--coordinator",
            f"127.0.0.1:{port}",
            "--bundle",
            f"pki/sites/{name}",
            "--runtime-port",
            str(free_port()),
            "--approve",
            plan,
            "--epsilon-cap",
            "10",
            *(["--share-statistics"] if name == "st-marys" else []),
            cwd=root,
        )
        assert res.returncode == 0, res.stderr
        site = root / "sites" / f"{name}.toml"
        res = fedmed("site", "data", "add", str(site), "breast", f"tables/{name}.csv", cwd=root)
        assert res.returncode == 0, res.stderr
    daemons = Daemons(root)
    coordinator = daemons.start("coordinator", "coordinator", "start", "--port", str(port))
    try:
        wait_until_ready(root / "coordinator", timeout=120, proc=coordinator)
    except BaseException:
        daemons.stop_all()
        raise
    return port, daemons


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[tuple[Path, Daemons, int]]:
    # northgate's steward has not approved this plan (it approved another model).
    port, daemons = _setup(tmp_path, unapproved={"northgate"})
    try:
        yield tmp_path, daemons, port
    finally:
        daemons.stop_all()


def _wait_online(root: Path, port: int, n: int, timeout: float = 90) -> None:
    from fedmed.cli.federation import load_coordinator

    c = load_coordinator(root / "coordinator", root / OPERATOR[1])
    assert c.port == port
    deadline = time.monotonic() + timeout
    while online_sites(c) < n:
        assert time.monotonic() < deadline, f"{n} sites never came online"
        time.sleep(1)


def test_real_federation_over_tls(federation) -> None:
    root, daemons, port = federation
    for name in SITES:
        daemons.start(name, "site", "start", f"sites/{name}.toml")
    _wait_online(root, port, len(SITES))

    # -- a 3-round study; northgate refuses the unapproved plan, the others finish it ----------
    res = fedmed("run", "study.toml", *OPERATOR, cwd=root, timeout=600)
    assert res.returncode == 0, res.stderr + daemons.log("coordinator")[-3000:]
    run_dir = Path(res.stdout.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [h["round"] for h in metrics["history"]] == [1, 2, 3]
    assert set(metrics["final"]["sites"]) == {"st-marys", "riverside"}
    assert metrics["final"]["average"]["accuracy"] > 0.8
    refusals = {f["reason"] for h in metrics["history"] for f in h["failures"]}
    assert any("'northgate'" in r and "not approved" in r for r in refusals), refusals
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "model.card.json").is_file()
    assert "round 3" in res.stderr  # progress was streamed
    # The model serves a clinic's raw rows with statistics from the one site that shared them.
    card = json.loads((run_dir / "model.card.json").read_text())
    assert card["preprocessing"]["sites"] == 1
    scored = fedmed("predict", str(run_dir), "tables/lakeview.csv", "--output", "s.csv", cwd=root)
    assert scored.returncode == 0, scored.stderr

    # -- the same plan's federated statistics: only st-marys shares them ------------------------
    res = fedmed("run", "study.toml", "--stats", *OPERATOR, cwd=root, timeout=300)
    assert res.returncode == 0, res.stderr + daemons.log("coordinator")[-3000:]
    stats_dir = Path(res.stdout.strip().splitlines()[-1])
    assert stats_dir.name.startswith("federation-stats-")
    stats = json.loads((stats_dir / "stats.json").read_text())
    assert stats["sites"] == ["st-marys"]
    assert "does not share statistics" in stats["refused"]["riverside"], stats["refused"]
    assert "not approved" in stats["refused"]["northgate"], stats["refused"]
    assert stats["cohort"]["sites"]["st-marys"] >= 10
    assert (stats_dir / "stats.md").is_file() and (stats_dir / "histograms.png").is_file()

    # -- a key the coordinator never registered is refused ---------------------------------------
    rogue_bundle = root / "rogue"
    from fedmed.security.pki import make_node_key

    make_node_key(rogue_bundle / "node.key")
    plan = "sha256:" + "0" * 64
    _site_toml(root, "rogue", port, free_port(), plan, key="rogue/node.key", ca="pki/ca.crt")
    res = fedmed("site", "start", "sites/rogue.toml", "--max-wait", "15", cwd=root, timeout=120)
    assert res.returncode != 0
    assert "2004" in res.stdout + res.stderr  # Flower: failed to activate (unknown key)

    # -- a site that trusts another CA cannot even open the TLS connection ----------------------
    other = root / "other-pki"
    assert fedmed("pki", "init", "--dir", str(other), cwd=root).returncode == 0
    _site_toml(
        root,
        "stranger",
        port,
        free_port(),
        plan,
        key="pki/sites/northgate/node.key",
        ca="other-pki/ca.crt",
    )
    res = fedmed("site", "start", "sites/stranger.toml", "--max-wait", "15", cwd=root, timeout=120)
    assert res.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in res.stdout + res.stderr

    # -- audit: every site's log verifies; the refusing site logged its refusals; edits show ---
    for name in SITES:
        res = fedmed("site", "audit", "verify", f"sites/{name}.toml", cwd=root)
        assert res.returncode == 0, res.stdout
    shown = fedmed("site", "audit", "show", "sites/northgate.toml", cwd=root).stdout
    assert "not approved" in shown
    log = root / "state" / "st-marys" / "audit.jsonl"
    lines = log.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["bytes"] += 1
    lines[1] = json.dumps(entry, sort_keys=True)
    log.write_text("\n".join(lines) + "\n")
    res = fedmed("site", "audit", "verify", "sites/st-marys.toml", cwd=root)
    assert res.returncode == 1 and "line 2" in res.stdout


def test_insecure_mode_warns_loudly(tmp_path: Path) -> None:
    site = tmp_path / "lab.toml"
    # Its own state folder: the default, ~/.fedmed/sites/lab, is shared by every run on the host.
    site.write_text(
        'name = "lab"\ninsecure = true\ncoordinator = "127.0.0.1:1"\nstate_dir = "state"\n'
    )
    env = {**os.environ}
    res = subprocess.run(
        [*FEDMED, "site", "start", str(site), "--max-wait", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
        cwd=tmp_path,
    )
    assert "NOT encrypted" in res.stderr
    assert res.returncode != 0
    subprocess.run(["pkill", "-KILL", "-f", f"{tmp_path}/"], check=False)


def test_a_site_killed_mid_study_does_not_stop_it(tmp_path: Path) -> None:
    """A hospital's machine dies after round 1: later rounds time out on it and go on."""
    port, daemons = _setup(tmp_path, unapproved=set())
    try:
        for name in SITES:
            daemons.start(name, "site", "start", f"sites/{name}.toml")
        _wait_online(tmp_path, port, len(SITES))
        run = subprocess.Popen(
            [
                *FEDMED,
                "run",
                "study.toml",
                *OPERATOR,
                "--quiet",
                "--set",
                "rounds=3",
                "--set",
                "strategy.round_timeout=20",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("runs/*/checkpoint.safetensors")):  # round 1 is done
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()
            time.sleep(0.5)
        daemons.power_cut("riverside")  # as with a power cut: daemon, SuperNode, app
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
        metrics = json.loads((Path(out.strip().splitlines()[-1]) / "metrics.json").read_text())
        assert [h["round"] for h in metrics["history"]] == [1, 2, 3]
        assert metrics["final"]["missing_sites"] == ["riverside"]
        assert set(metrics["history"][-1]["average"]) and metrics["history"][0]["failures"] == []
        # Named (never "node-…"), at most once per round: once the SuperLink has marked the node
        # offline it is no longer asked at all, so round 3 may or may not list it.
        for h in metrics["history"][1:]:
            train = [f["site"] for f in h["failures"] if f["phase"] == "train"]
            assert train in ([], ["riverside"]), h["failures"]
        assert any(f["site"] == "riverside" for f in metrics["history"][1]["failures"])
    finally:
        daemons.stop_all()


SECURE = ("strategy.secure_aggregation=true", "strategy.validate_updates=false", "rounds=2")


def test_a_secure_study_runs_across_site_daemons(tmp_path: Path) -> None:
    """SecAgg+ through `fedmed run`, TLS + node auth; sites' policy and audit still decide.

    northgate has not approved the plan: it refuses at SecAgg+ setup (before it holds anyone's
    key shares or reads a row) and the two others finish the study (min_sites = 2).
    """
    port, daemons = _setup(tmp_path, unapproved={"northgate"}, overrides=SECURE)
    try:
        for name in SITES:
            daemons.start(name, "site", "start", f"sites/{name}.toml")
        _wait_online(tmp_path, port, len(SITES))
        sets = [arg for o in SECURE for arg in ("--set", o)]

        res = fedmed("run", "study.toml", *sets, *OPERATOR, cwd=tmp_path, timeout=600)

        assert res.returncode == 0, res.stderr + daemons.log("coordinator")[-3000:]
        run_dir = Path(res.stdout.strip().splitlines()[-1])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert [h["round"] for h in metrics["history"]] == [1, 2]
        assert set(metrics["final"]["sites"]) == {"st-marys", "riverside"}
        assert metrics["final"]["average"]["accuracy"] > 0.8
        for h in metrics["history"]:
            assert {f["site"] for f in h["failures"]} == {"northgate"}
            assert all("not approved" in f["reason"] for f in h["failures"]), h["failures"]
        stages = ["setup", "share_keys", "collect_masked_vectors", "unmask"]
        for name in SITES:
            res = fedmed("site", "audit", "verify", f"sites/{name}.toml", cwd=tmp_path)
            assert res.returncode == 0, res.stdout
            entries = AuditLog(tmp_path / "state" / name).entries()
            got = [e.get("secagg_stage") for e in entries if e["direction"] == "received"]
            if name == "northgate":  # asked to set up, refused, left out of the round
                assert got == 2 * ["setup", None]
                sent = [e for e in entries if e["direction"] == "sent"]
                assert all("not approved" in e["outcome"] for e in sent)
            else:
                assert got == 2 * [*stages, None]
                assert all(e["bytes"] > 0 for e in entries)
    finally:
        daemons.stop_all()
