"""The federation's trust boundary, attacked with real processes on 127.0.0.1.

Each test performs one attack against a federation set up as the README says (coordinator behind
its gate, TLS, node authentication, site daemons) and checks that it is refused — and, where a
site is involved, that the site's audit log says so. docs/security.md maps each party to these
tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmed.config import load_run_config
from fedmed.runtime.deployment import flower_bin, flower_env, wait_for_port
from fedmed.security.audit import AuditLog
from fedmed.security.policy import plan_hash

from .ports import free_port
from .test_deployment import OPERATOR, Daemons, _setup, _site_toml, _wait_online, fedmed

pytestmark = pytest.mark.integration

CANARY = "CANARY-written-by-a-foreign-app"


def flwr(home: Path, *args: str, cert: Path | None = None, key: Path | None = None):
    """Flower's own CLI with its own FLWR_HOME; with cert/key it presents that client cert."""
    env = {**flower_env(home)}
    env.pop("FEDMED_OPERATOR_CERT", None)
    env.pop("FEDMED_OPERATOR_KEY", None)
    if cert is not None and key is not None:
        env.update({"FEDMED_OPERATOR_CERT": str(cert), "FEDMED_OPERATOR_KEY": str(key)})
    return subprocess.run(
        [sys.executable, "-m", "fedmed.runtime.operator_cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def connection(home: Path, port: int, ca: Path | None) -> Path:
    """An FLWR_HOME with one connection 'c' to 127.0.0.1:port (TLS with ``ca``, or insecure)."""
    home.mkdir(parents=True, exist_ok=True)
    tls = f"root-certificates = {json.dumps(str(ca))}" if ca else "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "c"\n\n[superlink.c]\naddress = "127.0.0.1:{port}"\n{tls}\n'
    )
    return home


def foreign_app(folder: Path, canary: Path, serverapp: str = "evil:app") -> Path:
    """A Flower app that is not fedmed's: its ClientApp (and ServerApp) write ``canary``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(
        textwrap.dedent(f"""\
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "innocent-study"
        version = "1.0.0"
        dependencies = []

        [tool.hatch.build.targets.wheel]
        packages = ["."]

        [tool.flwr.app]
        publisher = "mallory"

        [tool.flwr.app.components]
        serverapp = "{serverapp}"
        clientapp = "evil:client"
        """)
    )
    (folder / "evil.py").write_text(
        textwrap.dedent(f"""\
        import time
        from pathlib import Path
        from flwr.app import ConfigRecord, Message, RecordDict
        from flwr.clientapp import ClientApp
        from flwr.serverapp import ServerApp

        CANARY = Path({str(canary)!r})
        app = ServerApp()
        client = ClientApp()

        @app.main()
        def main(grid, context):
            CANARY.with_suffix(".server").write_text("{CANARY}")
            nodes, deadline = [], time.time() + 60
            while not nodes and time.time() < deadline:
                nodes = list(grid.get_node_ids())
                time.sleep(1)
            msgs = [grid.create_message(RecordDict({{"c": ConfigRecord({{"x": 1}})}}), "train",
                    n, "1") for n in nodes]
            list(grid.send_and_receive(msgs, timeout=40))

        @client.train()
        def train(msg, context):
            CANARY.write_text("{CANARY} " + repr(dict(context.node_config)))
            return Message(RecordDict(), reply_to=msg)
        """)
    )
    return folder


def _rounds_done(live: Path) -> int:
    try:
        return max((h["round"] for h in json.loads(live.read_text())["history"]), default=0)
    except (OSError, ValueError, KeyError):  # not written yet, or mid-replace
        return 0


# -- one federation for the attacks that leave it as it was ------------------------------------


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Daemons, int]]:
    root = tmp_path_factory.mktemp("attacks")
    port, daemons = _setup(root, unapproved=set())
    try:
        for name in ("st-marys", "northgate"):
            daemons.start(name, "site", "start", f"sites/{name}.toml")
        _wait_online(root, port, 2)
        yield root, daemons, port
    finally:
        daemons.stop_all()


def test_an_outsider_or_a_site_controls_nothing_at_the_coordinator(federation) -> None:
    root, _, port = federation
    outsider = connection(root / "outsider", port, root / "pki" / "ca.crt")
    nodes = json.loads((root / "coordinator" / "nodes.json").read_text())
    from fedmed.security.pki import make_node_key

    rogue = make_node_key(root / "rogue" / "node.key")
    app = foreign_app(root / "outsider-app", root / "outsider-canary")
    # The coordinator is shared by this module's tests (any order): compare runs, not "none".
    operator = root / OPERATOR[1]
    op_creds = {"cert": operator / "operator.crt", "key": operator / "operator.key"}
    before = flwr(outsider, "ls", "c", "--format", "json", **op_creds)
    assert before.returncode == 0, before.stdout + before.stderr
    runs_before = {r["run-id"] for r in json.loads(before.stdout)["runs"]}
    nodes_before = _node_status(outsider, op_creds)
    attempts = {
        "run": ["run", str(app), "c"],
        "ls": ["ls", "c"],
        "log": ["log", "1", "c"],
        "stop": ["stop", "1", "c"],
        "register": ["supernode", "register", str(rogue), "c"],
        "unregister": ["supernode", "unregister", str(nodes["st-marys"]), "c"],
        "list nodes": ["supernode", "list", "c"],
    }
    for what, args in attempts.items():
        res = flwr(outsider, *args)
        assert res.returncode != 0 and "403" in res.stdout + res.stderr, (what, res.stdout)

    # Certificates that are not an operator's: another CA's "operator", the coordinator's own.
    from fedmed.security import pki

    other = root / "other-pki"
    pki.init_ca(other)
    fake = pki.issue_operator(other, "mallory")
    own = root / "pki"
    for cert, key in (
        (fake / "operator.crt", fake / "operator.key"),
        (own / "coordinator.crt", own / "coordinator.key"),
    ):
        res = flwr(outsider, "ls", "c", cert=cert, key=key)
        assert res.returncode != 0, res.stdout

    # The operator can (so the refusals above are the gate's doing), and nothing changed.
    listed = flwr(outsider, "ls", "c", "--format", "json", **op_creds)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert {r["run-id"] for r in json.loads(listed.stdout)["runs"]} == runs_before
    assert not (root / "outsider-canary").exists()
    listed_nodes = _node_status(outsider, op_creds)
    assert listed_nodes[str(nodes["st-marys"])] == nodes_before[str(nodes["st-marys"])] == "online"
    assert set(listed_nodes) == set(nodes_before)  # the rogue key was not registered


def _node_status(home: Path, creds: dict[str, Path]) -> dict[str, str]:
    """Node id -> status, as the operator sees it (other tests of the module add and cut nodes)."""
    shown = flwr(home, "supernode", "list", "c", "--format", "json", **creds)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    return {n["node-id"]: n["status"] for n in json.loads(shown.stdout)["nodes"]}


def test_a_foreign_app_is_refused_by_the_coordinator(federation) -> None:
    """Even an operator's credential cannot make the coordinator import another app."""
    root, _, port = federation
    home = connection(root / "operator-home", port, root / "pki" / "ca.crt")
    canary = root / "coordinator-canary"
    app = foreign_app(root / "foreign-app", canary)
    operator = root / OPERATOR[1]
    creds = {"cert": operator / "operator.crt", "key": operator / "operator.key"}
    res = flwr(home, "run", str(app), "c", "--format", "json", **creds)
    assert res.returncode == 0, res.stdout + res.stderr
    run_id = json.loads(res.stdout)["run-id"]
    deadline = time.monotonic() + 90
    status = ""
    while time.monotonic() < deadline and not status.startswith("finished"):
        time.sleep(2)
        runs = json.loads(flwr(home, "ls", "c", "--format", "json", **creds).stdout)["runs"]
        status = next(r["status"] for r in runs if int(r["run-id"]) == int(run_id))
    assert status == "finished:failed", status
    assert not canary.exists() and not canary.with_suffix(".server").exists()
    # The refusal is in the coordinator's log (the executor's), and the run log shows it failed.
    superlink_log = (root / "coordinator" / "superlink.log").read_text(errors="replace")
    assert "the run's app is not fedmed's" in superlink_log


def test_a_local_process_without_the_site_secret_gets_no_task(federation) -> None:
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.superexec import run_superexec as superexec

    root, _, _ = federation
    site = (root / "sites" / "st-marys.toml").read_text()
    runtime = int(next(ln for ln in site.splitlines() if ln.startswith("runtime_port")).split()[-1])
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])

    def acquire(interceptors: list) -> object:
        client = RuntimeHttpClient.from_server_address(
            server_address=f"127.0.0.1:{runtime}",
            insecure=True,
            root_certificates=None,
            interceptors=interceptors,
        )
        try:
            return client.AcquireTask(request)
        finally:
            client.close()

    with pytest.raises(Exception) as refused:
        acquire([])
    assert "401" in str(refused.value) or "auth" in str(refused.value).lower(), refused.value
    wrong = superexec.SuperExecAuthHttpInterceptor(
        master_secret=b"guessed", protected_methods=superexec._SUPEREXEC_AUTH_METHODS
    )
    with pytest.raises(Exception):  # noqa: B017 - Flower's HTTP client error, any kind
        acquire([wrong])
    # The executor's secret works (so the refusals are about the secret, not the port).
    secret = (root / "state" / "st-marys" / "superexec.secret").read_bytes()
    assert os.stat(root / "state" / "st-marys" / "superexec.secret").st_mode & 0o077 == 0
    right = superexec.SuperExecAuthHttpInterceptor(
        master_secret=secret, protected_methods=superexec._SUPEREXEC_AUTH_METHODS
    )
    acquire([right])


def test_unregister_needs_an_operator_and_cuts_the_site_off(federation) -> None:
    root, _, port = federation
    from fedmed.security.pki import make_node_key

    pub = make_node_key(root / "eastside" / "node.key")
    res = fedmed("coordinator", "register", "eastside", str(pub), cwd=root)
    assert res.returncode == 2 and "--operator" in res.stderr, res.stdout + res.stderr
    res = fedmed("coordinator", "register", "eastside", str(pub), *OPERATOR, cwd=root)
    assert res.returncode == 0 and "registered" in res.stdout, res.stderr
    node = json.loads((root / "coordinator" / "nodes.json").read_text())["eastside"]

    res = fedmed("coordinator", "unregister", "eastside", cwd=root)
    assert res.returncode == 2 and "--operator" in res.stderr
    res = fedmed("coordinator", "unregister", "eastside", *OPERATOR, cwd=root)
    assert res.returncode == 0, res.stderr
    assert "eastside" not in json.loads((root / "coordinator" / "nodes.json").read_text())
    assert not (root / "pki" / "registered" / "eastside.pub").exists()
    home = connection(root / "operator-home-2", port, root / "pki" / "ca.crt")
    operator = root / OPERATOR[1]
    shown = flwr(home, "supernode", "list", "c", "--format", "json",
                 cert=operator / "operator.crt", key=operator / "operator.key")  # fmt: skip
    status = {n["node-id"]: n["status"] for n in json.loads(shown.stdout)["nodes"]}
    assert status.get(str(node), "unregistered") == "unregistered", status


# -- attacks that need their own federation ---------------------------------------------------


def test_a_site_runs_no_app_but_fedmed_even_for_a_hostile_coordinator(tmp_path: Path) -> None:
    """A stock Flower SuperLink (a coordinator gone rogue) sends a foreign app to a site."""
    port = free_port()
    daemons = Daemons(tmp_path)
    superlink = subprocess.Popen(
        [flower_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
         "--disable-runtime-dependency-installation"],
        cwd=tmp_path, env=flower_env(tmp_path / "hostile"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    daemons.procs["hostile"] = superlink
    try:
        wait_for_port("127.0.0.1", port, timeout=60, proc=superlink)
        assert fedmed("demo-data", "tables", cwd=tmp_path).returncode == 0
        res = fedmed("site", "init", "st-marys", "--coordinator", f"127.0.0.1:{port}",
                     "--insecure", "--runtime-port", str(free_port()), cwd=tmp_path)  # fmt: skip
        assert res.returncode == 0, res.stderr
        site = tmp_path / "sites" / "st-marys.toml"
        res = fedmed("site", "data", "add", str(site), "breast", "tables/st-marys.csv",
                     cwd=tmp_path)  # fmt: skip
        assert res.returncode == 0, res.stderr
        daemons.start("st-marys", "site", "start", str(site))
        canary = tmp_path / "site-canary"
        app = foreign_app(tmp_path / "foreign-app", canary)
        home = connection(tmp_path / "hostile-home", port, None)
        deadline = time.monotonic() + 120
        audit = AuditLog(tmp_path / "state" / "st-marys")
        res = flwr(home, "run", str(app), "c", "--format", "json")
        assert res.returncode == 0, res.stdout + res.stderr
        while time.monotonic() < deadline and not any(
            "refused" in str(e.get("outcome", "")) for e in audit.entries()
        ):
            time.sleep(1)
        refusals = [e for e in audit.entries() if "refused" in str(e.get("outcome", ""))]
        assert refusals and "not fedmed's" in refusals[0]["outcome"], audit.entries()
        assert canary.with_suffix(".server").exists()  # the hostile ServerApp did run and send
        time.sleep(3)
        assert not canary.exists()
        assert audit.verify() == []
    finally:
        daemons.stop_all()


def test_a_reply_naming_another_site_is_rejected(tmp_path: Path) -> None:
    """riverside's daemon says it is st-marys: its replies are refused and named as riverside."""
    port, daemons = _setup(tmp_path, unapproved=set(), overrides=("rounds=1",))
    try:
        approved = plan_hash(load_run_config(tmp_path / "study.toml", ["rounds=1"]))
        impostor = _site_toml(tmp_path, "impostor", port, free_port(), approved,
                              key="pki/sites/riverside/node.key", ca="pki/ca.crt")  # fmt: skip
        text = impostor.read_text().replace('name = "impostor"', 'name = "st-marys"')
        impostor.write_text(text.replace("state/impostor", "state/impostor-state"))
        res = fedmed("site", "data", "add", str(impostor), "breast", "tables/riverside.csv",
                     cwd=tmp_path)  # fmt: skip
        assert res.returncode == 0, res.stderr
        for name in ("st-marys", "northgate"):
            daemons.start(name, "site", "start", f"sites/{name}.toml")
        daemons.start("impostor", "site", "start", str(impostor))
        _wait_online(tmp_path, port, 3)
        res = fedmed("run", "study.toml", "--set", "rounds=1", *OPERATOR, cwd=tmp_path,
                     timeout=600)  # fmt: skip
        assert res.returncode == 0, res.stderr
        metrics = json.loads((Path(res.stdout.split()[-1]) / "metrics.json").read_text())
        failures = metrics["history"][0]["failures"]
        assert any(
            f["site"] == "riverside" and "claimed to come from site 'st-marys'" in f["reason"]
            for f in failures
        ), failures
        assert set(metrics["final"]["sites"]) == {"st-marys", "northgate"}
    finally:
        daemons.stop_all()


def test_a_killed_site_costs_a_round_at_most_two_minutes(tmp_path: Path) -> None:
    """Default round_timeout: the coordinator notices the dead node, not the timeout."""
    port, daemons = _setup(tmp_path, unapproved=set(), overrides=("rounds=3",))
    try:
        for name in ("st-marys", "riverside", "northgate"):
            daemons.start(name, "site", "start", f"sites/{name}.toml")
        _wait_online(tmp_path, port, 3)
        run = subprocess.Popen(
            [sys.executable, "-m", "fedmed.cli", "run", "study.toml", "--quiet",
             "--set", "rounds=3", *OPERATOR],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("runs/*/checkpoint.safetensors")):  # round 1 is done
            assert run.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        daemons.power_cut("riverside")
        killed = time.monotonic()
        live = next(tmp_path.glob("runs/*")) / "live.json"
        while _rounds_done(live) < 2:
            assert time.monotonic() - killed < 150, "round 2 still waits for the dead site"
            time.sleep(0.5)
        assert time.monotonic() - killed < 120
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
        metrics = json.loads((Path(out.split()[-1]) / "metrics.json").read_text())
        assert any(f["site"] == "riverside" for f in metrics["history"][1]["failures"])
    finally:
        daemons.stop_all()


def test_a_larger_delta_cannot_buy_epsilon_at_a_real_site(tmp_path: Path) -> None:
    """Issue 15's δ bypass through `fedmed run`: even a plan the stewards approved, whose noise
    is calibrated at δ = 0.05, is refused by every site (each accounts at its own δ ≤ 1e-5),
    so nothing is aggregated, no model is written, and the run fails loudly."""
    sets = ("privacy.delta=0.05", "rounds=1")
    port, daemons = _setup(tmp_path, unapproved=set(), overrides=sets)
    try:
        for name in ("st-marys", "riverside", "northgate"):
            daemons.start(name, "site", "start", f"sites/{name}.toml")
        _wait_online(tmp_path, port, 3)
        args = [a for s in sets for a in ("--set", s)]
        res = fedmed("run", "study.toml", *args, *OPERATOR, cwd=tmp_path, timeout=600)
        assert res.returncode == 2, res.stdout + res.stderr
        assert "released no model" in res.stderr
        run_dir = next((tmp_path / "runs").iterdir())
        assert not (run_dir / "model.safetensors").exists()
        failures = json.loads((run_dir / "metrics.json").read_text())["history"][0]["failures"]
        assert {f["site"] for f in failures if "δ" in f["reason"] or "delta" in f["reason"]} == {
            "st-marys",
            "riverside",
            "northgate",
        }, failures
        for name in ("st-marys", "riverside", "northgate"):
            refused = [e for e in AuditLog(tmp_path / "state" / name).entries()
                       if str(e.get("outcome", "")).startswith("refused")]  # fmt: skip
            assert refused, name
    finally:
        daemons.stop_all()
