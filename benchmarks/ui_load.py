"""Load on the search service: concurrent clients searching by key (not a test).

Builds (once, under --root) a catalogue of --images synthetic clustered vectors
committed through the real build and commit code (tables, parts, the index
`choose_index` picks: IVF-Flat at 100,000), starts the real `batchsight ui`
command on it in its own process, and runs --clients keep-alive HTTP clients in
another process, each searching by a random catalogued key (k=10) for
--seconds. Prints requests/s, p50/p90/p99 latency and errors; writes JSON to
benchmarks/results/ui_load.json.

    .venv/bin/python benchmarks/ui_load.py                      # 100,000 images, 32 clients, 30 s
    .venv/bin/python benchmarks/ui_load.py --images 20000 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.catalog import Catalog, ChangePlan, ShardResult, build_next_version, commit_manifest, read_pointer  # noqa: E402
from tasks.storage import LocalStore  # noqa: E402
from tasks.synthetic_vectors import ClusteredVectors  # noqa: E402
from tasks.tables import embeddings_table, image_id_for, to_parquet_bytes  # noqa: E402

CATEGORIES = ("invoice", "receipt", "form", "product", "uncertain")


def build_catalogue(root: Path, n: int, dim: int, part_rows: int = 10_000) -> Catalog:
    """A committed catalogue of `n` synthetic images (one version, real code path)."""
    store = LocalStore(root, create=True)
    if read_pointer(store)[0] is not None:
        cat = Catalog.open(store)
        if len(cat.images) == n and cat.manifest.embedding_dim == dim:
            return cat
        raise SystemExit(f"{root} holds another catalogue ({len(cat.images)} x {cat.manifest.embedding_dim}); "
                         "pass another --root")
    run_id = "bench001"
    data = ClusteredVectors(n, dim, clusters=200, seed=0, block_size=part_rows)
    results = []
    for shard, (ids, vectors) in enumerate(data):
        keys = [f"photos/{i // 1000:03d}/item-{i:07d}.jpg" for i in ids]
        image_ids = np.array([image_id_for(k) for k in keys], np.int64)
        part = f"tables/embeddings/{run_id}/shard-{shard:05d}.parquet"
        store.put(part, to_parquet_bytes(embeddings_table(image_ids, run_id, vectors)))
        rows = pd.DataFrame({"image_id": image_ids, "key": keys, "etag": run_id, "size": 1, "run_id": run_id,
                             "page": 1, "top_class": "thing", "embedding_part": part,
                             "category": [CATEGORIES[i % len(CATEGORIES)] for i in ids]})
        results.append(ShardResult(shard, rows, part, [], {}))
    manifest, _ = build_next_version(
        store, None, ChangePlan(), results, run_id=run_id, source=str(root / "no-source"), model="synthetic",
        weights="none", weights_source="random", weights_sha256="0" * 64, embedding_dim=dim, reembed_all=False)
    commit_manifest(store, manifest, None)
    return Catalog.open(store)


async def _client(host: str, port: int, paths: list[str], stop_at: float, latencies: list[float],
                  errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    rng = random.Random(id(latencies) ^ len(latencies))
    try:
        while time.perf_counter() < stop_at:
            path = paths[rng.randrange(len(paths))]
            t0 = time.perf_counter()
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            if not status.startswith(b"HTTP/1.1 200") or b'"results": [{' not in body:
                errors.append(f"{status.decode().strip()} {body[:200]!r}")
    finally:
        writer.close()


def run_clients(port: int, keys: list[str], clients: int, seconds: float, queue) -> None:
    """In its own process: `clients` keep-alive connections, closed loop, no think time."""
    paths = [f"/api/search?key={quote(k)}&k=10" for k in keys]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []

    async def main() -> None:
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(_client("127.0.0.1", port, paths, stop_at, lat, errors) for lat in latencies))

    t0 = time.perf_counter()
    asyncio.run(main())
    queue.put({"elapsed_s": time.perf_counter() - t0, "latencies": [x for lat in latencies for x in lat],
               "errors": errors[:20], "n_errors": len(errors)})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512, help="embedding size (512: resnet18/34; 2048: resnet50)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--root", type=Path, default=ROOT / "bench-data" / "ui-load")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ui_load.json")
    args = parser.parse_args()

    root = args.root / f"n{args.images}-d{args.dim}"
    t0 = time.perf_counter()
    cat = build_catalogue(root, args.images, args.dim)
    build_s = time.perf_counter() - t0
    m = cat.manifest
    print(f"catalogue: {len(cat.images):,} images x {m.embedding_dim}-d, index {m.index_factory} nprobe "
          f"{m.index_nprobe} (recall@10 {m.index_recall_at_10}), ready in {build_s:.0f} s")

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("batchsight")), "ui", "--catalog", str(root),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false"))
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.5)
        keys = cat.images["key"].sample(5000, random_state=0).tolist()
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        if args.warmup:
            warm = ctx.Process(target=run_clients, args=(port, keys, args.clients, args.warmup, queue))
            warm.start()
            queue.get()
            warm.join()
        proc = ctx.Process(target=run_clients, args=(port, keys, args.clients, args.seconds, queue))
        proc.start()
        result = queue.get()
        proc.join()
    finally:
        server.terminate()
        server.wait(10)

    lat = np.array(result["latencies"]) * 1000
    row = {"images": len(cat.images), "dim": m.embedding_dim, "index": m.index_factory, "nprobe": m.index_nprobe,
           "clients": args.clients, "seconds": round(result["elapsed_s"], 1), "requests": len(lat),
           "requests_per_s": round(len(lat) / result["elapsed_s"], 1),
           "p50_ms": round(float(np.percentile(lat, 50)), 2), "p90_ms": round(float(np.percentile(lat, 90)), 2),
           "p99_ms": round(float(np.percentile(lat, 99)), 2), "max_ms": round(float(lat.max()), 2),
           "errors": result["n_errors"], "error_examples": result["errors"],
           "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
           "targets": {"p50_ms": 20, "p99_ms": 200}}
    print(f"{'clients':>8} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>7}")
    print(f"{row['clients']:>8} {row['requests_per_s']:>8} {row['p50_ms']:>8} {row['p90_ms']:>8} "
          f"{row['p99_ms']:>8} {row['errors']:>7}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
