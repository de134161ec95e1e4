"""autofaiss on the same vectors, budget and queries as `benchmarks/index.py`, for
a side-by-side. Runs from its own virtualenv (autofaiss pins numpy < 2), so it
imports nothing of batchsight but the numpy-only vector generator:

    python -m venv /tmp/autofaiss-venv
    /tmp/autofaiss-venv/bin/pip install autofaiss "pyarrow<16"
    /tmp/autofaiss-venv/bin/python benchmarks/index_autofaiss.py --n 20000 --dim 512 --memory 16MB

Same seed, clusters and held-out query ids as benchmarks/index.py; recall@10 with
the query's own id excluded, against exact inner-product search. Prints a row and
writes JSON. Not a test. autofaiss copies the vectors to a temporary `emb.npy`
(8 GB at 1M x 2048); a run stopped by `timeout` leaves it in $TMPDIR/tmp*/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from importlib.metadata import version
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.synthetic_vectors import ClusteredVectors  # noqa: E402


def recall_at_10(found: np.ndarray, truth: np.ndarray, query_ids: np.ndarray) -> float:
    hits = 0
    for f, t, own in zip(found, truth, query_ids):
        hits += len(set(f[f != own][:10]) & set(t[t != own][:10]))
    return hits / (10 * len(query_ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--memory", default="16MB", help="autofaiss max_index_memory_usage")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="autofaiss's own progress log")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "index-autofaiss.json"))
    args = parser.parse_args()
    from autofaiss import build_index

    data = ClusteredVectors(args.n, args.dim, clusters=max(10, args.n // 1000), seed=args.seed, block_size=20_000)
    ids, vectors = data.all()  # positions are ids: autofaiss numbers vectors 0..n-1
    query_ids = np.sort(np.random.default_rng(args.seed).choice(args.n, min(args.queries, args.n),
                                                                replace=False)).astype(np.int64)
    queries = vectors[query_ids]
    _, truth = faiss.knn(queries, vectors, 11, metric=faiss.METRIC_INNER_PRODUCT)

    t = time.perf_counter()
    index, infos = build_index(embeddings=vectors, save_on_disk=False, max_index_memory_usage=args.memory,
                               current_memory_available="8G", metric_type="ip", verbose=20 if args.verbose else 30)
    build_s = time.perf_counter() - t
    _, found = index.search(queries, 11)
    recall = recall_at_10(found, truth, query_ids)
    t = time.perf_counter()
    index.search(queries, 10)
    batch_qps = len(queries) / (time.perf_counter() - t)
    row = {"n": args.n, "dim": args.dim, "memory": args.memory, "factory": infos.get("index_key"),
           "index_param": infos.get("index_param"), "index_bytes": len(faiss.serialize_index(index)),
           "build_s": build_s, "batch_qps": batch_qps, "recall_at_10": recall,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print(json.dumps(row, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                           "faiss_threads": faiss.omp_get_max_threads()},
                               "versions": {p: version(p) for p in ("autofaiss", "faiss-cpu", "numpy")},
                               "args": vars(args), "runs": [row]}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
