"""The write stage: each embedded batch becomes `images` rows, a row group of the
shard's embeddings part and thumbnails; at the end the parts are written and
the shard's result (`ShardResult`: rows, failures, the parts' keys and
checksums, stage times) goes back to the flow. Vectors go into the part batch
by batch and are not kept, so a shard holds its compressed part, not its raw
vectors; rows are kept column by column and become one table at the end.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa

from models.categorizer import Categorizer
from models.engine import embedders_built
from tasks.catalog import layout, tables
from tasks.catalog.manifest import crash_point, put_recorded
from tasks.records import ImageFailure, ObjectInfo, ShardResult, StageTimes
from tasks.shard.contents import KnownContents, VectorsOf
from tasks.shard.embed import Embedded
from tasks.shard.inputs import Pages
from tasks.storage import ObjectStore


class ThumbnailsPart:
    """The thumbnails of a shard's rows, gathered batch by batch (a few KB each)
    and written as one part (`tables.THUMBNAILS_SCHEMA`) beside its embeddings part."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.ids: list[int] = []
        self.blobs: list[bytes] = []

    def add(self, image_ids: np.ndarray, blobs: Sequence[bytes | None]) -> list[str | None]:
        """Keep the thumbnails made; returns each row's `thumbnail_part` (None where none was made)."""
        out: list[str | None] = [None] * len(image_ids)
        for i, (image_id, blob) in enumerate(zip(image_ids.tolist(), blobs, strict=True)):
            if blob is not None:
                self.ids.append(image_id)
                self.blobs.append(blob)
                out[i] = self.key
        return out

    def finish(self) -> bytes:
        return tables.to_parquet_bytes(pa.table({"image_id": self.ids, "thumbnail": self.blobs},
                                                schema=tables.THUMBNAILS_SCHEMA))


class ShardWriter:
    """Rows, vectors and thumbnails of one shard's embedded batches; `finish` writes
    the parts under `output` and returns the shard's `ShardResult`."""

    def __init__(self, output: ObjectStore, *, shard: int, run_id: str, part_key: str, labels: Sequence[str],
                 model: str, weights_sha256: str, dim: int, categorizer: Categorizer | None = None,
                 known: KnownContents | None = None) -> None:
        self.output, self.shard, self.run_id, self.part_key = output, shard, run_id, part_key
        self.labels = np.asarray(labels, dtype=object)
        self.model, self.weights_sha256, self.categorizer = model, weights_sha256, categorizer
        self.part = tables.EmbeddingsPartWriter(run_id, dim)
        self.thumbnails = ThumbnailsPart(layout.thumbnails_part_key(part_key))
        self.columns: dict[str, list] = {}
        self.failures: list[ImageFailure] = []
        self.times = StageTimes()
        self.write_s = 0.0
        self.started_at = time.time()
        self.first_batch_at = 0.0
        self.known = known
        self.copied = 0  # objects whose rows and vectors came from identical bytes, with no model pass
        # what copies of embedded bytes need of each batch: sizes, vectors, classes (never its pixels or bytes)
        self._batches: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._embedded: dict[str, dict[int, tuple[int, int]]] = {}  # content -> page -> (batch, row) in `_batches`
        self._complete: set[str] = set()  # contents whose object's every page is in `_embedded`
        self._pending: dict[str, list[ObjectInfo]] = {}  # copies met before their original was written
        self._copies: list[tuple] = []  # copies resolved, waiting to be written together
        self._failed: dict[str, ImageFailure] = {}  # content -> the failure of the object first read with it
        self._content_of: dict[str, str] = {}  # key -> content, for objects read
        self._vectors = VectorsOf()

    def write(self, batch: Embedded) -> None:
        t0 = time.perf_counter()
        self._content_of.update(batch.contents)
        self.failures += batch.failures
        for f in batch.failures:
            if f.key in self._content_of:
                content = self._content_of[f.key]
                self._failed.setdefault(content, f)
                for info in self._pending.pop(content, []):
                    self._copy(info, content)
        self.times.add(StageTimes(fetch=batch.fetch_s, decode=batch.decode_s, model=batch.model_s))
        if len(batch.pages):
            self.first_batch_at = self.first_batch_at or time.time()
            self._add(batch.pages, batch.embeddings, batch.class_ids, batch.class_probs, remember=True)
        for info, content in zip(batch.copies.infos, batch.copies.content, strict=True):
            self._copy(info, content)
        self._flush_copies()
        self.write_s += time.perf_counter() - t0

    def _add(self, pages: Pages, embeddings: np.ndarray, class_ids: np.ndarray, class_probs: np.ndarray, *,
             remember: bool) -> None:
        """Rows and vectors of `pages`, in order; with `remember`, kept by content for copies of the same bytes."""
        n = len(pages)
        ids = np.fromiter((tables.image_id_for(info.key, page) for info, page in
                           zip(pages.infos, pages.page.tolist(), strict=True)), np.int64, n)
        labels = self.labels[class_ids]
        columns = {
            "image_id": ids, "key": [i.key for i in pages.infos], "page": pages.page,
            "etag": [i.etag for i in pages.infos], "size": np.fromiter((i.size for i in pages.infos), np.int64, n),
            "content_sha256": pages.content or [None] * n,
            "width": pages.size[:, 0], "height": pages.size[:, 1], "top_class": labels[:, 0],
            "top_prob": class_probs[:, 0].astype(np.float64), "class_ids": class_ids.tolist(),
            "class_labels": labels.tolist(), "class_probs": class_probs.tolist(),
            "thumbnail_part": self.thumbnails.add(ids, pages.thumbnails or [None] * n),
        }
        if self.categorizer is not None:
            columns["category"], columns["category_confidence"] = self.categorizer.predict(embeddings)
        for name, values in columns.items():
            self.columns.setdefault(name, []).append(values)
        self.part.write(ids, embeddings)
        if remember and pages.content:
            b = len(self._batches)
            self._batches.append((pages.size, embeddings, class_ids, class_probs))
            for i, (content, page) in enumerate(zip(pages.content, pages.page.tolist(), strict=True)):
                self._embedded.setdefault(content, {})[page] = (b, i)
            for i in np.flatnonzero(pages.last):  # an object whose last page is in: its copies can have its rows
                self._complete.add(pages.content[i])
                for info in self._pending.pop(pages.content[i], []):
                    self._copy(info, pages.content[i])

    def _copy(self, info: ObjectInfo, content: str) -> None:
        """An object whose bytes were embedded before, in this shard or in a catalogue
        this run builds on: its rows under its own key, with those vectors."""
        if content in self._complete:
            where = self._embedded[content]
            numbers = sorted(where)
            picks = [where[p] for p in numbers]
            sizes = [tuple(self._batches[b][0][i]) for b, i in picks]
            vectors, ids, probs = (np.stack([self._batches[b][k][i] for b, i in picks]) for k in (1, 2, 3))
        elif self.known is not None and (rows := self.known.rows_of(content)) is not None:
            numbers, sizes = rows.page.tolist(), [tuple(s) for s in rows.size]
            vectors, ids, probs = self._vectors.get(rows), rows.class_ids, rows.class_probs
        elif content in self._failed:
            original = self._failed[content]
            self.failures.append(ImageFailure(info.key, info.etag, info.size, original.stage, original.error_type,
                                              original.message))
            return
        else:  # its original is still on its way through the model: it follows when that is written
            self._pending.setdefault(content, []).append(info)
            return
        n = len(numbers)
        pages = Pages([info] * n, np.asarray(numbers, np.int32), np.asarray(sizes, np.int32).reshape(-1, 2),
                      np.arange(n) == n - 1, [None] * n, content=[content] * n)
        self._copies.append((pages, vectors, np.asarray(ids), np.asarray(probs)))
        self.copied += 1

    def _flush_copies(self) -> None:
        """The copies resolved since the last flush, as one row group of the part (not one each)."""
        if not self._copies:
            return
        pages, vectors, ids, probs = zip(*self._copies, strict=True)
        self._copies.clear()
        self._add(Pages.concat(list(pages)), np.concatenate(vectors), np.concatenate(ids), np.concatenate(probs),
                  remember=False)

    def rows(self) -> pd.DataFrame:
        """The shard's `images` rows, in the order of its part's vectors."""
        if not self.columns:
            return tables.empty_frame(tables.IMAGES_SCHEMA)
        data = {name: np.concatenate(values) if isinstance(values[0], np.ndarray) else
                [v for chunk in values for v in chunk] for name, values in self.columns.items()}
        n = len(data["image_id"])
        frame = pd.DataFrame(data | {"model": [self.model] * n, "weights_sha256": [self.weights_sha256] * n,
                                     "run_id": [self.run_id] * n, "processed_at": [datetime.now(UTC)] * n,
                                     "embedding_part": [self.part_key] * n})
        return frame[[c for c in tables.IMAGES_SCHEMA.names if c in frame]]

    def close(self) -> None:
        """Let go of what a shard that failed held (the part's writer thread)."""
        self.part.close()

    def finish(self, *, load_s: float, batch_size: int, wait_s: float) -> ShardResult:
        t0 = time.perf_counter()
        for content, infos in self._pending.items():  # a prefix matched, not the digest (about 1 in 10^13)
            self.failures += [ImageFailure(info.key, info.etag, info.size, "fetch", "content_lookup",
                                           f"its sha256 {content[:16]}... matched a known prefix, not a known "
                                           "digest; it is read again on the next run") for info in infos]
        self._pending.clear()
        thumbnail_file = put_recorded(self.output, self.thumbnails.key, self.thumbnails.finish()) \
            if self.thumbnails.ids else None
        if self.part.rows:
            part_key, part_file = self.part_key, put_recorded(self.output, self.part_key, self.part.finish())
            crash_point(f"after-shard-{self.shard}")
        else:
            part_key, part_file = None, None
        rows = self.rows()
        self.times.wait = wait_s
        # `times` also carries the batch size the shard ended with, and when (epoch
        # seconds) it started, embedded its first batch and ended, for the run summary.
        times = self.times.as_dict() | {"write_s": self.write_s + time.perf_counter() - t0, "load_s": load_s,
                                        "batch_size": float(batch_size), "started_at": self.started_at,
                                        "first_batch_at": self.first_batch_at, "ended_at": time.time()}
        return ShardResult(shard=self.shard, rows=rows, embedding_part=part_key,
                           failures=[asdict(f) for f in self.failures], times=times, part_file=part_file,
                           thumbnail_part=self.thumbnails.key if thumbnail_file else None,
                           thumbnail_file=thumbnail_file, ran_on=f"{socket.gethostname()}:{os.getpid()}",
                           model_loads=embedders_built(), copied=self.copied)
