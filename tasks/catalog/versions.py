"""The one builder of catalogue versions. A run, `categories apply` and rollback
each describe how the next version differs from a base version (`VersionChange`);
`build_version` writes the files that change under new keys and returns the
manifest, and `commit_manifest` (tasks/catalog.py) makes it live.

Whatever a change leaves out is carried over file for file: an apply writes a
new `images` table and reuses the base's failures, vectors and index; a
rollback writes nothing but its manifest, whose base is the version restored.

"""

from __future__ import annotations

import io
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
import pyarrow as pa
import pyarrow.compute as pc

from tasks.catalog import layout, tables
from tasks.catalog.errors import CatalogCorrupt, CatalogError
from tasks.catalog.history import find_version
from tasks.catalog.leases import RunLease
from tasks.catalog.manifest import (
    FORMAT_VERSION,
    POINTER_KEY,
    ROW_IDENTITY,
    Manifest,
    Pointer,
    Provenance,
    commit_manifest,
    crash_point,
    new_run_id,
    newest_listed_version,
    parse_pointer,
    put_recorded,
    read_manifest,
    read_pointer,
)
from tasks.catalog.reader import Catalog, LiveEmbeddings, check_sizes, read_embedding_batches
from tasks.records import BuildStats, ChangePlan, FileRecord, ShardResult
from tasks.search import index as faiss_index
from tasks.search import index_choice, index_recall
from tasks.storage import ObjectNotFound, ObjectStore

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
    index: index_choice.IndexSettings | None = None  # update (or retrain) the index; None: the base's index
    redecided: frozenset[str] | None = None  # keys whose failures are decided anew; None: the base's failures
    new_failures: Sequence[dict] = ()  # failures of this change (attempts are counted here)
    categories: pd.DataFrame | None = None  # image_id, category, category_confidence of every row
    rolled_back_from: int | None = None
    compact: bool = False  # fold every part, delete and segment into one of each (`batchsight compact`)

    @property
    def changes_rows(self) -> bool:
        return self.from_scratch or bool(self.removed_keys) or any(len(r) for r in self.new_rows)


# A night compacts (rewrites the rows as one part and folds the index's delta and
# removed ids into a new main index) when the changes since the last compaction pass
# `IndexSettings.compact_share` of the catalogue (and `compact_min_changes`), when
# a table has this many parts, or when the index must be retrained anyway.
MAX_TABLE_PARTS = 64


def build_version(store: ObjectStore, base: Catalog | None, change: VersionChange, *, parent: Pointer | None,
                  run_id: str) -> tuple[Manifest, BuildStats]:
    """Write the files of the version after `parent` that `change` makes from
    `base`, under new keys, and return its manifest (not yet committed).

    `base` is the version whose content is changed (the live one, or for a
    rollback the one restored); `parent` the live version it follows (None for
    the first), which gives the number and the history link.

    A run's version is either appended (the usual night: a part of the new rows
    and the deletes of the rows that left, the new vectors in the index's delta
    segment and the ids that left recorded apart: bytes in proportion to the
    change) or compacted (every table one part again and one main index, read and
    written whole: the first version, a new model, `categories apply`,
    `batchsight compact`, and a night past a compaction threshold)."""
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
    dim = change.provenance.embedding_dim if change.provenance else (base.manifest.embedding_dim if base else 0)

    t_index = time.perf_counter()
    new_rows = [r for r in change.new_rows if len(r)]
    gone, staying_parts = _gone_rows(carried, change.removed_keys, new_rows) if change.index is not None \
        else (_NO_ROWS, {})
    n = (counts.get("images", 0) if carried else 0) - len(gone) + sum(len(r) for r in new_rows)
    reason = _compaction_reason(carried, change, n, len(gone), dim)
    if reason is not None and carried is not None:
        log.info("version %s compacts: %s", version, reason)
    images, built, segments = None, None, None
    if reason is not None and (change.index is not None or change.categories is not None):
        images = _next_images(carried, change, gone)
        if change.index is not None:
            built = _full_index(store, carried, images, gone, change.new_parts, dim=dim, settings=change.index,
                                seed=version)
            assert built.index.ntotal == len(images), f"index holds {built.index.ntotal} vectors for {n} rows"
    elif change.index is not None:
        segments = _appended_index(store, carried, gone, change.new_parts, n, settings=change.index)
    index_s = time.perf_counter() - t_index

    failures = None
    if change.redecided is not None:
        before = carried.failures if carried else tables.empty_frame(tables.FAILURES_SCHEMA)
        failures = _next_failures(before, change.redecided, change.new_failures, run_id=run_id, now=now)

    t_write = time.perf_counter()
    try:
        if images is not None or change.index is not None:
            fields |= _row_fields(store, carried, version, run_id, images, new_rows, gone, staying_parts, written)
            counts["images"] = len(images) if images is not None else n
        if failures is not None:
            fields |= _failure_fields(store, carried if reason is None else None, change.redecided, failures,
                                      layout.failures_table_key(version, run_id), run_id, written)
            counts["failures"] = len(failures)
        if built is not None:
            crash_point("before-index-write")
            fields |= _write_index(store, built, version, run_id, written)
            counts |= {"vectors": int(built.index.ntotal), "index_main": int(built.index.ntotal),
                       "index_delta": 0, "index_removed": 0}
            crash_point("after-index-write")
        elif segments is not None:
            crash_point("before-index-write")
            fields |= _write_segments(store, segments, version, run_id, written)
            counts |= {"vectors": int(segments.index.ntotal), "index_main": int(segments.index.main.ntotal),
                       "index_delta": int(segments.index.delta.ntotal) if segments.index.delta is not None else 0,
                       "index_removed": len(segments.index.removed)}
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


def _row_fields(store: ObjectStore, carried: Catalog | None, version: int, run_id: str,
                images: pd.DataFrame | None, new_rows: Sequence[pd.DataFrame], gone: pa.Table,
                staying_parts: dict[str, set[str]], written: dict[str, FileRecord]) -> dict:
    """Write the rows of the next version; its manifest fields for them. Compacted
    (`images` holds every live row): one part. Appended: a part of the new rows,
    the deletes of those that left."""
    key = layout.images_table_key(version, run_id)
    if images is not None:
        fields = {"images": [_put_table(store, key, images, tables.IMAGES_SCHEMA, written)], "images_deletes": None}
        for field_name, column in PART_FIELDS:
            fields[field_name] = sorted(pc.unique(images[column]).drop_null().to_pylist())
        return fields
    fields = _append_rows(store, carried, "images", key, pd.concat(new_rows, ignore_index=True) if new_rows else None,
                          tables.IMAGES_SCHEMA, gone, written)
    for field_name, column in PART_FIELDS:
        named = {part for r in new_rows if column in r for part in r[column].dropna()}
        fields[field_name] = sorted(staying_parts[column] | named)
    return fields


def _failure_fields(store: ObjectStore, appending_to: Catalog | None, redecided: frozenset[str],
                    failures: pd.DataFrame, key: str, run_id: str, written: dict[str, FileRecord]) -> dict:
    """Write the failures of the next version (`failures`, every one standing):
    one part, or appended to `appending_to`'s parts with the deletes of those re-decided."""
    if appending_to is None:
        return {"failures": [_put_table(store, key, failures, tables.FAILURES_SCHEMA, written)],
                "failures_deletes": None}
    before = appending_to.failures
    left = before[np.fromiter((key in redecided for key in before["key"]), bool, len(before))][
        list(ROW_IDENTITY["failures"])]
    fresh = failures[failures["run_id"] == run_id] if len(failures) else failures
    return _append_rows(store, appending_to, "failures", key, fresh, tables.FAILURES_SCHEMA,
                        pa.Table.from_pandas(left, preserve_index=False), written)


_NO_ROWS = pa.table({"image_id": pa.array([], pa.int64()), "run_id": pa.array([], pa.string())})

PART_FIELDS = (("embeddings", "embedding_part"), ("thumbnails", "thumbnail_part"))  # manifest field, row column

PART_COLUMNS = tuple(column for _, column in PART_FIELDS)


def _gone_rows(carried: Catalog | None, removed_keys: frozenset[str], new_rows: Sequence[pd.DataFrame]
               ) -> tuple[pa.Table, dict[str, set[str]]]:
    """(image_id, run_id) of the live rows whose keys leave, and the embeddings and
    thumbnails parts the rows that stay name. Reads five columns of the live rows,
    never the rows whole; checks that no new row's image id collides with a row that stays."""
    if carried is None:
        return _NO_ROWS, {column: set() for column in PART_COLUMNS}
    live = carried.live_table("images", ["key", "image_id", "run_id", *PART_COLUMNS])
    leaving = pc.is_in(live["key"], value_set=pa.array(sorted(removed_keys), pa.string())) if removed_keys \
        else pa.array(np.zeros(len(live), bool))
    staying = live.filter(pc.invert(leaving))
    if new_rows:
        new_ids = pa.array(np.concatenate([r["image_id"].to_numpy(np.int64) for r in new_rows]))
        clash = staying.filter(pc.is_in(staying["image_id"], value_set=new_ids))
        assert not len(clash), f"image ids collide for keys {clash['key'].to_pylist()[:5]}"
    gone = live.filter(leaving).select(["image_id", "run_id"])
    return gone, {column: set(pc.unique(staying[column]).drop_null().to_pylist()) for column in PART_COLUMNS}


def _compaction_reason(carried: Catalog | None, change: VersionChange, n: int, n_gone: int, dim: int) -> str | None:
    """Why this version rewrites its tables and main index whole, or None to append."""
    if carried is None:
        return "a first version" if not change.from_scratch else "a new model: every vector is new"
    if change.compact:
        return "asked for (`batchsight compact`)"
    if change.categories is not None:
        return "every row's category is new"
    if change.index is None:
        return None
    m, settings = carried.manifest, change.index
    if (parts := max(len(m.images), len(m.failures)) + 1) > MAX_TABLE_PARTS:
        return f"a table would have {parts} parts (the limit is {MAX_TABLE_PARTS})"
    choice = index_choice.choose_index(n, dim, settings.budget(), flat_max_vectors=settings.flat_max_vectors,
                                      rerank=settings.rerank)
    if (why := index_choice.retrain_reason(m.index_state, choice, n)) is not None:
        return why
    if index_choice.index_kind(m.index_type) != "flat" and not m.index_truth:
        return f"version {m.version} keeps no recall truth (written before index segments)"
    changes = m.counts.get("index_delta", 0) + m.counts.get("index_removed", 0) + n_gone \
        + sum(len(r) for r in change.new_rows)
    limit = max(settings.compact_min_changes, int(settings.compact_share * n))
    if changes > limit:
        return f"{changes:,} vectors added or removed since the last compaction, past {limit:,}"
    return None


def _put_table(store: ObjectStore, key: str, rows: pd.DataFrame | pa.Table, schema: pa.Schema,
               written: dict[str, FileRecord]) -> str:
    table = rows if isinstance(rows, pa.Table) else tables.frame_to_table(rows, schema)
    written[key] = put_recorded(store, key, tables.to_parquet_bytes(table))
    return key


def _append_rows(store: ObjectStore, carried: Catalog, table: str, key: str, fresh: pd.DataFrame | None,
                 schema: pa.Schema, gone: pa.Table, written: dict[str, FileRecord]) -> dict:
    """A part of the `fresh` rows (none when there are none) and the deletes: the
    base's plus the identities of the rows in `gone`. Returns the manifest fields."""
    m = carried.manifest
    parts = list(getattr(m, table))
    if fresh is not None and len(fresh):
        sort = ["key", "page"] if "page" in fresh else ["key"]
        parts.append(_put_table(store, key, fresh.sort_values(sort, kind="stable"), schema, written))
    deletes_key = getattr(m, f"{table}_deletes")
    if len(gone):
        identity = list(ROW_IDENTITY[table])
        before = [carried.read_table(deletes_key)] if deletes_key else []
        deletes = pa.concat_tables([*before, gone.select(identity).cast(schema_of(schema, identity))])
        deletes_key = layout.deletes_key(key)
        written[deletes_key] = put_recorded(store, deletes_key, tables.to_parquet_bytes(deletes))
    return {table: parts, f"{table}_deletes": deletes_key}


def schema_of(schema: pa.Schema, names: Sequence[str]) -> pa.Schema:
    return pa.schema([schema.field(name) for name in names])


def _next_images(carried: Catalog | None, change: VersionChange, gone: pa.Table) -> pa.Table:
    """Every live row of the next version, in one Arrow table sorted by key and page
    (a compacted version). Arrow, not pandas: 10M rows are a few GB of columns, where
    pandas' Python objects for the same rows filled 24 GB."""
    images = tables.conform(carried.live_table("images"), tables.IMAGES_SCHEMA) if carried \
        else tables.IMAGES_SCHEMA.empty_table()
    if change.index is not None:
        if len(gone):
            images = images.filter(pc.invert(pc.is_in(images["image_id"], value_set=gone["image_id"])))
        new_rows = [tables.frame_to_table(r, tables.IMAGES_SCHEMA) for r in change.new_rows if len(r)]
        images = pa.concat_tables([images, *new_rows]).combine_chunks() if new_rows else images
        ids = np.sort(images["image_id"].to_numpy())
        duplicated = np.unique(ids[1:][ids[1:] == ids[:-1]])
        if len(duplicated):
            clash = images.filter(pc.is_in(images["image_id"], value_set=pa.array(duplicated[:5])))
            raise AssertionError(f"image ids collide for keys {clash['key'].to_pylist()[:5]}")
    # one order for every compacted part, as `Catalog.images` reads it (rows written before
    # documents had pages are an image's page 1)
    images = images.set_column(images.schema.get_field_index("page"), "page", pc.fill_null(images["page"], 1))
    images = images.take(pc.sort_indices(images, [("key", "ascending"), ("page", "ascending")]))
    if change.categories is not None:
        labels = change.categories.drop_duplicates("image_id").set_index("image_id")
        at = labels.index.get_indexer(images["image_id"].to_numpy())
        assert (at >= 0).all(), f"no category for {int((at < 0).sum())} of {len(images)} rows"
        for column in CATEGORY_COLUMNS:
            values = tables.frame_to_table(labels[[column]].iloc[at].reset_index(drop=True),
                                           schema_of(tables.IMAGES_SCHEMA, [column]))[column]
            images = images.set_column(images.schema.get_field_index(column), column, values)
    return images


def make_version(store: ObjectStore, base: Catalog, change: VersionChange, *, parent: Pointer | None,
                 pointer_etag: str | None, writer: str) -> Manifest:
    """Build and commit a version under a lease of its own (`<writer>-<run id>`):
    what `categories apply` and rollback do in one step. Raises
    `ConcurrentCommitError` when another writer committed since `pointer_etag`."""
    with RunLease(store, f"{writer}-{new_run_id()}") as lease:
        manifest, _ = build_version(store, base, change, parent=parent, run_id=lease.run_id)
        commit_manifest(store, manifest, pointer_etag)
    return manifest


def compact(store: ObjectStore, settings: index_choice.IndexSettings | None = None) -> Manifest:
    """Fold the live version's parts, deletes and index segments into one part of
    each table and one main index (retrained where the catalogue outgrew it), as a
    new version under a lease of its own: what `batchsight compact` and a night
    past a threshold do. Search answers and rows stay the same."""
    pointer, etag = read_pointer(store)
    if pointer is None:
        raise CatalogError(f"no catalogue at {store.url}; nothing to compact")
    base = Catalog(store, read_manifest(store, pointer.manifest), pointer.manifest)
    change = VersionChange(index=settings or index_choice.IndexSettings(), redecided=frozenset(), compact=True)
    return make_version(store, base, change, parent=pointer, pointer_etag=etag, writer="compact")


def _next_failures(previous: pd.DataFrame, redecided: frozenset[str], fresh: Sequence[dict], *, run_id: str,
                   now: datetime) -> pd.DataFrame:
    """Failures still standing: earlier ones not re-decided, plus the new ones
    (with attempts counted across runs while the bytes stay the same)."""
    # by the set's own hash lookups: pandas' isin of Arrow strings against 10M keys (a first
    # run's every key is re-decided) converts each to a scalar, minutes at 10M
    kept = previous[np.fromiter((key not in redecided for key in previous["key"]), bool, len(previous))]
    prior_attempts = {(k, e): int(a) for k, e, a in zip(previous["key"], previous["etag"], previous["attempts"],
                                                        strict=True)}
    rows = [dict(f, attempts=prior_attempts.get((f["key"], f["etag"]), 0) + 1, run_id=run_id, failed_at=now)
            for f in fresh]
    if not rows:
        return kept.reset_index(drop=True)
    return pd.concat([kept, pd.DataFrame(rows)], ignore_index=True).sort_values("key").reset_index(drop=True)


@dataclass
class IndexBuild:
    """A main index built whole (a compacted version)."""

    index: faiss.Index
    state: index_choice.IndexState
    recall: index_recall.RecallReport
    truth: index_recall.RecallTruth | None = None  # the held-out queries' exact neighbours (IVF kinds)
    rerank_dir: Path | None = None  # the re-rank files, to be written with the index (then removed)


@dataclass
class AppendedIndex:
    """The base's main index unchanged, with this version's delta segment and removed ids."""

    index: faiss_index.Segments
    recall: index_recall.RecallReport
    truth: index_recall.RecallTruth | None


def _write_index(store: ObjectStore, built: IndexBuild, version: int, run_id: str,
                 written: dict[str, FileRecord]) -> dict:
    """Write a new main index (its re-rank files, its recall truth) and return the manifest fields that describe it."""
    key = layout.index_key(version, run_id)
    # through a file and a memory map, not faiss' in-memory serialisation: a 10M x 128
    # IVF index is 5 GB, and a second copy of it in RAM is what ran a 10M build out of memory
    with tempfile.TemporaryDirectory(prefix="batchsight-index-") as tmp:
        faiss.write_index(built.index, str(Path(tmp) / "main.faiss"))
        written[key] = _put_file(store, key, Path(tmp) / "main.faiss")
    rerank = (None, None)
    if built.rerank_dir is not None:
        rerank = layout.rerank_keys(version, run_id)
        for rerank_key, name in zip(rerank, (RERANK_IDS_FILE, RERANK_VECTORS_FILE), strict=True):
            written[rerank_key] = _put_file(store, rerank_key, built.rerank_dir / name)
    truth_key = _put_truth(store, built.truth, version, run_id, written)
    return {"index": key, "index_type": built.state.kind, "index_factory": built.state.factory,
            "index_trained_n": built.state.trained_n, "index_nlist": built.state.nlist,
            "index_rerank_ids": rerank[0], "index_rerank": rerank[1], "index_delta": None, "index_removed": None,
            "index_truth": truth_key} | _recall_fields(built.recall)


def _write_segments(store: ObjectStore, appended: AppendedIndex, version: int, run_id: str,
                    written: dict[str, FileRecord]) -> dict:
    """Write the delta segment and the removed ids (the main index and its re-rank files are the base's)."""
    delta_key, removed_key, _ = layout.index_segment_keys(version, run_id)
    segments = appended.index
    fields = {"index_delta": None, "index_removed": None,
              "index_truth": _put_truth(store, appended.truth, version, run_id, written)}
    if segments.delta is not None:
        written[delta_key] = put_recorded(store, delta_key, faiss_index.serialize(segments.delta))
        fields["index_delta"] = delta_key
    if len(segments.removed):
        sink = io.BytesIO()
        np.save(sink, segments.removed)
        written[removed_key] = put_recorded(store, removed_key, sink.getvalue())
        fields["index_removed"] = removed_key
    return fields | _recall_fields(appended.recall)


def _put_truth(store: ObjectStore, truth: index_recall.RecallTruth | None, version: int, run_id: str,
               written: dict[str, FileRecord]) -> str | None:
    if truth is None:
        return None
    key = layout.index_segment_keys(version, run_id)[2]
    written[key] = put_recorded(store, key, truth.to_bytes())
    return key


def _recall_fields(recall: index_recall.RecallReport) -> dict:
    return {"index_nprobe": recall.nprobe, "index_recall_at_10": recall.recall_at_10,
            "index_recall_target": recall.target, "index_recall_queries": recall.queries,
            "index_rerank_factor": recall.rerank_factor}


def _put_file(store: ObjectStore, key: str, path: Path) -> FileRecord:
    """`put_recorded` of a local file through a memory map (a 4 GB re-rank file is
    never copied into memory by us; the map's pages are the page cache's)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            return put_recorded(store, key, view)
        finally:
            view.release()


def _appended_index(store: ObjectStore, carried: Catalog, gone: pa.Table, new_parts: Mapping[str, FileRecord | None],
                    n: int, *, settings: index_choice.IndexSettings) -> AppendedIndex:
    """The base's main index as it is, the ids that left it recorded apart, and the
    new vectors in the delta segment (with the ids that left it removed); then recall
    measured against the kept truth, updated by what left and what came, and nprobe tuned."""
    base = carried.index
    gone_ids = gone["image_id"].to_numpy().astype(np.int64)
    in_delta = base.in_delta(gone_ids)
    delta = carried.load_delta() or faiss_index.new_delta(base.d)
    removed = faiss_index.remove_ids(delta, gone_ids[in_delta])
    assert removed == int(in_delta.sum()), f"the delta held {removed} of {int(in_delta.sum())} vectors to remove"
    new_blocks = _PartVectors(store, new_parts)
    for ids, vectors in new_blocks:
        faiss_index.add_vectors(delta, ids, vectors)
    segments = faiss_index.Segments(base.main, delta, np.concatenate([base.removed, gone_ids[~in_delta]]))
    assert len(segments.removed) == len(base.removed) + int((~in_delta).sum()), "an id left the main index twice"
    assert segments.ntotal == n, f"the index holds {segments.ntotal} vectors for {n} rows"
    truth = None
    recall = index_recall.RecallReport(recall_at_10=1.0, nprobe=0, queries=0, target=settings.recall_target)
    if faiss_index.is_ivf(segments):
        truth = carried.recall_truth().updated(gone_ids, new_blocks)
        recall = index_recall.measure_recall_against(segments, truth, target=settings.recall_target,
                                                    rerank=carried.rerank, start_nprobe=carried.manifest.index_nprobe,
                                                    start_rerank_factor=carried.manifest.index_rerank_factor)
        _warn_below_target(recall, n, base.d, settings)
    return AppendedIndex(index=segments, recall=recall, truth=truth)


class _PartVectors:
    """Re-iterable (ids, vectors) of every vector in some embeddings parts."""

    def __init__(self, store: ObjectStore, parts: Mapping[str, FileRecord | None]) -> None:
        self.store, self.parts = store, parts

    def __iter__(self):
        for part, record in self.parts.items():
            for ids, _runs, vectors in read_embedding_batches(self.store, part, record):
                yield ids, vectors


def _warn_below_target(recall: index_recall.RecallReport, n: int, dim: int, settings: index_choice.IndexSettings) -> None:
    if recall.recall_at_10 >= settings.recall_target:
        return
    stronger = index_choice.stronger_choice(n, dim, index_choice.choose_index(
        n, dim, settings.budget(), flat_max_vectors=settings.flat_max_vectors, rerank=settings.rerank),
        flat_max_vectors=settings.flat_max_vectors, rerank=settings.rerank)
    log.warning("index recall@10 %.3f misses the target %.2f within %s bytes; %s", recall.recall_at_10,
                settings.recall_target, f"{settings.budget():,}", index_choice.next_option_hint(stronger))


def _full_index(store: ObjectStore, previous: Catalog | None, images: pa.Table, gone: pa.Table,
                new_parts: Mapping[str, FileRecord | None], *, dim: int, settings: index_choice.IndexSettings,
                seed: int) -> IndexBuild:
    """A new main index holding every live vector: the previous one with its delta
    folded in and every removal applied while it still suits the catalogue, else
    one trained on a sample of the live vectors. Then the held-out queries' exact
    neighbours are found (one pass over the vectors), recall measured and nprobe tuned."""
    n = len(images)
    choice = index_choice.choose_index(n, dim, settings.budget(), flat_max_vectors=settings.flat_max_vectors,
                                      rerank=settings.rerank)
    reason = index_choice.retrain_reason(previous.manifest.index_state if previous else None, choice, n)
    part_files = {part: record for part, record in new_parts.items() if record}
    blocks = LiveEmbeddings(store, images, (previous.manifest.files if previous else {}) | part_files)
    rng = np.random.default_rng(seed)
    query_ids, train_ids = index_recall.split_sample(images["image_id"].to_numpy().astype(np.int64, copy=False),
                                                    min(index_recall.RECALL_QUERIES, n), choice, rng)
    if reason is None:
        index = previous.load_index()
        delta = faiss_index.Segments(index, previous.load_delta(), previous.removed_ids())
        gone_ids = gone["image_id"].to_numpy().astype(np.int64)
        in_delta = delta.in_delta(gone_ids)
        leaving_main = np.union1d(delta.removed, gone_ids[~in_delta])
        removed = faiss_index.remove_ids(index, leaving_main)
        assert removed == len(leaving_main), f"index held {removed} of {len(leaving_main)} vectors to remove"
        delta_ids, delta_vectors = delta.delta_vectors()
        staying = ~np.isin(delta_ids, gone_ids)
        faiss_index.add_vectors(index, delta_ids[staying], delta_vectors[staying])
        del delta_vectors
        for ids, vectors in _PartVectors(store, {part: blocks.files.get(part) for part in new_parts}):
            faiss_index.add_vectors(index, ids, vectors)
        state = replace(previous.manifest.index_state, rerank=choice.rerank)
        queries = index_recall.gather_vectors(blocks, query_ids, dim) if state.kind != "flat" else None
    else:
        log.info("building a new %s index for %s vectors: %s", choice.factory, n, reason)
        queries = sample = None
        if choice.kind != "flat":  # one pass for the held-out queries and the training sample
            sample = index_recall.gather_vectors(blocks, np.concatenate([query_ids, train_ids]), dim)
            queries = sample[:len(query_ids)].copy()
        index = faiss_index.trained_index(choice, dim, None if sample is None else sample[len(query_ids):])
        del sample  # 2 GB at 1M x 2048-d: not held while every vector is added
        for ids, vectors in blocks:
            faiss_index.add_vectors(index, ids, vectors)
        state = index_choice.IndexState(kind=choice.kind, factory=choice.factory,
                                       trained_n=n if choice.kind != "flat" else 0, nlist=choice.nlist,
                                       rerank=choice.rerank)
    rerank = rerank_dir = None
    if state.rerank:  # written anew with each main index from the live vectors (one more pass over the parts)
        rerank_dir = Path(tempfile.mkdtemp(prefix="batchsight-rerank-"))
        try:
            faiss_index.write_rerank_vectors(blocks, n, dim, rerank_dir / RERANK_IDS_FILE,
                                             rerank_dir / RERANK_VECTORS_FILE)
            rerank = faiss_index.RerankVectors.open(rerank_dir / RERANK_IDS_FILE, rerank_dir / RERANK_VECTORS_FILE)
        except BaseException:
            shutil.rmtree(rerank_dir, ignore_errors=True)
            raise
    truth = None
    if queries is None:
        recall = index_recall.RecallReport(recall_at_10=1.0, nprobe=0, queries=0, target=settings.recall_target)
    else:
        truth = index_recall.RecallTruth.exact(queries, query_ids, blocks)
        recall = index_recall.measure_recall_against(index, truth, target=settings.recall_target, rerank=rerank)
        _warn_below_target(recall, n, dim, settings)
    return IndexBuild(index=index, state=state, recall=recall, truth=truth, rerank_dir=rerank_dir)


def build_next_version(store: ObjectStore, previous: Catalog | None, plan: ChangePlan,
                       shard_results: Sequence[ShardResult], *, run_id: str, source: str, model: str,
                       weights: str, weights_source: str, weights_sha256: str, embedding_dim: int,
                       reembed_all: bool, index_settings: index_choice.IndexSettings | None = None,
                       categorizer: str | None = None) -> tuple[Manifest, BuildStats]:
    """One run's changes to the previous version, written by the one builder of
    versions (`tasks.build_version`); not yet committed."""
    deferred, deleted = {o.key for o in plan.deferred}, set(plan.deleted)
    change = VersionChange(
        provenance=Provenance(source=source, model=model, weights=weights, weights_source=weights_source,
                              weights_sha256=weights_sha256, embedding_dim=embedding_dim, categorizer=categorizer),
        from_scratch=reembed_all,
        removed_keys=frozenset({o.key for o in plan.changed} | deferred | deleted),
        new_rows=[r.rows for r in shard_results],
        new_parts={r.embedding_part: r.part_file for r in shard_results if r.embedding_part is not None},
        new_files={r.thumbnail_part: r.thumbnail_file for r in shard_results if r.thumbnail_part is not None},
        index=index_settings or index_choice.IndexSettings(),
        redecided=frozenset({o.key for o in plan.to_process} | deferred | deleted),
        new_failures=[f for r in shard_results for f in r.failures])
    parent = Pointer(previous.manifest.version, previous.manifest_key) if previous else None
    return build_version(store, previous, change, parent=parent, run_id=run_id)


def rollback(store: ObjectStore, to_version: int) -> Manifest:
    """Make an earlier version live again, as a new version (history stays linear
    and auditable; the next nightly run diffs against the restored content).

    Works when the live version is damaged, `CURRENT` included: the target is then
    found among the manifests, and its files are checked before it goes live."""
    try:
        data, etag = store.get_with_etag(POINTER_KEY)
    except ObjectNotFound:
        raise CatalogError(f"no catalogue at {store.url}; nothing to roll back") from None
    try:
        pointer: Pointer | None = parse_pointer(store, data)
    except CatalogCorrupt as exc:
        log.warning("%s", exc)
        pointer = None
    if pointer is not None and to_version == pointer.version:
        raise CatalogError(f"version {to_version} is already live at {store.url}")
    target_key = find_version(store, to_version, start=pointer.manifest if pointer else None)
    target = read_manifest(store, target_key)
    problems = check_sizes(store, target)
    if problems:
        raise CatalogCorrupt(f"version {to_version} is damaged too ({'; '.join(problems[:3])}); "
                             "roll back to an earlier one")
    # The restored version is the target's files unchanged, after the live one
    # (or, with CURRENT damaged, after the newest manifest listed).
    parent = pointer or Pointer(newest_listed_version(store), target_key)
    return make_version(store, Catalog(store, target, target_key),
                                 VersionChange(rolled_back_from=to_version), parent=parent,
                                 pointer_etag=etag, writer="rollback")
