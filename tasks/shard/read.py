"""The read stage: a shard's objects in, `Inputs` out, in order, a bounded
distance ahead of the model.

Objects are read a chunk at a time (`read_chunk`: fetch, then decode and resize
to model-sized pixels, or, for a JPEG bound for the device, just its header).
Chunks run in forked decode processes (on a GPU or from 4 cores,
`decodes_in_processes`), where a chunk is one task and one reply, and pixels
come back as one array a chunk; or in this process's I/O threads, one object a
chunk (S3 GETs wait on the network; Pillow releases the GIL while decoding).
Decode processes die with the process that started them (`PR_SET_PDEATHSIG`).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from tasks.records import ImageFailure, ObjectInfo
from tasks.shard.contents import KnownContents, SeenContents, content_sha256, is_known, known_prefixes
from tasks.shard.decode import DecodeOptions
from tasks.shard.device import device_jpeg_size
from tasks.shard.inputs import Inputs, Pages
from tasks.shard.pixels import decode_to_pixels
from tasks.storage import ObjectStore, StoreSpec, open_store

if TYPE_CHECKING:
    from models.family import ModelFamily

T = TypeVar("T")
R = TypeVar("R")

PROCESS_DECODE_MIN_CORES = 4
CHUNK_OBJECTS = 64  # at most, a task sent to a decode process ...
CHUNK_BYTES = 4 * 1024 * 1024  # ... or as many objects as make this many listed bytes (at least one)
WORKER_CORES_ENV = "BATCHSIGHT_WORKER_CORES"  # this process's share of the cores (a local Dask worker's)


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


def decode_process_count(device: torch.device, cores: int | None = None) -> int:
    """One decode process a core of this process's share (`WORKER_CORES_ENV`,
    set for each worker of a local cluster; else every core); on a GPU, cores
    are left to the shard's own process (fetch threads, batching, GPU decode and
    the model's launches): two of more than 4, one of 2 to 4."""
    cores = cores or int(os.environ.get(WORKER_CORES_ENV) or 0) or os.cpu_count() or 1
    if device.type != "cuda" or cores < 2:
        return cores
    return cores - 2 if cores > 4 else cores - 1


def default_io_workers() -> int:
    """Fetch/decode threads: enough to hide S3 latency, few enough that decoding
    does not crowd the model off the cores (Pillow holds no GIL while decoding)."""
    return max(4, 2 * (os.cpu_count() or 1))


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """In a decode process: the kernel kills it when the thread that forked it ends
    (`_spawner`'s, which lives as long as its process), however the process ends:
    a killed Dask worker leaves no decode process behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown is all there is
        pass
    if os.getppid() != parent:  # the parent ended before prctl took effect
        os._exit(0)


# Decode processes are forked from this one thread, which lives as long as its
# process: PR_SET_PDEATHSIG fires when the forking *thread* ends, and a shard's
# threads (I/O threads, a Prefect task's) end long before the process does.
_spawner = ThreadPoolExecutor(1, thread_name_prefix="batchsight-spawner")
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
            pool = _decode_pools[workers] = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("fork"), initializer=_die_with_parent,
                initargs=(os.getpid(),))
            # a fork pool starts every process on its first task: start them from the spawner
            _spawner.submit(lambda: pool.submit(int).result()).result()
        return pool


def shutdown_decode_processes() -> None:
    """Stop this process's decode processes (a Dask worker closing, a run ending)."""
    with _decode_pools_lock:
        for pool in _decode_pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        _decode_pools.clear()


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


@dataclass(frozen=True)
class ChunkRead:
    """What reading a chunk of objects gives, as plain data (it crosses back from a
    decode process in one reply): per input, its object's index in the chunk,
    page, width, height, last-page flag and thumbnail; the decoded pixels as one
    uint8 array [pages, S, S, 3]; the raw JPEGs for the device with their object
    indices and sizes; per failed object (index, stage, reason, message); the
    sha256 of each object fetched; and the objects whose bytes are known already
    (`known`), neither decoded nor sent back."""

    page_object: list[int]
    page: list[int]
    size: list[tuple[int, int]]
    last: list[bool]
    thumbnails: list[bytes | None]
    pixels: np.ndarray | None
    jpeg_object: list[int]
    jpeg_size: list[tuple[int, int]]
    jpegs: list[bytes]
    failures: list[tuple[int, str, str, str]]
    fetch_s: float
    decode_s: float
    content: list[str | None]
    known: list[int]


def _fetch(store: ObjectStore, key: str) -> tuple[bytes | None, str, str, float]:
    t0 = time.perf_counter()
    try:
        return store.get(key), "", "", time.perf_counter() - t0
    except Exception as exc:  # network and permission errors are per-object failures
        return None, type(exc).__name__, str(exc), time.perf_counter() - t0


def read_chunk(fetched: Iterable[tuple[bytes | None, str, str, float]], family: ModelFamily,
               options: DecodeOptions, known: np.ndarray | None = None,
               claim: Callable[[int, str], bool] | None = None) -> ChunkRead:
    """Decode a chunk's fetched objects (bytes, or the fetch error): each to its
    pages' model-sized pixels (and thumbnails), or, for a JPEG bound for the
    device, its size only; or the reason it failed. An object is not decoded when
    its sha256 is in `known` (sorted digest prefixes, `tasks.shard.contents`), or
    when `claim(index, sha256)` says another object of the shard read those bytes
    first: it is a copy."""
    page_object, page, size, last, thumbnails, pixels = [], [], [], [], [], []
    jpeg_object, jpeg_size, jpegs, failures, content, copies = [], [], [], [], [], []
    fetch_s = decode_s = 0.0
    for i, (data, error_type, message, seconds) in enumerate(fetched):
        fetch_s += seconds
        if data is None:
            failures.append((i, "fetch", error_type, message))
            content.append(None)
            continue
        content.append(content_sha256(data))
        if (known is not None and is_known(known, content[-1])) or (claim is not None and not claim(i, content[-1])):
            copies.append(i)
            continue
        if (dims := device_jpeg_size(data, options)) is not None:
            jpeg_object.append(i)
            jpeg_size.append(dims)
            jpegs.append(data)
            continue
        t0 = time.perf_counter()
        decoded = decode_to_pixels(data, family, options.pdf_dpi, options.max_pages, options.thumbnail_side)
        decode_s += time.perf_counter() - t0
        if isinstance(decoded, tuple):
            failures.append((i, "decode", *decoded))
            continue
        for n, (number, width, height, array, thumbnail) in enumerate(decoded):
            page_object.append(i)
            page.append(number)
            size.append((width, height))
            last.append(n == len(decoded) - 1)
            thumbnails.append(thumbnail)
            pixels.append(array)
    return ChunkRead(page_object, page, size, last, thumbnails, np.stack(pixels) if pixels else None,
                     jpeg_object, jpeg_size, jpegs, failures, fetch_s, decode_s, content, copies)


@dataclass(frozen=True)
class _ChunkJob:
    """What a decode process needs for a chunk of objects: plain data."""

    source: StoreSpec
    keys: tuple[str, ...]
    family: ModelFamily
    options: DecodeOptions
    known: str | None = None  # a file of known digest prefixes (`KnownContents.prefix_file`)


# One store per decode process, opened in the process (a boto3 client must not be
# shared across a fork), and a few threads to overlap a chunk's fetches.
_worker_state: dict[str, object] = {}


def decode_chunk(job: _ChunkJob) -> ChunkRead:
    """In a decode process: fetch a chunk's objects (a few at a time) and read them."""
    stores = _worker_state.setdefault("stores", {})
    store = stores.get(job.source)
    if store is None:  # not `StoreSpec.open`: its cache came across the fork, and a boto3 client must not
        store = stores[job.source] = open_store(job.source.url, endpoint_url=job.source.endpoint_url)
    fetchers = _worker_state.get("fetchers")
    if fetchers is None and store.concurrent_gets > 1:
        fetchers = _worker_state["fetchers"] = ThreadPoolExecutor(store.concurrent_gets,
                                                                  thread_name_prefix="batchsight-fetch")
    return read_chunk(fetch_all(store, job.keys, fetchers), job.family, job.options, known_prefixes(job.known))


def fetch_all(store: ObjectStore, keys: Sequence[str], fetchers: ThreadPoolExecutor | None
              ) -> Iterator[tuple[bytes | None, str, str, float]]:
    """Each key's bytes (or why not), in order: `store.concurrent_gets` at a time on
    `fetchers`, or one after another on this thread where the store reads fastest so."""
    if store.concurrent_gets > 1 and fetchers is not None:
        return fetchers.map(partial(_fetch, store), keys)
    return map(partial(_fetch, store), keys)


def chunks_of(items: Sequence[ObjectInfo]) -> Iterator[Sequence[ObjectInfo]]:
    """`items` as decode-process tasks: a task and its reply cost the shard's own
    process about as much as ten small objects do, so small objects go many a
    task (`CHUNK_OBJECTS`); large ones few (`CHUNK_BYTES`), so that a chunk of
    camera photos does not hold the model up for seconds."""
    start, size = 0, 0
    for i, item in enumerate(items):
        if i > start and (i - start >= CHUNK_OBJECTS or size + item.size > CHUNK_BYTES):
            yield items[start:i]
            start, size = i, 0
        size += item.size
    if start < len(items):
        yield items[start:]


def as_inputs(infos: Sequence[ObjectInfo], read: ChunkRead) -> Inputs:
    """A chunk's read, as `Inputs` naming its objects."""
    decoded = Pages.of([infos[i] for i in read.page_object], read.page, read.size, read.last, read.thumbnails,
                       [read.content[i] for i in read.page_object], pixels=read.pixels)
    raw = Pages.of([infos[i] for i in read.jpeg_object], [1] * len(read.jpegs), read.jpeg_size,
                   [True] * len(read.jpegs), [None] * len(read.jpegs), [read.content[i] for i in read.jpeg_object],
                   jpegs=read.jpegs)
    copies = Pages.of([infos[i] for i in read.known], [1] * len(read.known), [(0, 0)] * len(read.known),
                      [True] * len(read.known), [None] * len(read.known), [read.content[i] for i in read.known])
    failures = [ImageFailure(infos[i].key, infos[i].etag, infos[i].size, stage, reason, message)
                for i, stage, reason, message in read.failures]
    contents = {infos[i].key: c for i, c in enumerate(read.content) if c is not None}
    return Inputs(decoded, raw, failures, copies, read.fetch_s, read.decode_s, contents)


class ShardReader:
    """Reads objects of `source` into `Inputs`, in order, at most `lookahead`
    objects ahead of whoever consumes them: in decode processes where `processes`
    is given, else in this process's I/O threads."""

    def __init__(self, source: StoreSpec, family: ModelFamily, options: DecodeOptions, *,
                 processes: ProcessPoolExecutor | None = None, io_workers: int | None = None,
                 known: KnownContents | None = None, seen: SeenContents | None = None) -> None:
        self.source, self.family, self.options, self.processes = source, family, options, processes
        self.store = source.open()
        self.io_workers = io_workers or default_io_workers()
        self.known = known if known is not None and len(known) else None
        self.seen = seen  # in this process's threads, bytes read before are not decoded again

    def read(self, items: Sequence[ObjectInfo], lookahead: int) -> Iterator[Inputs]:
        chunks = list(chunks_of(items))
        in_flight = max(2, lookahead * len(chunks) // max(1, len(items)))  # ~lookahead objects
        read = self._in_process if self.processes is not None else self._here
        with ThreadPoolExecutor(max_workers=self.io_workers, thread_name_prefix="batchsight-io") as pool, \
                ThreadPoolExecutor(self.store.concurrent_gets, thread_name_prefix="batchsight-fetch") as fetchers:
            self._fetchers = fetchers
            yield from bounded_map(pool, read, chunks, max_in_flight=in_flight)

    def _in_process(self, infos: Sequence[ObjectInfo]) -> Inputs:
        job = _ChunkJob(self.source, tuple(i.key for i in infos), self.family, self.options,
                        self.known.prefix_file() if self.known is not None else None)
        return as_inputs(infos, self.processes.submit(decode_chunk, job).result())

    def _here(self, infos: Sequence[ObjectInfo]) -> Inputs:
        claim = (lambda i, content: self.seen.claim(content, infos[i].key)) if self.seen is not None else None
        fetched = fetch_all(self.store, [i.key for i in infos], self._fetchers)
        return as_inputs(infos, read_chunk(fetched, self.family, self.options,
                                           self.known.prefix if self.known is not None else None, claim))
