"""Inside one shard: a bounded streaming pipeline.

Fetch + decode + resize run in a thread pool (S3 GETs wait on the network;
Pillow releases the GIL while decoding and resizing), the calling thread
assembles batches, and the embedder's model streams run them (on a CPU, one
single-threaded stream per core). Every stage is bounded, so memory does not
grow with the shard size.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Protocol, TypeVar

import numpy as np
import pandas as pd
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from models.engine import EmbedResult, Embedder, EmbedderSettings, default_batch_size, get_embedder, stack_images
from tasks import tables
from tasks.catalog import ShardResult, crash_point, put_recorded
from tasks.categories import categorize_rows, load_categorizer
from tasks.decode import DEFAULT_MAX_PAGES, DEFAULT_PDF_DPI, DecodeError, decode_image, decode_pages
from tasks.storage import ObjectInfo, ObjectStore, cached_store

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


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
    """Seconds spent per stage, summed over the threads that do it: decode threads
    (fetch, decode), model streams (model); `wait` is the batching thread's time
    waiting for decoded images."""

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


INPUT_BOUND_WAIT = 0.2  # batching idle this share of the time: the inputs are the wall


def bottleneck(stage_s: dict[str, float], wall_s: float) -> str:
    """One line that tells an operator what held a run back, from its stage times
    and the wall time of its shards."""
    if wall_s <= 0:
        return ""
    waited = min(1.0, stage_s.get("wait_s", 0.0) / wall_s)
    if waited >= INPUT_BOUND_WAIT:
        slower = "fetch" if stage_s.get("fetch_s", 0.0) > stage_s.get("decode_s", 0.0) else "decode"
        return (f"input: batches waited for images {waited:.0%} of the time, mostly in {slower}; raise --io-workers"
                + (", or move the catalogue job closer to the bucket" if slower == "fetch" else
                   ", add cores, or use --gpu-decode on a GPU"))
    return (f"model: it ran all the time (batches waited for images {waited:.0%} of the time); a GPU, "
            "--compile on or a smaller model is what goes faster")


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

    records: list[tuple[ObjectInfo, int, int, int]]  # (object, original width, height, page)
    embeddings: np.ndarray
    class_ids: np.ndarray
    class_probs: np.ndarray


@dataclass
class _Page:
    """One model input: a decoded page (uint8 CHW tensor) or a raw JPEG left for
    decoding on the model's device."""

    info: ObjectInfo
    page: int
    tensor: torch.Tensor | None
    jpeg: bytes | None
    width: int
    height: int
    last: bool = True  # the object's last page: progress counts an object once, here


@dataclass
class _Fetched:
    """One object after fetch and decode: its pages, or the failure that stopped it."""

    info: ObjectInfo
    pages: list[_Page]
    failure: ImageFailure | None
    fetch_s: float
    decode_s: float


@dataclass
class ShardOutput:
    batches: list[ProcessedBatch] = field(default_factory=list)
    failures: list[ImageFailure] = field(default_factory=list)
    times: StageTimes = field(default_factory=StageTimes)


@dataclass(frozen=True)
class DecodeOptions:
    on_device: bool = False  # JPEGs decoded by nvJPEG on the model's device
    pdf_dpi: int = DEFAULT_PDF_DPI
    max_pages: int = DEFAULT_MAX_PAGES


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _failure(info: ObjectInfo, stage: str, error_type: str, message: str) -> ImageFailure:
    return ImageFailure(info.key, info.etag, info.size, stage, error_type, message)


def _fetch_and_decode(store: ObjectStore, info: ObjectInfo, embedder: Embedder, options: DecodeOptions) -> _Fetched:
    t0 = time.perf_counter()
    try:
        data = store.get(info.key)
    except Exception as exc:  # network and permission errors are per-object failures
        return _Fetched(info, [], _failure(info, "fetch", type(exc).__name__, str(exc)), time.perf_counter() - t0, 0.0)
    t1 = time.perf_counter()
    if options.on_device and _is_jpeg(data):
        return _Fetched(info, [_Page(info, 1, None, data, 0, 0)], None, t1 - t0, 0.0)
    try:
        decoded = decode_pages(data, min_side=embedder.preprocessing.resize_size, dpi=options.pdf_dpi,
                               max_pages=options.max_pages)
        pages = [_Page(info, d.page, embedder.preprocess(d.image), None, d.width, d.height, last=i == len(decoded) - 1)
                 for i, d in enumerate(decoded)]
    except DecodeError as exc:
        return _Fetched(info, [], _failure(info, "decode", exc.reason, exc.message), t1 - t0,
                        time.perf_counter() - t1)
    return _Fetched(info, pages, None, t1 - t0, time.perf_counter() - t1)


def _decode_jpegs_on_device(batch: list[_Page], embedder: Embedder) -> tuple[list[_Page], list[ImageFailure]]:
    """Decode the batch's raw JPEGs with nvJPEG (torchvision.io.decode_jpeg on the
    model's device), then resize and crop there. A JPEG the device decoder
    refuses goes back through the CPU decoder, which gives the failure its reason."""
    raw = [p for p in batch if p.jpeg is not None]
    if not raw:
        return batch, []

    def device_decode(items: list[_Page]) -> list[torch.Tensor]:
        return decode_jpeg([torch.frombuffer(bytearray(p.jpeg), dtype=torch.uint8) for p in items],
                           mode=ImageReadMode.RGB, device=embedder.device, apply_exif_orientation=True)

    try:
        images: list[torch.Tensor | None] = list(device_decode(raw))
    except RuntimeError:  # one bad file fails the whole call: decode one by one
        images = []
        for p in raw:
            try:
                images.append(device_decode([p])[0])
            except RuntimeError:
                images.append(None)
    decoded = dict(zip((id(p) for p in raw), images, strict=True))
    ready, failures = [], []
    for p in batch:
        if p.jpeg is None:
            ready.append(p)
        elif (image := decoded[id(p)]) is not None:
            height, width = image.shape[-2:]
            ready.append(_Page(p.info, p.page, embedder.preprocess_tensor(image), None, width, height))
        else:
            try:
                cpu = decode_image(p.jpeg, min_side=embedder.preprocessing.resize_size)
            except DecodeError as exc:
                failures.append(_failure(p.info, "decode", exc.reason, exc.message))
                continue
            ready.append(_Page(p.info, p.page, embedder.preprocess(cpu.image), None, cpu.width, cpu.height))
    return ready, failures


def bounded_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], max_in_flight: int) -> Iterator[R]:
    """`pool.map` in order, but never more than `max_in_flight` submitted and
    unconsumed; `items` is pulled lazily, on the caller's thread."""
    pending: deque[Future[R]] = deque()
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


@dataclass
class _Embedded:
    """One batch after the model: its result, or the error the model raised."""

    pages: list[_Page]
    result: EmbedResult | None
    error: RuntimeError | None
    seconds: float


def run_shard(items: list[ObjectInfo], store: ObjectStore, embedder: Embedder, *, batch_size: int | None = None,
              workers: int | None = None, decode: DecodeOptions = DecodeOptions(),
              on_batch: Callable[[ProcessedBatch], None] | None = None,
              on_progress: Callable[[int], None] | None = None) -> ShardOutput:
    """Fetch, decode, batch and embed `items` (every page of a document is its own
    input); a bad object becomes an `ImageFailure` and never stops the rest of its batch.

    Three stages run at once: decode threads, this thread assembling batches, and
    the embedder's model streams (`Embedder.stream_pool`), each bounded, so memory
    does not grow with the shard. Each embedded batch goes to `on_batch` on this
    thread, in input order (and is not kept), else into `ShardOutput.batches`."""
    batch_size = batch_size or default_batch_size(embedder.device.type)
    out = ShardOutput()
    pin = embedder.device.type == "cuda"

    # No closure here refers to itself: a self-referencing closure is a reference
    # cycle, and it would keep `on_batch` (and the shard's part buffer and rows)
    # alive after the shard until a full garbage collection.
    def run_model(pages: list[_Page]) -> _Embedded:  # on a model stream
        t0 = time.perf_counter()
        tensors = stack_images([p.tensor for p in pages])
        if pin and tensors.device.type == "cpu":
            tensors = tensors.pin_memory()  # lets the host-to-device copy run without blocking
        try:
            return _Embedded(pages, embedder.embed(tensors, pad_to=batch_size), None, time.perf_counter() - t0)
        except RuntimeError as exc:
            return _Embedded(pages, None, exc, time.perf_counter() - t0)

    def finish(done: _Embedded) -> None:
        out.times.model += done.seconds
        if done.error is not None:
            # A model error on a whole batch (out of memory, say) is retried one by
            # one so a single poison input cannot take its neighbours down with it.
            if len(done.pages) == 1:
                page = done.pages[0]
                out.failures.append(_failure(page.info, "model", type(done.error).__name__, str(done.error)))
            else:
                log.warning("batch of %s failed in the model (%s); retrying image by image", len(done.pages),
                            done.error)
                for page in done.pages:
                    finish(run_model([page]))
                return
        else:
            result = done.result
            processed = ProcessedBatch([(p.info, p.width, p.height, p.page) for p in done.pages],
                                       result.embeddings, result.class_ids, result.class_probs)
            if on_batch is not None:
                on_batch(processed)
            else:
                out.batches.append(processed)

    def batches() -> Iterator[list[_Page]]:
        batch: list[_Page] = []

        def ready() -> Iterator[list[_Page]]:
            pages, failures = _decode_jpegs_on_device(batch, embedder) if decode.on_device else (list(batch), [])
            batch.clear()
            out.failures.extend(failures)
            if on_progress and failures:
                on_progress(len(failures))
            if pages:
                yield pages

        lookahead = (embedder.streams + 1) * batch_size + 8
        with ThreadPoolExecutor(max_workers=workers or default_io_workers(), thread_name_prefix="batchsight-io") as pool:
            stream = bounded_map(pool, lambda info: _fetch_and_decode(store, info, embedder, decode), items,
                                 max_in_flight=lookahead)
            while True:
                t_wait = time.perf_counter()
                fetched = next(stream, None)
                out.times.wait += time.perf_counter() - t_wait
                if fetched is None:
                    break
                out.times.fetch += fetched.fetch_s
                out.times.decode += fetched.decode_s
                if fetched.failure is not None:
                    out.failures.append(fetched.failure)
                    if on_progress:
                        on_progress(1)
                    continue
                for page in fetched.pages:
                    batch.append(page)
                    if len(batch) >= batch_size:
                        yield from ready()
            if batch:
                yield from ready()

    with closing(batches()) as groups:
        for done in bounded_map(embedder.stream_pool(), run_model, groups, max_in_flight=embedder.streams + 1):
            finish(done)
            if on_progress:
                on_progress(sum(p.last for p in done.pages))
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
    decode: DecodeOptions = DecodeOptions()
    compile: bool = False
    categorizer: str | None = None  # key of the categoriser to apply, under `output`
    endpoint_url: str | None = None


def process_shard(spec: ShardSpec, *, on_progress: Callable[[int], None] | None = None) -> ShardResult:
    """Run one shard end to end and write its embeddings part; returns the rows.

    Vectors go into the part batch by batch (one Parquet row group each) and are
    not kept, so a shard holds its compressed part, not its raw vectors."""
    source = cached_store(spec.source, spec.endpoint_url)
    output = cached_store(spec.output, spec.endpoint_url, create=True)
    embedder = get_embedder(spec.embedder)
    if spec.compile:
        embedder.enable_compile()
    categorizer = load_categorizer(output, spec.categorizer) if spec.categorizer else None
    part_key = f"tables/embeddings/{spec.run_id}/shard-{spec.index:05d}.parquet"
    part = tables.EmbeddingsPartWriter(spec.run_id, embedder.embedding_dim)
    row_frames: list[pd.DataFrame] = []
    write_s = 0.0

    def keep(batch: ProcessedBatch) -> None:
        nonlocal write_s
        t0 = time.perf_counter()
        rows = images_rows([batch], embedder, run_id=spec.run_id, embedding_part=part_key)
        row_frames.append(categorize_rows(rows, batch.embeddings, categorizer))
        part.write(rows["image_id"].to_numpy(np.int64), batch.embeddings)
        write_s += time.perf_counter() - t0

    out = run_shard(list(spec.items), source, embedder, batch_size=spec.batch_size, workers=spec.workers,
                    decode=spec.decode, on_batch=keep, on_progress=on_progress)
    t0 = time.perf_counter()
    if part.rows:
        part_file = put_recorded(output, part_key, part.finish())
        crash_point(f"after-shard-{spec.index}")
        rows = pd.concat(row_frames, ignore_index=True)
    else:
        part_key, part_file, rows = None, None, tables.empty_frame(tables.IMAGES_SCHEMA)
    times = out.times.as_dict() | {"write_s": write_s + time.perf_counter() - t0}
    failures = [asdict(f) for f in out.failures]
    return ShardResult(shard=spec.index, rows=rows, embedding_part=part_key, failures=failures, times=times,
                       part_file=part_file)


def images_rows(batches: list[ProcessedBatch], embedder: Embedder, *, run_id: str, embedding_part: str) -> pd.DataFrame:
    """One `images` row per embedded image, in batch order (the order of the vectors)."""
    now = datetime.now(UTC)
    labels = embedder.categories
    rows = []
    for b in batches:
        for (info, width, height, page), ids, probs in zip(b.records, b.class_ids, b.class_probs, strict=True):
            rows.append({
                "image_id": tables.image_id_for(info.key, page), "key": info.key, "page": page, "etag": info.etag,
                "size": info.size, "width": width, "height": height,
                "top_class": labels[ids[0]], "top_prob": float(probs[0]),
                "class_ids": ids.tolist(), "class_labels": [labels[i] for i in ids], "class_probs": probs.tolist(),
                "model": embedder.spec.name, "weights_sha256": embedder.weights.sha256, "run_id": run_id,
                "processed_at": now, "embedding_part": embedding_part,
            })
    if not rows:
        return tables.empty_frame(tables.IMAGES_SCHEMA)
    return pd.DataFrame(rows)
