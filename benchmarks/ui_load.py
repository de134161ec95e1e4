"""Load on the search service: concurrent clients searching by key (not a test).

Builds (once, under --root) a catalogue of --images synthetic clustered vectors
committed through the real build and commit code (tables, parts, the index
`choose_index` picks: IVF-Flat at 100,000), starts the real `batchsight ui`
command on it (with --workers) in its own process, and runs --clients keep-alive
HTTP clients in another process, each searching by a random catalogued key
(k=10) for --seconds, with one request in flight and no pause; a latency runs
from the request's write to the last byte of its body. Several client counts
(--clients 32,1) run one after another on the same server. Prints requests/s,
p50/p90/p99 latency, errors and the cores the server and the generator used
(they share the machine); writes JSON to benchmarks/results/ui_load.json.

    .venv/bin/python benchmarks/ui_load.py --workers 2 --clients 32,1   # 100,000 images, 30 s each
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
import psutil
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.catalog.manifest import commit_manifest, read_pointer  # noqa: E402
from tasks.catalog.reader import Catalog  # noqa: E402
from tasks.catalog.tables import embeddings_table, image_id_for, to_parquet_bytes  # noqa: E402
from tasks.catalog.versions import build_next_version  # noqa: E402
from tasks.records import ChangePlan, ShardResult  # noqa: E402
from tasks.storage import LocalStore  # noqa: E402
from tasks.synthetic_vectors import ClusteredVectors  # noqa: E402

CATEGORIES = ("invoice", "receipt", "form", "product", "uncertain")


def _shown(arg: str) -> str:
    """A path under the checkout as the reader's checkout would name it (no machine's paths in results)."""
    return os.path.relpath(arg, ROOT) if Path(arg).is_absolute() and Path(arg).is_relative_to(ROOT) else arg


def build_catalogue(root: Path, n: int, dim: int, part_rows: int = 10_000, *, model: str = "synthetic",
                    weights: str = "none") -> Catalog:
    """A committed catalogue of `n` synthetic images (one version, real code path).
    `model` and `weights` are what the manifest names: a real model (resnet18 with
    `random:0`, 512-d) lets the page embed query images against it."""
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
        store, None, ChangePlan(), results, run_id=run_id, source=str(root / "no-source"), model=model,
        weights=weights, weights_source="random", weights_sha256="0" * 64, embedding_dim=dim, reembed_all=False)
    commit_manifest(store, manifest, None)
    return Catalog.open(store)


class _Client(asyncio.Protocol):
    """One keep-alive connection, closed loop: send a GET, read the whole response
    (headers, then Content-Length bytes of body), record the time from the write
    to the last byte, send the next. A Protocol rather than streams, so the
    generator spends little of the cores it shares with the server."""

    def __init__(self, requests: list[bytes], rng: random.Random, stop_at: float, latencies: list[float],
                 errors: list[str], done: asyncio.Future) -> None:
        self.requests = requests
        self.rng, self.stop_at, self.latencies, self.errors, self.done = rng, stop_at, latencies, errors, done
        self.buf = bytearray()
        self.size: int | None = None  # the whole response's length, once its headers are in
        self.t0 = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        if time.perf_counter() >= self.stop_at:
            self.transport.close()
            return
        self.buf.clear()
        self.size = None
        self.t0 = time.perf_counter()
        self.transport.write(self.requests[self.rng.randrange(len(self.requests))])

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.size is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                self.errors.append(f"no content-length: {head[:200]!r}")
                self.transport.close()
                return
            line_end = head.find(b"\r\n", at + 2)
            self.size = end + 4 + int(head[at + 17:line_end if line_end >= 0 else None])
        if len(self.buf) < self.size:
            return
        self.latencies.append(time.perf_counter() - self.t0)
        if not self.buf.startswith(b"HTTP/1.1 200") or b'"rank"' not in self.buf or len(self.buf) != self.size:
            self.errors.append(bytes(self.buf[:300]).decode("latin-1"))
        self._send()

    def connection_lost(self, exc) -> None:
        if exc is not None or time.perf_counter() < self.stop_at:
            self.errors.append(f"connection lost early: {exc!r}")
        if not self.done.done():
            self.done.set_result(None)


def run_clients(port: int, keys: list[str], clients: int, seconds: float, queue) -> None:
    """In its own process: `clients` keep-alive connections, closed loop, no think time."""
    requests = [f"GET /api/search?key={quote(k)}&k=10 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() for k in keys]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop_at = time.perf_counter() + seconds
        done = [loop.create_future() for _ in latencies]
        for i, lat in enumerate(latencies):
            def client(i=i, lat=lat) -> _Client:
                return _Client(requests, random.Random(i), stop_at, lat, errors, done[i])
            await loop.create_connection(client, "127.0.0.1", port)
        await asyncio.gather(*done)

    t0, cpu0 = time.perf_counter(), time.process_time()
    uvloop.run(main())
    queue.put({"elapsed_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0,
               "latencies": [x for lat in latencies for x in lat], "errors": errors[:20], "n_errors": len(errors)})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command: list[str], port: int) -> subprocess.Popen:
    """`batchsight ui ...` (`command`) in its own process, once it answers on `port`."""
    server = subprocess.Popen([str(Path(sys.executable).with_name("batchsight")), *command[1:]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false"))
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2).read()
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (uvicorn's workers)."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def measure(port: int, keys: list[str], clients: int, seconds: float, warmup: float, server_pid: int) -> dict:
    """Warm up, then one closed-loop run of `clients` connections, with what the
    server and the generator each spent of the cores."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    if warmup:
        warm = ctx.Process(target=run_clients, args=(port, keys, clients, warmup, queue))
        warm.start()
        queue.get()
        warm.join()
    load_before, server_cpu = os.getloadavg(), cpu_seconds(server_pid)
    proc = ctx.Process(target=run_clients, args=(port, keys, clients, seconds, queue))
    proc.start()
    result = queue.get()
    proc.join()
    server_cpu = cpu_seconds(server_pid) - server_cpu
    lat = np.array(result["latencies"]) * 1000
    elapsed = result["elapsed_s"]
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": len(lat),
            "requests_per_s": round(len(lat) / elapsed, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p90_ms": round(float(np.percentile(lat, 90)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "max_ms": round(float(lat.max()), 2),
            "errors": result["n_errors"], "error_examples": result["errors"],
            # cores used on average: the server's processes and the load generator's
            "server_cores": round(server_cpu / elapsed, 2), "generator_cores": round(result["cpu_s"] / elapsed, 2),
            "server_cpu_ms_per_request": round(1000 * server_cpu / max(len(lat), 1), 3),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512, help="embedding size (512: resnet18/34; 2048: resnet50)")
    parser.add_argument("--clients", default="32", help="concurrent clients; several (1,32) run one after another")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--workers", type=int, default=1, help="the server's --workers")
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
    command = ["batchsight", "ui", "--catalog", str(root), "--port", str(port), "--workers", str(args.workers)]
    server = start_server(command, port)
    try:
        keys = cat.images["key"].sample(5000, random_state=0).tolist()
        runs = [measure(port, keys, int(n), args.seconds, args.warmup, server.pid) for n in args.clients.split(",")]
    finally:
        server.terminate()
        server.wait(30)

    print(f"{'clients':>8} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>7} "
          f"{'server cores':>13} {'client cores':>13} {'load':>5}")
    for row in runs:
        print(f"{row['clients']:>8} {row['requests_per_s']:>8} {row['p50_ms']:>8} {row['p90_ms']:>8} "
              f"{row['p99_ms']:>8} {row['errors']:>7} {row['server_cores']:>13} {row['generator_cores']:>13} "
              f"{row['load_average_before'][0]:>5}")
    report = {"images": len(cat.images), "dim": m.embedding_dim, "index": m.index_factory, "nprobe": m.index_nprobe,
              "server": " ".join(_shown(c) for c in command), "workers": args.workers, "runs": runs,
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "targets": {"clients": 32, "p50_ms": 20, "p99_ms": 200}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
