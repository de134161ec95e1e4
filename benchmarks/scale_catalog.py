"""The bookkeeping of a large catalogue, through the real commit path, without
the CNN (issue 14's scale harness). Not a test.

Phases, each in its own process so its peak RSS is its own:

  build   a committed catalogue of --images synthetic images: clustered unit
          vectors (--dim, 512 by default to keep the disk use sane) in parts of
          --shard-size rows, the rows a run would write, one version made by
          `build_next_version` + `commit_manifest` (what a first run does).
  night   one nightly run against it: a synthetic listing of the bucket (a
          store whose `list` yields every object; --new, --changed and
          --deleted are shares of the catalogue), `plan_run` (list, diff, plan:
          exactly what a run calls); then, in a child process of its own (the
          commit step, whose peak RSS is reported apart from the plan's), the
          synthetic shard results for the objects to process (their rows, and
          parts of vectors: what the model would have written),
          `build_next_version` and `commit_manifest`.
  compact `batchsight compact` on the live version (what a night past a
          threshold does too): every table one part, one main index.

It reports the seconds of the synthetic listing (apart: a real bucket's LIST
is the store's time), of diff-and-plan, the stand-in shards, the build (and
its index update) and the commit; the bytes written and read by each step, the
catalogue's bytes, and the peak RSS of each process. JSON goes to --out.

    .venv/bin/python benchmarks/scale_catalog.py --phase build --images 1000000 --root /tmp/bs-scale-1m
    .venv/bin/python benchmarks/scale_catalog.py --phase night --images 1000000 --root /tmp/bs-scale-1m
    .venv/bin/python benchmarks/scale_catalog.py --phase compact --images 1000000 --root /tmp/bs-scale-1m
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.catalog import (
    layout,  # noqa: E402
    tables,  # noqa: E402
)
from tasks.catalog.manifest import Manifest, commit_manifest, new_run_id, put_recorded, read_pointer
from tasks.catalog.reader import Catalog
from tasks.catalog.versions import build_next_version
from tasks.records import (
    ChangePlan,
    ObjectInfo,  # noqa: E402
    ShardResult,
)
from tasks.search.index_choice import IndexSettings, parse_memory_size  # noqa: E402
from tasks.config import DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_DELETE_SHARE, DEFAULT_SHARD_SIZE  # noqa: E402
from tasks.source.planning import _plan_run  # noqa: E402
from tasks.storage import LocalStore  # noqa: E402
from tasks.synthetic_vectors import ClusteredVectors  # noqa: E402

MODEL = dict(model="synthetic", weights="none", weights_source="random", weights_sha256="0" * 64)


class CountingStore(LocalStore):
    """The catalogue's folder, counting the bytes put and got."""

    written = 0
    read = 0

    def put(self, key, data, **kwargs):
        CountingStore.written += memoryview(data).nbytes
        return super().put(key, data, **kwargs)

    def get(self, key):
        data = super().get(key)
        CountingStore.read += len(data)
        return data


class SyntheticBucket:
    """A bucket of `n` objects, listed without existing: object i is
    `photos/<i // 1000>/item-<i>.jpg`, as it stands after `night` nights (0: as
    built). Night j deletes the objects at i % (1 / deleted) == j - 1, gives
    those at i % (1 / changed) == j a new ETag (`v<j + 1>`), and adds `n * new`
    objects after the last; so each night, run on the catalogue the nights
    before it made, changes those shares of it and no more."""

    url = "synthetic://bucket"

    def __init__(self, n: int, *, new: float = 0.0, changed: float = 0.0, deleted: float = 0.0,
                 night: int = 0) -> None:
        self.n, self.n_new, self.night = n, int(round(n * new)), night
        self.every_changed = int(round(1 / changed)) if changed else 0
        self.every_deleted = int(round(1 / deleted)) if deleted else 0

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        night, every_changed, every_deleted = self.night, self.every_changed, self.every_deleted
        for i in range(self.n + self.n_new * night):
            if every_deleted and i < self.n and i % every_deleted < night:
                continue
            changed_on = i % every_changed if every_changed and i < self.n else 0
            yield ObjectInfo(key_of(i), f"v{changed_on + 1}" if 1 <= changed_on <= night else "v1", 100_000)


class Listed:
    """A listing made beforehand, listed again as it is."""

    url = SyntheticBucket.url

    def __init__(self, objects: list[ObjectInfo]) -> None:
        self.objects = objects

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        return self.objects


def key_of(i: int) -> str:
    return f"photos/{i // 1000:05d}/item-{i:08d}.jpg"


def shard_results(store: LocalStore, run_id: str, objects: list[ObjectInfo], *, dim: int, shard_size: int,
                  seed: int) -> list[ShardResult]:
    """What the shards of a run over `objects` hand back: rows, and a part of
    vectors each (clustered synthetic vectors standing in for the model's)."""
    vectors = ClusteredVectors(len(objects), dim, clusters=max(10, len(objects) // 1000), seed=seed,
                               block_size=shard_size)
    results = []
    for shard, (positions, block) in enumerate(vectors):
        infos = [objects[p] for p in positions]
        image_ids = np.array([tables.image_id_for(o.key) for o in infos], np.int64)
        part = layout.embeddings_part_key(run_id, shard, "bench")
        record = put_recorded(store, part, tables.to_parquet_bytes(tables.embeddings_table(image_ids, run_id,
                                                                                                block)))
        rows = pd.DataFrame({"image_id": image_ids, "key": [o.key for o in infos], "page": 1,
                             "etag": [o.etag for o in infos], "size": [o.size for o in infos],
                             "width": 640, "height": 480, "top_class": "thing", "top_prob": 0.5,
                             "model": "synthetic", "weights_sha256": "0" * 64, "run_id": run_id,
                             "processed_at": pd.Timestamp.now(tz="UTC"), "embedding_part": part})
        results.append(ShardResult(shard, rows, part, [], {}, part_file=record))
    return results


CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")


def commit_memory_limit(size: str, previous: Catalog | None):
    """For `--commit-memory`: a cgroup (v1) of that memory limit, the page cache
    charged to it, that the commit step's process joins before it starts; and the
    main index's pages dropped from the page cache first, so they are faulted in,
    and charged, by the step itself (pages cached earlier stay charged to whoever
    read them). None without a limit."""
    if not size:
        return None
    group = CGROUP_V1_MEMORY / "batchsight-scale-commit"
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(parse_memory_size(size)))
    for counter in ("memory.max_usage_in_bytes", "memory.failcnt"):
        (group / counter).write_text("0")
    if previous is not None and previous.manifest.index:
        fd = os.open(Path(previous.store.url) / previous.manifest.index, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    tasks = str(group / "tasks")

    def join() -> None:  # in the child, before exec
        with open(tasks, "w") as f:
            f.write(str(os.getpid()))
    return join


def catalogue_bytes(root: Path, manifest: Manifest) -> int:
    return sum((root / key).stat().st_size for key in manifest.named_files)


def peak_rss() -> int:
    """This process's peak RSS: VmHWM, the high-water mark of its own memory map.
    Not getrusage's ru_maxrss: Linux carries that across exec, so a child started
    by subprocess (vfork + exec) reports its parent's peak when that was higher."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def commit(store: CountingStore, previous: Catalog | None, pointer_etag: str | None, plan: ChangePlan,
           results: list[ShardResult], run_id: str, dim: int, settings: IndexSettings) -> dict:
    CountingStore.written = CountingStore.read = 0
    rss_before = peak_rss()
    t0 = time.perf_counter()
    manifest, stats = build_next_version(store, previous, plan, results, run_id=run_id, source=SyntheticBucket.url,
                                             embedding_dim=dim, reembed_all=False, index_settings=settings, **MODEL)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    commit_manifest(store, manifest, pointer_etag)
    return {"version": manifest.version, "build_s": build_s, "index_s": stats.index_s, "write_s": stats.write_s,
            "commit_s": time.perf_counter() - t0, "build_written_bytes": CountingStore.written,
            "build_read_bytes": CountingStore.read, "index": manifest.index_factory,
            "recall_at_10": manifest.index_recall_at_10, "peak_rss_before_build_bytes": rss_before,
            "peak_rss_bytes": peak_rss(), "catalogue_bytes": catalogue_bytes(Path(store.url), manifest)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["build", "night", "commit", "compact"], required=True,
                        help="commit is the second half of night, run by it in a child process")
    parser.add_argument("--plan-file", help="(commit) the plan the night phase made")
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--root", required=True, help="the catalogue's folder (build makes it, night reads it)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    parser.add_argument("--new", type=float, default=0.001)
    parser.add_argument("--changed", type=float, default=0.001)
    parser.add_argument("--deleted", type=float, default=0.0005)
    parser.add_argument("--night", type=int, default=1, help="which night (1, 2, ...): the nights before it "
                        "must have run on this catalogue, in order (compactions between them are fine)")
    parser.add_argument("--index-memory", default="", help="index budget, e.g. 4G (default: the run's)")
    parser.add_argument("--commit-memory", default="", help="(night) run the commit step in a memory cgroup of "
                        "this size, e.g. 4G, page cache charged (cgroup v1, as root), after dropping the main "
                        "index's pages from the page cache: shows the step fits, mapped pages and all")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_catalog.json"))
    args = parser.parse_args()
    settings = IndexSettings(memory_budget_bytes=parse_memory_size(args.index_memory) if args.index_memory else None)
    root = Path(args.root)
    store = CountingStore(root, create=True)
    row: dict = {"phase": args.phase, "images": args.images, "dim": args.dim, "shard_size": args.shard_size}

    if args.phase == "build":
        if read_pointer(store)[0] is not None:
            raise SystemExit(f"{root} holds a catalogue already; pass an empty --root")
        run_id = new_run_id()
        objects = list(SyntheticBucket(args.images).list())
        t0 = time.perf_counter()
        results = shard_results(store, run_id, objects, dim=args.dim, shard_size=args.shard_size, seed=0)
        row["shards_s"] = time.perf_counter() - t0
        plan = ChangePlan(new=objects)
        row |= commit(store, None, None, plan, results, run_id, args.dim, settings)
    elif args.phase == "night":
        bucket = SyntheticBucket(args.images, new=args.new, changed=args.changed, deleted=args.deleted,
                                 night=args.night)
        row |= {"night": args.night, "new_share": args.new, "changed_share": args.changed, "deleted_share": args.deleted}
        t0 = time.perf_counter()
        listed = Listed(list(bucket.list()))  # made apart: a real bucket's LIST is S3's time, not ours
        row["listing_s"] = time.perf_counter() - t0
        CountingStore.written = CountingStore.read = 0
        t0 = time.perf_counter()
        planned = _plan_run(listed, store, "synthetic@" + "0" * 64, max_attempts=DEFAULT_MAX_ATTEMPTS, limit=None,
                            max_delete_share=DEFAULT_MAX_DELETE_SHARE, allow_mass_delete=True)
        row |= {"plan_s": time.perf_counter() - t0, "plan_read_bytes": CountingStore.read,
                "listed": len(planned.listing.images), "to_process": len(planned.plan.to_process),
                "deleted": len(planned.plan.deleted), "plan_peak_rss_bytes": peak_rss()}
        with tempfile.TemporaryDirectory() as tmp:
            plan_file, out_file = Path(tmp) / "plan.pickle", Path(tmp) / "commit.json"
            plan_file.write_bytes(pickle.dumps((planned.plan, planned.pointer_etag)))
            limit = commit_memory_limit(args.commit_memory, planned.previous)
            subprocess.run([sys.executable, __file__, "--phase", "commit", "--plan-file", str(plan_file),
                            "--root", args.root, "--images", str(args.images), "--dim", str(args.dim),
                            "--shard-size", str(args.shard_size), "--index-memory", args.index_memory,
                            "--out", str(out_file)], check=True, preexec_fn=limit)
            row |= json.loads(out_file.read_text())[0]
            if args.commit_memory:  # the cgroup's own count: private memory and page cache charged to it
                group = CGROUP_V1_MEMORY / "batchsight-scale-commit"
                row |= {"commit_memory_limit": args.commit_memory,
                        "commit_cgroup_max_usage_bytes": int((group / "memory.max_usage_in_bytes").read_text()),
                        "commit_cgroup_limit_hits": int((group / "memory.failcnt").read_text())}
        row["bookkeeping_s"] = row["plan_s"] + row["build_s"] + row["commit_s"]  # the listing aside
        row["written_share_of_catalogue"] = (row["build_written_bytes"] + row["parts_written_bytes"]) / row[
            "catalogue_bytes"]
    elif args.phase == "commit":  # the commit step of a night, in a process of its own
        plan, pointer_etag = pickle.loads(Path(args.plan_file).read_bytes())
        previous = Catalog.open(store)
        run_id = new_run_id()
        CountingStore.written = CountingStore.read = 0
        t0 = time.perf_counter()
        results = shard_results(store, run_id, plan.to_process, dim=args.dim, shard_size=args.shard_size,
                                seed=int(time.time()))
        row = {"shards_s": time.perf_counter() - t0, "parts_written_bytes": CountingStore.written}
        row |= commit(store, previous, pointer_etag, plan, results, run_id, args.dim, settings)
        row["commit_step_peak_rss_bytes"] = row.pop("peak_rss_bytes")
        # what the RSS is made of at the end: private memory, and pages of files mapped
        # (the main index through IO_FLAG_MMAP, the re-rank file): page cache, shared
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        row |= {f"commit_step_end_{name.lower()}_bytes": int(status[name].split()[0]) * 1024
                for name in ("RssAnon", "RssFile") if name in status}
    else:
        from tasks.catalog.versions import compact

        CountingStore.written = CountingStore.read = 0
        t0 = time.perf_counter()
        manifest = compact(store, settings)
        row |= {"compact_s": time.perf_counter() - t0, "version": manifest.version,
                "written_bytes": CountingStore.written, "read_bytes": CountingStore.read,
                "index": manifest.index_factory, "recall_at_10": manifest.index_recall_at_10,
                "peak_rss_bytes": peak_rss(), "catalogue_bytes": catalogue_bytes(root, manifest)}
    row["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()}
    print(json.dumps(row, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(runs + [row], indent=2))


if __name__ == "__main__":
    main()
