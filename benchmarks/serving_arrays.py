"""Latency of `fedmed serve` for image and sequence models, on loopback, one client.

Trains BreastMNIST and PhysioNet 2012 for one round (the served model's accuracy is not the
point here), starts a real `fedmed serve` process for each, and times sequential requests:
one 28x28 image as a JSON array vs as a PNG upload, 32 images per request, with saliency maps;
one ICU stay (its first-48 h observations as JSON records) vs 32 per request. Prints the
ratios side by side. Every loop is bounded (a request count) and only 127.0.0.1 is contacted.

Usage: FEDMED_DATA_DIR=../shared/datasets python benchmarks/serving_arrays.py [--requests 50]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from serving_load import start_server

from fedmed.serving.server import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serving_arrays.json"


def train(config: str, out: Path, env: dict[str, str]) -> Path:
    fedmed = str(Path(sys.executable).with_name("fedmed"))
    sets = ["rounds=1", f"output_dir={out}"]
    done = subprocess.run(
        [fedmed, "simulate", config, "--quiet", *[a for s in sets for a in ("--set", s)]],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(done.stdout.strip().splitlines()[-1])


def timed(send, n: int) -> dict[str, float]:
    send()  # warm-up (first request builds the route's models)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        reply = send()
        times.append(time.perf_counter() - start)
        reply.raise_for_status()
    ms = np.array(times) * 1000
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "n": n}


def image_cases(url: str, n: int, images: np.ndarray) -> dict[str, dict[str, float]]:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, format="PNG")
    png = buf.getvalue()
    one, batch = [images[0].tolist()], images[:32].tolist()
    post = httpx.Client(timeout=60).post
    return {
        "1 image, JSON": timed(lambda: post(f"{url}/predict", json={"images": one}), n),
        "1 image, PNG": timed(
            lambda: post(f"{url}/predict/png", content=png, headers={"content-type": "image/png"}),
            n,
        ),
        "32 images, JSON": timed(lambda: post(f"{url}/predict", json={"images": batch}), n),
        "1 image, PNG + saliency": timed(
            lambda: post(f"{url}/predict/png?explain=true", content=png), n
        ),
    }


def series_cases(url: str, n: int, patients: list[list[dict]]) -> dict[str, dict[str, float]]:
    post = httpx.Client(timeout=60).post
    one = {"patients": [{"observations": patients[0]}]}
    batch = {"patients": [{"observations": p} for p in patients[:32]]}
    return {
        "1 ICU stay": timed(lambda: post(f"{url}/predict", json=one), n),
        "32 ICU stays": timed(lambda: post(f"{url}/predict", json=batch), n),
    }


def icu_stays(data_dir: Path, variables: set[str]) -> list[list[dict]]:
    """The first 32 stays of set A, their first-48 h observations of the model's variables."""
    import pandas as pd

    long = pd.read_csv(data_dir / "physionet2012" / "set_a_long.csv.gz")
    first = long["record_id"].drop_duplicates().iloc[:32]
    rows = long[long["record_id"].isin(first) & long["parameter"].isin(variables)]
    return [
        [{"time": float(t), "variable": str(v), "value": float(x)}
         for t, v, x in zip(g["time_min"], g["parameter"], g["value"], strict=True)]
        for _, g in rows.groupby("record_id", sort=False)
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    data_dir = Path(os.environ.get("FEDMED_DATA_DIR", "../shared/datasets"))
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config, cases in (("breastmnist", "images"), ("physionet2012", "series")):
            run_dir = train(config, Path(tmp) / config, env)
            port = free_port()
            server = start_server(run_dir, port, env)
            try:
                url = f"http://127.0.0.1:{port}"
                if cases == "images":
                    archive = np.load(data_dir / "medmnist" / "breastmnist.npz")
                    results[config] = image_cases(url, args.requests, archive["test_images"])
                else:
                    card = json.loads((run_dir / "model.card.json").read_text())
                    variables = set(card["preprocessing"]["variables"])
                    stays = icu_stays(data_dir, variables)
                    results[config] = series_cases(url, args.requests, stays)
                    results[config]["observations per stay (median)"] = {
                        "n": float(np.median([len(s) for s in stays]))
                    }
            finally:
                server.terminate()
                server.wait(timeout=30)
    for config, cases in results.items():
        print(config)
        for name, r in cases.items():
            if "p50_ms" in r:
                print(f"  {name:<26} p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms")
    img, icu = results["breastmnist"], results["physionet2012"]

    def p50(cases: dict, name: str) -> float:
        return cases[name]["p50_ms"]

    ratios = {
        "PNG upload / JSON array, 1 image": p50(img, "1 image, PNG") / p50(img, "1 image, JSON"),
        "per image, 32 per request / 1": p50(img, "32 images, JSON")
        / 32
        / p50(img, "1 image, JSON"),
        "PNG + saliency / PNG": p50(img, "1 image, PNG + saliency") / p50(img, "1 image, PNG"),
        "per stay, 32 per request / 1": p50(icu, "32 ICU stays") / 32 / p50(icu, "1 ICU stay"),
    }
    print("ratios (p50):")
    for name, ratio in ratios.items():
        print(f"  {name:<34} {ratio:.2f}")
    results["ratios"] = {k: {"p50_ratio": v} for k, v in ratios.items()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(RESULTS)


if __name__ == "__main__":
    main()
