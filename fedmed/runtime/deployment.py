"""Deployment runtime: Flower's SuperLink (coordinator) and SuperNodes (sites) as real processes.

fedmed does not move a byte itself here: it composes Flower's own command lines (TLS and node
authentication on unless told otherwise), keeps Flower offline (no telemetry, update checks or
per-run dependency installs), registers the consortium's site keys with the SuperLink, and
submits studies with ``flwr run``. The app a run ships (its FAB) holds only a pyproject that
points at ``fedmed.server_app:app`` / ``fedmed.client_app:app``: each side runs the fedmed it has
installed, so a coordinator can never push code into a hospital.
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
from fedmed.study import ENGINE_KEY, RunPlan

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
    port: int = 9092
    insecure: bool = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def flwr_home(self) -> Path:
        return self.home / "flwr"

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
    cmd = [
        flower_bin("flower-superlink"),
        "--host",
        c.host,
        "--port",
        str(c.port),
        "--database",
        str(c.home / "state.db"),
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
    ]
    if c.insecure:
        return [*cmd, "--insecure"]
    assert c.pki_dir is not None
    return [
        *cmd,
        "--ssl-ca-certfile",
        str(c.pki_dir / pki.CA_CERT),
        "--ssl-certfile",
        str(c.pki_dir / pki.COORDINATOR_CERT),
        "--ssl-keyfile",
        str(c.pki_dir / pki.COORDINATOR_KEY),
        "--enable-supernode-auth",
    ]


def write_connection(c: Coordinator) -> None:
    """Flower's CLI reaches the SuperLink through a named connection in $FLWR_HOME/config.toml."""
    c.flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "{c.address}"',
    ]
    if c.insecure:
        lines.append("insecure = true")
    else:
        assert c.pki_dir is not None
        lines.append(f"root-certificates = {json.dumps(str((c.pki_dir / pki.CA_CERT).resolve()))}")
    (c.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def flwr_cli(c: Coordinator, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [flower_bin("flwr"), *args],
        env=flower_env(c.flwr_home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _flwr_json(c: Coordinator, *args: str) -> dict:
    res = flwr_cli(c, *args, "--format", "json", timeout=60)
    try:
        return json.loads(res.stdout)
    except json.JSONDecodeError:
        return {}


def online_sites(c: Coordinator) -> int:
    """How many site daemons are connected right now."""
    nodes = _flwr_json(c, "supernode", "list", CONNECTION).get("nodes", [])
    return sum(1 for n in nodes if n.get("status") == "online")


def register_with_superlink(c: Coordinator, name: str, public_key: Path) -> str:
    """Admit one site's key; returns 'registered' or 'already registered'."""
    pki.read_node_public_key(public_key)  # a clear error for a bad key file, before Flower's
    res = flwr_cli(c, "supernode", "register", str(public_key), CONNECTION, "--name", name)
    if res.returncode == 0:
        return "registered"
    if "already" in (res.stdout + res.stderr).lower():  # a restart: the state DB remembers
        return "already registered"
    raise FedmedError(
        f"could not register site '{name}' with the coordinator: "
        f"{(res.stderr or res.stdout).strip().splitlines()[-1:]}"
    )


# -- sites ---------------------------------------------------------------------------------------


def supernode_command(
    site: SiteConfig, config_path: Path, max_wait: float | None = None, warm: bool = True
) -> list[str]:
    """flower-supernode for ``site``.

    ``warm`` (fedmed's speed work) leaves task launching to executor_command and polls promptly
    (fedmed.runtime.polling); otherwise it is Flower's own command with Flower's defaults.
    """
    host, _, port = site.coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"site '{site.name}': coordinator = '{site.coordinator}' must be host:port"
        )
    cmd = [
        *(
            [sys.executable, "-m", "fedmed.runtime.polling"]
            if warm
            else [flower_bin("flower-supernode")]
        ),
        "--superlink",
        site.coordinator,
        "--port",
        str(site.runtime_port),
        "--isolation",
        "process" if warm else "subprocess",
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


def submit(c: Coordinator, plan: RunPlan) -> int:
    """Start ``plan`` on the coordinator; returns Flower's run id."""
    with tempfile.TemporaryDirectory(prefix="fedmed-app-") as tmp:
        values = {**plan.to_run_config(), ENGINE_KEY: "deployment"}
        secure = plan.config.strategy.secure_aggregation
        app = write_app(Path(tmp) / "app", sorted(values), secure=secure)
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
