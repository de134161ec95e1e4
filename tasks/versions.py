"""The one builder of catalogue versions. A run, `categories apply` and rollback
each describe how the next version differs from a base version (`VersionChange`);
`build_version` writes the files that change under new keys and returns the
manifest, and `commit_manifest` (tasks/catalog.py) makes it live.

Whatever a change leaves out is carried over file for file: an apply writes a
new `images` table and reuses the base's failures, vectors and index; a
rollback writes nothing but its manifest, whose base is the version restored.
"""

from __future__ import annotations

import logging
import mmap
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from tasks import index as faiss_index
from tasks import layout, tables
from tasks.catalog import (FORMAT_VERSION, BuildStats, Catalog, FileRecord, LiveEmbeddings, Manifest, Pointer,
                           Provenance, RunLease, commit_manifest, crash_point, new_run_id, put_recorded,
                           read_embedding_batches)
from tasks.storage import ObjectStore

log = logging.getLogger(__name__)

RERANK_IDS_FILE, RERANK_VECTORS_FILE = "ids.npy", "vectors-f16.npy"
CATEGORY_COLUMNS = ("category", "category_confidence")


@dataclass
class VersionChange:
    """How the next version differs from its base. Rows, failures and the index
    change only where a field says so; the rest is the base's, file for file."""

    provenance: Provenance | None = None  # None: the base's
    from_scratch: bool = False  # the model changed: no row, failure or vector of the base is kept
    removed_keys: frozenset[str] = frozenset()  # objects whose rows leave (changed, deferred, deleted)
    new_rows: Sequence[pd.DataFrame] = ()  # rows that come in; their vectors are in `new_parts`
    new_parts: Mapping[str, FileRecord | None] = field(default_factory=dict)  # embeddings parts written for them
    new_files: Mapping[str, FileRecord | None] = field(default_factory=dict)  # other parts they name (thumbnails)
    index: faiss_index.IndexSettings | None = None  # update (or retrain) the index; None: the base's index
    redecided: frozenset[str] | None = None  # keys whose failures are decided anew; None: the base's failures
    new_failures: Sequence[dict] = ()  # failures of this change (attempts are counted here)
    categories: pd.DataFrame | None = None  # image_id, category, category_confidence of every row
    rolled_back_from: int | None = None

    @property
    def changes_rows(self) -> bool:
        return self.from_scratch or bool(self.removed_keys) or any(len(r) for r in self.new_rows)


def build_version(store: ObjectStore, base: Catalog | None, change: VersionChange, *, parent: Pointer | None,
                  run_id: str) -> tuple[Manifest, BuildStats]:
    """Write the files of the version after `parent` that `change` makes from
    `base`, under new keys, and return its manifest (not yet committed).

    `base` is the version whose content is changed (the live one, or for a
    rollback the one restored); `parent` the live version it follows (None for
    the first), which gives the number and the history link."""
    assert change.index is not None or not change.changes_rows, "rows that change need an index update"
    assert base is not None or change.index is not None, "a first version needs rows, failures and an index"
    version = (parent.version if parent else 0) + 1
    now = datetime.now(UTC)
    carried = None if change.from_scratch else base
    fields: dict = {"format": FORMAT_VERSION, "version": version, "run_id": run_id,
                    "created_at": now.isoformat(timespec="seconds"), "parent": parent.manifest if parent else None,
                    "rolled_back_from": change.rolled_back_from}
    if change.provenance is not None:
        fields |= asdict(Provenance.of(change.provenance))
    counts = dict(base.manifest.counts) if base else {}
    written: dict[str, FileRecord] = {}

    images, gone_ids = _next_images(carried, change)
    t_index = time.perf_counter()
    built = None
    if change.index is not None:
        dim = change.provenance.embedding_dim if change.provenance else base.manifest.embedding_dim
        built = _next_index(store, carried, images, gone_ids, change.new_parts, dim=dim, settings=change.index,
                            seed=version)
        assert built.index.ntotal == len(images), f"index holds {built.index.ntotal} vectors for {len(images)} rows"
    index_s = time.perf_counter() - t_index
    if built is not None:  # the rows changed: the parts that hold a live vector, and a live thumbnail, now
        fields["embeddings"] = sorted(set(images["embedding_part"].dropna().tolist()))
        fields["thumbnails"] = sorted(set(images["thumbnail_part"].dropna().tolist())) \
            if "thumbnail_part" in images else []
    failures = None
    if change.redecided is not None:
        before = carried.failures if carried else tables.empty_frame(tables.FAILURES_SCHEMA)
        failures = _next_failures(before, change.redecided, change.new_failures, run_id=run_id, now=now)

    t_write = time.perf_counter()
    try:
        if images is not None:
            fields["images"] = key = layout.images_table_key(version, run_id)
            written[key] = put_recorded(store, key, tables.to_parquet_bytes(
                tables.frame_to_table(images, tables.IMAGES_SCHEMA)))
            counts["images"] = len(images)
        if failures is not None:
            fields["failures"] = key = layout.failures_table_key(version, run_id)
            written[key] = put_recorded(store, key, tables.to_parquet_bytes(
                tables.frame_to_table(failures, tables.FAILURES_SCHEMA)))
            counts["failures"] = len(failures)
        if built is not None:
            crash_point("before-index-write")
            fields |= _write_index(store, built, version, run_id, written)
            counts["vectors"] = int(built.index.ntotal)
            crash_point("after-index-write")
    finally:
        if built is not None and built.rerank_dir is not None:
            shutil.rmtree(built.rerank_dir, ignore_errors=True)
    crash_point("after-version-files")
    write_s = time.perf_counter() - t_write

    fields["counts"] = counts
    fields["files"] = {}
    manifest = replace(base.manifest, **fields) if base is not None else Manifest(**fields)
    known = (base.manifest.files if base else {}) | {k: r for k, r in (change.new_parts | change.new_files).items() if r} \
        | written
    manifest.files = {key: known[key] for key in manifest.named_files if key in known}
    return manifest, BuildStats(index_s=index_s, write_s=write_s)


def make_version(store: ObjectStore, base: Catalog, change: VersionChange, *, parent: Pointer | None,
                 pointer_etag: str | None, writer: str) -> Manifest:
    """Build and commit a version under a lease of its own (`<writer>-<run id>`):
    what `categories apply` and rollback do in one step. Raises
    `ConcurrentCommitError` when another writer committed since `pointer_etag`."""
    with RunLease(store, f"{writer}-{new_run_id()}") as lease:
        manifest, _ = build_version(store, base, change, parent=parent, run_id=lease.run_id)
        commit_manifest(store, manifest, pointer_etag)
    return manifest


def _next_images(carried: Catalog | None, change: VersionChange) -> tuple[pd.DataFrame | None, np.ndarray]:
    """The next version's rows (None where they are the base's) and the ids that left."""
    gone = np.empty(0, np.int64)
    if change.index is None and change.categories is None:
        return None, gone
    images = carried.images if carried else tables.empty_frame(tables.IMAGES_SCHEMA)
    if change.index is not None:
        leaving = images["key"].isin(change.removed_keys)
        gone = images.loc[leaving, "image_id"].to_numpy(np.int64)
        new_rows = [r for r in change.new_rows if len(r)]
        images = pd.concat([images[~leaving], *new_rows], ignore_index=True) if new_rows else images[~leaving]
        images = images.sort_values("key", kind="stable").reset_index(drop=True)
        duplicated = images["image_id"].duplicated()
        assert not duplicated.any(), f"image ids collide for keys {images.loc[duplicated, 'key'].tolist()[:5]}"
    if change.categories is not None:
        labels = change.categories.set_index("image_id")
        missing = ~images["image_id"].isin(labels.index)
        assert not missing.any(), f"no category for {int(missing.sum())} of {len(images)} rows"
        images = images.copy()
        for column in CATEGORY_COLUMNS:
            images[column] = labels[column].reindex(images["image_id"]).to_numpy()
    return images, gone


def _next_failures(previous: pd.DataFrame, redecided: frozenset[str], fresh: Sequence[dict], *, run_id: str,
                   now: datetime) -> pd.DataFrame:
    """Failures still standing: earlier ones not re-decided, plus the new ones
    (with attempts counted across runs while the bytes stay the same)."""
    kept = previous[~previous["key"].isin(redecided)]
    prior_attempts = {(k, e): int(a) for k, e, a in zip(previous["key"], previous["etag"], previous["attempts"],
                                                        strict=True)}
    rows = [dict(f, attempts=prior_attempts.get((f["key"], f["etag"]), 0) + 1, run_id=run_id, failed_at=now)
            for f in fresh]
    if not rows:
        return kept.reset_index(drop=True)
    return pd.concat([kept, pd.DataFrame(rows)], ignore_index=True).sort_values("key").reset_index(drop=True)


@dataclass
class IndexBuild:
    index: faiss.Index
    state: faiss_index.IndexState
    recall: faiss_index.RecallReport
    rerank_dir: Path | None = None  # the re-rank files, to be written with the index (then removed)


def _write_index(store: ObjectStore, built: IndexBuild, version: int, run_id: str,
                 written: dict[str, FileRecord]) -> dict:
    """Write the index (and its re-rank files) and return the manifest fields that describe it."""
    key = layout.index_key(version, run_id)
    written[key] = put_recorded(store, key, faiss_index.serialize(built.index))
    rerank = (None, None)
    if built.rerank_dir is not None:
        rerank = layout.rerank_keys(version, run_id)
        for rerank_key, name in zip(rerank, (RERANK_IDS_FILE, RERANK_VECTORS_FILE), strict=True):
            written[rerank_key] = _put_file(store, rerank_key, built.rerank_dir / name)
    return {"index": key, "index_type": built.state.kind, "index_factory": built.state.factory,
            "index_trained_n": built.state.trained_n, "index_nlist": built.state.nlist,
            "index_nprobe": built.recall.nprobe, "index_recall_at_10": built.recall.recall_at_10,
            "index_recall_target": built.recall.target, "index_recall_queries": built.recall.queries,
            "index_rerank_ids": rerank[0], "index_rerank": rerank[1],
            "index_rerank_factor": built.recall.rerank_factor}


def _put_file(store: ObjectStore, key: str, path: Path) -> FileRecord:
    """`put_recorded` of a local file through a memory map (a 4 GB re-rank file is
    never copied into memory by us; the map's pages are the page cache's)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            return put_recorded(store, key, view)
        finally:
            view.release()


def _next_index(store: ObjectStore, previous: Catalog | None, images: pd.DataFrame, gone_ids: np.ndarray,
                new_parts: Mapping[str, FileRecord | None], *, dim: int, settings: faiss_index.IndexSettings,
                seed: int) -> IndexBuild:
    """The index of the next version: the previous one updated by id (remove the
    gone, add the new parts) while it still suits the catalogue, else a new one
    trained on a sample of the live vectors. Then recall is measured and nprobe tuned."""
    n = len(images)
    choice = faiss_index.choose_index(n, dim, settings.budget(), flat_max_vectors=settings.flat_max_vectors,
                                      rerank=settings.rerank)
    reason = faiss_index.retrain_reason(previous.manifest.index_state if previous else None, choice, n)
    part_files = {part: record for part, record in new_parts.items() if record}
    blocks = LiveEmbeddings(store, images, (previous.manifest.files if previous else {}) | part_files)
    rng = np.random.default_rng(seed)
    query_ids, train_ids = faiss_index.split_sample(images["image_id"].to_numpy(np.int64),
                                                    min(faiss_index.RECALL_QUERIES, n), choice, rng)
    if reason is None:
        index = previous.load_index()
        removed = faiss_index.remove_ids(index, gone_ids)
        assert removed == len(gone_ids), f"index held {removed} of {len(gone_ids)} vectors to remove"
        for part in new_parts:
            for ids, _runs, vectors in read_embedding_batches(store, part, blocks.files.get(part)):
                faiss_index.add_vectors(index, ids, vectors)
        state = replace(previous.manifest.index_state, rerank=choice.rerank)
        queries = faiss_index.gather_vectors(blocks, query_ids, dim) if state.kind != "flat" else None
    else:
        log.info("building a new %s index for %s vectors: %s", choice.factory, n, reason)
        queries = sample = None
        if choice.kind != "flat":  # one pass for the held-out queries and the training sample
            sample = faiss_index.gather_vectors(blocks, np.concatenate([query_ids, train_ids]), dim)
            queries = sample[:len(query_ids)].copy()
        index = faiss_index.trained_index(choice, dim, None if sample is None else sample[len(query_ids):])
        del sample  # 2 GB at 1M x 2048-d: not held while every vector is added
        for ids, vectors in blocks:
            faiss_index.add_vectors(index, ids, vectors)
        state = faiss_index.IndexState(kind=choice.kind, factory=choice.factory,
                                       trained_n=n if choice.kind != "flat" else 0, nlist=choice.nlist,
                                       rerank=choice.rerank)
    rerank = rerank_dir = None
    if state.rerank:  # written anew each version from the live vectors (one more pass over the parts)
        rerank_dir = Path(tempfile.mkdtemp(prefix="batchsight-rerank-"))
        try:
            faiss_index.write_rerank_vectors(blocks, n, dim, rerank_dir / RERANK_IDS_FILE,
                                             rerank_dir / RERANK_VECTORS_FILE)
            rerank = faiss_index.RerankVectors.open(rerank_dir / RERANK_IDS_FILE, rerank_dir / RERANK_VECTORS_FILE)
        except BaseException:
            shutil.rmtree(rerank_dir, ignore_errors=True)
            raise
    if queries is None:
        recall = faiss_index.RecallReport(recall_at_10=1.0, nprobe=0, queries=0, target=settings.recall_target)
    else:
        recall = faiss_index.measure_recall(index, queries, query_ids, blocks, target=settings.recall_target,
                                            rerank=rerank)
        if recall.recall_at_10 < settings.recall_target:
            stronger = faiss_index.stronger_choice(n, dim, faiss_index.choose_index(
                n, dim, settings.budget(), flat_max_vectors=settings.flat_max_vectors, rerank=settings.rerank),
                flat_max_vectors=settings.flat_max_vectors, rerank=settings.rerank)
            log.warning("index recall@10 %.3f misses the target %.2f within %s bytes; %s", recall.recall_at_10,
                        settings.recall_target, f"{settings.budget():,}",
                        f"the next option up is {stronger.describe()}: raise --index-memory to about "
                        f"{stronger.estimated_bytes:,} bytes" if stronger else "no index reaches it")
    return IndexBuild(index=index, state=state, recall=recall, rerank_dir=rerank_dir)
