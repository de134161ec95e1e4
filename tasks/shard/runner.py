"""Inside one shard: a bounded streaming pipeline.

Fetch + decode + resize run in forked decode processes (a chunk of objects per
task; on a GPU or from 4 cores, `decodes_in_processes`) or in a thread pool
(S3 GETs wait on the network; Pillow releases the GIL while decoding and
resizing); the shard's thread assembles batches; the embedder's model streams
run them (`Embedder.stream_pool()`: on a CPU one single-threaded stream per
core, at most 8; on a GPU one). Decoding runs about `(streams + 1) * batch + 8`
objects ahead of batching and the streams hold at most `streams + 1` batches,
so memory does not grow with the shard size. `process_shard` runs one
`ShardSpec` end to end and writes its embeddings part.

"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache, partial
from typing import Protocol, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from models.engine import Embedder, EmbedResult, embedders_built, get_embedder, stack_images
from models.family import ModelFamily
from models.settings import EmbedderSettings
from tasks.catalog import layout, tables
from tasks.catalog.manifest import crash_point, put_recorded
from tasks.categories.apply import categorize_rows
from tasks.categories.store import load_categorizer
from tasks.records import ImageFailure, ObjectInfo, ShardResult, StageTimes
from tasks.shard.decode import DEFAULT_PDF_DPI, DecodeOptions
from tasks.shard.pixels import decode_to_pixels
from tasks.storage import LocalStore, ObjectStore, StoreSpec, open_store, url_reader

log = logging.getLogger(__name__)

T = TypeVar("T")

R = TypeVar("R")


@dataclass
class ProcessedBatch:
    """Rows of one model batch: `records[i]` owns `embeddings[i]`."""

    records: list[tuple[ObjectInfo, int, int, int]]  # (object, original width, height, page)
    embeddings: np.ndarray
    class_ids: np.ndarray
    class_probs: np.ndarray
    thumbnails: list[bytes | None] = field(default_factory=list)  # WebP of each record, where made


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
    thumbnail: bytes | None = None  # WebP, made where the page was decoded on a CPU


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
    batch_size: int = 0  # the model batch size the shard ended with (halved on GPU out-of-memory)


PROCESS_DECODE_MIN_CORES = 4


def decodes_in_processes(option: str, device: torch.device, cores: int | None = None) -> bool:
    """Where CPU decoding runs. Threads share one interpreter: Pillow releases the
    GIL inside decode and resize, but everything around them holds it, and on 16
    cores with a GPU model the thread pool spent ~35 ms of thread time per image
    against ~4 core-ms on 2 cores. Worker processes scale with the cores. On a
    small CPU machine the model streams use every core anyway and threads cost
    less (no copy of the pixels between processes), so auto picks processes on a
    GPU or from `PROCESS_DECODE_MIN_CORES` cores. A daemonic process (a Dask
    worker, by default) may not start processes: it decodes in threads."""
    if multiprocessing.current_process().daemon:
        return False  # a daemonic process (a Dask worker, by default) may not start children
    if option != "auto":
        return option == "processes"
    cores = cores or os.cpu_count() or 1
    return device.type == "cuda" or cores >= PROCESS_DECODE_MIN_CORES


WORKER_CORES_ENV = "BATCHSIGHT_WORKER_CORES"  # this process's share of the cores (a local Dask worker's)


def decode_process_count(device: torch.device, cores: int | None = None) -> int:
    """One decode process a core of this process's share (`WORKER_CORES_ENV`,
    set for each worker of a local cluster; else every core); on a GPU, cores
    are left to the shard's own process (fetch threads, batching, GPU decode and
    the model's launches): two of more than 4, one of 2 to 4."""
    cores = cores or int(os.environ.get(WORKER_CORES_ENV) or 0) or os.cpu_count() or 1
    if device.type != "cuda" or cores < 2:
        return cores
    return cores - 2 if cores > 4 else cores - 1


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, without decoding; None where the
    header cannot be found (the decoder will say what is wrong)."""
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF_MARKERS:
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _failure(info: ObjectInfo, stage: str, error_type: str, message: str) -> ImageFailure:
    return ImageFailure(info.key, info.etag, info.size, stage, error_type, message)


_decode_pools_lock = threading.Lock()

_decode_pools: dict[int, ProcessPoolExecutor] = {}


def decode_processes(workers: int) -> ProcessPoolExecutor:
    """The process's pool of `workers` decode processes, started once and reused by
    every shard. Forked, like a torch DataLoader's workers: they start in
    milliseconds and run only Pillow and numpy, never torch or CUDA."""
    with _decode_pools_lock:
        pool = _decode_pools.get(workers)
        if pool is None:
            for old in _decode_pools.values():
                old.shutdown(wait=False, cancel_futures=True)
            _decode_pools.clear()
            pool = _decode_pools[workers] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        return pool


def _fetch_and_decode(store: ObjectStore, info: ObjectInfo, embedder: Embedder, options: DecodeOptions,
                      processes: ProcessPoolExecutor | None) -> _Fetched:
    t0 = time.perf_counter()
    try:
        data = store.get(info.key)
    except Exception as exc:  # network and permission errors are per-object failures
        return _Fetched(info, [], _failure(info, "fetch", type(exc).__name__, str(exc)), time.perf_counter() - t0, 0.0)
    t1 = time.perf_counter()
    if options.on_device and (size := _device_jpeg_size(data, options)):
        return _Fetched(info, [_Page(info, 1, None, data, *size)], None, t1 - t0, 0.0)
    if processes is not None:
        decoded = processes.submit(decode_to_pixels, data, embedder.family, options.pdf_dpi, options.max_pages,
                                   options.thumbnail_side).result()
    else:
        decoded = decode_to_pixels(data, embedder.family, options.pdf_dpi, options.max_pages, options.thumbnail_side)
    if isinstance(decoded, tuple):
        return _Fetched(info, [], _failure(info, "decode", *decoded), t1 - t0, time.perf_counter() - t1)
    return _Fetched(info, _decoded_pages(info, decoded), None, t1 - t0, time.perf_counter() - t1)


def _decoded_pages(info: ObjectInfo, decoded: list[tuple[int, int, int, np.ndarray, bytes | None]]) -> list[_Page]:
    return [_Page(info, page, torch.from_numpy(pixels).permute(2, 0, 1), None, width, height,
                  last=i == len(decoded) - 1, thumbnail=thumb)
            for i, (page, width, height, pixels, thumb) in enumerate(decoded)]


CHUNK = 16  # objects per task sent to a decode process


@dataclass(frozen=True)
class _ChunkJob:
    """What a decode process needs for a chunk of objects: plain data."""

    source: StoreSpec
    keys: tuple[str, ...]
    family: ModelFamily
    options: DecodeOptions


# One store per decode process, opened in the process (a boto3 client must not be
# shared across a fork), and a few threads to overlap a chunk's fetches.
_worker_state: dict[str, object] = {}


def _worker_fetch(store: ObjectStore, key: str) -> tuple[bytes | None, str, str, float]:
    t0 = time.perf_counter()
    try:
        return store.get(key), "", "", time.perf_counter() - t0
    except Exception as exc:  # network and permission errors are per-object failures
        return None, type(exc).__name__, str(exc), time.perf_counter() - t0


def decode_chunk(job: _ChunkJob) -> list[tuple]:
    """In a decode process: fetch, decode and resize a chunk of objects. Per object:
    ("fetch", error type, message, fetch_s) | ("decode", reason, message, fetch_s,
    decode_s) | ("jpeg", bytes, width, height, fetch_s) for a JPEG left to the GPU
    | ("pages", [(page, width, height, pixels)], fetch_s, decode_s)."""
    stores = _worker_state.setdefault("stores", {})
    store = stores.get(job.source)
    if store is None:  # not `StoreSpec.open`: its cache came across the fork, and a boto3 client must not
        store = stores[job.source] = open_store(job.source.url, endpoint_url=job.source.endpoint_url)
    fetchers = _worker_state.get("fetchers")
    if fetchers is None:
        fetchers = _worker_state["fetchers"] = ThreadPoolExecutor(4, thread_name_prefix="batchsight-fetch")
    out: list[tuple] = []
    for data, error_type, message, fetch_s in fetchers.map(partial(_worker_fetch, store), job.keys):
        if data is None:
            out.append(("fetch", error_type, message, fetch_s))
            continue
        if job.options.on_device and (size := _device_jpeg_size(data, job.options)):
            out.append(("jpeg", data, *size, fetch_s))
            continue
        t0 = time.perf_counter()
        decoded = decode_to_pixels(data, job.family, job.options.pdf_dpi, job.options.max_pages,
                                   job.options.thumbnail_side)
        if isinstance(decoded, tuple):
            out.append(("decode", *decoded, fetch_s, time.perf_counter() - t0))
        else:
            out.append(("pages", decoded, fetch_s, time.perf_counter() - t0))
    return out


def _device_jpeg_size(data: bytes, options: DecodeOptions) -> tuple[int, int] | None:
    """The JPEG's size where it goes to the device decoder: a JPEG no larger than
    `options.device_max_pixels`."""
    if not _is_jpeg(data):
        return None
    size = jpeg_size(data)
    return size if size and size[0] * size[1] <= options.device_max_pixels else None


def _fetch_and_decode_chunk(infos: list[ObjectInfo], processes: ProcessPoolExecutor, source: StoreSpec,
                            family: ModelFamily, options: DecodeOptions) -> list[_Fetched]:
    """A chunk of objects through a decode process; one task and one reply per
    chunk, so this process spends little interpreter time per image."""
    job = _ChunkJob(source, tuple(i.key for i in infos), family, options)
    fetched = []
    for info, r in zip(infos, processes.submit(decode_chunk, job).result(), strict=True):
        if r[0] == "fetch":
            fetched.append(_Fetched(info, [], _failure(info, "fetch", r[1], r[2]), r[3], 0.0))
        elif r[0] == "decode":
            fetched.append(_Fetched(info, [], _failure(info, "decode", r[1], r[2]), r[3], r[4]))
        elif r[0] == "jpeg":
            fetched.append(_Fetched(info, [_Page(info, 1, None, r[1], r[2], r[3])], None, r[4], 0.0))
        else:
            pages = _decoded_pages(info, r[1])
            fetched.append(_Fetched(info, pages, None, r[2], r[3]))
    return fetched


class DeviceJpegDecoder(Protocol):
    """Decodes a batch of JPEGs on a device: uint8 RGB CHW tensors there (EXIF
    orientation applied), None for each JPEG it refuses."""

    def decode(self, jpegs: list[bytes]) -> list[torch.Tensor | None]: ...


class NvJpegDecoder:
    """nvJPEG through `torchvision.io.decode_jpeg(device="cuda")`, a batch per call."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def _decode(self, jpegs: list[bytes]) -> list[torch.Tensor]:
        return decode_jpeg([torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs],
                           mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)

    def decode(self, jpegs: list[bytes]) -> list[torch.Tensor | None]:
        try:
            return list(self._decode(jpegs))
        except RuntimeError:  # one file nvJPEG refuses fails the whole call: decode one by one
            images: list[torch.Tensor | None] = []
            for j in jpegs:
                try:
                    images.append(self._decode([j])[0])
                except RuntimeError:
                    images.append(None)
            return images


@lru_cache(maxsize=4)
def device_jpeg_decoder(device: torch.device) -> NvJpegDecoder | None:
    """nvJPEG for `device`, checked on a tiny JPEG once per process; None, after a
    one-line notice, where this torchvision cannot decode JPEGs there (a build
    without nvJPEG): the run then decodes every JPEG on the CPU."""
    import io

    from PIL import Image

    probe = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(probe, "JPEG")
    decoder = NvJpegDecoder(device)
    try:
        decoder._decode([probe.getvalue()])
    except (RuntimeError, NotImplementedError) as exc:
        log.warning("--gpu-decode: torchvision cannot decode JPEGs on %s (%s); decoding them on the CPU instead",
                    device, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return decoder


def _decode_jpegs_on_device(batch: list[_Page], embedder: Embedder,
                            decoder: DeviceJpegDecoder) -> tuple[list[_Page], list[ImageFailure]]:
    """Decode the batch's raw JPEGs on the device in one call, then resize and crop
    them there (same-size images as one batch). A JPEG the device decoder refuses
    goes back through the CPU decoder, which gives a failure its reason. Pages
    come out on whichever device decoded them; `stack_images` brings them together."""
    raw = [p for p in batch if p.jpeg is not None]
    if not raw:
        return list(batch), []  # a copy: the caller clears `batch` for the next one
    images = decoder.decode([p.jpeg for p in raw])
    done = [im for im in images if im is not None]
    prepared = iter(embedder.family.preprocess_on_device(done) if done else [])
    decoded = {id(p): (next(prepared) if im is not None else None) for p, im in zip(raw, images, strict=True)}
    ready, failures = [], []
    for p in batch:
        if p.jpeg is None:
            ready.append(p)
        elif (image := decoded[id(p)]) is not None:
            ready.append(_Page(p.info, p.page, image, None, p.width, p.height, p.last))
        else:
            pixels = decode_to_pixels(p.jpeg, embedder.family, DEFAULT_PDF_DPI, 1)
            if isinstance(pixels, tuple):
                failures.append(_failure(p.info, "decode", *pixels))
                continue
            _, width, height, hwc, _ = pixels[0]
            ready.append(_Page(p.info, p.page, torch.from_numpy(hwc).permute(2, 0, 1), None, width, height, p.last))
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


def non_finite_rows(result: EmbedResult) -> np.ndarray:
    """Rows whose embedding or class probabilities hold NaN or inf (fp16 overflow,
    broken weights): such a vector would poison every search it meets."""
    return ~(np.isfinite(result.embeddings).all(axis=1) & np.isfinite(result.class_probs).all(axis=1))


NON_FINITE_MESSAGE = ("the model's embedding for this image holds NaN or inf values, so it was not stored; check "
                      "the weights (a NaN in them), or run with --precision fp32 (fp16 can overflow)")


class _BatchSize:
    """The shard's model batch size: halved when the GPU runs out of memory, and
    kept halved for the rest of the shard."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()

    def halve(self, failed: int) -> int:
        """The size to retry a batch of `failed` pages at: half the current size,
        unless another model stream has halved it since that batch was cut."""
        with self._lock:
            if failed <= self.size:
                self.size = max(1, self.size // 2)
            return self.size


def run_shard(items: list[ObjectInfo], store: ObjectStore, embedder: Embedder, *, batch_size: int | None = None,
              workers: int | None = None, decode: DecodeOptions = DecodeOptions(),
              on_batch: Callable[[ProcessedBatch], None] | None = None,
              on_progress: Callable[[int], None] | None = None,
              jpeg_decoder: DeviceJpegDecoder | None = None,
              source: StoreSpec | None = None) -> ShardOutput:
    """Fetch, decode, batch and embed `items` (every page of a document is its own
    input); a bad object becomes an `ImageFailure` and never stops the rest of its batch.

    Three stages run at once: fetch and decode (in worker processes, a chunk of
    objects per task, where `decodes_in_processes` and the store can be opened
    there: `source` is its (url, endpoint), known for a `LocalStore`; else
    fetched in threads and decoded in a worker process an object at a time, or
    in the thread where not `decodes_in_processes`), this thread assembling
    batches, and the embedder's model streams (`Embedder.stream_pool`; with
    `decode.on_device` they decode the batch's JPEGs on the device first). Each
    is bounded: decoding runs at most `(streams + 1) * batch + 8` objects ahead
    of this thread (in processes, in whole chunks, two at least), and at most `streams + 1` batches are at the model, so
    memory does not grow with the shard. Every page reaches the model's device through `stack_images`,
    whatever decoded it. On a GPU, a batch that runs out of memory is retried at
    half the size (`ShardOutput.batch_size` is the size the shard ended with).
    Each embedded batch goes to `on_batch` on this thread, in input order (and is
    not kept), else into `ShardOutput.batches`."""
    sizer = _BatchSize(batch_size or embedder.fitting_batch_size())
    out = ShardOutput()
    pin = embedder.device.type == "cuda"
    if decode.on_device and jpeg_decoder is None:
        jpeg_decoder = device_jpeg_decoder(embedder.device)
        if jpeg_decoder is None:
            decode = replace(decode, on_device=False)
    processes = decode_processes(decode_process_count(embedder.device)) \
        if decodes_in_processes(decode.decode_in, embedder.device) else None
    if source is None and isinstance(store, LocalStore):
        source = StoreSpec(store.url)

    # No closure here refers to itself: a self-referencing closure is a reference
    # cycle, and it would keep `on_batch` (and the shard's part buffer and rows)
    # alive after the shard until a full garbage collection.
    def embed_once(pages: list[_Page]) -> _Embedded:
        t0 = time.perf_counter()
        try:
            tensors = stack_images([p.tensor for p in pages], embedder.device, pin=pin)
            return _Embedded(pages, embedder.embed(tensors, pad_to=sizer.size), None, time.perf_counter() - t0)
        except RuntimeError as exc:
            return _Embedded(pages, None, exc, time.perf_counter() - t0)

    def run_model(pages: list[_Page]) -> tuple[list[_Embedded], list[ImageFailure], float]:  # on a model stream
        decode_s, failures = 0.0, []
        if jpeg_decoder is not None:
            t0 = time.perf_counter()
            pages, failures = _decode_jpegs_on_device(pages, embedder, jpeg_decoder)
            decode_s = time.perf_counter() - t0
        todo, done = [pages] if pages else [], []
        while todo:
            group = todo.pop(0)
            result = embed_once(group)
            if isinstance(result.error, torch.cuda.OutOfMemoryError) and len(group) > 1:
                # Out of memory: the same pages again at half the size, and every
                # later batch of the shard at that size too.
                size = sizer.halve(len(group))
                log.warning("batch of %s ran out of GPU memory; retrying at batch size %s", len(group), size)
                torch.cuda.empty_cache()
                todo[:0] = [group[i:i + size] for i in range(0, len(group), size)]
                out.times.model += result.seconds
                continue
            done.append(result)
        return done, failures, decode_s

    def keep(done: _Embedded) -> None:
        result = done.result
        bad = non_finite_rows(result)
        pages = done.pages
        if bad.any():
            for page in (p for p, b in zip(pages, bad, strict=True) if b):
                out.failures.append(_failure(page.info, "model", "non_finite_embedding", NON_FINITE_MESSAGE))
            good = ~bad
            pages = [p for p, g in zip(pages, good, strict=True) if g]
            result = EmbedResult(result.embeddings[good], result.class_ids[good], result.class_probs[good])
            if not pages:
                return
        processed = ProcessedBatch([(p.info, p.width, p.height, p.page) for p in pages],
                                   result.embeddings, result.class_ids, result.class_probs,
                                   [p.thumbnail for p in pages])
        if on_batch is not None:
            on_batch(processed)
        else:
            out.batches.append(processed)

    def finish(model_out: tuple[list[_Embedded], list[ImageFailure], float]) -> None:
        results, failures, decode_s = model_out
        out.failures.extend(failures)
        out.times.decode += decode_s
        for done in results:
            out.times.model += done.seconds
            if done.error is None:
                keep(done)
            elif len(done.pages) == 1:
                page = done.pages[0]
                out.failures.append(_failure(page.info, "model", type(done.error).__name__, str(done.error)))
            else:
                # A model error on a whole batch is retried one by one so a single
                # poison input cannot take its neighbours down with it.
                log.warning("batch of %s failed in the model (%s); retrying image by image", len(done.pages),
                            done.error)
                for page in done.pages:
                    for single in run_model([page])[0]:
                        out.times.model += single.seconds
                        if single.error is None:
                            keep(single)
                        else:
                            out.failures.append(_failure(page.info, "model", type(single.error).__name__,
                                                         str(single.error)))

    def batches() -> Iterator[list[_Page]]:
        batch: list[_Page] = []

        def ready() -> Iterator[list[_Page]]:
            pages = list(batch)
            batch.clear()
            yield pages

        def fetched_objects(pool: ThreadPoolExecutor, lookahead: int) -> Iterator[_Fetched]:
            if processes is not None and source is not None:
                chunks = (items[i:i + CHUNK] for i in range(0, len(items), CHUNK))
                fetch_chunk = partial(_fetch_and_decode_chunk, processes=processes, source=source,
                                      family=embedder.family, options=decode)
                for chunk in bounded_map(pool, fetch_chunk, chunks, max_in_flight=max(2, lookahead // CHUNK)):
                    yield from chunk
            else:
                yield from bounded_map(pool, lambda info: _fetch_and_decode(store, info, embedder, decode, processes),
                                       items, max_in_flight=lookahead)

        lookahead = (embedder.streams + 1) * sizer.size + 8
        with ThreadPoolExecutor(max_workers=workers or default_io_workers(), thread_name_prefix="batchsight-io") as pool:
            stream = fetched_objects(pool, lookahead)
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
                    if len(batch) >= sizer.size:
                        yield from ready()
            if batch:
                yield from ready()

    with closing(batches()) as groups:
        for model_out in bounded_map(embedder.stream_pool(), run_model, groups, max_in_flight=embedder.streams + 1):
            finish(model_out)
            if on_progress:
                on_progress(sum(p.last for done in model_out[0] for p in done.pages) + len(model_out[1]))
    out.batch_size = sizer.size
    return out


@dataclass(frozen=True)
class ShardSpec:
    """Everything a worker needs to process one shard; plain data, so it travels
    to a Dask worker as easily as to a thread."""

    index: int
    items: tuple[ObjectInfo, ...]
    source: StoreSpec
    output: StoreSpec
    run_id: str
    embedder: EmbedderSettings
    batch_size: int | None = None  # None: Embedder.fitting_batch_size()
    workers: int | None = None  # None: default_io_workers()
    decode: DecodeOptions = DecodeOptions()
    compile: bool = False
    categorizer: str | None = None  # key of the categoriser to apply, under `output`
    progress_topic: str | None = None  # Dask event topic the flow listens on, when the shard runs elsewhere


def process_shard(spec: ShardSpec, *, on_progress: Callable[[int], None] | None = None) -> ShardResult:
    """Run one shard end to end and write its embeddings part; returns the rows.

    Vectors go into the part batch by batch (one Parquet row group each) and are
    not kept, so a shard holds its compressed part, not its raw vectors."""
    started_at = time.time()
    source = spec.source.open()
    output = spec.output.open(create=True)
    # Built on the process's first shard, then reused.
    embedder = get_embedder(spec.embedder, read=url_reader(spec.source.endpoint_url))
    if spec.compile:
        embedder.enable_compile()
    load_s = time.time() - started_at
    categorizer = load_categorizer(output, spec.categorizer) if spec.categorizer else None
    part_key = layout.embeddings_part_key(spec.run_id, spec.index, attempt=secrets.token_hex(4))
    part = tables.EmbeddingsPartWriter(spec.run_id, embedder.dim)
    thumbnails = ThumbnailsPart(layout.thumbnails_part_key(part_key))
    row_frames: list[pd.DataFrame] = []
    write_s, first_batch_at = 0.0, 0.0

    def keep(batch: ProcessedBatch) -> None:
        nonlocal write_s, first_batch_at
        first_batch_at = first_batch_at or time.time()
        t0 = time.perf_counter()
        rows = images_rows([batch], embedder, run_id=spec.run_id, embedding_part=part_key)
        rows["thumbnail_part"] = thumbnails.add(rows["image_id"].to_numpy(np.int64), batch.thumbnails)
        row_frames.append(categorize_rows(rows, batch.embeddings, categorizer))
        part.write(rows["image_id"].to_numpy(np.int64), batch.embeddings)
        write_s += time.perf_counter() - t0

    out = run_shard(list(spec.items), source, embedder, batch_size=spec.batch_size, workers=spec.workers,
                    decode=spec.decode, on_batch=keep, on_progress=on_progress,
                    source=spec.source)
    t0 = time.perf_counter()
    thumbnail_file = put_recorded(output, thumbnails.key, thumbnails.finish()) if thumbnails.ids else None
    if part.rows:
        part_file = put_recorded(output, part_key, part.finish())
        crash_point(f"after-shard-{spec.index}")
        rows = pd.concat(row_frames, ignore_index=True)
    else:
        part_key, part_file, rows = None, None, tables.empty_frame(tables.IMAGES_SCHEMA)
    # `times` also carries the batch size the shard ended with, and when (epoch
    # seconds) it started, embedded its first batch and ended, for the run summary.
    times = out.times.as_dict() | {"write_s": write_s + time.perf_counter() - t0, "load_s": load_s,
                                   "batch_size": float(out.batch_size), "started_at": started_at,
                                   "first_batch_at": first_batch_at, "ended_at": time.time()}
    failures = [asdict(f) for f in out.failures]
    return ShardResult(shard=spec.index, rows=rows, embedding_part=part_key, failures=failures, times=times,
                       part_file=part_file, thumbnail_part=thumbnails.key if thumbnail_file else None,
                       thumbnail_file=thumbnail_file, ran_on=f"{socket.gethostname()}:{os.getpid()}",
                       model_loads=embedders_built())


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
        for i, (image_id, blob) in enumerate(zip(image_ids.tolist(), blobs or [None] * len(image_ids), strict=True)):
            if blob is not None:
                self.ids.append(image_id)
                self.blobs.append(blob)
                out[i] = self.key
        return out

    def finish(self) -> bytes:
        return tables.to_parquet_bytes(pa.table({"image_id": self.ids, "thumbnail": self.blobs},
                                                schema=tables.THUMBNAILS_SCHEMA))


def images_rows(batches: list[ProcessedBatch], embedder: Embedder, *, run_id: str, embedding_part: str) -> pd.DataFrame:
    """One `images` row per embedded image, in batch order (the order of the vectors).
    Built column by column: on a GPU this runs on the shard's thread for thousands
    of images a second."""
    records = [r for b in batches for r in b.records]
    if not records:
        return tables.empty_frame(tables.IMAGES_SCHEMA)
    ids = np.concatenate([b.class_ids for b in batches])
    probs = np.concatenate([b.class_probs for b in batches])
    labels = np.asarray(embedder.labels, dtype=object)[ids]
    n = len(records)
    return pd.DataFrame({
        "image_id": [tables.image_id_for(info.key, page) for info, _, _, page in records],
        "key": [info.key for info, *_ in records], "page": [page for *_, page in records],
        "etag": [info.etag for info, *_ in records], "size": [info.size for info, *_ in records],
        "width": [w for _, w, _, _ in records], "height": [h for _, _, h, _ in records],
        "top_class": labels[:, 0], "top_prob": probs[:, 0].astype(np.float64),
        "class_ids": ids.tolist(), "class_labels": labels.tolist(), "class_probs": probs.tolist(),
        "model": [embedder.family.name] * n, "weights_sha256": [embedder.weights.sha256] * n, "run_id": [run_id] * n,
        "processed_at": [datetime.now(UTC)] * n, "embedding_part": [embedding_part] * n,
    })
