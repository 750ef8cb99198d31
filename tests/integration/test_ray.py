"""Same study, same seed: Flower's Ray engine and the in-process Grid give the same metrics.

And the same study on an existing 2-node Ray cluster (``--ray-address``), started here with
``ray start`` as an operator would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from fedmed.cli.main import main
from tests.integration.ports import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _own_ray_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts a Ray cluster of its own, never joins another, and leaves nothing behind.

    Without RAY_TMPDIR every Ray on the host shares /tmp/ray, and ray.init() joins the cluster
    named in /tmp/ray/ray_current_cluster (a `ray start` by anyone). The folder is short on
    purpose: Ray's socket paths live under it, and a Unix socket path has at most 107 bytes.
    A run also changes this process's environment: ray.init() and run_ray set
    PYTHONBREAKPOINT and RAY_* variables (and Flower's Ray backend, were it to start Ray itself,
    would prepend all of sys.path to $PYTHONPATH). All of it is put back, as is a Ray left
    connected by a failed test.
    """
    import flwr.simulation  # noqa: F401 - its and Ray's import-time settings stay, as they would
    import ray

    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    environ = dict(os.environ)
    try:
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
        os.environ.clear()
        os.environ.update(environ)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_ray_and_inprocess_agree(demo_config, tmp_path, capsys) -> None:
    from tests.cli.test_cli import _write_toml

    config = _write_toml(demo_config, tmp_path / "demo.toml")
    results = {}
    for engine in ("inprocess", "ray"):
        assert main(["simulate", str(config), "--engine", engine, "--quiet"]) == 0
        run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
        results[engine] = json.loads((run_dir / "metrics.json").read_text())

    a, b = results["inprocess"], results["ray"]
    assert b["engine"] == "ray"
    for site in demo_config.site_names:
        for metric in ("accuracy", "roc_auc", "loss", "epsilon"):
            assert a["final"]["sites"][site][metric] == pytest.approx(
                b["final"]["sites"][site][metric], abs=1e-5
            )


def test_a_run_killed_in_process_resumes_on_ray(demo_config, tmp_path, capsys) -> None:
    from fedmed.coordinator.app import build_server_app
    from fedmed.runtime.inprocess import run_inprocess
    from fedmed.runtime.run import preflight
    from fedmed.site.app import app
    from fedmed.study.plan import RunPlan, new_run_dir
    from tests.cli.test_cli import _write_toml

    def killed_after_round_1(rnd: int, history) -> None:
        if rnd == 1:
            raise KeyboardInterrupt  # stands in for the coordinator dying

    config = _write_toml(demo_config, tmp_path / "demo.toml")
    cfg, _ = preflight(demo_config)
    plan = RunPlan(cfg, new_run_dir(cfg))
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(build_server_app(plan, killed_after_round_1), app, 4, plan.to_run_config())
    assert main(["simulate", str(config), "--quiet"]) == 0  # uninterrupted, in-process
    reference = Path(capsys.readouterr().out.strip().splitlines()[-1])

    args = ["simulate", str(config), "--engine", "ray", "--resume", str(plan.run_dir), "--quiet"]
    assert main(args) == 0

    resumed = json.loads((plan.run_dir / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    assert resumed["engine"] == "ray" and [h["round"] for h in resumed["history"]] == [1, 2]
    for site in demo_config.site_names:
        for metric in ("accuracy", "loss", "epsilon"):
            assert resumed["final"]["sites"][site][metric] == pytest.approx(
                expected["final"]["sites"][site][metric], abs=1e-6
            )


def test_local_normalization_on_ray_matches_inprocess(tmp_path, capsys, monkeypatch) -> None:
    """FedBN's site-local layers persist across rounds in Ray actors as they do in-process.

    Without $FEDMED_SITE_STATE_DIR they live in the run's own folder, found from a RELATIVE
    output_dir by Ray's worker processes as by the in-process sites.
    """
    from tests.tasks.test_imaging import _study, _to_toml

    monkeypatch.delenv("FEDMED_SITE_STATE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    raw = _study(tmp_path, rounds=3)
    raw["output_dir"] = "runs"
    raw["personalize"] = {"local_normalization": True}
    config = tmp_path / "img.toml"
    config.write_text(_to_toml(raw))
    results = {}
    for engine in ("inprocess", "ray"):
        assert main(["simulate", str(config), "--engine", engine, "--quiet"]) == 0
        run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
        results[engine] = json.loads((run_dir / "metrics.json").read_text())
        for site in ("a", "b"):
            stored = list(
                (tmp_path / run_dir / "sites" / site / "local-layers").rglob("*.safetensors")
            )
            assert stored, f"{engine}: site {site} kept no layers in its run folder"

    a, b = results["inprocess"], results["ray"]
    assert b["engine"] == "ray"
    for site in ("a", "b"):
        for phase in ("before", "after"):
            assert a["final"]["personalized"]["sites"][site][phase]["loss"] == pytest.approx(
                b["final"]["personalized"]["sites"][site][phase]["loss"], abs=1e-5
            )
        for h_a, h_b in zip(a["history"], b["history"], strict=True):
            assert h_a["sites"][site]["evaluate"]["loss"] == pytest.approx(
                h_b["sites"][site]["evaluate"]["loss"], abs=1e-5
            )


def _survival(tmp_path: Path) -> dict:
    from tests.tasks.test_survival import _run

    # (Local DP-SGD cannot apply to Cox; central DP's noise is drawn at the coordinator,
    # unseeded, so runs would not compare: tests/test_survival.py covers it in-process.)
    return _run({"strategy.name": "fedadam", "train.local_steps": 3}, tmp_path)


def _imaging(tmp_path: Path) -> dict:
    from tests.tasks.test_imaging import _study

    return _study(tmp_path, strategy={"name": "fedprox", "proximal_mu": 0.1})


def _sequence(tmp_path: Path) -> dict:
    from tests.tasks.test_sequence import _study

    return _study(tmp_path, privacy={"enabled": True, "target_epsilon": 8.0})  # Opacus DPGRU


def _text(tmp_path: Path) -> dict:
    from tests.data.test_text import site_texts, text_study

    # The vocabulary is asked for before round 1, when Ray's engine may list no node yet.
    return text_study(tmp_path, [site_texts(0, n=60), site_texts(1, n=45)], min_count=5)


@pytest.mark.parametrize("study", [_survival, _imaging, _sequence, _text], ids=lambda f: f.__name__)
def test_every_task_runs_on_ray_as_in_process(study, tmp_path, capsys) -> None:
    """Survival, imaging, sequence and text studies (2 sites, 1 round) give the same metrics on
    Ray."""
    from tests.tasks.test_imaging import _to_toml

    raw = {**study(tmp_path), "rounds": 1, "seed": 3}
    config = tmp_path / "study.toml"
    config.write_text(_to_toml(raw))
    results = {}
    for engine in ("inprocess", "ray"):
        assert main(["simulate", str(config), "--engine", engine, "--quiet"]) == 0
        run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
        results[engine] = json.loads((run_dir / "metrics.json").read_text())

    a, b = results["inprocess"], results["ray"]
    assert b["engine"] == "ray" and set(b["final"]["sites"]) == {s["name"] for s in raw["sites"]}
    assert not any(h["failures"] for h in b["history"]), b["history"]
    for site, metrics in a["final"]["sites"].items():
        for metric, value in metrics.items():
            assert b["final"]["sites"][site][metric] == pytest.approx(value, abs=1e-4), metric


# -- an existing cluster: `ray start` head + worker node, as an operator starts them ---------------

RAY_STARTED = "Ray runtime started."


def _ray_cli() -> list[str]:
    """This Python's `ray` command (bin/ray next to it in a venv, as CI installs it)."""
    ray = Path(sys.executable).with_name("ray")
    return [str(ray)] if ray.is_file() else [sys.executable, "-m", "ray.scripts.scripts"]


def _start_node(args: Sequence[str], temp_dir: Path, nodes: list[subprocess.Popen]) -> None:
    """`ray start --block` in a session of its own, appended to ``nodes`` before it is waited for.

    --block keeps `ray start` as the parent of the node's daemons, so the node is one process
    tree this test owns. The cluster gets neither this test's FEDMED_* settings nor its
    PYTHONPATH nor its working directory, as a cluster started by someone else would not: what
    the sites need must reach them through fedmed (fedmed.runtime.ray.actor_environment).
    Ports: the fixed defaults (agent 52365, client server 10001) would clash between the two
    nodes and with other tests; worker ports are left to the kernel, as Ray's own multi-node
    tests on one machine do.
    """
    log = temp_dir / "ray-start.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMED_")}
    env.pop("PYTHONPATH", None)
    command = [
        *_ray_cli(),
        "start",
        "--block",
        "--disable-usage-stats",
        "--num-cpus=1",
        "--num-gpus=0",
        "--object-store-memory=100000000",
        f"--temp-dir={temp_dir}",
        "--min-worker-port=0",
        "--max-worker-port=0",
        f"--dashboard-agent-listen-port={free_port()}",
        *args,
    ]
    with log.open("wb") as out:
        node = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd="/", start_new_session=True
        )
    nodes.append(node)
    deadline = time.monotonic() + 120
    while RAY_STARTED not in log.read_text(errors="replace"):  # printed once GCS lists the node
        if node.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"`ray start {' '.join(args)}` did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _stop_nodes(nodes: list[subprocess.Popen], temp_dirs: Sequence[Path]) -> list[str]:
    """Kill the nodes' process trees, and any process still naming one of their temp dirs.

    Never `ray stop`: it kills every Ray process of this user on the machine, whoever started
    it (another test, another run). Returns what was still alive after SIGKILL (should be []).
    """
    import psutil

    found: dict[int, psutil.Process] = {}
    for node in nodes:
        try:
            parent = psutil.Process(node.pid)
            for proc in (parent, *parent.children(recursive=True)):
                found[proc.pid] = proc
        except psutil.NoSuchProcess:
            pass
    for proc in psutil.process_iter(["cmdline"]):
        command = " ".join(proc.info["cmdline"] or [])
        if proc.pid != os.getpid() and any(str(d) in command for d in temp_dirs):
            found[proc.pid] = proc
    for proc in found.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(list(found.values()), timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    _, still = psutil.wait_procs(alive, timeout=10)
    for node in nodes:
        node.wait(timeout=10)  # reaped: no zombie `ray start`
    return [" ".join(p.cmdline()[:2]) for p in still if p.is_running()]


@pytest.fixture
def two_node_cluster() -> Iterator[tuple[str, Path, list[subprocess.Popen]]]:
    """A head and a worker node with 1 CPU each, on 127.0.0.1; always stopped afterwards.

    The head uses this test's own RAY_TMPDIR (see _own_ray_cluster), the worker node a temp
    dir of its own, so what each node ran can be told apart by its logs.
    """
    head_dir = Path(os.environ["RAY_TMPDIR"])
    worker_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: socket paths
    port = free_port()
    nodes: list[subprocess.Popen] = []
    try:
        _start_node(
            [
                "--head",
                f"--port={port}",
                "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}",
            ],
            head_dir,
            nodes,
        )
        _start_node([f"--address=127.0.0.1:{port}"], worker_dir, nodes)
        yield f"127.0.0.1:{port}", worker_dir, nodes
    finally:
        left = _stop_nodes(nodes, (head_dir, worker_dir))
        shutil.rmtree(worker_dir, ignore_errors=True)
        assert not left, f"Ray processes survived the test: {left}"


def test_a_study_runs_on_an_existing_two_node_cluster_and_leaves_it_running(
    two_node_cluster, demo_config, tmp_path, capsys, _private_ledger
) -> None:
    """--ray-address: the sites' actors run on both nodes; fedmed disconnects, never stops it.

    The demo (4 sites, DP-SGD, 2 rounds) on 2 one-CPU nodes: Flower starts one actor per node
    and the 4 sites queue for them. The cluster was started without this test's FEDMED_*
    settings, so the sites charging the test's own privacy ledger shows that fedmed carried
    them to the actors. The metrics are those of the same study run in-process.
    """
    import ray

    from tests.cli.test_cli import _write_toml

    address, worker_dir, nodes = two_node_cluster
    config = _write_toml(demo_config, tmp_path / "demo.toml")

    code = main(["simulate", str(config), "--engine", "ray", "--ray-address", address, "--quiet"])

    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    run_dir = Path(out.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["engine"] == "ray" and [h["round"] for h in metrics["history"]] == [1, 2]
    assert set(metrics["final"]["sites"]) == set(demo_config.site_names)
    assert not any(h["failures"] for h in metrics["history"]), metrics["history"]
    assert f"ray: 4 sites share 2 actors on 2 nodes of the Ray cluster at {address}" in err
    # An actor ran on the worker node: Ray tags an actor's worker log with its class name, and
    # the worker node keeps its logs in its own temp dir.
    tagged = [
        f
        for f in worker_dir.glob("session_*/logs/worker-*")
        if b":actor_name:ClientAppActor" in f.read_bytes()
    ]
    assert tagged, sorted(p.name for p in worker_dir.glob("session_*/logs/*"))
    assert list(_private_ledger.rglob("*")), "the sites did not charge this test's ledger"
    # Disconnected, and both nodes still up (`ray start --block` exits if a daemon dies).
    assert not ray.is_initialized()
    assert [node.poll() for node in nodes] == [None, None]
    # And the cluster computed what this process computes alone.
    assert main(["simulate", str(config), "--quiet"]) == 0
    alone = Path(capsys.readouterr().out.strip().splitlines()[-1])
    expected = json.loads((alone / "metrics.json").read_text())["final"]["sites"]
    for site, values in expected.items():
        for metric in ("accuracy", "loss", "epsilon"):
            assert metrics["final"]["sites"][site][metric] == pytest.approx(
                values[metric], abs=1e-5
            )
