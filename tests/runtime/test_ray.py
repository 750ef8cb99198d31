"""The Ray runtime's decisions before any Ray starts: the actor pool, the address, its errors.

Nothing here starts Ray; tests/integration/test_ray.py runs studies on real Ray clusters.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedmed.config import RunConfig, SimulationConfig
from fedmed.errors import ConfigError, FedmedError
from fedmed.runtime import ray as fedmed_ray
from fedmed.runtime.ray import (
    actor_capacity,
    actor_environment,
    check_reachable,
    gpus_per_site,
    parse_address,
    plan_pool,
    version_mismatch_message,
)


def _node(cpus: float = 0, gpus: float = 0, alive: bool = True) -> dict[str, Any]:
    resources = {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}
    return {"NodeID": os.urandom(4).hex(), "Alive": alive, "Resources": resources if alive else {}}


@pytest.fixture
def listening() -> Iterator[str]:
    """An address where something accepts TCP connections (not a Ray cluster)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield f"127.0.0.1:{server.getsockname()[1]}"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed on exit: nothing listens there now


LAYOUTS = [
    ([_node(2)], 1.0, 0.0),  # 1,000 sites on a 2-CPU machine: 2 actors
    ([_node(2)], 0.5, 0.0),
    ([_node(1), _node(1)], 1.0, 0.0),  # the integration test's 2-node cluster
    ([_node(2), _node(4)], 3.0, 0.0),  # per node: the 2-CPU node fits none
    ([_node(8, gpus=1)], 1.0, 0.25),  # GPUs cap the actors
    ([_node(8), _node(8, gpus=2)], 2.0, 0.5),  # a node without GPUs hosts none
    ([_node(4), _node(alive=False)], 1.0, 0.0),  # a node that left the cluster
    ([_node(2)], 4.0, 0.0),  # not one site fits
]


@pytest.mark.parametrize(("nodes", "cpus", "gpus"), LAYOUTS)
def test_actor_capacity_is_what_flowers_engine_starts(
    nodes: list[dict], cpus: float, gpus: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    try:
        expected = pool_size_from_resources({"num_cpus": cpus, "num_gpus": gpus})
    except ValueError:  # Flower: "ActorPool is empty"
        expected = 0

    assert actor_capacity(nodes, cpus, gpus) == expected


def test_a_thousand_sites_on_two_cpus_share_two_actors() -> None:
    pool = plan_pool(SimulationConfig(), [_node(2)], 1000, where="this machine's Ray")

    assert (pool.actors, pool.nodes, pool.gpus_per_site) == (2, 1, 0.0)
    assert pool.describe() == (
        "ray: 1000 sites share 2 actors on 1 node of this machine's Ray (1 CPU, 0 GPU each)"
    )


@pytest.mark.parametrize(
    ("simulation", "nodes", "fix"),
    [
        (SimulationConfig(cpus_per_site=4), [_node(2), _node(2)], "cpus_per_site=2 or add"),
        (SimulationConfig(gpus_per_site=1), [_node(8)], "gpus_per_site=0 or add"),
        (SimulationConfig(gpus_per_site=2), [_node(8, gpus=1)], "gpus_per_site=1 or add"),
        (SimulationConfig(), [_node(alive=False)], "add a node with CPUs"),
    ],
)
def test_a_cluster_without_room_for_one_site_is_refused_naming_the_fix(
    simulation: SimulationConfig, nodes: list[dict], fix: str
) -> None:
    with pytest.raises(FedmedError, match="has no node with room for one site") as err:
        plan_pool(simulation, nodes, 4, where="the Ray cluster at 10.0.0.5:6379")

    assert fix in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("the Ray cluster at 10.0.0.5:6379 has no node")


def test_unset_gpus_share_the_clusters_gpu_unless_the_study_runs_on_cpu() -> None:
    auto = SimulationConfig()
    gpu_cluster = [_node(8), _node(8, gpus=1)]

    assert gpus_per_site(auto, gpu_cluster, 4, "auto") == 0.25  # today's 1 / sites
    assert gpus_per_site(auto, gpu_cluster, 100_000, "auto") == 1e-4  # Ray's finest fraction
    assert gpus_per_site(auto, gpu_cluster, 4, "cpu") == 0.0
    assert gpus_per_site(auto, [_node(8)], 4, "auto") == 0.0
    assert gpus_per_site(SimulationConfig(gpus_per_site=0.5), [_node(8)], 4, "cpu") == 0.5


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("10.0.0.5:6379", ("10.0.0.5", 6379)),
        ("ray://head.hospital.org:10001", ("head.hospital.org", 10001)),
        ("[::1]:6379", ("::1", 6379)),
        ("auto", None),
    ],
)
def test_cluster_addresses_are_parsed(address: str, parsed: tuple | None) -> None:
    assert parse_address(address) == parsed


@pytest.mark.parametrize("address", ["10.0.0.5", "10.0.0.5:port", ":6379", "http://h:1/x", "h:0"])
def test_a_malformed_address_names_the_forms_it_takes(address: str) -> None:
    with pytest.raises(ConfigError, match=r"not a Ray cluster address; give the head node's"):
        parse_address(address)


def test_ray_address_needs_the_ray_engine(demo_config: RunConfig) -> None:
    from fedmed.runtime.run import plan_study

    with pytest.raises(ConfigError, match="--ray-address runs the sites on a Ray cluster: add"):
        plan_study(demo_config, ray_address="127.0.0.1:6379")
    with pytest.raises(ConfigError, match="not a Ray cluster address"):
        plan_study(demo_config, engine="ray", ray_address="127.0.0.1")


def test_an_address_nobody_answers_at_fails_at_once_naming_the_fix() -> None:
    port = _closed_port()

    with pytest.raises(FedmedError) as err:
        check_reachable(f"127.0.0.1:{port}", timeout=2)

    message = str(err.value)
    assert message.startswith(f"no Ray cluster answers at 127.0.0.1:{port} (Connection refused)")
    assert f"`ray start --head --port {port}`" in message and "\n" not in message


def test_simulate_on_an_unreachable_cluster_is_one_line_and_leaves_no_run_folder(
    demo_config: RunConfig, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from fedmed.cli.main import main
    from tests.cli.test_cli import _write_toml

    config = _write_toml(demo_config, tmp_path / "demo.toml")  # output_dir: tmp_path / "runs"
    address = f"127.0.0.1:{_closed_port()}"

    code = main(["simulate", str(config), "--engine", "ray", "--ray-address", address, "--quiet"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"fedmed: error: no Ray cluster answers at {address}")
    assert not any((tmp_path / "runs").glob("*"))  # the empty run folder was removed


def test_a_cluster_of_another_ray_or_python_is_refused_with_the_versions_to_match(
    listening: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray
    from ray._private.utils import check_version_info

    def cluster_of_another_version(**_: Any) -> None:
        metadata = {"ray_version": "2.9.3", "python_version": "3.10.4"}
        check_version_info(metadata, "127.0.0.1")  # Ray's own check, with its own message

    monkeypatch.setattr(ray, "init", cluster_of_another_version)
    with pytest.raises(FedmedError) as err:
        fedmed_ray.connect(listening, {}, {})

    message = str(err.value)
    assert message.startswith(f"the Ray cluster at {listening} runs Ray 2.9.3 on Python 3.10.4")
    assert "ray==2.9.3 on Python 3.10.4" in message and "\n" not in message
    assert version_mismatch_message("x", "Version mismatch: odd\nformat") == (
        "the Ray cluster at x runs another Ray or Python (Version mismatch: odd format)"
    )


def test_the_actors_get_this_runs_folders_as_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node started elsewhere has its own environment and working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDMED_LEDGER_DIR", "ledger")
    monkeypatch.setenv("FEDMED_DATA_DIR", "data")
    monkeypatch.setenv("FEDMED_GRID_POLL_SECONDS", "0.5")
    monkeypatch.delenv("FEDMED_CACHE_DIR", raising=False)

    env = actor_environment(Path("runs/study/sites"))

    assert env["FEDMED_LEDGER_DIR"] == str(tmp_path / "ledger")
    assert env["FEDMED_DATA_DIR"] == str(tmp_path / "data")
    assert env["FEDMED_SITE_STATE_DIR"] == str(tmp_path / "runs/study/sites")
    assert env["FEDMED_GRID_POLL_SECONDS"] == "0.5" and "FEDMED_CACHE_DIR" not in env
    assert set(p for p in sys.path if p) <= set(env["PYTHONPATH"].split(os.pathsep))


def test_the_address_reaches_ray_init_and_flower_and_the_cluster_is_only_disconnected(
    listening: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plumbing only (Ray and Flower stand-ins); the integration test runs a real cluster."""
    import flwr.simulation
    import ray

    calls: dict[str, Any] = {"shutdown": 0}
    monkeypatch.setattr(ray, "init", lambda **kw: calls.setdefault("init", kw))
    monkeypatch.setattr(ray, "is_initialized", lambda: "init" in calls)
    monkeypatch.setattr(ray, "nodes", lambda: [_node(1), _node(1)])
    monkeypatch.setattr(ray, "shutdown", lambda: calls.update(shutdown=calls["shutdown"] + 1))
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: calls.setdefault("sim", kw))

    pool = fedmed_ray.run_ray(
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        3,
        simulation=SimulationConfig(cpus_per_site=1),
        address=listening,
        device="cpu",
    )

    assert calls["init"]["address"] == listening
    assert "PYTHONPATH" in calls["init"]["runtime_env"]["env_vars"]
    backend = calls["sim"]["backend_config"]
    assert backend["init_args"]["address"] == listening
    assert backend["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert calls["sim"]["num_supernodes"] == 3 and (pool.nodes, pool.actors) == (2, 2)
    assert calls["shutdown"] == 1  # ray.shutdown() in a driver that joined: a disconnect
