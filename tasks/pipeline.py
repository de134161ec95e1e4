"""Inside one shard: a bounded streaming pipeline.

Fetch + decode + resize run in a thread pool (S3 GETs wait on the network;
Pillow releases the GIL while decoding and resizing), the model runs on the
calling thread, and at most `max_in_flight` images are held at once, so memory
does not grow with the shard size.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from models.engine import Embedder, EmbedderSettings, default_batch_size, get_embedder
from tasks import tables
from tasks.catalog import ShardResult, crash_point
from tasks.decode import DecodeError, decode_image
from tasks.storage import ObjectInfo, ObjectStore, cached_store

log = logging.getLogger(__name__)


class ProgressReporter(Protocol):
    def start(self, total: int) -> None: ...
    def advance(self, n: int) -> None: ...


# Set by the CLI around a run; Prefect copies the context into its task threads,
# so shards report to the terminal's progress bar without a global.
_progress: ContextVar[ProgressReporter | None] = ContextVar("batchsight_progress", default=None)


def current_progress() -> ProgressReporter | None:
    return _progress.get()


@contextmanager
def reporting_progress(reporter: ProgressReporter | None) -> Iterator[None]:
    token = _progress.set(reporter)
    try:
        yield
    finally:
        _progress.reset(token)


@dataclass
class StageTimes:
    """Seconds spent per stage, summed over worker threads (fetch, decode) or
    wall time on the model thread (model, wait)."""

    fetch: float = 0.0
    decode: float = 0.0
    model: float = 0.0
    wait: float = 0.0  # model thread idle, waiting for decoded images

    def add(self, other: StageTimes) -> None:
        self.fetch += other.fetch
        self.decode += other.decode
        self.model += other.model
        self.wait += other.wait

    def as_dict(self) -> dict[str, float]:
        return {"fetch_s": self.fetch, "decode_s": self.decode, "model_s": self.model, "wait_s": self.wait}


@dataclass(frozen=True)
class ImageFailure:
    key: str
    etag: str
    size: int
    stage: str  # fetch | decode | model
    error_type: str
    message: str


@dataclass
class ProcessedBatch:
    """Rows of one model batch: `records[i]` owns `embeddings[i]`."""

    records: list[tuple[ObjectInfo, int, int]]  # (object, original width, height)
    embeddings: np.ndarray
    class_ids: np.ndarray
    class_probs: np.ndarray


@dataclass
class _Prepared:
    info: ObjectInfo
    tensor: torch.Tensor | None  # uint8 CHW, resized and cropped
    jpeg: bytes | None  # raw JPEG left for decoding on the model's device
    width: int
    height: int
    failure: ImageFailure | None
    fetch_s: float
    decode_s: float


@dataclass
class ShardOutput:
    batches: list[ProcessedBatch] = field(default_factory=list)
    failures: list[ImageFailure] = field(default_factory=list)
    times: StageTimes = field(default_factory=StageTimes)


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _prepare(store: ObjectStore, info: ObjectInfo, embedder: Embedder, decode_on_device: bool) -> _Prepared:
    t0 = time.perf_counter()
    try:
        data = store.get(info.key)
    except Exception as exc:  # network and permission errors are per-object failures
        return _Prepared(info, None, None, 0, 0, ImageFailure(info.key, info.etag, info.size, "fetch",
                                                              type(exc).__name__, str(exc)), time.perf_counter() - t0, 0.0)
    t1 = time.perf_counter()
    if decode_on_device and _is_jpeg(data):
        return _Prepared(info, None, data, 0, 0, None, t1 - t0, 0.0)
    try:
        decoded = decode_image(data, min_side=embedder.preprocessing.resize_size)
        tensor = embedder.preprocess(decoded.image)
    except DecodeError as exc:
        failure = ImageFailure(info.key, info.etag, info.size, "decode", exc.reason, exc.message)
        return _Prepared(info, None, None, 0, 0, failure, t1 - t0, time.perf_counter() - t1)
    return _Prepared(info, tensor, None, decoded.width, decoded.height, None, t1 - t0, time.perf_counter() - t1)


def _decode_jpegs_on_device(batch: list[_Prepared], embedder: Embedder) -> list[_Prepared]:
    """Decode the batch's raw JPEGs with nvJPEG (torchvision.io.decode_jpeg on the
    model's device), then resize and crop there. A JPEG the device decoder
    refuses goes back through the CPU decoder, which gives the failure its reason."""
    raw = [p for p in batch if p.jpeg is not None]
    if not raw:
        return batch
    device = embedder.device
    try:
        images = decode_jpeg([torch.frombuffer(bytearray(p.jpeg), dtype=torch.uint8) for p in raw],
                             mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:
        images = []
        for p in raw:
            try:
                images.append(decode_jpeg(torch.frombuffer(bytearray(p.jpeg), dtype=torch.uint8),
                                          mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
            except RuntimeError:
                images.append(None)
    out = []
    decoded = dict(zip((id(p) for p in raw), images, strict=True))
    for p in batch:
        if p.jpeg is None:
            out.append(p)
            continue
        image = decoded[id(p)]
        if image is None:
            try:
                cpu = decode_image(p.jpeg, min_side=embedder.preprocessing.resize_size)
            except DecodeError as exc:
                out.append(_Prepared(p.info, None, None, 0, 0, ImageFailure(
                    p.info.key, p.info.etag, p.info.size, "decode", exc.reason, exc.message), p.fetch_s, 0.0))
                continue
            out.append(_Prepared(p.info, embedder.preprocess(cpu.image), None, cpu.width, cpu.height, None,
                                 p.fetch_s, 0.0))
            continue
        height, width = image.shape[-2:]
        out.append(_Prepared(p.info, embedder.preprocess_tensor(image), None, width, height, None, p.fetch_s, 0.0))
    return out


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable[[ObjectInfo], _Prepared], items: Iterable[ObjectInfo],
                 max_in_flight: int) -> Iterator[_Prepared]:
    """`pool.map` in order, but never more than `max_in_flight` submitted and unconsumed."""
    pending: deque[Future[_Prepared]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= max_in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def default_io_workers() -> int:
    """Fetch/decode threads: enough to hide S3 latency, few enough that decoding
    does not crowd the model off the cores (Pillow holds no GIL while decoding)."""
    return max(4, 2 * (os.cpu_count() or 1))


def run_shard(items: list[ObjectInfo], store: ObjectStore, embedder: Embedder, *, batch_size: int | None = None,
              workers: int | None = None, decode_on_device: bool = False,
              on_progress: Callable[[int], None] | None = None) -> ShardOutput:
    """Fetch, decode, batch and embed `items`; a bad image becomes an `ImageFailure`
    and never stops the rest of its batch."""
    batch_size = batch_size or default_batch_size(embedder.device.type)
    out = ShardOutput()
    batch: list[_Prepared] = []
    pin = embedder.device.type == "cuda"

    def flush() -> None:
        if not batch:
            return
        t0 = time.perf_counter()
        ready = _decode_jpegs_on_device(batch, embedder) if decode_on_device else batch
        for p in ready:
            if p.failure is not None:
                out.failures.append(p.failure)
        ready = [p for p in ready if p.failure is None]
        batch.clear()
        if not ready:
            return
        tensors = torch.stack([p.tensor for p in ready])
        if pin and tensors.device.type == "cpu":
            tensors = tensors.pin_memory()  # lets the host-to-device copy run without blocking
        try:
            result = embedder.embed(tensors, pad_to=batch_size)
        except RuntimeError as exc:
            # A model error on a whole batch (out of memory, say) is retried one by
            # one so a single poison input cannot take its neighbours down with it.
            if len(ready) == 1:
                p = ready[0]
                out.failures.append(ImageFailure(p.info.key, p.info.etag, p.info.size, "model", type(exc).__name__, str(exc)))
                return
            log.warning("batch of %s failed in the model (%s); retrying image by image", len(ready), exc)
            for p in ready:
                batch.append(p)
                flush()
            return
        out.times.model += time.perf_counter() - t0
        out.batches.append(ProcessedBatch([(p.info, p.width, p.height) for p in ready],
                                          result.embeddings, result.class_ids, result.class_probs))
        if on_progress:
            on_progress(len(ready))

    with ThreadPoolExecutor(max_workers=workers or default_io_workers(), thread_name_prefix="batchsight-io") as pool:
        stream = _bounded_map(pool, lambda info: _prepare(store, info, embedder, decode_on_device), items,
                              max_in_flight=2 * batch_size + 8)
        while True:
            t_wait = time.perf_counter()
            prepared = next(stream, None)
            out.times.wait += time.perf_counter() - t_wait
            if prepared is None:
                break
            out.times.fetch += prepared.fetch_s
            out.times.decode += prepared.decode_s
            if prepared.failure is not None:
                out.failures.append(prepared.failure)
                if on_progress:
                    on_progress(1)
                continue
            batch.append(prepared)
            if len(batch) >= batch_size:
                flush()
        flush()
    return out


@dataclass(frozen=True)
class ShardSpec:
    """Everything a worker needs to process one shard; plain data, so it travels
    to a Dask worker as easily as to a thread."""

    index: int
    items: tuple[ObjectInfo, ...]
    source: str
    output: str
    run_id: str
    embedder: EmbedderSettings
    batch_size: int | None = None  # None: default_batch_size for the device
    workers: int | None = None  # None: default_io_workers()
    decode_on_device: bool = False
    compile: bool = False
    endpoint_url: str | None = None


def process_shard(spec: ShardSpec, *, on_progress: Callable[[int], None] | None = None) -> ShardResult:
    """Run one shard end to end and write its embeddings part; returns the rows."""
    source = cached_store(spec.source, spec.endpoint_url)
    output = cached_store(spec.output, spec.endpoint_url, create=True)
    embedder = get_embedder(spec.embedder)
    if spec.compile:
        embedder.enable_compile()
    out = run_shard(list(spec.items), source, embedder, batch_size=spec.batch_size, workers=spec.workers,
                    decode_on_device=spec.decode_on_device, on_progress=on_progress)

    t0 = time.perf_counter()
    part_key = f"tables/embeddings/{spec.run_id}/shard-{spec.index:05d}.parquet"
    rows = images_rows(out.batches, embedder, run_id=spec.run_id, embedding_part=part_key)
    if len(rows):
        vectors = np.concatenate([b.embeddings for b in out.batches])
        part = tables.embeddings_table(rows["image_id"].to_numpy(np.int64), spec.run_id, vectors)
        output.put(part_key, tables.to_parquet_bytes(part))
        crash_point(f"after-shard-{spec.index}")
    else:
        part_key = None
    times = out.times.as_dict() | {"write_s": time.perf_counter() - t0}
    failures = [asdict(f) for f in out.failures]
    return ShardResult(shard=spec.index, rows=rows, embedding_part=part_key, failures=failures, times=times)


def images_rows(batches: list[ProcessedBatch], embedder: Embedder, *, run_id: str, embedding_part: str) -> pd.DataFrame:
    """One `images` row per embedded image, in batch order (the order of the vectors)."""
    now = datetime.now(UTC)
    labels = embedder.categories
    rows = []
    for b in batches:
        for (info, width, height), ids, probs in zip(b.records, b.class_ids, b.class_probs, strict=True):
            rows.append({
                "image_id": tables.image_id_for(info.key), "key": info.key, "etag": info.etag, "size": info.size,
                "width": width, "height": height,
                "top_class": labels[ids[0]], "top_prob": float(probs[0]),
                "class_ids": ids.tolist(), "class_labels": [labels[i] for i in ids], "class_probs": probs.tolist(),
                "model": embedder.spec.name, "weights_sha256": embedder.weights.sha256, "run_id": run_id,
                "processed_at": now, "embedding_part": embedding_part,
            })
    if not rows:
        return tables.empty_frame(tables.IMAGES_SCHEMA)
    return pd.DataFrame(rows)
