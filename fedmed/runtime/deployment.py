"""Deployment runtime: Flower's SuperLink (coordinator) and SuperNodes (sites) as real processes.

fedmed does not move a byte itself here: it composes Flower's own command lines (TLS and node
authentication on unless told otherwise), keeps Flower offline (no telemetry, update checks or
per-run dependency installs), registers the consortium's site keys with the SuperLink, and
submits studies with ``flwr run``. The app a run ships (its FAB) holds only a pyproject that
points at ``fedmed.server_app:app`` / ``fedmed.client_app:app``: each side runs the fedmed it has
installed, and both sides' executors refuse any other app (fedmed.security.apps).

Who may do what (docs/security.md): the SuperLink listens on 127.0.0.1 only, behind the gate
(fedmed.runtime.gate: nginx, operators by client certificate for the Control API); its Runtime
API and each site's local Runtime API take tasks only from fedmed's executor, which holds the
daemon's SuperExec secret (0600, made at start).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fedmed import __version__
from fedmed.config import SiteConfig
from fedmed.errors import ConfigError, FedmedError
from fedmed.security import pki
from fedmed.study.plan import ENGINE_KEY, RunPlan

CONNECTION = "fedmed"  # the connection name fedmed writes into the coordinator's FLWR_HOME

FLOWER_OFFLINE = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}

INSECURE_WARNING = (
    "WARNING: --insecure: traffic is NOT encrypted and sites are NOT authenticated. Use it only "
    "for a local experiment on one machine, never with patient data across a network."
)


def flower_bin(name: str) -> str:
    """A Flower command from this environment (next to this Python first, then PATH)."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise FedmedError(f"'{name}' not found; reinstall fedmed (it installs flwr)")
    return found


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """Flower's daemons start helpers (flower-superexec, flwr-serverapp) by name: put this
    environment's bin folder first on PATH, so an unactivated venv works too."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    env = {**os.environ, **FLOWER_OFFLINE, "PATH": f"{bin_dir}{os.pathsep}{path}"}
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def wait_for_port(
    host: str, port: int, timeout: float, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FedmedError(f"the process exited with code {proc.returncode} before listening")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise FedmedError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


# -- coordinator ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Coordinator:
    """Where a coordinator keeps its state and how it is reached."""

    home: Path  # state.db, Flower's home (connection config), logs
    pki_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 9092  # the gate's (what sites and operators dial)
    insecure: bool = False
    internal_port: int = 0  # the SuperLink's, on 127.0.0.1 behind the gate
    operator: Path | None = None  # an operator's folder (fedmed pki issue-operator)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def internal_address(self) -> str:
        return f"127.0.0.1:{self.internal_port}"

    @property
    def superlink(self) -> tuple[str, int]:
        """Where Flower's SuperLink itself listens: behind the gate, or (--insecure) openly."""
        return ("127.0.0.1", self.internal_port) if self.internal_port else (self.host, self.port)

    @property
    def flwr_home(self) -> Path:
        return self.home / "flwr"

    @property
    def secret_file(self) -> Path:
        return self.home / SECRET_FILE

    @property
    def nodes_file(self) -> Path:
        """Which Flower node id speaks for which site: fixed when its key is registered."""
        return self.home / "nodes.json"

    def check(self) -> None:
        if self.insecure:
            return
        if self.pki_dir is None:
            raise ConfigError("give --pki DIR (made by `fedmed pki init`), or --insecure")
        for name in (pki.CA_CERT, pki.COORDINATOR_CERT, pki.COORDINATOR_KEY):
            if not (self.pki_dir / name).is_file():
                hint = (
                    f"fedmed pki issue-coordinator --dir {self.pki_dir} --host {self.host}"
                    if name != pki.CA_CERT
                    else f"fedmed pki init --dir {self.pki_dir}"
                )
                raise ConfigError(f"{self.pki_dir / name} is missing; run: {hint}")


SECRET_FILE = "superexec.secret"


def make_secret(path: Path) -> Path:
    """A fresh 0600 SuperExec secret: the executor signs its task requests with it, so no other
    local process can pull this daemon's tasks. New at every start (nothing to leak for long)."""
    from fedmed.io import private_secret

    private_secret(path, fresh=True)
    return path


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ready_file(home: Path) -> Path:
    """Exists while a coordinator is up AND has admitted the registered sites."""
    return Path(home) / "ready"


def wait_until_ready(home: Path, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Sites started before their keys are registered are refused: wait for this first."""
    deadline = time.monotonic() + timeout
    while not ready_file(home).is_file():
        if proc is not None and proc.poll() is not None:
            raise FedmedError(f"the coordinator exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise FedmedError(f"the coordinator in {home} is not ready after {timeout:.0f} s")
        time.sleep(0.2)


def superlink_command(c: Coordinator) -> list[str]:
    """Flower's SuperLink; with TLS it listens on 127.0.0.1 only, behind the gate."""
    cmd = [
        flower_bin("flower-superlink"),
        "--database",
        str(c.home / "state.db"),
        "--disable-runtime-dependency-installation",
    ]
    if c.insecure:
        return [
            *cmd,
            *("--host", c.host, "--port", str(c.port)),
            *("--isolation", "subprocess", "--insecure"),
        ]
    assert c.pki_dir is not None
    return [
        *cmd,
        *("--host", "127.0.0.1", "--port", str(c.internal_port)),
        # ServerApp tasks go to fedmed's executor, which refuses any app but fedmed's.
        *("--isolation", "process", "--superexec-auth-secret-file", str(c.secret_file)),
        "--ssl-ca-certfile",
        str(c.pki_dir / pki.CA_CERT),
        "--ssl-certfile",
        str(c.pki_dir / pki.COORDINATOR_CERT),
        "--ssl-keyfile",
        str(c.pki_dir / pki.COORDINATOR_KEY),
        "--enable-supernode-auth",
    ]


def gate_command(c: Coordinator) -> list[str]:
    """nginx in front of the SuperLink (fedmed.runtime.gate)."""
    from fedmed.runtime import gate

    assert c.pki_dir is not None
    conf = gate.write_config(
        c.home / "gate",
        c.address,
        c.internal_port,
        c.pki_dir,
        pki.COORDINATOR_CERT,
        pki.COORDINATOR_KEY,
        pki.CA_CERT,
    )
    return gate.command(conf)


def coordinator_executor_command(c: Coordinator, superlink_pid: int) -> list[str]:
    """fedmed's executor for the coordinator's ServerApp tasks (fedmed.runtime.executor)."""
    assert c.pki_dir is not None
    return [
        sys.executable,
        "-m",
        "fedmed.runtime.executor",
        *("--role", "coordinator"),
        *("--runtime-api-address", c.internal_address),
        *("--root-certificates", str((c.pki_dir / pki.CA_CERT).resolve())),
        *("--secret-file", str(c.secret_file)),
        *("--parent-pid", str(superlink_pid)),
    ]


LOCAL = "fedmed-local"  # the coordinator host's own connection, straight to the SuperLink


def write_connection(c: Coordinator) -> None:
    """Flower's CLI reaches the SuperLink through named connections in $FLWR_HOME/config.toml:
    ``fedmed`` through the gate (operators), ``fedmed-local`` on 127.0.0.1 (start-up only)."""
    c.flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', ""]
    host, port = c.superlink
    targets = {CONNECTION: c.address, LOCAL: f"{host}:{port}"}
    for name, address in targets.items():
        lines += [f"[superlink.{name}]", f'address = "{address}"']
        if c.insecure:
            lines.append("insecure = true")
        else:
            assert c.pki_dir is not None
            ca = json.dumps(str((c.pki_dir / pki.CA_CERT).resolve()))
            lines.append(f"root-certificates = {ca}")
        lines.append("")
    (c.flwr_home / "config.toml").write_text("\n".join(lines))


def flwr_cli(
    c: Coordinator, *args: str, timeout: float = 120, local: bool = False
) -> subprocess.CompletedProcess:
    """Flower's CLI; through the gate it presents the operator's certificate (``c.operator``)."""
    env = flower_env(c.flwr_home)
    if not c.insecure and not local:
        cert, key = operator_files(c)
        from fedmed.runtime.operator_cli import CERT_ENV, KEY_ENV

        env.update({CERT_ENV: str(cert), KEY_ENV: str(key)})
    return subprocess.run(
        [sys.executable, "-m", "fedmed.runtime.operator_cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def operator_files(c: Coordinator) -> tuple[Path, Path]:
    if c.operator is None:
        raise ConfigError(
            "controlling the coordinator needs an operator credential: pass --operator DIR "
            "(made by `fedmed pki issue-operator NAME --dir PKI`)"
        )
    cert, key = c.operator / pki.OPERATOR_CERT, c.operator / pki.OPERATOR_KEY
    for path in (cert, key):
        if not path.is_file():
            raise ConfigError(
                f"{path} not found; --operator takes the folder made by "
                "`fedmed pki issue-operator NAME`"
            )
    return cert, key


def _flwr_json(c: Coordinator, *args: str, local: bool = False) -> dict:
    res = flwr_cli(c, *args, "--format", "json", timeout=60, local=local)
    try:
        return json.loads(res.stdout)
    except json.JSONDecodeError:
        return {}


def online_nodes(c: Coordinator, local: bool = False) -> set[int]:
    """Flower node ids of the site daemons connected right now."""
    conn = LOCAL if local else CONNECTION
    nodes = _flwr_json(c, "supernode", "list", conn, local=local).get("nodes", [])
    return {int(n["node-id"]) for n in nodes if n.get("status") == "online"}


def online_sites(c: Coordinator) -> int:
    """How many site daemons are connected right now."""
    return len(online_nodes(c))


def read_nodes(c: Coordinator) -> dict[str, int]:
    """site name -> Flower node id, as registered by this coordinator."""
    try:
        data = json.loads(c.nodes_file.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FedmedError(
            f"{c.nodes_file} is unreadable; restore it from a backup, or unregister and "
            "re-register the sites"
        ) from None
    return {str(k): int(v) for k, v in data.items()}


def _write_nodes(c: Coordinator, nodes: dict[str, int]) -> None:
    from fedmed.io import atomic_write

    atomic_write(c.nodes_file, (json.dumps(nodes, indent=1, sort_keys=True) + "\n").encode())


def register_with_superlink(
    c: Coordinator, name: str, public_key: Path, local: bool = False
) -> str:
    """Admit one site's key and record which node id speaks for it; 'registered' or
    'already registered'."""
    from fedmed.io import file_lock

    pki.read_node_public_key(public_key)  # a clear error for a bad key file, before Flower's
    conn = LOCAL if local else CONNECTION
    res = flwr_cli(
        c,
        "supernode",
        "register",
        str(public_key),
        conn,
        "--name",
        name,
        "--format",
        "json",
        local=local,
    )
    try:
        reply = json.loads(res.stdout)
    except json.JSONDecodeError:
        reply = {}
    with file_lock(c.nodes_file):
        nodes = read_nodes(c)
        if res.returncode == 0 and reply.get("node-id"):
            nodes[name] = int(reply["node-id"])
            _write_nodes(c, nodes)
            return "registered"
        text = (res.stdout + res.stderr).lower()
        if "already" in text and name in nodes:  # a restart: the state DB remembers
            return "already registered"
    detail = reply.get("error-message") or (res.stderr or res.stdout).strip()[-300:]
    if "already" in text:
        detail = "its key is registered, but not as this site in " + str(c.nodes_file)
    raise FedmedError(
        f"could not register site '{name}' with the coordinator ({detail}); to replace a "
        f"site's key: fedmed coordinator unregister {name}, then register the new one"
    )


def unregister_from_superlink(c: Coordinator, name: str) -> int:
    """Revoke a site: Flower forgets its node (the daemon is cut off); returns the node id."""
    from fedmed.io import file_lock

    with file_lock(c.nodes_file):
        nodes = read_nodes(c)
        if name not in nodes:
            raise ConfigError(
                f"site '{name}' is not registered with the coordinator in {c.home} "
                f"(registered: {', '.join(sorted(nodes)) or 'none'})"
            )
        node = nodes[name]
        res = flwr_cli(c, "supernode", "unregister", str(node), CONNECTION, "--format", "json")
        if res.returncode != 0 and "not found" not in (res.stdout + res.stderr).lower():
            raise FedmedError(
                f"the coordinator refused to unregister site '{name}' (node {node}): "
                f"{(res.stderr or res.stdout).strip()[-300:]}"
            )
        del nodes[name]
        _write_nodes(c, nodes)
    return node


# -- sites ---------------------------------------------------------------------------------------


def site_secret(site: SiteConfig) -> Path:
    return site.state_path / SECRET_FILE


def supernode_command(
    site: SiteConfig, config_path: Path, max_wait: float | None = None
) -> list[str]:
    """flower-supernode for ``site``, polling promptly (fedmed.runtime.polling).

    Tasks are launched only by fedmed's executor (executor_command), which holds the site's
    SuperExec secret and runs fedmed's own ClientApp only: there is no mode in which Flower's
    stock launcher would install and import a run's app next to the site's data.
    """
    host, _, port = site.coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"site '{site.name}': coordinator = '{site.coordinator}' must be host:port"
        )
    cmd = [
        *[sys.executable, "-m", "fedmed.runtime.polling"],
        "--superlink",
        site.coordinator,
        "--port",
        str(site.runtime_port),
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(site_secret(site)),
        "--node-config",
        f"fedmed-site={json.dumps(str(Path(config_path).resolve()))}",
    ]
    if max_wait is not None:
        cmd += ["--max-wait-time", str(max_wait)]
    if site.insecure:
        return [*cmd, "--insecure"]
    for path in (site.ca_certificate, site.node_key):
        if not Path(path).is_file():
            raise ConfigError(
                f"site '{site.name}': {path} not found; copy the site bundle made by "
                "`fedmed pki issue-site` next to the site config"
            )
    return [
        *cmd,
        "--root-certificates",
        site.ca_certificate,
        "--auth-supernode-private-key",
        site.node_key,
    ]


def executor_command(site: SiteConfig, supernode_pid: int) -> list[str]:
    """fedmed's warm executor (fedmed.runtime.executor) serving the SuperNode's ClientApp tasks."""
    return [
        sys.executable,
        "-m",
        "fedmed.runtime.executor",
        "--runtime-api-address",
        f"127.0.0.1:{site.runtime_port}",
        "--parent-pid",
        str(supernode_pid),
        "--cache-dir",
        str(site.state_path / "cache"),
        "--secret-file",
        str(site_secret(site)),
    ]


# -- runs ----------------------------------------------------------------------------------------

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedmed-study"
version = "{version}"
description = "A fedmed study: the code is the fedmed installed at each end"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedmed"

[tool.flwr.app.components]
serverapp = "fedmed.server_app:app"
clientapp = "{clientapp}"

[tool.flwr.app.config]
{config}
"""


CLIENT_APPS = {
    False: "fedmed.client_app:app",
    # SecAgg+ exists only on Flower's legacy API: its own ClientApp, with the same site mods.
    True: "fedmed.secagg:client_app",
}


def write_app(folder: Path, keys: list[str], secure: bool = False) -> Path:
    """The Flower app a run ships: a pyproject naming fedmed's apps, and nothing else.

    Flower accepts run-config overrides only for keys the app declares: declare the plan's.
    The ServerApp is the same for every study (it picks the secure path from the plan).
    """
    config = "\n".join(f'{k} = ""' for k in keys)
    version = ".".join(__version__.split(".")[:3])
    folder.mkdir(parents=True, exist_ok=True)
    text = APP_PYPROJECT.format(version=version, config=config, clientapp=CLIENT_APPS[secure])
    (folder / "pyproject.toml").write_text(text)
    return folder


def ships_secure_app(plan: RunPlan) -> bool:
    """Whether the sites run the SecAgg+ ClientApp: a secure study, or statistics masked
    under SecAgg+ (``fedmed run --stats`` of a plan with stats.secure_aggregation)."""
    cfg = plan.config
    return cfg.strategy.secure_aggregation or (plan.stats and cfg.secure_statistics)


def submit(c: Coordinator, plan: RunPlan) -> int:
    """Start ``plan`` on the coordinator; returns Flower's run id."""
    with tempfile.TemporaryDirectory(prefix="fedmed-app-") as tmp:
        values = {**plan.to_run_config(), ENGINE_KEY: "deployment"}
        app = write_app(Path(tmp) / "app", sorted(values), secure=ships_secure_app(plan))
        overrides = Path(tmp) / "run-config.toml"
        overrides.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
        res = flwr_cli(
            c, "run", str(app), CONNECTION, "--run-config", str(overrides), "--format", "json"
        )
    try:
        reply = json.loads(res.stdout)
    except json.JSONDecodeError:
        reply = {}
    if res.returncode != 0 or not reply.get("success", False) or "run-id" not in reply:
        detail = reply.get("error-message") or (res.stderr or res.stdout).strip()[-400:]
        raise FedmedError(
            f"the coordinator at {c.address} did not accept the run ({detail}); is "
            "`fedmed coordinator start` running with this --dir?"
        )
    return int(reply["run-id"])


def run_status(c: Coordinator, run_id: int) -> str:
    """Flower's status of a run, e.g. 'running', 'finished:completed', 'finished:failed'."""
    runs = _flwr_json(c, "ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
    return str(runs[0].get("status", "unknown")) if runs else "unknown"


def stop_run(c: Coordinator, run_id: int) -> None:
    """Ask the coordinator to stop a run (what Ctrl-C on `fedmed run` means)."""
    flwr_cli(c, "stop", str(run_id), CONNECTION, timeout=60)
