"""The catalogue: versioned manifests, change planning, building the next
version and the atomic commit.

Every file a run writes has a new key (named by version and run id), so nothing
live is ever overwritten; the only mutable object is `CURRENT`, moved by a
conditional put. Readers follow `CURRENT` and never see a half-written version.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import cached_property

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa

from tasks import index as faiss_index
from tasks import tables
from tasks.storage import ObjectInfo, ObjectNotFound, ObjectStore, PreconditionFailed, StorageError, cached_store

log = logging.getLogger(__name__)

POINTER_KEY = "CURRENT"
FORMAT_VERSION = 1


class CatalogError(RuntimeError):
    """The output root holds no usable catalogue, or a version asked for is missing."""


class ConcurrentCommitError(RuntimeError):
    """Another run moved `CURRENT` while this one was running; nothing was committed."""


def crash_point(name: str) -> None:
    """Fault injection for the crash-safety tests: `BATCHSIGHT_CRASH_AT=name` kills
    this process with SIGKILL here, as the OOM killer or a lost node would.
    A no-op unless that variable names this point."""
    if os.environ.get("BATCHSIGHT_CRASH_AT") == name:
        log.warning("BATCHSIGHT_CRASH_AT=%s: killing this process", name)
        os.kill(os.getpid(), signal.SIGKILL)


def new_run_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{np.random.default_rng().integers(0, 1 << 24):06x}"


@dataclass
class Manifest:
    """One complete catalogue version: what to read, and what produced it."""

    version: int
    run_id: str
    created_at: str
    parent: str | None  # manifest key of the version this one was built from
    source: str
    model: str
    weights: str
    weights_source: str
    weights_sha256: str
    embedding_dim: int
    images: str  # key of the images snapshot
    failures: str  # key of the failures snapshot
    embeddings: list[str]  # embedding parts that hold at least one live vector
    index: str
    index_type: str  # flat | ivf-flat | ivf-pq ("flat-ip" in versions written before IVF)
    counts: dict[str, int] = field(default_factory=dict)
    rolled_back_from: int | None = None  # set on a version made by `batchsight rollback`
    categorizer: str | None = None  # key of the categoriser whose labels are in `images.category`
    format: int = FORMAT_VERSION
    # The index in detail (defaults describe the exact flat index of older versions).
    index_factory: str = "IDMap2,Flat"
    index_trained_n: int = 0  # catalogue size when the index was last trained (0: untrained flat)
    index_nlist: int = 0
    index_nprobe: int = 0  # tuned to reach index_recall_target; searches use it
    index_recall_at_10: float | None = None  # vs exact search, on held-out indexed vectors
    index_recall_target: float | None = None
    index_recall_queries: int = 0

    @property
    def index_state(self) -> faiss_index.IndexState:
        return faiss_index.IndexState(kind=faiss_index.index_kind(self.index_type), factory=self.index_factory,
                                      trained_n=self.index_trained_n, nlist=self.index_nlist)

    @property
    def fingerprint(self) -> str:
        return f"{self.model}@{self.weights_sha256}"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        raw = json.loads(data)
        if raw.get("format") != FORMAT_VERSION:
            raise CatalogError(f"manifest format {raw.get('format')} is not supported by this batchsight "
                               f"(expects {FORMAT_VERSION}); upgrade batchsight")
        return cls(**raw)


@dataclass(frozen=True)
class Pointer:
    version: int
    manifest: str

    def to_json(self) -> bytes:
        return json.dumps({"version": self.version, "manifest": self.manifest}).encode()


def version_stem(version: int, run_id: str) -> str:
    """What every file of one version is named by: `v000042-<run_id>`."""
    return f"v{version:06d}-{run_id}"


def manifest_key(version: int, run_id: str) -> str:
    return f"manifests/{version_stem(version, run_id)}.json"


def read_pointer(store: ObjectStore) -> tuple[Pointer | None, str | None]:
    """The live pointer and the ETag a commit must match, or (None, None) for an empty root."""
    try:
        data, etag = store.get_with_etag(POINTER_KEY)
    except ObjectNotFound:
        return None, None
    raw = json.loads(data)
    return Pointer(int(raw["version"]), str(raw["manifest"])), etag


def commit_manifest(store: ObjectStore, manifest: Manifest, expected_pointer_etag: str | None) -> Pointer:
    """Write the manifest, then move `CURRENT` to it with a conditional put: the
    one commit point. Losing the condition means another run committed first."""
    key = manifest_key(manifest.version, manifest.run_id)
    store.put(key, manifest.to_json(), if_none_match=True)
    crash_point("before-commit")
    pointer = Pointer(manifest.version, key)
    try:
        if expected_pointer_etag is None:
            store.put(POINTER_KEY, pointer.to_json(), if_none_match=True)
        else:
            store.put(POINTER_KEY, pointer.to_json(), if_match=expected_pointer_etag)
    except PreconditionFailed:
        raise ConcurrentCommitError(
            f"another run committed to {store.url} while run {manifest.run_id} was running "
            f"(the conditional put on CURRENT failed); this run committed nothing. "
            "Run again: it will start from the newer version."
        ) from None
    return pointer


class Catalog:
    """A read-only view of one committed version."""

    def __init__(self, store: ObjectStore, manifest: Manifest, key: str) -> None:
        self.store = store
        self.manifest = manifest
        self.manifest_key = key

    @classmethod
    def open(cls, store: ObjectStore, version: int | None = None) -> Catalog:
        pointer, _ = read_pointer(store)
        if pointer is None:
            raise CatalogError(f"no catalogue at {store.url} (no CURRENT pointer); "
                               "run `batchsight run --source SRC --output OUT` first")
        key = pointer.manifest
        if version is not None and version != pointer.version:
            key = find_version(store, version, start=pointer.manifest)
        return cls(store, Manifest.from_json(store.get(key)), key)

    @cached_property
    def images(self) -> pd.DataFrame:
        frame = tables.table_to_frame(tables.read_parquet_bytes(self.store.get(self.manifest.images)))
        if "page" not in frame:  # written before documents had pages: every row is an image's only page
            frame["page"] = np.ones(len(frame), np.int32)
        return frame

    @cached_property
    def failures(self) -> pd.DataFrame:
        return tables.table_to_frame(tables.read_parquet_bytes(self.store.get(self.manifest.failures)))

    @cached_property
    def index(self) -> faiss.Index:
        """The version's index, for searching; never mutate it (see `load_index`)."""
        return self.load_index()

    def load_index(self) -> faiss.Index:
        """A private copy of the index, to build the next version from."""
        return faiss_index.deserialize(self.store.get(self.manifest.index))

    def embedding_blocks(self) -> LiveEmbeddings:
        """The live vectors one part at a time (for catalogues larger than memory)."""
        return LiveEmbeddings(self.store, self.images)

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(image_ids, vectors) of the live images, in the order of `images`."""
        blocks = list(self.embedding_blocks())
        if not blocks:
            return np.empty(0, np.int64), np.empty((0, self.manifest.embedding_dim), np.float32)
        ids, vectors = np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])
        order = pd.Index(ids).get_indexer(self.images["image_id"].to_numpy())
        assert (order >= 0).all(), "every live image must have exactly one embedding"
        return ids[order], vectors[order]


class LiveEmbeddings:
    """Re-iterable (image_ids, vectors) blocks, one per embeddings part, holding
    only the vectors live in `images` (a part may also hold superseded ones)."""

    def __init__(self, store: ObjectStore, images: pd.DataFrame) -> None:
        self.store = store
        # A part is written by one run (its key names the run), so the ids live in a
        # part are the rows that point at it.
        self.live = {part: ids.to_numpy(np.int64) for part, ids in images.groupby("embedding_part")["image_id"]}
        self.parts = sorted(self.live)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for part in self.parts:
            for ids, _runs, vectors in tables.iter_embedding_batches(self.store.get(part)):
                keep = np.isin(ids, self.live[part])
                yield ids[keep], vectors[keep]


def open_catalog(url: str, *, endpoint_url: str | None = None, version: int | None = None) -> Catalog:
    """The live (or a given) version of the catalogue at `url`."""
    try:
        store = cached_store(url, endpoint_url)
    except StorageError as exc:
        raise CatalogError(f"no catalogue at {url} ({exc}); run `batchsight run --source SRC --output OUT` first") from None
    return Catalog.open(store, version=version)


def find_version(store: ObjectStore, version: int, *, start: str) -> str:
    """Follow parent links from `start` back to `version`'s manifest key."""
    key: str | None = start
    while key is not None:
        manifest = Manifest.from_json(store.get(key))
        if manifest.version == version:
            return key
        if manifest.version < version:
            break
        key = manifest.parent
    raise CatalogError(f"version {version} is not in the history of {store.url}; "
                       "`batchsight status --catalog OUT` lists the versions")


def list_versions(store: ObjectStore) -> list[Manifest]:
    """Committed versions, newest first (the parent chain from CURRENT)."""
    pointer, _ = read_pointer(store)
    out: list[Manifest] = []
    key = pointer.manifest if pointer else None
    while key is not None:
        try:
            manifest = Manifest.from_json(store.get(key))
        except ObjectNotFound:
            break  # history older than a gc'd manifest
        out.append(manifest)
        key = manifest.parent
    return out


@dataclass
class ChangePlan:
    """What a run must do, from diffing the listing against the catalogue."""

    new: list[ObjectInfo] = field(default_factory=list)
    changed: list[ObjectInfo] = field(default_factory=list)
    retry: list[ObjectInfo] = field(default_factory=list)  # failed before, unchanged, attempts left
    deleted: list[str] = field(default_factory=list)  # keys gone from the source
    unchanged: int = 0
    given_up: int = 0  # failed max_attempts times and unchanged since
    deferred: list[ObjectInfo] = field(default_factory=list)  # past --limit, left for a later run

    @property
    def to_process(self) -> list[ObjectInfo]:
        # Changed first: under --limit their stale rows are removed either way,
        # so doing them first keeps the catalogue as complete as possible.
        return self.changed + self.new + self.retry

    @property
    def is_empty(self) -> bool:
        return not self.to_process and not self.deleted and not self.deferred

    def counts(self) -> dict[str, int]:
        return {"new": len(self.new), "changed": len(self.changed), "retry": len(self.retry),
                "deleted": len(self.deleted), "unchanged": self.unchanged, "given_up": self.given_up,
                "deferred": len(self.deferred)}


def plan_changes(listing: Iterable[ObjectInfo], catalogued: pd.DataFrame, failed: pd.DataFrame, *,
                 reembed_all: bool = False, max_attempts: int = 3, limit: int | None = None) -> ChangePlan:
    """Diff a listing against the live rows by (key, etag, size).

    `catalogued` has columns key, etag, size; `failed` has key, etag, size,
    attempts. `reembed_all` (the model or weights changed) makes every listed
    object new or changed. `limit` caps the images processed; changed images
    past it are still removed (no stale row survives), to be redone later.
    """
    known = {k: (e, s) for k, e, s in zip(catalogued["key"], catalogued["etag"], catalogued["size"], strict=True)}
    failures = {k: (e, s, a) for k, e, s, a in
                zip(failed["key"], failed["etag"], failed["size"], failed["attempts"], strict=True)}
    plan = ChangePlan()
    seen: set[str] = set()
    for obj in listing:
        seen.add(obj.key)
        prior = known.get(obj.key)
        fail = failures.get(obj.key)
        if prior is not None:
            if reembed_all or prior != (obj.etag, obj.size):
                plan.changed.append(obj)
            else:
                plan.unchanged += 1
        elif fail is not None and (fail[0], fail[1]) == (obj.etag, obj.size) and not reembed_all:
            if fail[2] < max_attempts:
                plan.retry.append(obj)
            else:
                plan.given_up += 1
        else:
            plan.new.append(obj)
    plan.deleted = sorted((set(known) | set(failures)) - seen)
    if limit is not None and len(plan.to_process) > limit:
        keep = plan.to_process[:limit]
        kept = {o.key for o in keep}
        plan.deferred = [o for o in plan.to_process if o.key not in kept]
        plan.new = [o for o in plan.new if o.key in kept]
        plan.changed = [o for o in plan.changed if o.key in kept]
        plan.retry = [o for o in plan.retry if o.key in kept]
    return plan


@dataclass
class ShardResult:
    """What one shard hands back to the flow: small rows, and the key of the
    embeddings part it wrote (vectors stay in storage, not in task results)."""

    shard: int
    rows: pd.DataFrame
    embedding_part: str | None
    failures: list[dict]
    times: dict[str, float]


@dataclass
class BuildStats:
    index_s: float
    write_s: float


def build_next_version(store: ObjectStore, previous: Catalog | None, plan: ChangePlan,
                       shard_results: Sequence[ShardResult], *, run_id: str, source: str, model: str,
                       weights: str, weights_source: str, weights_sha256: str, embedding_dim: int,
                       reembed_all: bool, index_settings: faiss_index.IndexSettings | None = None,
                       categorizer: str | None = None) -> tuple[Manifest, BuildStats]:
    """Apply one run's changes to the previous version and write the new
    version's snapshot tables and index (not yet committed)."""
    version = (previous.manifest.version if previous else 0) + 1
    now = datetime.now(UTC)
    removed_keys = {o.key for o in plan.changed} | {o.key for o in plan.deferred} | set(plan.deleted)

    if previous is None or reembed_all:
        kept = tables.empty_frame(tables.IMAGES_SCHEMA)
        prev_failures = tables.empty_frame(tables.FAILURES_SCHEMA)
    else:
        kept = previous.images
        prev_failures = previous.failures
    gone = kept[kept["key"].isin(removed_keys)]
    kept = kept[~kept["key"].isin(removed_keys)]
    new_rows = [r.rows for r in shard_results if len(r.rows)]
    images = pd.concat([kept, *new_rows], ignore_index=True) if new_rows else kept.reset_index(drop=True)
    images = images.sort_values("key", kind="stable").reset_index(drop=True)
    duplicated = images["image_id"].duplicated()
    assert not duplicated.any(), f"image ids collide for keys {images.loc[duplicated, 'key'].tolist()[:5]}"

    t_index = time.perf_counter()
    built = _next_index(store, None if reembed_all else previous, images, gone["image_id"].to_numpy(np.int64),
                        [r.embedding_part for r in shard_results if r.embedding_part is not None],
                        dim=embedding_dim, settings=index_settings or faiss_index.IndexSettings(), seed=version)
    index = built.index
    index_s = time.perf_counter() - t_index
    assert index.ntotal == len(images), f"index holds {index.ntotal} vectors for {len(images)} rows"

    failures = _next_failures(prev_failures, plan, shard_results, run_id=run_id, now=now)

    t_write = time.perf_counter()
    stem = version_stem(version, run_id)
    images_key = f"tables/images/{stem}.parquet"
    failures_key = f"tables/failures/{stem}.parquet"
    index_key = f"index/{stem}.faiss"
    store.put(images_key, tables.to_parquet_bytes(tables.frame_to_table(images, tables.IMAGES_SCHEMA)))
    store.put(failures_key, tables.to_parquet_bytes(tables.frame_to_table(failures, tables.FAILURES_SCHEMA)))
    crash_point("before-index-write")
    store.put(index_key, faiss_index.serialize(index))
    crash_point("after-index-write")
    write_s = time.perf_counter() - t_write

    manifest = Manifest(
        version=version, run_id=run_id, created_at=now.isoformat(timespec="seconds"),
        parent=previous.manifest_key if previous else None, source=source, model=model, weights=weights,
        weights_source=weights_source, weights_sha256=weights_sha256, embedding_dim=embedding_dim,
        images=images_key, failures=failures_key,
        embeddings=sorted(set(images["embedding_part"].dropna().tolist())),
        index=index_key, index_type=built.state.kind, categorizer=categorizer,
        counts={"images": len(images), "failures": len(failures), "vectors": int(index.ntotal)},
        index_factory=built.state.factory, index_trained_n=built.state.trained_n, index_nlist=built.state.nlist,
        index_nprobe=built.recall.nprobe, index_recall_at_10=built.recall.recall_at_10,
        index_recall_target=built.recall.target, index_recall_queries=built.recall.queries,
    )
    return manifest, BuildStats(index_s=index_s, write_s=write_s)


@dataclass
class IndexBuild:
    index: faiss.Index
    state: faiss_index.IndexState
    recall: faiss_index.RecallReport


def _next_index(store: ObjectStore, previous: Catalog | None, images: pd.DataFrame, gone_ids: np.ndarray,
                new_parts: Sequence[str], *, dim: int, settings: faiss_index.IndexSettings, seed: int) -> IndexBuild:
    """The index of the next version: the previous one updated by id (remove the
    gone, add the new parts) while it still suits the catalogue, else a new one
    trained on a sample of the live vectors. Then recall is measured and nprobe tuned."""
    n = len(images)
    choice = faiss_index.choose_index(n, dim, settings.budget(), flat_max_vectors=settings.flat_max_vectors)
    reason = faiss_index.retrain_reason(previous.manifest.index_state if previous else None, choice, n)
    blocks = LiveEmbeddings(store, images)
    rng = np.random.default_rng(seed)
    query_ids, train_ids = faiss_index.split_sample(images["image_id"].to_numpy(np.int64),
                                                    min(faiss_index.RECALL_QUERIES, n), choice, rng)
    if reason is None:
        index = previous.load_index()
        removed = faiss_index.remove_ids(index, gone_ids)
        assert removed == len(gone_ids), f"index held {removed} of {len(gone_ids)} vectors to remove"
        for part in new_parts:
            for ids, _runs, vectors in tables.iter_embedding_batches(store.get(part)):
                faiss_index.add_vectors(index, ids, vectors)
        state = previous.manifest.index_state
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
                                       trained_n=n if choice.kind != "flat" else 0, nlist=choice.nlist)
    if queries is None:
        recall = faiss_index.RecallReport(recall_at_10=1.0, nprobe=0, queries=0, target=settings.recall_target)
    else:
        recall = faiss_index.measure_recall(index, queries, query_ids, blocks, target=settings.recall_target)
    return IndexBuild(index=index, state=state, recall=recall)


def _next_failures(previous: pd.DataFrame, plan: ChangePlan, shard_results: Sequence[ShardResult], *,
                   run_id: str, now: datetime) -> pd.DataFrame:
    """Failures still standing: earlier ones not re-decided this run, plus this run's
    (with attempts counted across runs while the bytes stay the same)."""
    redecided = {o.key for o in plan.to_process} | {o.key for o in plan.deferred} | set(plan.deleted)
    kept = previous[~previous["key"].isin(redecided)]
    prior_attempts = {(k, e): int(a) for k, e, a in zip(previous["key"], previous["etag"], previous["attempts"], strict=True)}
    fresh = [dict(f, attempts=prior_attempts.get((f["key"], f["etag"]), 0) + 1, run_id=run_id, failed_at=now)
             for r in shard_results for f in r.failures]
    if not fresh:
        return kept.reset_index(drop=True)
    return pd.concat([kept, pd.DataFrame(fresh)], ignore_index=True).sort_values("key").reset_index(drop=True)


def read_runs(store: ObjectStore) -> pd.DataFrame:
    """The runs log: one row per run, committed or not, oldest first."""
    parts = [tables.read_parquet_bytes(store.get(o.key)) for o in store.list("tables/runs/")]
    if not parts:
        return tables.empty_frame(tables.RUNS_SCHEMA)
    return tables.table_to_frame(pa.concat_tables(parts)).sort_values("started_at").reset_index(drop=True)


def write_run_row(store: ObjectStore, row: dict) -> str:
    key = f"tables/runs/{row['run_id']}.parquet"
    store.put(key, tables.to_parquet_bytes(tables.frame_to_table(pd.DataFrame([row]), tables.RUNS_SCHEMA)))
    return key


def rollback(store: ObjectStore, to_version: int) -> Manifest:
    """Make an earlier version live again, as a new version (history stays linear
    and auditable; the next nightly run diffs against the restored content)."""
    pointer, etag = read_pointer(store)
    if pointer is None:
        raise CatalogError(f"no catalogue at {store.url}; nothing to roll back")
    if to_version == pointer.version:
        raise CatalogError(f"version {to_version} is already live at {store.url}")
    target = Manifest.from_json(store.get(find_version(store, to_version, start=pointer.manifest)))
    restored = replace(target, version=pointer.version + 1, run_id=f"rollback-{new_run_id()}",
                       created_at=datetime.now(UTC).isoformat(timespec="seconds"), parent=pointer.manifest,
                       rolled_back_from=to_version)
    commit_manifest(store, restored, etag)
    return restored


ALWAYS_KEPT_PREFIXES = ("tables/runs/", "categorizers/")
VERSION_REPORT_PREFIXES = ("tables/duplicates/", "tables/category_suggestions/")


@dataclass
class GcReport:
    kept_versions: list[int]
    deleted: list[str]
    bytes_freed: int
    skipped_recent: int  # unreferenced but younger than the grace period (a run may be writing them)


def collect_garbage(store: ObjectStore, *, keep_versions: int | None = None, min_age_s: float = 6 * 3600,
                    dry_run: bool = False, now: float | None = None) -> GcReport:
    """Delete what no retained version references: parts of crashed or losing runs,
    and (with `keep_versions`) the files and reports of versions older than the newest N.

    Never deleted: the runs log and categorisers (small, and the audit trail of
    what categorised which rows). Reports named by a retained version (duplicates,
    category suggestions) stay with it. Objects younger than `min_age_s` are left
    alone, so gc never deletes the parts of a run that is still writing them.
    """
    versions = list_versions(store)
    if keep_versions is not None:
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be at least 1, not {keep_versions}")
        versions = versions[:keep_versions]
    referenced = {POINTER_KEY}
    kept_prefixes = list(ALWAYS_KEPT_PREFIXES)
    for m in versions:
        referenced |= {manifest_key(m.version, m.run_id), m.images, m.failures, m.index, *m.embeddings}
        kept_prefixes += [f"{p}{version_stem(m.version, m.run_id)}/" for p in VERSION_REPORT_PREFIXES]
    kept_prefixes = tuple(kept_prefixes)
    now = time.time() if now is None else now
    report = GcReport(kept_versions=[m.version for m in versions], deleted=[], bytes_freed=0, skipped_recent=0)
    for obj in store.list():
        if obj.key in referenced or obj.key.startswith(kept_prefixes):
            continue
        if now - obj.modified < min_age_s:
            report.skipped_recent += 1
            continue
        if not dry_run:
            store.delete(obj.key)
        report.deleted.append(obj.key)
        report.bytes_freed += obj.size
    return report
