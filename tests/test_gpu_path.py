"""The GPU path's guarantees, checked on a machine without a GPU: every page
reaches the model on the model's device through one path (a mixed batch never
crashes), JPEGs are routed by size, out-of-memory halves the batch, a non-finite
embedding fails its image, and decoding in worker processes gives what threads give.

What cannot run here is simulated, and each simulation says so: nvJPEG (no GPU),
and a GPU running out of memory."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils._pytree import tree_flatten, tree_map
from torchvision.io import ImageReadMode, decode_jpeg

from models.engine import Embedder, EmbedResult, batch_size_that_fits, stack_images
from models.settings import EmbedderSettings
from tasks.sample_data import encode, make_document, make_product_photo
from tasks.shard.decode import DecodeOptions
from tasks.shard.device import (
    DECODE_MAX_BYTES,
    DeviceBudget,
    device_decode_bytes,
    device_jpeg_decoder,
    jpeg_size,
    plan_device_chunks,
    planned_peak_bytes,
)
from tasks.shard.embed import non_finite_rows
from tasks.shard.read import decodes_in_processes
from tasks.storage import LocalStore
from tests.helpers import embed_objects


@pytest.fixture(scope="module")
def embedder(resnet18_weights):
    return Embedder(EmbedderSettings(model="resnet18", weights=str(resnet18_weights), device="cpu", precision="fp32"))


class OnSimulatedGpu(torch.Tensor):
    """Pixels held in host memory that behave as if they lived on cuda:0, which this
    machine does not have: `.device` says cuda:0, any op that mixes them with
    (non-scalar) CPU tensors raises the error CUDA raises, and only an explicit
    move to the CPU (`.to("cpu")`, `.cpu()`) gives back a plain CPU tensor. What is
    real: the pixels, and every op on them."""

    DEVICE = torch.device("cuda", 0)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == torch.Tensor.device.__get__:
            return cls.DEVICE
        if func in (torch.Tensor.to, torch.Tensor.cpu):
            device = torch.device("cpu") if func is torch.Tensor.cpu else \
                torch._C._nn._parse_to(*args[1:], **kwargs)[0]
            if device is not None and device.type == "cpu":
                with torch._C.DisableTorchFunctionSubclass():
                    return args[0].clone()  # a plain tensor: it has left the simulated GPU
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(type(t) is torch.Tensor and t.dim() > 0 for t in tensors):
            raise RuntimeError("Expected all tensors to be on the same device, but got tensors is on cpu, "
                               "different from other tensors on cuda:0 (simulated)")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        return tree_map(lambda t: t.as_subclass(cls) if type(t) is torch.Tensor else t, out)


class SimulatedGpuJpegDecoder:
    """Stands in for nvJPEG: decodes with torchvision's CPU JPEG decoder and hands
    the pixels back as `OnSimulatedGpu` tensors, in one call per batch, and refuses
    CMYK JPEGs (as nvJPEG's GPU backends do with some). Records what it decoded."""

    def __init__(self) -> None:
        self.decoded: list[tuple[int, int]] = []
        self.refused = 0

    def decode(self, jpegs: list[bytes]) -> list[torch.Tensor | None]:
        images = []
        for data in jpegs:
            if Image.open(io.BytesIO(data)).mode == "CMYK":
                self.refused += 1
                images.append(None)
                continue
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            self.decoded.append(tuple(image.shape[1:]))
            images.append(image.as_subclass(OnSimulatedGpu))
        return images


def test_the_simulated_gpu_tensor_reproduces_the_mixed_device_crash():
    """The simulation is faithful where it matters: stacking a GPU image with a
    CPU image fails, as it did on the H200 in `stack_images` before one path."""
    gpu = torch.zeros(3, 4, 4, dtype=torch.uint8).as_subclass(OnSimulatedGpu)
    cpu = torch.zeros(3, 4, 4, dtype=torch.uint8)
    assert gpu.device == torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        torch.stack([gpu, cpu])
    mixed = stack_images([gpu, cpu, gpu], torch.device("cpu"))
    assert type(mixed) is torch.Tensor and mixed.device.type == "cpu" and mixed.shape == (3, 3, 4, 4)
    assert mixed.is_contiguous(memory_format=torch.channels_last)


def _mixed_bucket(store: LocalStore) -> None:
    rng = np.random.default_rng(41)
    store.put("photos/a.jpg", encode(make_product_photo(rng, (500, 375)), "JPEG"))
    store.put("photos/b.jpg", encode(make_product_photo(rng, (500, 375)), "JPEG"))
    store.put("photos/c.jpg", encode(make_product_photo(rng, (375, 500)), "JPEG"))
    store.put("photos/big.jpg", encode(make_product_photo(rng, (1600, 1200)), "JPEG"))  # over the device limit
    store.put("photos/cmyk.jpg", encode(make_product_photo(rng, (500, 375)).convert("CMYK"), "JPEG"))
    store.put("photos/d.png", encode(make_product_photo(rng, (640, 480)), "PNG"))
    store.put("docs/scan.png", encode(make_document(rng, "invoice"), "PNG"))
    pdf = io.BytesIO()
    make_document(rng, "receipt").save(pdf, "PDF", resolution=60)
    store.put("docs/receipt.pdf", pdf.getvalue())


@pytest.mark.parametrize("decode_in", ["threads", "processes"])
def test_a_batch_mixing_device_and_cpu_decoded_pages_reaches_the_model_on_its_device(tmp_path, embedder, decode_in):
    """One batch holds JPEGs the (simulated) GPU decoded, a CMYK JPEG it refused
    (decoded on the CPU instead), a JPEG too large for it (routed to the CPU),
    PNGs and a PDF page; before one path, stacking such a batch raised. Every
    batch the model gets is on the model's device, and every page's embedding
    matches the all-CPU run's."""
    store = LocalStore(tmp_path / "src", create=True)
    _mixed_bucket(store)
    items = list(store.list())
    decoder = SimulatedGpuJpegDecoder()
    seen_devices = []
    forward = embedder.embed

    class Recording:  # records where each batch lands; the real embedder does the work
        def __getattr__(self, name):
            return getattr(embedder, name)

        def embed(self, batch, **kw):
            seen_devices.append((type(batch), batch.device))
            return forward(batch, **kw)

    options = DecodeOptions(on_device=True, device_max_pixels=1_000_000, decode_in=decode_in)
    dev = embed_objects(store, Recording(), batch_size=8, decode=options, jpeg_decoder=decoder, items=items)
    cpu = embed_objects(store, embedder, batch_size=8, items=items)

    assert dev.failures == [] and len(dev.batches) == 1 and len(dev.batches[0].pages) == 8
    assert sorted(decoder.decoded) == [(375, 500), (375, 500), (500, 375)] and decoder.refused == 1
    assert seen_devices == [(torch.Tensor, torch.device("cpu"))]

    a, b = cpu.by_key(), dev.by_key()
    assert a.keys() == b.keys()
    for key in a:
        assert float(a[key][0] @ b[key][0]) >= 0.98, key
        assert a[key][1] == b[key][1], key

    # Batches of two: the first holds only the PDF page and a PNG, no JPEG (such a
    # batch was once dropped whole on the device path).
    small = embed_objects(store, embedder, batch_size=2, decode=options, jpeg_decoder=SimulatedGpuJpegDecoder(),
                          items=items)
    assert small.failures == [] and small.by_key().keys() == a.keys()
    assert [info.key for info in small.batches[0].pages.infos] == ["docs/receipt.pdf", "docs/scan.png"]


@pytest.mark.parametrize("size", [(500, 375), (4000, 3000), (1, 65500)])
def test_jpeg_size_reads_the_frame_header(size):
    data = encode(Image.new("RGB", size, (200, 30, 30)), "JPEG")
    assert jpeg_size(data) == size
    assert jpeg_size(b"\xff\xd8\xff\xe0\x00") is None


@pytest.mark.parametrize("free,per_image,cap,expected", [
    (140 * 2**30, 40 * 2**20, 512, 512),  # an H200: the cap
    (8 * 2**30, 40 * 2**20, 512, 64),  # 4 GiB for activations: 102 fit, 64 is the power of two
    (2**30, 40 * 2**20, 512, 8),
    (10 * 2**20, 40 * 2**20, 512, 1),  # nothing fits: 1, and the run finds out
    (140 * 2**30, 40 * 2**20, 300, 256),  # a cap that is no power of two
])
def test_batch_size_that_fits(free, per_image, cap, expected):
    assert batch_size_that_fits(free, per_image, cap=cap) == expected


def test_a_cpu_embedder_starts_from_the_cpu_batch_size(embedder):
    assert embedder.fitting_batch_size() == 16


def test_out_of_memory_halves_the_batch_and_retries_the_same_pages(tmp_path, embedder):
    """A GPU running out of memory cannot happen here, so a thin wrapper over the
    real embedder raises torch's own OutOfMemoryError for batches over 2 images."""
    from tasks.sample_data import generate_samples, write_samples

    store = LocalStore(tmp_path / "src", create=True)
    write_samples(store, generate_samples(7, seed=43, broken=False, document_fraction=0.0))
    sizes = []

    class SmallCard:
        def __getattr__(self, name):
            return getattr(embedder, name)

        def embed(self, batch, **kw):
            sizes.append(batch.shape[0])
            if batch.shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return embedder.embed(batch, **kw)

    items = list(store.list())
    out = embed_objects(store, SmallCard(), batch_size=8, items=items)
    assert out.failures == [] and out.batch_size == 2
    assert [key for key, *_ in out.records()] == [i.key for i in items]
    assert sizes == [7, 4, 2, 2, 3, 2, 1]  # 8 -> 4 -> 2, each failed batch retried in pieces


def test_a_non_finite_embedding_fails_its_image_and_is_never_stored(tmp_path, resnet18_weights):
    """Real weights with one broken statistic (a negative running variance in the
    last block: sqrt of a negative number), so the model itself makes NaN."""
    state = torch.load(resnet18_weights, weights_only=True)
    state["layer4.1.bn2.running_var"][0] = -1.0
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    embedder = Embedder(EmbedderSettings(model="resnet18", weights=str(broken), device="cpu", precision="fp32"))
    store = LocalStore(tmp_path / "src", create=True)
    rng = np.random.default_rng(47)
    store.put("a.jpg", encode(make_product_photo(rng, (320, 240)), "JPEG"))
    store.put("b.png", encode(make_product_photo(rng, (320, 240)), "PNG"))
    out = embed_objects(store, embedder, batch_size=4)
    assert out.batches == []
    assert [(f.key, f.stage, f.error_type) for f in out.failures] == [
        ("a.jpg", "model", "non_finite_embedding"), ("b.png", "model", "non_finite_embedding")]
    assert "NaN or inf" in out.failures[0].message and "--precision fp32" in out.failures[0].message


def test_non_finite_rows_finds_nan_and_inf_in_vectors_or_probabilities():
    emb = np.ones((4, 3), np.float32)
    probs = np.full((4, 2), 0.5, np.float32)
    emb[1, 2], probs[2, 0] = np.nan, np.inf
    result = EmbedResult(emb, np.zeros((4, 2), np.int32), probs)
    assert non_finite_rows(result).tolist() == [False, True, True, False]


def test_decoding_in_worker_processes_gives_what_threads_give(tmp_path, embedder):
    from tasks.sample_data import broken_files, generate_samples, write_samples

    store = LocalStore(tmp_path / "src", create=True)
    write_samples(store, generate_samples(12, seed=53) + broken_files(np.random.default_rng(2)))
    items = list(store.list())
    threads = embed_objects(store, embedder, batch_size=4, decode=DecodeOptions(decode_in="threads"), items=items)
    processes = embed_objects(store, embedder, batch_size=4, decode=DecodeOptions(decode_in="processes"),
                              items=items)
    assert threads.records() == processes.records()
    np.testing.assert_array_equal(threads.vectors(), processes.vectors())
    assert sorted(threads.failures, key=str) == sorted(processes.failures, key=str) and threads.failures


@pytest.mark.parametrize("option,device,cores,expected", [
    ("auto", "cpu", 2, False), ("auto", "cpu", 4, True), ("auto", "cuda", 2, True),
    ("threads", "cuda", 16, False), ("processes", "cpu", 1, True)])
def test_where_cpu_decoding_runs(option, device, cores, expected):
    assert decodes_in_processes(option, torch.device(device), cores) is expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torchvision cannot decode on cuda")
def test_without_a_gpu_jpeg_decoder_one_line_says_so_and_jpegs_decode_on_the_cpu(caplog):
    with caplog.at_level("WARNING", logger="tasks.shard.device"):
        assert device_jpeg_decoder(torch.device("cuda")) is None
    [record] = [r for r in caplog.records if "--gpu-decode" in r.getMessage()]
    assert "decoding them on the CPU instead" in record.getMessage() and "\n" not in record.getMessage()


def _report_decode_choice(queue) -> None:
    queue.put(decodes_in_processes("processes", torch.device("cuda"), 16))


def test_a_daemonic_process_such_as_a_dask_worker_decodes_in_threads():
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_report_decode_choice, args=(queue,), daemon=True)
    child.start()
    child.join(30)
    assert queue.get(timeout=5) is False


TWELVE_MP = (4000, 3000)


@pytest.mark.parametrize("card_free,batch_bytes", [
    (139 * 2**30, 512 * 100 * 2**20),  # an H200 after ResNet-50 and a batch of 512
    (22 * 2**30, 128 * 100 * 2**20),  # a 24 GB card
    (3 * 2**30, 16 * 100 * 2**20),  # a small card: the budget is what is left
])
def test_a_batch_of_512_camera_photos_is_planned_within_the_device_budget(card_free, batch_bytes):
    """The crash on the H200: 512 12-MP JPEGs stacked and made float32 at once
    (68.7 GiB). The plan decodes them in chunks whose decoded pixels and resize
    working memory fit the budget, which fits in what the card has free."""
    budget = DeviceBudget.from_free(card_free, batch_bytes)
    assert 0 < budget.bytes <= min(DECODE_MAX_BYTES, card_free - batch_bytes)
    sizes = [TWELVE_MP] * 512
    chunks, too_large = plan_device_chunks(sizes, budget.bytes)
    assert too_large == [] and sorted(i for c in chunks for i in c) == list(range(512))
    assert max(planned_peak_bytes(sizes, c) for c in chunks) <= budget.bytes
    assert all(len(c) >= 1 for c in chunks)


@pytest.mark.parametrize("sizes,budget,chunks,too_large", [
    ([(100, 100)] * 4, 4 * device_decode_bytes(100, 100), [[0, 1, 2, 3]], []),
    ([(100, 100)] * 4, 2 * device_decode_bytes(100, 100), [[0, 1], [2, 3]], []),
    ([(100, 100), (1000, 1000), (100, 100)], device_decode_bytes(1000, 1000), [[0], [1], [2]], []),
    ([(100, 100), (2000, 2000), (100, 100)], device_decode_bytes(1000, 1000), [[0, 2]], [1]),  # alone too large
    ([], 1 << 30, [], []),
])
def test_device_chunks_by_bytes(sizes, budget, chunks, too_large):
    assert plan_device_chunks(sizes, budget) == (chunks, too_large)


class SmallCardDecoder(SimulatedGpuJpegDecoder):
    """A (simulated) card with room for `capacity` bytes of decoding: a chunk whose
    planned working memory is larger raises torch's own OutOfMemoryError, as
    nvJPEG and the resize would on a real card."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.chunks: list[int] = []

    def decode(self, jpegs):
        need = sum(device_decode_bytes(*Image.open(io.BytesIO(j)).size) for j in jpegs)
        self.chunks.append(len(jpegs))
        if need > self.capacity:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().decode(jpegs)


def test_out_of_memory_in_device_decoding_backs_off_and_gives_what_a_clean_run_gives(tmp_path, embedder):
    """The budget was misjudged (4x what the simulated card holds): decoding runs out
    of memory, the budget and the batch are halved and the same JPEGs retried, and
    every vector equals the one a card with room to spare gives."""
    store = LocalStore(tmp_path / "src", create=True)
    rng = np.random.default_rng(61)
    for i in range(12):
        store.put(f"photos/{i:02d}.jpg", encode(make_product_photo(rng, (640, 480)), "JPEG"))
    items = list(store.list())
    one = device_decode_bytes(640, 480)
    options = DecodeOptions(on_device=True, decode_in="threads")
    clean = embed_objects(store, embedder, batch_size=8, decode=options, jpeg_decoder=SimulatedGpuJpegDecoder(),
                          items=items)
    small = SmallCardDecoder(capacity=3 * one)
    budget = DeviceBudget(12 * one)
    tight = embed_objects(store, embedder, batch_size=8, decode=options, jpeg_decoder=small, budget=budget,
                          items=items)
    assert tight.failures == [] and clean.failures == []
    assert budget.bytes <= 3 * one and tight.batch_size < 8  # halved, and kept for the shard
    assert max(small.chunks) > 3 and small.chunks[-1] <= 3  # it ran out, then fitted
    a, b = clean.by_key(), tight.by_key()
    assert a.keys() == b.keys() == {i.key for i in items}
    for key in a:
        np.testing.assert_allclose(a[key][0], b[key][0], atol=1e-5)


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_that_runs_out_of_memory_commits_what_a_clean_run_commits(tmp_path, resnet18_weights, monkeypatch):
    """A whole run on a (simulated) card that holds batches of 3: the model runs out
    of memory on every larger batch, the shard backs off, and the catalogue's rows
    and vectors equal a clean run's."""
    from tasks.catalog.reader import open_catalog
    from tasks.sample_data import generate_samples, write_samples
    from tests.helpers import run_small

    write_samples(LocalStore(tmp_path / "src", create=True), generate_samples(20, seed=67))
    clean = run_small(tmp_path / "src", tmp_path / "clean", resnet18_weights, shard_size=50)
    real_embed = Embedder.embed

    def small_card(self, batch, **kw):
        if batch.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_embed(self, batch, **kw)

    monkeypatch.setattr(Embedder, "embed", small_card)
    tight = run_small(tmp_path / "src", tmp_path / "tight", resnet18_weights, shard_size=50)
    assert tight.status == clean.status == "committed" and tight.batch_size <= 3 < clean.batch_size
    a, b = open_catalog(str(tmp_path / "clean")), open_catalog(str(tmp_path / "tight"))
    cols = ["key", "page", "image_id", "top_class"]
    pd.testing.assert_frame_equal(a.images[cols], b.images[cols])
    pd.testing.assert_frame_equal(a.failures[["key", "stage", "error_type"]], b.failures[["key", "stage", "error_type"]])
    (ids_a, vec_a), (ids_b, vec_b) = a.embeddings(), b.embeddings()
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_allclose(vec_a, vec_b, atol=1e-5)
