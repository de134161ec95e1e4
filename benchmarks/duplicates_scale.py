"""Near-duplicate grouping at scale, on synthetic vectors whose truth is known
(issue 28). Not a test: it prints a table and writes JSON; nothing asserts a time.

The vectors (`PlantedCopies`): `ClusteredVectors` (tasks/synthetic_vectors.py)
as the photos; some photos redrawn as near twins of another (a distinct photo of
the same thing: cosine --twin-cos to it); and a share of every block made of
altered copies of its photos (cosine --copy-cos to the photo). Twins are what
chains groups: connected components join a photo, its copies, its twin and the
twin's copies through one pair; a twin of a twin makes a run of them. Copies
are drawn in random directions, so two copies of one photo are further apart
than either is from it (the photo is their centre); that is this set's shape,
not a law of real copies (benchmarks/duplicates_photos.py has real ones).

Phases, each in its own process so its peak memory is its own:

  build  the index `choose_index` picks for --n x --dim within --memory, trained,
         added (and its float16 re-rank file written) block by block, and its
         nprobe tuned to the recall target against exact search, as a night
         does; written under --dir.
  group  what `batchsight duplicates --threshold T` does after loading the
         version, timed: the index read through a memory map (as a local
         catalogue's is), the pairs above T (`duplicates.find_pairs`: on an IVF
         index each list joined with itself and with the images for which it is
         one of the 2 next nearest, the vectors read from the re-rank file; on a flat
         one a range search of each block),
         and the groups (`duplicates.centre_groups`). Peak memory: VmHWM (all
         resident pages, the index file's mapped pages and the re-rank file's
         among them) and the peak of RssAnon (the process's own allocations),
         sampled every 0.2 s. Then the pairs of the first --check-images images
         against a range search of each at the tuned nprobe (how the command
         found pairs before), and both groupings' pairwise F1 against the truth
         at each --sweep threshold (pairs found once more at the lowest).

    .venv/bin/python benchmarks/duplicates_scale.py --n 100000 --dir /tmp/bs-dups-100k
    .venv/bin/python benchmarks/duplicates_scale.py --n 1000000 --memory 2G --dir /tmp/bs-dups-1m
    .venv/bin/python benchmarks/duplicates_scale.py --phase group --n 1000000 --memory 2G --dir /tmp/bs-dups-1m
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import duplicates_eval as ev  # noqa: E402

from tasks.search import duplicates as dups  # noqa: E402
from tasks.search import index as faiss_index  # noqa: E402
from tasks.search import index_choice, index_recall  # noqa: E402
from tasks.synthetic_vectors import ClusteredVectors  # noqa: E402


@dataclass(frozen=True)
class PlantedCopies:
    """`n` unit vectors, `block_size` a block, each block alone: its first
    `photo_share` are photos (a `twin_share` of them near twins of an earlier photo
    of the block), the rest copies of its photos. Ids are positions; `photo` is the
    id of the photo each vector shows (its own, for a photo or a twin)."""

    n: int
    dim: int
    photo_share: float = 0.9
    twin_share: float = 0.05
    copy_cos: tuple[float, float] = (0.95, 0.995)
    twin_cos: tuple[float, float] = (0.90, 0.97)
    seed: int = 0
    block_size: int = 10_000

    def base(self) -> ClusteredVectors:
        return ClusteredVectors(self.n, self.dim, clusters=max(10, self.n // 1000), seed=self.seed,
                                block_size=self.block_size)

    def block(self, b: int, structure) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, vectors = self.base().block(b, structure)
        rng = np.random.default_rng([self.seed, 2, b])
        photos = max(1, round(len(ids) * self.photo_share))
        photo = ids.copy()
        for i in np.flatnonzero(rng.random(photos) < self.twin_share):
            if i == 0:
                continue
            src = int(rng.integers(0, i))  # an earlier photo, perhaps itself a twin: runs of twins
            vectors[i] = _at_cosine(vectors[src][None], rng.uniform(*self.twin_cos, 1), rng)[0]
        src = rng.integers(0, photos, len(ids) - photos)
        vectors[photos:] = _at_cosine(vectors[src], rng.uniform(*self.copy_cos, len(src)), rng)
        photo[photos:] = ids[src]
        return ids, vectors, photo

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        structure = self.base().structure()
        for b in range(-(-self.n // self.block_size)):
            yield self.block(b, structure)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for ids, vectors, _ in self.blocks():
            yield ids, vectors

    def truth(self) -> pd.Series:
        return pd.concat([pd.Series(photo, index=ids) for ids, _, photo in self.blocks()])


def _at_cosine(sources: np.ndarray, cos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at exactly `cos` to each of `sources`, in random directions."""
    noise = rng.standard_normal(sources.shape, dtype=np.float32)
    noise -= (noise * sources).sum(1, keepdims=True) * sources
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    cos = cos.astype(np.float32)[:, None]
    return cos * sources + np.sqrt(1 - cos ** 2) * noise


class TimedBlocks:
    """`blocks`, with the seconds spent producing them (reading parts, in a real run) counted apart."""

    def __init__(self, blocks) -> None:
        self.blocks = blocks
        self.seconds = 0.0

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        it = iter(self.blocks)
        while True:
            t = time.perf_counter()
            try:
                block = next(it)
            except StopIteration:
                self.seconds += time.perf_counter() - t
                return
            self.seconds += time.perf_counter() - t
            yield block


class MemorySampler:
    """Peak RssAnon and RssFile of this process, sampled every `every` seconds."""

    def __init__(self, every: float = 0.2) -> None:
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self._sample()

    def _sample(self) -> None:
        now = status_bytes()
        for k in self.peak:
            self.peak[k] = max(self.peak[k], now.get(k, 0))


def status_bytes() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0]) * 1024
    return out


def paths(args: argparse.Namespace) -> dict[str, Path]:
    d = Path(args.dir)
    return {"index": d / "main.faiss", "rerank_ids": d / "rerank-ids.npy", "rerank": d / "rerank-f16.npy",
            "meta": d / "build.json"}


def data_of(args: argparse.Namespace) -> PlantedCopies:
    return PlantedCopies(args.n, args.dim, photo_share=args.photo_share, twin_share=args.twin_share,
                         copy_cos=tuple(args.copy_cos), twin_cos=tuple(args.twin_cos), seed=args.seed,
                         block_size=args.block_size)


def build(args: argparse.Namespace) -> dict:
    data = data_of(args)
    p = paths(args)
    p["index"].parent.mkdir(parents=True, exist_ok=True)
    budget = index_choice.parse_memory_size(args.memory)
    choice = index_choice.choose_index(data.n, data.dim, budget)
    print(f"[{data.n:,} x {data.dim}] {choice.describe()} within {args.memory}", flush=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed + 1)
    query_ids, train_ids = index_recall.split_sample(np.arange(data.n, dtype=np.int64), index_recall.RECALL_QUERIES,
                                                     choice, rng)
    training = index_recall.gather_vectors(data, np.sort(train_ids), data.dim) if choice.kind != "flat" else None
    index = faiss_index.trained_index(choice, data.dim, training)
    del training
    t_train = time.perf_counter()
    rerank = None
    if choice.rerank:
        def adding(blocks):
            for ids, vectors in blocks:
                faiss_index.add_vectors(index, ids, vectors)
                yield ids, vectors
        faiss_index.write_rerank_vectors(adding(data), data.n, data.dim, p["rerank_ids"], p["rerank"])
        rerank = faiss_index.RerankVectors.open(p["rerank_ids"], p["rerank"])
    else:
        for ids, vectors in data:
            faiss_index.add_vectors(index, ids, vectors)
    t_add = time.perf_counter()
    print(f"  trained in {t_train - t0:.1f} s, added in {t_add - t_train:.1f} s", flush=True)
    query_ids = np.sort(query_ids)
    queries = index_recall.gather_vectors(data, query_ids, data.dim)
    report = index_recall.measure_recall(index, queries, query_ids, data, target=args.recall_target, rerank=rerank)
    t_tune = time.perf_counter()
    print(f"  recall@10 {report.recall_at_10:.3f} at nprobe {report.nprobe} (tuned in {t_tune - t_add:.1f} s)",
          flush=True)
    faiss.write_index(index, str(p["index"]))
    meta = {"factory": choice.factory, "kind": choice.kind, "rerank": choice.rerank,
            "estimated_bytes": choice.estimated_bytes, "budget_bytes": budget, "nprobe": report.nprobe,
            "recall_at_10": report.recall_at_10, "recall_curve": report.curve,
            "index_file_bytes": p["index"].stat().st_size, "train_s": t_train - t0, "add_s": t_add - t_train,
            "tune_s": t_tune - t_add, "peak_rss_bytes": status_bytes()["VmHWM"], "data": asdict(data)}
    p["meta"].write_text(json.dumps(meta, indent=1))
    return meta


def group(args: argparse.Namespace) -> dict:
    data = data_of(args)
    p = paths(args)
    meta = json.loads(p["meta"].read_text())
    assert meta["data"] == json.loads(json.dumps(asdict(data))), "the index under --dir was built from other vectors"
    load0 = os.getloadavg()
    with MemorySampler() as memory:
        t0 = time.perf_counter()
        main = faiss.read_index(str(p["index"]), faiss.IO_FLAG_MMAP) if meta["kind"] != "flat" \
            else faiss.read_index(str(p["index"]))
        index = faiss_index.Segments(main)
        rerank = faiss_index.RerankVectors.open(p["rerank_ids"], p["rerank"]) if meta["rerank"] else None
        t_open = time.perf_counter()
        blocks = TimedBlocks(data)  # read only on a flat index: an IVF's lists are joined
        pairs = dups.find_pairs(index, blocks, args.threshold, n_images=data.n, rerank=rerank,
                                neighbour_lists=args.neighbour_lists)
        t_pairs = time.perf_counter()
        groups = dups.centre_groups(pairs)
        t_groups = time.perf_counter()
    run = {"threshold": args.threshold, "neighbour_lists": args.neighbour_lists, "open_s": t_open - t0,
           "pairs_s": t_pairs - t_open - blocks.seconds,
           "generate_blocks_s": blocks.seconds, "group_s": t_groups - t_pairs,
           "total_s": t_groups - t0, "total_without_generating_s": t_groups - t0 - blocks.seconds,
           "pairs": len(pairs), "groups": int(groups["group_id"].nunique()) if len(groups) else 0,
           "grouped_images": len(groups), "largest_group": int(groups["group_size"].max()) if len(groups) else 0,
           "peak_rss_bytes": status_bytes()["VmHWM"], "peak_rss_anon_bytes": memory.peak["RssAnon"],
           "peak_rss_file_bytes": memory.peak["RssFile"], "load_average": {"start": load0, "end": os.getloadavg()}}
    print(f"[{data.n:,} x {data.dim}] {meta['factory']}{' + re-rank' if meta['rerank'] else ''}, lists joined (own, and "
          f"{dups.NEXT_LISTS} next nearest): duplicates at {args.threshold} in {run['total_s']:.1f} s (pairs "
          f"{run['pairs_s']:.1f} s, generating the blocks {run['generate_blocks_s']:.1f} s, grouping "
          f"{run['group_s']:.1f} s); {run['pairs']:,} pairs, {run['groups']:,} groups, largest "
          f"{run['largest_group']}; peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB (anonymous "
          f"{run['peak_rss_anon_bytes'] / 2**30:.2f} GiB, file-backed {run['peak_rss_file_bytes'] / 2**30:.2f} GiB)",
          flush=True)
    if args.check_images and meta["nprobe"]:
        run["against_range_search"] = against_range_search(index, data, args, pairs, meta["nprobe"], rerank)
        print(f"  against a range search of the first {args.check_images:,} images at the tuned nprobe "
              f"{meta['nprobe']}: {run['against_range_search']}", flush=True)
    sweep = []
    if args.sweep:
        thresholds = sorted(float(t) for t in args.sweep.split(","))
        t = time.perf_counter()
        low = dups.find_pairs(index, data, thresholds[0], n_images=data.n, rerank=rerank,
                              neighbour_lists=args.neighbour_lists) if thresholds[0] < args.threshold else pairs
        sweep = ev.sweep(low, data.truth(), np.array(thresholds))
        print(f"  sweep in {time.perf_counter() - t:.1f} s\n" + ev.table(sweep), flush=True)
    return {"build": meta, "group": run, "sweep": sweep}


def against_range_search(index, data: PlantedCopies, args: argparse.Namespace, pairs: dups.SimilarPairs,
                         nprobe: int, rerank) -> dict:
    """The pairs of the first --check-images images that a range search of each of them
    finds at the tuned nprobe (how the command found pairs before), against those the
    timed run found."""
    def head():
        left = args.check_images
        for ids, vectors in data:
            if left <= 0:
                return
            yield ids[:left], vectors[:left]
            left -= len(ids)

    t = time.perf_counter()
    searched = dups.similar_pairs(index, head(), args.threshold, n_images=data.n, nprobe=nprobe, rerank=rerank)
    seconds = time.perf_counter() - t
    in_head = (pairs.a < args.check_images) | (pairs.b < args.check_images)  # ids are positions
    found = set(zip(pairs.a[in_head].tolist(), pairs.b[in_head].tolist(), strict=True))
    wanted = set(zip(searched.a.tolist(), searched.b.tolist(), strict=True))
    return {"images": args.check_images, "nprobe": nprobe, "range_search_pairs": len(wanted),
            "run_pairs": len(found), "share_of_range_search_pairs_found": len(found & wanted) / max(len(wanted), 1),
            "pairs_only_the_run_found": len(found - wanted), "range_search_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", default="all", choices=["all", "build", "group"])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=2048, help="2048 = ResNet-50 embeddings")
    parser.add_argument("--memory", default="2G", help="the index's memory budget (choose_index)")
    parser.add_argument("--recall-target", type=float, default=index_choice.DEFAULT_RECALL_TARGET)
    parser.add_argument("--threshold", type=float, default=0.95, help="the duplicates threshold timed")
    parser.add_argument("--sweep", default="0.9,0.92,0.94,0.95,0.96,0.97,0.98",
                        help="thresholds for the F1 of both groupings against the truth ('' to skip)")
    parser.add_argument("--check-images", type=int, default=20_000,
                        help="images whose pairs are also found by a range search of each at the tuned nprobe, "
                             "to compare (0 to skip)")
    parser.add_argument("--neighbour-lists", type=int, default=dups.NEIGHBOUR_LISTS,
                        help="lists an image's next nearest list is looked for among")
    parser.add_argument("--photo-share", type=float, default=0.9)
    parser.add_argument("--twin-share", type=float, default=0.05)
    parser.add_argument("--copy-cos", type=float, nargs=2, default=(0.95, 0.995))
    parser.add_argument("--twin-cos", type=float, nargs=2, default=(0.90, 0.97))
    parser.add_argument("--block-size", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="FAISS threads (default: all cores)")
    parser.add_argument("--dir", default="/tmp/batchsight-duplicates-scale", help="the built index and its files")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "duplicates-scale.json"))
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    if args.phase == "build":
        build(args)
        return
    if args.phase == "all":
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--phase", "build"], check=True)
    result = group(args)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "faiss_threads": faiss.omp_get_max_threads(), "faiss": faiss.__version__},
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args)} | result
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
