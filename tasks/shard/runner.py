"""One shard, as stages: read (fetch + decode, `ShardReader`), batch, embed
(`EmbedStage`), write (`ShardWriter`). `run_shard` is the loop that joins them;
`process_shard` builds the stages a `ShardSpec` asks for, in whatever process
runs it, and runs them.

Each stage is bounded, so memory does not grow with the shard: reading runs at
most `(streams + 1) x batch + 8` objects ahead of batching (in decode
processes, in whole chunks, two at least), and at most `streams + 1` batches
are at the model.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass

from models.engine import Embedder, get_embedder
from models.settings import EmbedderSettings
from tasks.catalog import layout
from tasks.categories.store import load_categorizer
from tasks.records import ObjectInfo, ShardResult
from tasks.shard.contents import CatalogRef, KnownContents, SeenContents, known_contents
from tasks.shard.decode import DecodeOptions
from tasks.shard.device import DECODE_MAX_BYTES, DeviceBudget, device_jpeg_decoder
from tasks.shard.embed import Embedded, EmbedStage
from tasks.shard.inputs import Inputs, batches
from tasks.shard.read import ShardReader, decode_process_count, decode_processes, decodes_in_processes
from tasks.shard.write import ShardWriter
from tasks.storage import StoreSpec, url_reader


@dataclass
class Waited:
    """Seconds the batching thread waited for the read stage."""

    seconds: float = 0.0

    def timed(self, inputs: Iterator[Inputs]) -> Iterator[Inputs]:
        while True:
            t0 = time.perf_counter()
            chunk = next(inputs, None)
            self.seconds += time.perf_counter() - t0
            if chunk is None:
                return
            yield chunk


class FreedMemory:
    """Hands the memory a shard's stages freed back to the system, at most every
    `every_s` seconds: glibc keeps freed blocks in each thread's arena for reuse,
    and with decode threads, the part writer's thread and the model's buffers all
    allocating, a shard process's RSS grew over 4,000 images of the mix from 1,380
    to 1,820 MB while what it held stayed flat (a trim after every batch kept it
    at 1,190-1,400 MB). A trim costs ~13 ms at that size, so it runs at most
    every 5 s, under 0.3% of the loop. A no-op without glibc's `malloc_trim`."""

    _trim = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)

    def __init__(self, every_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.clock = every_s, clock
        self.last = clock()
        self.trims = 0

    def maybe_release(self) -> None:
        if self._trim is not None and self.clock() - self.last >= self.every_s:
            self.release()

    def release(self) -> None:
        if self._trim is not None:
            self._trim(0)
            self.trims += 1
        self.last = self.clock()


def run_shard(items: Sequence[ObjectInfo], reader: ShardReader, embed: EmbedStage,
              write: Callable[[Embedded], None], *, on_progress: Callable[[int], None] | None = None) -> float:
    """Read `items`, keep one object of each content, cut them into batches, embed
    each batch and hand it to `write`, in input order, on this thread; returns the
    seconds batching waited for reading."""
    waited, freed = Waited(), FreedMemory()
    lookahead = (embed.embedder.streams + 1) * embed.size + 8
    reader.seen = SeenContents()  # bytes met before in this shard: copies, no model pass
    with closing(reader.read(items, lookahead)) as inputs:
        read = reader.seen.dedupe(waited.timed(inputs))
        for done in embed.map(batches(read, size_of=lambda: embed.size)):
            write(done)
            freed.maybe_release()
            if on_progress:
                on_progress(done.objects_done)
    return waited.seconds


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
    workers: int | None = None  # I/O threads; None: default_io_workers()
    decode: DecodeOptions = DecodeOptions()
    compile: bool = False
    categorizer: str | None = None  # key of the categoriser to apply, under `output`
    progress_topic: str | None = None  # Dask event topic the flow listens on, when the shard runs elsewhere
    contents_from: tuple[CatalogRef, ...] = ()  # catalogue versions whose vectors are reused for the same bytes


def shard_stages(spec: ShardSpec, embedder: Embedder, known: KnownContents | None = None
                 ) -> tuple[ShardReader, EmbedStage]:
    """The read and embed stages `spec` asks for, on this process's embedder: decode
    processes where `decodes_in_processes`, the device's JPEG decoder and its
    memory budget with `--gpu-decode`."""
    processes = decode_processes(decode_process_count(embedder.device)) \
        if decodes_in_processes(spec.decode.decode_in, embedder.device) else None
    batch_size = spec.batch_size or embedder.fitting_batch_size()
    jpeg_decoder = device_jpeg_decoder(embedder.device) if spec.decode.on_device else None
    decode = spec.decode if jpeg_decoder is not None else DecodeOptions(**{**spec.decode.__dict__, "on_device": False})
    budget = DeviceBudget.from_free(*embedder.device_memory(batch_size)) if embedder.device.type == "cuda" \
        else DeviceBudget(DECODE_MAX_BYTES)  # decoding "on the device" of a CPU model: in host memory
    reader = ShardReader(spec.source, embedder.family, decode, processes=processes, io_workers=spec.workers,
                         known=known)
    return reader, EmbedStage(embedder, batch_size, jpeg_decoder=jpeg_decoder, budget=budget)


_settled = threading.Event()


def shard_embedder(spec: ShardSpec) -> Embedder:
    """This process's model for `spec` (built once a process, then reused). The
    first time, every object alive then (the modules, torch, the model) is moved
    out of the garbage collector's sight (`gc.freeze`): they live as long as the
    process, and a full collection walked all of them (417,000 objects in a shard
    process, 0.16 s, one collection an 8,000-image shard at the ceiling)."""
    embedder = get_embedder(spec.embedder, read=url_reader(spec.source.endpoint_url))
    if spec.compile:
        embedder.enable_compile()
    if not _settled.is_set():
        _settled.set()
        gc.collect()
        gc.freeze()
    return embedder


def known_of(spec: ShardSpec) -> KnownContents | None:
    """What the catalogues `spec` builds on know by content (kept a process, a version)."""
    return known_contents([ref.open() for ref in spec.contents_from]) if spec.contents_from else None


def warm_shard_process(spec: ShardSpec) -> float:
    """Build in this process what `spec`'s shards will need, before they come: the
    model (once a process), the stages (decode processes; the device's JPEG decoder
    and its budget) and one batch through the model (a GPU's kernels chosen, a
    compiled model compiled). A Dask worker runs this while the flow plans.
    Returns the seconds it took."""
    t0 = time.time()
    embedder = shard_embedder(spec)
    _, embed = shard_stages(spec, embedder, known_of(spec))
    embedder.warm_up(embed.size)
    return time.time() - t0


def process_shard(spec: ShardSpec, *, on_progress: Callable[[int], None] | None = None) -> ShardResult:
    """Run one shard end to end: its stages, then its parts written; returns its rows."""
    started_at = time.time()
    embedder = shard_embedder(spec)
    load_s = time.time() - started_at
    output = spec.output.open(create=True)
    known = known_of(spec)
    writer = ShardWriter(output, shard=spec.index, run_id=spec.run_id,
                         part_key=layout.embeddings_part_key(spec.run_id, spec.index, attempt=secrets.token_hex(4)),
                         labels=embedder.labels, model=embedder.family.name, weights_sha256=embedder.weights.sha256,
                         dim=embedder.dim, categorizer=load_categorizer(output, spec.categorizer)
                         if spec.categorizer else None, known=known)
    writer.started_at = started_at
    try:
        reader, embed = shard_stages(spec, embedder, known)
        wait_s = run_shard(spec.items, reader, embed, writer.write, on_progress=on_progress)
        return writer.finish(load_s=load_s, batch_size=embed.size, wait_s=wait_s)
    finally:
        writer.close()
