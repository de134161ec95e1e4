"""Parquet schemas and (de)serialisation of the catalogue's tables.

Column meanings are documented in the README ("Reading the tables"); the
schemas here are the single source of truth for names and types.
"""

from __future__ import annotations

import hashlib
import io
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("key", pa.string()),
    ("page", pa.int32()),  # 1-based; every page of a PDF or multi-page TIFF is its own row
    ("etag", pa.string()),
    ("size", pa.int64()),
    ("content_sha256", pa.string()),  # of the object's bytes: its vector is reused for other keys with them
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("top_class", pa.string()),
    ("top_prob", pa.float32()),
    ("class_ids", pa.list_(pa.int32())),
    ("class_labels", pa.list_(pa.string())),
    ("class_probs", pa.list_(pa.float32())),
    ("category", pa.string()),
    ("category_confidence", pa.float32()),
    ("model", pa.string()),
    ("weights_sha256", pa.string()),
    ("run_id", pa.string()),
    ("processed_at", pa.timestamp("ms", tz="UTC")),
    ("embedding_part", pa.string()),
    ("thumbnail_part", pa.string()),  # null: made on first view (older catalogues, JPEGs decoded on a GPU)
])

THUMBNAILS_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("thumbnail", pa.binary()),  # WebP
])

FAILURES_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("etag", pa.string()),
    ("size", pa.int64()),
    ("stage", pa.string()),
    ("error_type", pa.string()),
    ("message", pa.string()),
    ("attempts", pa.int32()),
    ("run_id", pa.string()),
    ("failed_at", pa.timestamp("ms", tz="UTC")),
])

RUNS_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("status", pa.string()),  # committed | no_changes | failed
    ("version", pa.int64()),
    ("started_at", pa.timestamp("ms", tz="UTC")),
    ("finished_at", pa.timestamp("ms", tz="UTC")),
    ("source", pa.string()),
    ("model", pa.string()),
    ("weights_sha256", pa.string()),
    ("listed", pa.int64()),
    ("new", pa.int64()),
    ("changed", pa.int64()),
    ("deleted", pa.int64()),
    ("unchanged", pa.int64()),
    ("processed", pa.int64()),
    ("failed", pa.int64()),
    ("images_per_s", pa.float64()),
    ("elapsed_s", pa.float64()),
    ("fetch_s", pa.float64()),
    ("decode_s", pa.float64()),
    ("model_s", pa.float64()),
    ("wait_s", pa.float64()),
    ("write_s", pa.float64()),
    ("index_s", pa.float64()),
    ("compile_s", pa.float64()),
    ("message", pa.string()),
])


def image_id_for(key: str, page: int = 1) -> int:
    """A stable, non-negative 63-bit id for a key's page (FAISS ids are int64).
    Page 1 hashes the bare key, so an image's id never depends on page handling.
    A key holding a byte that is not UTF-8 (a lone surrogate from a file name)
    hashes that byte; every valid key hashes as plain UTF-8."""
    name = key if page == 1 else f"{key}#page={page}"
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest(),
                          "big") & ((1 << 63) - 1)


def parquet_write_options(schema: pa.Schema) -> dict:
    """How every table is written: zstd, dictionary encoding for columns that are
    not floats, statistics; vectors (`VECTORS`) plain, uncompressed, without
    statistics. A dictionary over vector floats never pays: Arrow builds a hash
    table of every value, overflows the dictionary page and falls back to plain
    encoding (measured on 256-row batches of 2048-d vectors: 344 us a row with it
    against 82 without, and the part 32% smaller, 0.83 against 0.57 of the raw
    bytes). Zstd over model features saves little (0.93 of the raw bytes on dense
    ResNet-50 features, 0.57 on half-zero ones) and cost 44 of the 50 us a row took
    to write on the shard's one thread. The min and max of a page of vector floats
    serve no reader and cost 4 of the 18 us a row left (14.3 without)."""

    def leaf(name: str, kind: pa.DataType) -> tuple[str, pa.DataType]:  # Parquet's path to a list's values
        while pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind):
            name, kind = f"{name}.list.element", kind.value_type
        return name, kind

    leaves = [leaf(f.name, f.type) for f in schema]
    return {"compression": {path: "none" if path in VECTORS else "zstd" for path, _ in leaves},
            "use_dictionary": [path for path, kind in leaves if not pa.types.is_floating(kind)],
            "write_statistics": [path for path, _ in leaves if path not in VECTORS]}


VECTORS = ("embedding.list.element",)  # Parquet paths of vector floats


def to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **parquet_write_options(table.schema))
    return sink.getvalue()


# Columns with a value shared by many rows (a run's id, a shard's part), read as
# dictionaries when a few columns of every live row are read (10M rows: 40 MB, not 600)
FEW_VALUES = ("run_id", "embedding_part", "thumbnail_part")


def read_parquet_bytes(data: bytes, columns: Sequence[str] | None = None) -> pa.Table:
    """A Parquet file, or just `columns` of it (a column an older file lacks comes back null)."""
    if columns is None:
        return pq.read_table(io.BytesIO(data))
    file = pq.ParquetFile(io.BytesIO(data), read_dictionary=[c for c in columns if c in FEW_VALUES])
    have = set(file.schema_arrow.names)
    table = file.read(columns=[c for c in columns if c in have])
    for name in columns:
        if name not in have:
            kind = next((s.field(name).type for s in (IMAGES_SCHEMA, FAILURES_SCHEMA) if name in s.names), pa.string())
            table = table.append_column(name, pa.nulls(len(table), kind))
    return table.select(list(columns))


def without_rows(rows: pa.Table, deletes: pa.Table, identity: Sequence[str]) -> pa.Table:
    """`rows` less those whose `identity` columns match a row of `deletes`, in their
    order. Deletes are few: rows are first narrowed by the first identity column,
    then matched whole among those candidates only."""
    if not len(deletes) or not len(rows):
        return rows
    first = identity[0]
    kind = rows.schema.field(first).type
    value_set = deletes[first].combine_chunks().cast(kind.value_type if pa.types.is_dictionary(kind) else kind)
    candidates = np.flatnonzero(pc.is_in(rows[first], value_set=value_set).to_numpy(zero_copy_only=False))
    if not len(candidates):
        return rows
    near = rows.take(candidates).select(list(identity)).to_pandas()
    for column in identity:
        near[column] = near[column].astype(object)
    gone = deletes.select(list(identity)).to_pandas().astype(object).drop_duplicates().assign(_gone=True)
    matched = near.merge(gone, on=list(identity), how="left")["_gone"].fillna(False).to_numpy(bool)
    keep = np.ones(len(rows), bool)
    keep[candidates[matched]] = False
    return rows.filter(pa.array(keep))


def frame_to_table(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """Conform a DataFrame to `schema` (missing nullable columns become nulls)."""
    columns = {}
    for f in schema:
        if f.name in frame.columns:
            columns[f.name] = _arrow_column(frame[f.name], f.type)
        else:
            columns[f.name] = pa.nulls(len(frame), type=f.type)
    return pa.table(columns, schema=schema)


def _arrow_column(series: pd.Series, kind: pa.DataType) -> pa.Array:
    """A column straight from its numpy data (10M rows: 0.2 s, where a detour
    through Python objects took 19 s); timestamps are truncated to the schema's
    unit; objects Arrow cannot take as they are go through Python values."""
    try:
        if pa.types.is_timestamp(kind):
            return pa.array(series, from_pandas=True).cast(kind, safe=False)
        return pa.array(series, type=kind, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return pa.array(series.tolist(), type=kind, from_pandas=True)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` as `schema` says: its columns in order and cast, null where it has none
    (a part written before a column existed)."""
    return pa.table([table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
                     for f in schema], schema=schema)


def table_to_frame(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas()


def empty_frame(schema: pa.Schema) -> pd.DataFrame:
    return schema.empty_table().to_pandas()


def embeddings_table(image_ids: np.ndarray, run_id: str, vectors: np.ndarray) -> pa.Table:
    """image_id, run_id, embedding as fixed_size_list<float32>[D] (zero-copy from numpy)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    return pa.table({
        "image_id": pa.array(image_ids, type=pa.int64()),
        "run_id": pa.array([run_id] * len(image_ids), type=pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
    })


EMBEDDING_READ_ROWS = 1024


class EmbeddingsPartWriter:
    """An embeddings part written a batch at a time (a row group each) into an
    in-memory Parquet file, on a thread of its own: Arrow encodes into its own
    buffer without the GIL, so a batch is written while the shard's thread works
    on the next (at most `QUEUED` batches wait). A batch's vectors are dropped
    once written."""

    QUEUED = 2

    def __init__(self, run_id: str, dim: int) -> None:
        self.run_id = run_id
        self.rows = 0
        self._sink = pa.BufferOutputStream()
        schema = embeddings_table(np.empty(0, np.int64), run_id, np.empty((0, dim), np.float32)).schema
        self._writer = pq.ParquetWriter(self._sink, schema, **parquet_write_options(schema))
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="batchsight-part")
        self._queued: deque[Future[None]] = deque()

    def write(self, image_ids: np.ndarray, vectors: np.ndarray) -> None:
        self._queued.append(self._thread.submit(self._writer.write_table,
                                                embeddings_table(image_ids, self.run_id, vectors)))
        self.rows += len(image_ids)
        while len(self._queued) > self.QUEUED:
            self._queued.popleft().result()

    def finish(self) -> memoryview:
        """The whole part; the writer's thread ends."""
        try:
            while self._queued:
                self._queued.popleft().result()
            self._writer.close()
            return memoryview(self._sink.getvalue())
        finally:
            self.close()

    def close(self) -> None:
        """End the writer's thread (a shard that failed: its part is never finished)."""
        self._thread.shutdown(wait=True, cancel_futures=True)


def iter_embedding_batches(data: bytes, rows: int = EMBEDDING_READ_ROWS
                           ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image_ids, run_ids, vectors) of an embeddings part, `rows` at a time, so
    reading a part back never holds more than one batch of decoded vectors."""
    for batch in pq.ParquetFile(io.BytesIO(data)).iter_batches(batch_size=rows):
        yield embeddings_from_table(pa.Table.from_batches([batch]))


def embeddings_from_table(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image_ids, run_ids, vectors float32 [N, D]) from an embeddings part."""
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    vectors = col.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
    ids = table.column("image_id").to_numpy()
    runs = np.asarray(table.column("run_id").to_pylist(), dtype=object)
    return ids, runs, vectors
