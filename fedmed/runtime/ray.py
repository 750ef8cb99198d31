"""Flower's Ray simulation engine: each site's ClientApp runs in a Ray actor process.

Flower's ``run_simulation`` hands the ServerApp an empty run_config, so the plan is bound into the
ServerApp object instead (see server_app.build_server_app); sites get the plan in every message.

Where Ray runs. Without an address, ``ray.init()`` starts a Ray for the run on this machine, and
the run shuts it down. With one (``fedmed simulate --ray-address``, ``RunPlan.ray_address``) the
run joins that existing cluster as a driver; at the end ``ray.shutdown()`` only disconnects this
process, the cluster stays up (it is not ours to stop). We call ``ray.init`` ourselves, with the
same ``init_args`` that go to Flower's ``backend_config``: Flower's RayBackend calls ``ray.init``
only when Ray is not initialized yet, and connecting first lets us refuse, in one line, an address
nobody answers at, a cluster started with another Ray or Python, and a cluster with no node big
enough for one site, instead of Flower's "Simulation Runtime crashed" and a traceback.

How many actors. Flower's engine (``RayBackend.build`` → ``BasicActorPool``,
``pool_size_from_resources``) starts, on every node, ``node CPUs // cpus_per_site`` actors (no
more than ``node GPUs // gpus_per_site`` when sites ask for GPUs; none on a node without GPUs
then), summed over the nodes and whatever the number of sites; each site's messages wait in a
queue for a free actor. So 1,000 sites on a 2-CPU cluster run on 2 actors, one message at a
time each. ``actor_capacity`` is that sum, computed before the run so it can be refused or
reported. (The pool follows the cluster, not the study: 4 sites on a 64-CPU cluster still start
64 actors; raise ``cpus_per_site`` to start fewer.)
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedmed.config import ENVIRONMENT, SimulationConfig, data_dir
from fedmed.errors import ConfigError, FedmedError

RAY_FRACTION = 1e-4  # Ray refuses resource fractions finer than this
CONNECT_TIMEOUT = 5.0  # seconds to wait for a TCP answer from the cluster's address


def parse_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray cluster address, None for "auto"; a ConfigError naming the forms.

    ``HOST:PORT`` is the head node's GCS address (what ``ray start --head`` prints, port 6379
    by default); ``ray://HOST:PORT`` is Ray Client (port 10001); ``auto`` is the cluster
    ``ray start`` last started on this machine.
    """
    if address == "auto":
        return None
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
        raise ConfigError(
            f"--ray-address {address!r} is not a Ray cluster address; give the head node's "
            "HOST:PORT (as `ray start --head` prints it, e.g. 10.0.0.5:6379), "
            "ray://HOST:PORT for Ray Client, or auto for the cluster started on this machine"
        )
    return host, int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """A one-line error, at once, when nothing answers at ``address`` (Ray retries for long)."""
    target = parse_address(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise FedmedError(
            f"no Ray cluster answers at {address} ({reason}); start one with "
            f"`ray start --head --port {target[1]}` on {target[0]} and a "
            f"`ray start --address {target[0]}:{target[1]}` on each worker, or fix --ray-address"
        ) from None


def version_mismatch_message(address: str, ray_message: str) -> str:
    """Ray's multi-line "Version mismatch" as one line that says which versions to line up."""
    found = re.findall(r"Ray: (\S+)\s+Python: (\S+)", ray_message)
    if len(found) != 2:
        detail = " ".join(ray_message.split())
        return f"the Ray cluster at {address} runs another Ray or Python ({detail})"
    (ray_there, py_there), (ray_here, py_here) = found
    return (
        f"the Ray cluster at {address} runs Ray {ray_there} on Python {py_there}, fedmed here "
        f"Ray {ray_here} on Python {py_here}, and Ray needs both to match: run fedmed from an "
        f"environment with ray=={ray_there} on Python {py_there}, or restart the cluster's "
        "nodes (`ray start`) from this environment"
    )


def actor_capacity(
    nodes: Iterable[Mapping[str, Any]], cpus_per_site: float, gpus_per_site: float
) -> int:
    """How many site actors Flower's engine starts on these Ray nodes (``ray.nodes()``).

    The same sum as Flower's ``pool_size_from_resources`` (tested against it): per node,
    CPUs // cpus_per_site, capped by GPUs // gpus_per_site when sites ask for GPUs; a node
    that left the cluster (no resources) or is marked dead counts for nothing.
    """
    total = 0
    for node in nodes:
        resources = node.get("Resources") or {}
        if not resources or not node.get("Alive", True):
            continue
        fits = int(resources.get("CPU", 0) / cpus_per_site)
        if gpus_per_site > 0:
            gpus = resources.get("GPU", 0)
            fits = min(fits, int(gpus / gpus_per_site)) if gpus else 0
        total += fits
    return total


def gpus_per_site(
    simulation: SimulationConfig, nodes: Iterable[Mapping[str, Any]], sites: int, device: str
) -> float:
    """The configured GPUs per site; unset: share the cluster's GPU among all sites, if any.

    A study pinned to ``device = "cpu"`` reserves no GPU, so it can use every node's CPUs.
    """
    if simulation.gpus_per_site is not None:
        return simulation.gpus_per_site
    has_gpu = any((node.get("Resources") or {}).get("GPU", 0) > 0 for node in nodes)
    if device == "cpu" or not has_gpu:
        return 0.0
    return max(1.0 / sites, RAY_FRACTION)


@dataclass(frozen=True)
class RayPool:
    """The actors a run gets: how many, on how many nodes, each with which resources."""

    where: str
    nodes: int
    actors: int
    sites: int
    cpus_per_site: float
    gpus_per_site: float

    def describe(self) -> str:
        return (
            f"ray: {self.sites} sites share {self.actors} actors on {self.nodes} node"
            f"{'s' if self.nodes != 1 else ''} of {self.where} ({self.cpus_per_site:g} CPU, "
            f"{self.gpus_per_site:g} GPU each)"
        )


def plan_pool(
    simulation: SimulationConfig,
    nodes: list[Mapping[str, Any]],
    sites: int,
    *,
    device: str = "auto",
    where: str = "this machine's Ray",
) -> RayPool:
    """The actor pool Flower will start on ``nodes``; refused when not one site fits."""
    alive = [n for n in nodes if n.get("Resources") and n.get("Alive", True)]
    gpus = gpus_per_site(simulation, alive, sites, device)
    cpus = simulation.cpus_per_site
    actors = actor_capacity(alive, cpus, gpus)
    if actors == 0:
        most_cpus = max((n["Resources"].get("CPU", 0) for n in alive), default=0)
        most_gpus = max((n["Resources"].get("GPU", 0) for n in alive), default=0)
        if cpus > most_cpus:
            key, value = "cpus_per_site", most_cpus
        else:  # short of GPUs: ask for what one node has, or for none
            key, value = "gpus_per_site", most_gpus if 0 < most_gpus < gpus else 0
        fix = f"--set simulation.{key}={value:g}" if value or key == "gpus_per_site" else ""
        raise FedmedError(
            f"{where} has no node with room for one site: a site asks for {cpus:g} CPU and "
            f"{gpus:g} GPU, its nodes ({len(alive)}) have at most {most_cpus:g} CPUs and "
            f"{most_gpus:g} GPUs; "
            + (f"use {fix} or add a bigger node" if fix else "add a node with CPUs")
        )
    return RayPool(where, len(alive), actors, sites, cpus, gpus)


def actor_environment(site_state: Path | None = None) -> dict[str, str]:
    """What the site actors need from this process's environment, as absolute paths.

    A local Ray inherits this process's environment, but the nodes of a cluster started with
    `ray start` elsewhere do not: without this their sites would read the data, and charge the
    privacy ledger, wherever that node's own settings (or defaults) point. Every FEDMED_* folder
    set here goes along, made absolute (a node's working directory is not ours); the data folder
    always does, and so does ``site_state``, where the sites keep their layers (the run's own
    folder unless FEDMED_SITE_STATE_DIR says otherwise: fedmed.site.fedbn). PYTHONPATH carries
    this process's sys.path, as Flower's own ray.init does, so a checkout on a shared path is
    imported as here; an installed fedmed is found in each node's environment anyway.
    """
    env = {name: os.environ[name] for name in ENVIRONMENT if os.environ.get(name)}
    env = {k: os.path.abspath(v) if k.endswith("_DIR") else v for k, v in env.items()}
    env["FEDMED_DATA_DIR"] = str(data_dir().resolve())
    if site_state is not None:
        env["FEDMED_SITE_STATE_DIR"] = str(Path(site_state).resolve())
    paths = [p for p in (*sys.path, os.environ.get("PYTHONPATH", "")) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def connect(address: str, init_args: dict[str, Any], env: dict[str, str]) -> None:
    """``ray.init``: join the cluster at ``address`` (or start a local Ray), errors in one line."""
    import ray

    if address:
        check_reachable(address)
    try:
        ray.init(
            **({"address": address} if address else {}),
            runtime_env={"env_vars": env},
            **init_args,
        )
    except RuntimeError as exc:
        if str(exc).startswith("Version mismatch"):
            raise FedmedError(version_mismatch_message(address or "local", str(exc))) from None
        raise
    except ConnectionError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedmedError(
            f"could not join the Ray cluster at {address or 'auto'}: {first}; check that it "
            f"runs with `ray status --address {address or 'auto'}` on its head node"
        ) from None


def run_ray(
    server_app: ServerApp,
    client_app: ClientApp,
    num_nodes: int,
    *,
    simulation: SimulationConfig | None = None,
    address: str = "",
    device: str = "auto",
    site_state: Path | None = None,
    verbose: bool = False,
) -> RayPool:
    """Run on Ray with ``num_nodes`` virtual SuperNodes; returns the actor pool it ran on.

    A Ray this run started is shut down afterwards; a cluster at ``address`` is only
    disconnected from.
    """
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray's future default (leave CUDA_VISIBLE_DEVICES alone for CPU-only actors); opting in now
    # also silences its FutureWarning.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import ray
    from flwr.simulation import run_simulation

    simulation = simulation or SimulationConfig()
    init_args: dict[str, Any] = {
        "log_to_driver": verbose,
        "logging_level": logging.ERROR,
        "include_dashboard": False,
    }
    connect(address, init_args, actor_environment(site_state))
    try:
        where = f"the Ray cluster at {address}" if address else "this machine's Ray"
        pool = plan_pool(simulation, ray.nodes(), num_nodes, device=device, where=where)
        print(pool.describe(), file=sys.stderr)
        backend_config = {
            "client_resources": {"num_cpus": pool.cpus_per_site, "num_gpus": pool.gpus_per_site},
            # Flower passes these to ray.init only if Ray were not initialized: the same call.
            "init_args": {**init_args, **({"address": address} if address else {})},
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_nodes,
                backend_config=backend_config,
                verbose_logging=verbose,
            )
        return pool
    finally:
        if ray.is_initialized():  # Flower shuts down on success; a failed start leaves it to us
            ray.shutdown()
