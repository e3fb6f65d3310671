"""Latency of ``cm3-pyg serve``: ``GET /recommend?user=ID&k=K`` over 1,000 requests.

python -m benchmarks.serving_latency --run runs/tiktok-cm3-seed999 --data-root ../shared/data

Starts the server in its own process (``python -m cm3_pyg serve RUN --port 0``), sends
``--requests`` requests for seeded random users over one keep-alive connection, and prints
p50 / p90 / p99 / max in milliseconds; beside it, the same users through
:class:`cm3_pyg.serving.TopK` in this process (the scoring alone). A run from before
artifacts existed gets one built from its checkpoint (``--data-root`` needed) in ``--out``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from cm3_pyg.serving import ARTIFACT_NAME, Artifact, TopK, save_artifact
from cm3_pyg.training.loading import load_run


def _artifact_run(run: Path, out: Path, data_root: str | None) -> Path:
    if (run / ARTIFACT_NAME).exists():
        return run
    trained = load_run(run, data_root=data_root)
    user_emb, item_emb = trained.model.embed(trained.inputs)
    out.mkdir(parents=True, exist_ok=True)
    artifact = Artifact.build(
        model=type(trained.model).name,
        dataset=str(trained.metrics.get("dataset", "")),
        epoch=trained.epoch,
        valid=trained.metrics.get("valid", {}),
        config=trained.config,
        user_embeddings=user_emb,
        item_embeddings=item_emb,
        train_edges=trained.splits.train,
    )
    save_artifact(artifact, out / ARTIFACT_NAME)
    return out


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

    return {
        "p50_ms": q(0.50),
        "p90_ms": q(0.90),
        "p99_ms": q(0.99),
        "max_ms": ordered[-1],
        "mean_ms": statistics.mean(ordered),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--data-root")
    parser.add_argument("--out", default="runs/serving-latency")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = _artifact_run(Path(args.run), Path(args.out), args.data_root)
    top_k = TopK(run)
    generator = torch.Generator().manual_seed(args.seed)
    known = [u for u in top_k.artifact.user_ids if u]
    picks = torch.randint(len(known), (args.requests,), generator=generator).tolist()
    users = [known[i] for i in picks]

    in_process = []
    for user in users:
        start = time.perf_counter()
        top_k.recommend([user], args.k)
        in_process.append((time.perf_counter() - start) * 1000)

    server = subprocess.Popen(
        [sys.executable, "-m", "cm3_pyg", "serve", str(run), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = server.stdout.readline() if server.stdout else ""
        if "http://" not in line:
            raise SystemExit(f"the server did not start: {line!r}")
        host, port = line.strip().rsplit("http://", 1)[1].split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        over_http = []
        for user in users:
            start = time.perf_counter()
            connection.request("GET", f"/recommend?user={user}&k={args.k}")
            response = connection.getresponse()
            body = response.read()
            over_http.append((time.perf_counter() - start) * 1000)
            if response.status != 200:
                raise SystemExit(f"HTTP {response.status}: {body[:200]!r}")
        connection.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    art = top_k.artifact
    report = {
        "run": str(args.run),
        "model": art.model,
        "dataset": art.dataset,
        "users": art.num_users,
        "items": art.num_items,
        "dim": int(art.user_embeddings.size(1)),
        "requests": args.requests,
        "k": args.k,
        "torch_threads": torch.get_num_threads(),
        "http": _quantiles(over_http),
        "in_process": _quantiles(in_process),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
