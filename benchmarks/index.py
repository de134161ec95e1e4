"""Index benchmark: each index kind on clustered synthetic unit vectors.

For each size and kind (flat, ivf-flat, ivf-pq as `choose_index` would configure
them): build seconds (train + add), resident memory the built index added, single-query
and batched queries per second at k=10, and recall@10 against exact search on a
held-out sample of the indexed vectors, at the nprobe tuned to --recall-target.
Vectors are generated block by block, so only the index itself (and a training
sample) is ever held: 1M x 2048-d needs about 8 GiB for flat or IVF-Flat. Prints a
table and writes JSON. Not a test: nothing here asserts a time.

    python benchmarks/index.py --sizes 20000 --threads 1              # a quick look
    python benchmarks/index.py --sizes 100000,1000000                 # the real run (2048-d)
    python benchmarks/index.py --sizes 1000000 --kinds ivf-pq --pq-m 128 --opq off
    python benchmarks/index.py --sizes 1000000 --kinds chosen --memory 2G       # the ladder in 2 GiB
    python benchmarks/index.py --sizes 20000 --dim 512 --kinds chosen --memory 16M
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.search import index as faiss_index
from tasks.search import index_choice, index_recall
from tasks.synthetic_vectors import ClusteredVectors  # noqa: E402

SINGLE_QUERIES = 200
# exact neighbours are cached by the generator's source too: another generator, other vectors
GENERATOR_SHA = hashlib.sha256(Path(sys.modules[ClusteredVectors.__module__].__file__).read_bytes()).hexdigest()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def configure(kind: str, n: int, dim: int, args: argparse.Namespace) -> index_choice.IndexChoice:
    """The choice `choose_index` would make for `kind` (with its re-rank where --rerank
    is on), with optional PQ overrides; `chosen` is what `choose_index` picks within --memory."""
    if kind == "chosen":
        if not args.memory:
            raise SystemExit("kind 'chosen' needs --memory, e.g. 2G")
        return index_choice.choose_index(n, dim, index_choice.parse_memory_size(args.memory), rerank=args.rerank == "on")
    choice = configure_codes(kind, n, dim, args)
    return index_choice._with_rerank(choice, n, dim) if args.rerank == "on" and kind in index_choice.RERANK_KINDS else choice


def configure_codes(kind: str, n: int, dim: int, args: argparse.Namespace) -> index_choice.IndexChoice:
    if kind in index_choice.SQ_CODES:
        return index_choice.ivf_sq_choice(n, dim, kind)
    if kind == "flat":
        return index_choice.flat_choice(n, dim)
    if kind == "ivf-flat":
        return index_choice.ivf_flat_choice(n, dim)
    if kind not in index_choice.KINDS:
        raise SystemExit(f"unknown kind {kind!r}; use {', '.join(index_choice.KINDS)}")
    # OPQ by the library's rule, which leaves it out where a re-rank follows
    opq = {"on": True, "off": False}.get(args.opq, False if args.rerank == "on" else None)
    if args.pq_m:
        choice = index_choice.ivf_pq_for_code(n, dim, args.pq_m, opq=opq)
        if choice is None:
            raise SystemExit(f"PQ{args.pq_m} does not suit dimension {dim}: at most d/{index_choice.PQ_MIN_DIMS_PER_CODE} "
                             "bytes, and without OPQ a divisor of d")
        return choice
    budget = index_choice.parse_memory_size(args.pq_memory) if args.pq_memory else index_choice.ivf_flat_choice(n, dim).estimated_bytes // 16
    choice = index_choice.ivf_pq_choice(n, dim, budget)
    if choice is None:
        raise SystemExit(f"no IVF-PQ for {n} x {dim} fits in {budget:,} bytes; pass --pq-memory or --pq-m")
    return index_choice.ivf_pq_for_code(n, dim, choice.pq_m, opq=opq) if opq is not None else choice


def bench_kind(kind: str, data: ClusteredVectors, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray,
               args: argparse.Namespace) -> dict:
    choice = configure(kind, data.n, data.dim, args)
    print(f"[{data.n:,} x {data.dim}] {kind}: {choice.describe()} ...", flush=True)
    gc.collect()
    rss0 = rss_bytes()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    training = None
    if choice.kind != "flat":
        rng = np.random.default_rng(args.seed + 1)
        pool = np.setdiff1d(np.arange(data.n, dtype=np.int64), query_ids)  # held out: queries never train
        train_ids = rng.choice(pool, min(choice.train_size, len(pool)), replace=False)
        training = index_recall.gather_vectors(data, train_ids, data.dim)
    t_sample = time.perf_counter()
    print(f"  training sample of {choice.train_size:,} in {t_sample - t0:.1f} s", flush=True)
    index = faiss_index.trained_index(choice, data.dim, training)
    del training
    t_train = time.perf_counter()
    print(f"  trained in {t_train - t_sample:.1f} s", flush=True)
    rerank = None
    if choice.rerank:  # one pass adds every block and writes it to the re-rank file
        def adding(blocks):
            for ids, vectors in blocks:
                faiss_index.add_vectors(index, ids, vectors)
                yield ids, vectors
        paths = Path(args.rerank_dir) / f"rerank-{data.n}x{data.dim}-ids.npy", \
            Path(args.rerank_dir) / f"rerank-{data.n}x{data.dim}-f16.npy"
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        faiss_index.write_rerank_vectors(adding(data), data.n, data.dim, *paths)
        rerank = faiss_index.RerankVectors.open(*paths)
    else:
        for ids, vectors in data:
            faiss_index.add_vectors(index, ids, vectors)
    t_add = time.perf_counter()
    build_peak = peak_rss_bytes()  # before any search touches the re-rank file's pages
    gc.collect()
    memory = rss_bytes() - rss0
    print(f"  added in {t_add - t_train:.1f} s; build {t_add - t0:.1f} s, peak RSS {build_peak / 2**30:.2f} GiB, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)

    t_tune = time.perf_counter()
    if choice.kind == "flat":
        _, found = faiss_index.search(index, queries, truth.shape[1] + 1)
        report = index_recall.RecallReport(recall_at_10=index_recall.recall_at_k(index_recall.drop_self(found, query_ids, truth.shape[1]), truth),
                                 nprobe=0, queries=len(queries), target=args.recall_target)
    else:
        report = index_recall.tune_nprobe(index, queries, query_ids, truth, args.recall_target, rerank=rerank)
    nprobe = report.nprobe or None
    factor = report.rerank_factor
    tune_s = time.perf_counter() - t_tune
    print(f"  recall@10 {report.recall_at_10:.3f} at nprobe {report.nprobe}, re-rank x{factor} "
          f"(tuned in {tune_s:.1f} s: {report.curve})", flush=True)
    if report.recall_at_10 < args.recall_target:
        stronger = index_choice.stronger_choice(data.n, data.dim, choice)
        print(f"  recall@10 {report.recall_at_10:.3f} misses {args.recall_target}; "
              f"{stronger.describe() if stronger else 'nothing'} would be next up", flush=True)

    t = time.perf_counter()
    for q in queries[:SINGLE_QUERIES]:
        faiss_index.search(index, q[None], 10, nprobe=nprobe, rerank=rerank, rerank_factor=factor)
    single_qps = min(SINGLE_QUERIES, len(queries)) / (time.perf_counter() - t)
    t = time.perf_counter()
    faiss_index.search(index, queries, 10, nprobe=nprobe, rerank=rerank, rerank_factor=factor)
    batch_qps = len(queries) / (time.perf_counter() - t)
    row = {
        "n": data.n, "dim": data.dim, "kind": kind, "factory": choice.factory, "nlist": choice.nlist,
        "sample_s": t_sample - t0, "train_s": t_train - t_sample, "add_s": t_add - t_train,
        "build_s": t_add - t0, "tune_s": tune_s, "memory_bytes": memory, "estimated_bytes": choice.estimated_bytes,
        "build_peak_rss_bytes": build_peak, "peak_rss_bytes": peak_rss_bytes(), "single_qps": single_qps,
        "batch_qps": batch_qps,
        "recall_at_10": report.recall_at_10, "nprobe": report.nprobe, "recall_curve": report.curve,
        "queries": len(queries), "rerank": choice.rerank, "rerank_factor": factor,
        "disk_bytes": choice.disk_bytes, "budget_bytes": index_choice.parse_memory_size(args.memory) if args.memory else None,
        "load_average": {"start": load0, "end": os.getloadavg()},
    }
    del index
    gc.collect()
    return row


def bench_size(n: int, args: argparse.Namespace) -> list[dict]:
    data = ClusteredVectors(n, args.dim, clusters=args.clusters or max(10, n // 1000), spread=args.spread,
                            seed=args.seed, block_size=args.block_size)
    query_ids = np.sort(np.random.default_rng(args.seed).choice(n, min(args.queries, n), replace=False)).astype(np.int64)
    print(f"[{n:,} x {args.dim}] gathering {len(query_ids)} queries and their exact neighbours ...", flush=True)
    queries = index_recall.gather_vectors(data, query_ids, args.dim)
    t = time.perf_counter()
    cached = Path(args.truth_cache) / f"{n}x{args.dim}-c{data.clusters}-s{args.spread}-seed{args.seed}-" \
        f"q{len(query_ids)}-{GENERATOR_SHA[:12]}.npy" if args.truth_cache else None
    if cached and cached.exists():
        truth = np.load(cached)
    else:
        _, truth = index_recall.exact_neighbours(queries, data, index_recall.RECALL_K + 1)
        if cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.save(cached, truth)
    truth_s = time.perf_counter() - t  # benchmark time: a run measures recall against the same exact search
    print(f"[{n:,} x {args.dim}] ground truth in {truth_s:.1f} s", flush=True)
    truth = index_recall.drop_self(truth, query_ids, index_recall.RECALL_K)
    return [bench_kind(kind, data, queries, query_ids, truth, args) | {"truth_s": truth_s}
            for kind in args.kinds.split(",")]


def print_table(rows: list[dict]) -> None:
    head = (f"{'n':>9} {'kind':9} {'factory':32} {'build s':>8} {'train s':>8} {'memory MB':>10} "
            f"{'1-query/s':>10} {'batch q/s':>10} {'nprobe':>6} {'rerank':>6} {'recall@10':>9}")
    print("\n" + head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['n']:>9,} {r['kind']:9} {r['factory']:32} {r['build_s']:8.1f} {r['train_s']:8.1f} "
              f"{r['memory_bytes'] / 2**20:10.0f} {r['single_qps']:10.0f} {r['batch_qps']:10.0f} "
              f"{r['nprobe']:>6} {r.get('rerank_factor', 0):>6} {r['recall_at_10']:9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="vector counts, comma-separated")
    parser.add_argument("--dim", type=int, default=2048, help="2048 = ResNet-50 embeddings")
    parser.add_argument("--kinds", default="flat,ivf-flat,ivf-pq",
                        help=f"{', '.join(index_choice.KINDS)}, or chosen (what choose_index picks in --memory)")
    parser.add_argument("--memory", default="", help="index memory budget for kind 'chosen', e.g. 2G or 16M")
    parser.add_argument("--rerank", default="on", choices=["on", "off"],
                        help="exact re-rank for the codes of index_choice.RERANK_KINDS")
    parser.add_argument("--rerank-dir", default=os.path.join(tempfile.gettempdir(), "batchsight-rerank"),
                        help="where the float16 re-rank file goes")
    parser.add_argument("--clusters", type=int, default=0, help="cluster centres (default: one per 1,000 vectors)")
    parser.add_argument("--spread", type=float, default=1.0, help="noise norm relative to a centre's")
    parser.add_argument("--queries", type=int, default=index_recall.RECALL_QUERIES, help="held-out queries for recall and q/s")
    parser.add_argument("--recall-target", type=float, default=index_choice.DEFAULT_RECALL_TARGET)
    parser.add_argument("--pq-memory", default="", help="IVF-PQ budget, e.g. 512M (default: 1/16 of IVF-Flat's size)")
    parser.add_argument("--pq-m", type=int, default=0, help="force the PQ code size in bytes")
    parser.add_argument("--opq", default="auto", choices=["auto", "on", "off"], help="override the OPQ rule")
    parser.add_argument("--lists-per-sqrt-n", type=float, default=index_choice.NLIST_PER_SQRT_N,
                        help="IVF lists per sqrt(n), to compare list counts (the library's rule: NLIST_PER_SQRT_N)")
    parser.add_argument("--truth-cache", default=os.path.join(tempfile.gettempdir(), "batchsight-index-truth"),
                        help="folder that keeps exact neighbours between runs ('' to recompute)")
    parser.add_argument("--threads", type=int, default=0, help="FAISS threads (default: all cores)")
    parser.add_argument("--block-size", type=int, default=20_000, help="vectors generated at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "index.json"))
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    index_choice.NLIST_PER_SQRT_N = args.lists_per_sqrt_n  # every choice below (lists, training sample, estimate) follows it

    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows.extend(bench_size(n, args))
        print_table(rows)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "faiss_threads": faiss.omp_get_max_threads(), "faiss": faiss.__version__},
               "args": vars(args), "runs": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
