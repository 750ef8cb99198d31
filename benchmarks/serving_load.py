"""Load test of `fedmed serve` on loopback: latency percentiles and throughput.

A real server process (`fedmed serve`, uvicorn, one worker) serves the demo model; client threads
send 1-row and 1,000-row /predict requests at several concurrency levels. Every loop is bounded
(a fixed number of requests and a time cap) and only 127.0.0.1 is contacted.

Usage: python benchmarks/serving_load.py [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serving_load.json"
TIME_CAP_S = 60.0


def train_demo(out: Path, env: dict[str, str]) -> Path:
    fedmed = str(Path(sys.executable).with_name("fedmed"))
    done = subprocess.run(
        [fedmed, "simulate", "demo", "--quiet", "--set", f"output_dir={out}"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(done.stdout.strip().splitlines()[-1])


def start_server(run_dir: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    fedmed = str(Path(sys.executable).with_name("fedmed"))
    proc = subprocess.Popen(
        [fedmed, "serve", str(run_dir), "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("server did not start")


def load(url: str, body: dict, concurrency: int, total: int) -> dict[str, float]:
    """``total`` requests spread over ``concurrency`` threads; latency in ms."""
    latencies: list[float] = []
    lock = threading.Lock()
    per_thread = max(1, total // concurrency)
    stop_at = time.monotonic() + TIME_CAP_S

    def worker() -> None:
        with httpx.Client(timeout=30) as client:
            for _ in range(per_thread):
                if time.monotonic() > stop_at:
                    return
                start = time.perf_counter()
                reply = client.post(url, json=body)
                elapsed = (time.perf_counter() - start) * 1e3
                reply.raise_for_status()
                with lock:
                    latencies.append(elapsed)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    rows = len(body["rows"])
    return {
        "requests": len(latencies),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "requests_per_s": len(latencies) / wall,
        "rows_per_s": len(latencies) * rows / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FEDMED_LEDGER_DIR": f"{tmp}/ledger", "FEDMED_KEY_DIR": f"{tmp}/keys"}
        run_dir = train_demo(Path(tmp) / "runs", env)
        card = json.loads((run_dir / "model.card.json").read_text())
        rng = np.random.default_rng(0)
        features = card["schema"]["features"]
        means = card["preprocessing"]["mean"]
        stds = card["preprocessing"]["std"]

        def rows(n: int) -> list[dict[str, float]]:
            return [
                {
                    f: float(m + s * rng.normal())
                    for f, m, s in zip(features, means, stds, strict=True)
                }
                for _ in range(n)
            ]

        from fedmed.serving.server import free_port

        port = free_port()
        proc = start_server(run_dir, port, env)
        url = f"http://127.0.0.1:{port}/predict"
        results = {}
        try:
            for n_rows in (1, 1000):
                body = {"rows": rows(n_rows)}
                load(url, body, 1, 10)  # warm-up
                for concurrency in (1, 4, 16):
                    total = args.requests if n_rows == 1 else max(16, args.requests // 10)
                    results[f"{n_rows} rows, {concurrency} clients"] = load(
                        url, body, concurrency, total
                    )
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"command: python benchmarks/serving_load.py --requests {args.requests}")
    print(
        f"server: fedmed serve (uvicorn, 1 worker) on 127.0.0.1; {os.cpu_count()} CPUs shared "
        "with the clients"
    )
    print(f"{'case':<24} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'rows/s':>9}")
    for case, r in results.items():
        print(
            f"{case:<24} {r['requests']:>8} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
            f"{r['requests_per_s']:>8.1f} {r['rows_per_s']:>9.0f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
