"""Decode scaling: fetch + decode + resize of the throughput mix, in 1 and 2 (or
more) workers, as worker processes (what `run_shard` uses from 4 cores and on a
GPU: `decode_chunk`, a chunk of objects per task) and as threads (the small-CPU
path). Worker counts alternate within each round, so a machine shared with other
work slows both alike, and a control (a pure-Python busy loop in as many
processes) shows how many cores the machine gave the benchmark at that moment;
prints each round, the median rates and ratios, writes JSON.

    python benchmarks/decode_scaling.py                 # 1 and 2 workers, 5 rounds, 300 images
    python benchmarks/decode_scaling.py --workers 1,2,4,8,16 --images 2000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import cpu_model, image_pool, write_set  # noqa: E402

from models.registry import model_family  # noqa: E402
from tasks.shard.pixels import decode_to_pixels  # noqa: E402
from tasks.shard.decode import DecodeOptions  # noqa: E402
from tasks.shard.read import _ChunkJob, chunks_of, decode_chunk  # noqa: E402
from tasks.storage import LocalStore, StoreSpec  # noqa: E402


def in_processes(workers: int, folder: str, objects: list, prep, options: DecodeOptions) -> float:
    """The chunks are the runs' own (`chunks_of`: 64 small objects or 4 MB a task)."""
    chunks = [tuple(o.key for o in chunk) for chunk in chunks_of(objects)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(decode_chunk, [_ChunkJob(StoreSpec(folder), chunks[0], prep, options)] * workers))  # start
        t0 = time.perf_counter()
        jobs = [_ChunkJob(StoreSpec(folder), keys, prep, options) for keys in chunks]
        n = sum(len(set(read.page_object)) for read in pool.map(decode_chunk, jobs))
        return n / (time.perf_counter() - t0)


def in_threads(workers: int, store: LocalStore, keys: list[str], prep, options: DecodeOptions) -> float:
    def one(key: str) -> bool:
        return not isinstance(decode_to_pixels(store.get(key), prep, options.pdf_dpi, options.max_pages,
                                               options.thumbnail_side), tuple)

    with ThreadPoolExecutor(workers) as pool:
        t0 = time.perf_counter()
        n = sum(pool.map(one, keys))
        return n / (time.perf_counter() - t0)


def _burn(n: int) -> int:
    x = 0
    for i in range(n):
        x += i
    return x


def control(workers: int) -> float:
    """A pure-Python busy loop in `workers` processes (tasks/s): how many cores the
    machine gives this benchmark right now, whatever the decoder does."""
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_burn, [1000] * workers))
        t0 = time.perf_counter()
        list(pool.map(_burn, [2_000_000] * 8))
        return 8 / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--thumbnail-side", type=int, default=DecodeOptions().thumbnail_side,
                        help="thumbnails made while decoding, as runs do (0: none)")
    parser.add_argument("--kinds", default="processes,threads,control")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bs-decode-scaling"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_scaling.json"))
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    kinds = args.kinds.split(",")
    folder = Path(args.workdir) / f"mix-{args.images}"
    if not folder.exists() or sum(1 for _ in folder.rglob("*.*")) != args.images:
        write_set(LocalStore(folder, create=True), image_pool(unique=min(200, args.images)), args.images)
    store = LocalStore(folder)
    listed = list(store.list())
    objects = [listed[i] for i in __import__("numpy").random.default_rng(0).permutation(len(listed))]
    keys = [o.key for o in objects]
    prep = model_family("resnet50")
    options = DecodeOptions(thumbnail_side=args.thumbnail_side)
    rates: dict[str, dict[int, list[float]]] = {k: {w: [] for w in counts} for k in kinds}
    for r in range(args.rounds):
        line = []
        for kind in kinds:
            for w in counts:
                if kind == "processes":
                    rate = in_processes(w, str(folder), objects, prep, options)
                elif kind == "threads":
                    rate = in_threads(w, store, keys, prep, options)
                else:
                    rate = control(w)
                rates[kind][w].append(rate)
                line.append(f"{kind} x{w}: {rate:7.1f}")
        print(f"round {r + 1}: " + ", ".join(line) + f"  (load {os.getloadavg()[0]:.2f})", flush=True)
    summary = {}
    for kind in kinds:
        med = {w: statistics.median(v) for w, v in rates[kind].items()}
        base = med[counts[0]]
        summary[kind] = {"median_images_per_s": med, "ratio_to_first": {w: m / base for w, m in med.items()},
                         "per_round_ratio": [rates[kind][w][i] / rates[kind][counts[0]][i]
                                             for w in counts[1:] for i in range(args.rounds)]}
        print(f"{kind}: " + ", ".join(f"{w} workers {m:.1f} img/s ({m / base:.2f}x)" for w, m in med.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpu": cpu_model(), "cores": os.cpu_count()}, "images": args.images,
                               "rounds": args.rounds, "rates": rates, "summary": summary}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
