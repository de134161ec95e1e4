"""The shard pipeline's speed features keep results right: draft-mode decoding,
the compiled model, and decoding JPEGs on the model's device (run here on the
CPU device: the same code path the GPU takes, minus nvJPEG itself)."""

from __future__ import annotations

import subprocess
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from models.engine import (
    COMPILE_MIN_IMAGES,
    Embedder,
    EmbedderSettings,
    cpu_streams,
    default_batch_size,
    should_compile,
    stack_images,
)
from tasks.catalog import layout
from tasks.records import BuildStats, ObjectInfo, ShardResult
from tasks.report import RunSummary, bottleneck
from tasks.sample_data import broken_files, encode, generate_samples, make_product_photo, write_samples
from tasks.shard.decode import DecodeOptions, decode_image
from tasks.shard.embed import Embedded
from tasks.shard.inputs import Pages
from tasks.shard.read import CHUNK_BYTES, CHUNK_OBJECTS, chunks_of
from tasks.shard.runner import FreedMemory
from tasks.shard.write import ShardWriter
from tasks.storage import LocalStore
from tests.helpers import embed_objects


@pytest.fixture(scope="module")
def embedder(resnet18_weights):
    return Embedder(EmbedderSettings(model="resnet18", weights=str(resnet18_weights), device="cpu", precision="fp32"))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1)


@pytest.mark.slow
def test_draft_mode_decoding_gives_embeddings_close_to_full_decoding(embedder):
    rng = np.random.default_rng(17)
    photos = [encode(make_product_photo(rng, (4000, 3000)), "JPEG") for _ in range(2)]
    draft = torch.stack([embedder.preprocess(decode_image(p, min_side=232).image) for p in photos])
    full = torch.stack([embedder.preprocess(decode_image(p).image) for p in photos])
    assert cosine(embedder.embed(draft).embeddings, embedder.embed(full).embeddings).min() >= 0.995


@pytest.mark.slow
def test_compiled_model_agrees_with_eager_and_pads_short_batches(resnet18_weights):
    settings = EmbedderSettings(model="resnet18", weights=str(resnet18_weights), device="cpu")
    eager, compiled = Embedder(settings), Embedder(settings)
    compiled.enable_compile()
    x = torch.randint(0, 256, (5, 3, 224, 224), dtype=torch.uint8)
    full = compiled.embed(x, pad_to=5)
    short = compiled.embed(x[:3], pad_to=5)  # padded to the compiled shape, padding dropped
    ref = eager.embed(x)
    assert short.embeddings.shape == (3, 512)
    assert cosine(full.embeddings, ref.embeddings).min() >= 0.99
    np.testing.assert_allclose(short.embeddings, full.embeddings[:3], atol=1e-3)
    np.testing.assert_array_equal(short.class_ids, full.class_ids[:3])


def test_decoding_jpegs_on_the_model_device_matches_the_cpu_path(tmp_path, embedder):
    store = LocalStore(tmp_path / "src", create=True)
    samples = generate_samples(10, seed=23, png_fraction=0.3, broken=False) + broken_files(np.random.default_rng(1))
    write_samples(store, samples)
    cpu = embed_objects(store, embedder, batch_size=4)
    dev = embed_objects(store, embedder, batch_size=4, decode=DecodeOptions(on_device=True))
    a, b = cpu.by_key(), dev.by_key()
    assert a.keys() == b.keys() and len(a) == 10
    for key in a:
        assert float(a[key][0] @ b[key][0]) >= 0.98, key
        assert a[key][1] == b[key][1], key  # original sizes agree
    reasons = {f.key: f.error_type for f in dev.failures}
    assert reasons == {"broken/truncated.jpg": "truncated", "broken/empty.jpg": "empty",
                       "broken/notes.jpg": "not_an_image"}


@pytest.mark.parametrize("mode,n,expected", [("off", 10**6, False), ("on", 1, True),
                                             ("auto", COMPILE_MIN_IMAGES - 1, False), ("auto", COMPILE_MIN_IMAGES, True)])
def test_compile_decision(mode, n, expected):
    assert should_compile(mode, n) is expected


def test_compile_mode_and_batch_size_defaults():
    with pytest.raises(ValueError, match="unknown compile mode 'always'"):
        should_compile("always", 1)
    assert default_batch_size("cpu") == 16


def test_the_bottleneck_line_names_the_stage_that_held_the_run_back():
    model_bound = {"fetch_s": 2.0, "decode_s": 12.0, "model_s": 29.0, "wait_s": 0.6}
    assert bottleneck(model_bound, 15.0).startswith("model: it ran all the time (batches waited for images 4%")
    decode_bound = {"fetch_s": 2.0, "decode_s": 40.0, "model_s": 8.0, "wait_s": 9.0}
    assert bottleneck(decode_bound, 15.0).startswith("input: batches waited for images 60% of the time, mostly in decode")
    fetch_bound = {"fetch_s": 90.0, "decode_s": 10.0, "model_s": 8.0, "wait_s": 12.0}
    assert "mostly in fetch" in bottleneck(fetch_bound, 15.0)
    assert bottleneck(model_bound, 0.0) == ""
    # The H200's ImageNet-like run with GPU decode: batches seldom waited, yet the
    # model was busy 3 s of the shard's 15; it once said "model: it ran all the time".
    shard_bound = {"fetch_s": 28.0, "decode_s": 6.6, "model_s": 3.0, "wait_s": 2.0}
    line = bottleneck(shard_bound, 15.0)
    assert line.startswith("shard process: the model was busy 20%") and "--workers N" in line


def test_the_bottleneck_counts_shards_side_by_side_once_each():
    """Two workers, each running a shard for 10 s at once: the waited share is over
    the shards' 20 s, not the run's 10 s of wall time (which called it input-bound)."""
    rows = pd.DataFrame({"key": ["a.jpg"], "top_class": ["tabby"]})
    times = {"fetch_s": 1.0, "decode_s": 3.0, "model_s": 19.0, "wait_s": 1.5, "write_s": 0.1, "load_s": 2.0,
             "batch_size": 16.0, "started_at": 100.0, "first_batch_at": 103.0, "ended_at": 112.0}
    summary = RunSummary("r", "running", None, "src", "out", "resnet18", "sha")
    summary.note_shards([ShardResult(i, rows, None, [], times) for i in range(2)], runner="workers", wall_s=10.0,
                        cluster_start_s=0.0, ready_at=100.0, compile_s=0.0, build=BuildStats(0.0, 0.0), batch_size=16)
    assert summary.bottleneck.startswith("model: it ran all the time (batches waited for images 15%")


def test_an_embeddings_part_writes_its_vectors_as_they_are(tmp_path):
    """Arrow's default dictionary-encodes every column, and zstd compresses it: over
    vector floats the dictionary costs 4x the write time of a batch, and zstd most
    of the rest for 0.93 of the raw bytes on dense features. The vectors are
    written plain and uncompressed, the run id as a compressed dictionary, and
    they read back intact."""
    import io

    import pyarrow.parquet as pq

    from tasks.catalog import tables

    rng = np.random.default_rng(5)
    vectors = np.maximum(rng.standard_normal((256, 2048)), 0).astype(np.float32)
    ids = np.arange(256, dtype=np.int64)
    part = tables.EmbeddingsPartWriter("run-1", 2048)
    part.write(ids, vectors)
    data = bytes(part.finish())
    meta = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0)
    columns = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    assert "RLE_DICTIONARY" not in columns["embedding.list.element"].encodings
    assert columns["embedding.list.element"].compression == "UNCOMPRESSED"
    assert "RLE_DICTIONARY" in columns["run_id"].encodings and columns["run_id"].compression == "ZSTD"
    assert len(data) < 1.05 * vectors.nbytes  # the floats, their levels and a little metadata
    read_ids, runs, read = next(tables.iter_embedding_batches(data))
    assert (read_ids == ids).all() and set(runs) == {"run-1"} and np.array_equal(read, vectors)


@pytest.mark.parametrize("cores,expected", [(1, (1, 1)), (2, (2, 1)), (8, (8, 1)), (12, (8, 1)), (16, (8, 2))])
def test_cpu_cores_become_single_threaded_model_streams(cores, expected):
    assert cpu_streams(cores) == expected


def test_batches_from_several_model_streams_arrive_in_input_order_with_their_own_vectors(tmp_path, resnet18_weights):
    embedder = Embedder(EmbedderSettings(model="resnet18", weights=str(resnet18_weights), device="cpu",
                                         precision="fp32"))
    embedder.streams = 3  # more streams than cores: batches may finish out of order
    forward = embedder.embed
    model_threads, batch_threads, seen = [], [], []

    def recording_embed(batch, **kw):
        model_threads.append(threading.current_thread().name)
        return forward(batch, **kw)

    def keep(batch):
        batch_threads.append(threading.current_thread())
        seen.append(batch)

    embedder.embed = recording_embed
    store = LocalStore(tmp_path / "src", create=True)
    write_samples(store, generate_samples(23, seed=31, broken=False))
    items = list(store.list())
    out = embed_objects(store, embedder, batch_size=2, items=items, write=keep)
    assert len(seen) == 12 and len(out.batches) == 12
    # the model ran on the stream threads; batches were handed back on the caller's
    assert len(model_threads) == 12 and all(name.startswith("batchsight-model") for name in model_threads)
    assert set(batch_threads) == {threading.current_thread()}
    keys = [key for key, *_ in out.records()]
    assert keys == [i.key for i in items]
    side = embedder.family.preprocessing.resize_size
    direct = forward(stack_images([embedder.preprocess(decode_image(store.get(k), min_side=side).image)
                                          for k in keys])).embeddings
    # fp32 sums may differ in the last digits between batch sizes and thread counts
    np.testing.assert_allclose(np.concatenate([b.embeddings for b in seen]), direct, atol=1e-5)


def test_progress_counts_each_object_once_however_many_pages_and_batches(tmp_path, embedder):
    import io

    from tasks.sample_data import make_document

    rng = np.random.default_rng(37)
    store = LocalStore(tmp_path / "src", create=True)
    pages = [make_document(rng, "invoice") for _ in range(5)]
    pdf = io.BytesIO()
    pages[0].save(pdf, "PDF", save_all=True, append_images=pages[1:], resolution=60)
    store.put("docs/bundle.pdf", pdf.getvalue())
    store.put("photos/a.jpg", encode(make_product_photo(rng, (320, 240)), "JPEG"))
    store.put("photos/b.jpg", encode(make_product_photo(rng, (320, 240)), "JPEG"))
    store.put("photos/broken.jpg", b"not an image")
    steps = []
    out = embed_objects(store, embedder, batch_size=2, on_progress=steps.append)
    assert sum(len(b.pages) for b in out.batches) == 7  # five pages and two photos, across four batches
    assert sum(steps) == 4  # objects, as the progress bar's total counts them


def test_a_model_error_on_a_batch_is_retried_image_by_image(tmp_path, embedder):
    """A model error cannot be provoked on demand here (it would be an OOM or a bad
    kernel), so a thin wrapper over the real embedder raises for one poison input."""
    from PIL import Image

    store = LocalStore(tmp_path / "src", create=True)
    write_samples(store, generate_samples(5, seed=29, broken=False))
    store.put("poison.png", encode(Image.new("RGB", (300, 300), (0, 0, 0)), "PNG"))

    class PoisonOnBlack:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def embed(self, batch, **kw):
            if (batch.flatten(1).amax(dim=1) == 0).any():
                raise RuntimeError("simulated kernel failure")
            return self.inner.embed(batch, **kw)

    out = embed_objects(store, PoisonOnBlack(embedder), batch_size=8)
    embedded = [key for key, *_ in out.records()]
    assert len(embedded) == 5 and "poison.png" not in embedded
    assert [(f.key, f.stage, f.message) for f in out.failures] == [("poison.png", "model", "simulated kernel failure")]


def test_a_shard_that_fails_leaves_no_part_writer_thread(tmp_path, resnet18_weights, monkeypatch):
    """The embeddings part is encoded on a thread of its own; a shard that fails
    after its first batch was written must not leave that thread behind (a worker
    runs thousands of shards). The failure is injected into the writer's second
    batch: nothing real fails on demand here."""
    import tasks.shard.write as write_stage
    from tasks.shard.runner import ShardSpec, process_shard
    from tasks.storage import StoreSpec

    store = LocalStore(tmp_path / "src", create=True)
    write_samples(store, generate_samples(6, seed=31, broken=False))
    written = write_stage.ShardWriter.write
    calls = []

    def fails_second(self, batch):
        calls.append(len(batch.pages))
        if len(calls) == 2:
            raise RuntimeError("injected: the disk went away")
        written(self, batch)

    monkeypatch.setattr(write_stage.ShardWriter, "write", fails_second)
    spec = ShardSpec(index=0, items=tuple(store.list()), source=StoreSpec(store.url),
                     output=StoreSpec(str(tmp_path / "out")), run_id="r", batch_size=2,
                     embedder=EmbedderSettings(model="resnet18", weights=str(resnet18_weights), device="cpu"),
                     decode=DecodeOptions(decode_in="threads"))
    with pytest.raises(RuntimeError, match="injected"):
        process_shard(spec)
    assert len(calls) == 2
    assert [t.name for t in threading.enumerate() if t.name.startswith("batchsight-part")] == []


def test_objects_go_to_decode_processes_many_small_or_few_large_a_chunk():
    small = [ObjectInfo(f"s{i}.jpg", "e", 30_000, 0.0) for i in range(300)]
    large = [ObjectInfo(f"l{i}.jpg", "e", 5_000_000, 0.0) for i in range(3)]  # each past CHUNK_BYTES alone
    chunks = list(chunks_of(small + large + small[:5]))
    assert [len(c) for c in chunks] == [CHUNK_OBJECTS] * 4 + [300 - 4 * CHUNK_OBJECTS, 1, 1, 1, 5]
    assert all(sum(o.size for o in c) <= CHUNK_BYTES or len(c) == 1 for c in chunks)
    assert [o.key for c in chunks for o in c] == [o.key for o in small + large + small[:5]]


def test_memory_freed_by_a_shards_threads_goes_back_to_the_system():
    """A shard's threads free blocks that glibc keeps in their arenas; `FreedMemory`
    hands them back (the shard loop does so at most every 5 s). In a fresh process:
    300 MB allocated and freed by a thread, one block of it kept, so the arena
    cannot shrink from its top: its RSS falls by most of that only on a release."""
    code = ("import threading\n"
            "from tasks.shard.runner import FreedMemory\n"
            "def rss(): return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])\n"
            "kept = []\n"
            "def work():\n"
            "    blocks = [bytearray(100_000) for _ in range(3000)]\n"
            "    kept.append(blocks[-1])\n"
            "t = threading.Thread(target=work); t.start(); t.join()\n"
            "before = rss(); FreedMemory().release(); print(before - rss())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) > 200_000, f"released only {int(done.stdout) // 1024} MB of 300"

    now = [0.0]
    freed = FreedMemory(every_s=5.0, clock=lambda: now[0])
    for now[0] in (1.0, 4.9, 5.0, 6.0, 10.1):
        freed.maybe_release()
    assert freed.trims == (2 if FreedMemory._trim is not None else 0)  # at 5.0 and at 10.1


def test_the_writer_keeps_no_pixels_of_a_batch_it_wrote(tmp_path):
    """The writer remembers a batch for later copies of its bytes; it must keep their
    sizes, vectors and classes, not the batch's pixels (or, on a GPU, its JPEG bytes):
    it held every batch's pixels until the shard ended (150 KB an image)."""
    writer = ShardWriter(LocalStore(tmp_path, create=True), shard=0, run_id="r", part_key=layout.embeddings_part_key("r", 0, "a1"), labels=["a", "b"],
                         model="m", weights_sha256="0" * 64, dim=4)
    pixels = np.zeros((2, 8, 8, 3), np.uint8)
    kept = weakref.ref(pixels)
    infos = [ObjectInfo("a.jpg", "e1", 10), ObjectInfo("b.jpg", "e2", 10)]
    pages = Pages.of(infos, [1, 1], [(30, 20), (40, 10)], [True, True], [None, None], ["c1", "c2"], pixels=pixels)
    vectors = np.eye(2, 4, dtype=np.float32)
    writer.write(Embedded(pages, vectors, np.zeros((2, 2), np.int32), np.full((2, 2), 0.5, np.float32)))
    del pages, pixels
    assert kept() is None, "the writer still holds the pixels of a batch it wrote"

    copy = Pages.of([ObjectInfo("copy-of-b.jpg", "e3", 10)], [1], [(40, 10)], [True], [None], ["c2"])
    writer.write(Embedded(Pages(), np.empty((0, 4), np.float32), np.empty((0, 2), np.int32),
                          np.empty((0, 2), np.float32), copies=copy))
    writer.close()
    assert writer.copied == 1  # and the copy still has its original's rows
    keys = [key for batch in writer.columns["key"] for key in batch]
    sizes = np.stack([np.concatenate(writer.columns["width"]), np.concatenate(writer.columns["height"])], axis=1)
    assert sizes[keys.index("copy-of-b.jpg")].tolist() == [40, 10]
