"""The Embedder: the runtime of a model. One per process, it runs any
`ModelFamily`'s network (models/family.py) on a device and precision, turning
uint8 image batches into L2-normalised embeddings and top-k classes.

What the rest of the code asks of it is the model interface (`preprocess`,
`embed`, `fingerprint`, `dim`, `labels`) plus how it runs: `device`, the model
streams (`stream_pool`, `cpu_streams`), `enable_compile`, `warm_up` and
`fitting_batch_size`.

Preprocessing is split so the expensive part (the family's resize and crop, in
Pillow) runs in decode threads or processes (on the device for JPEGs with
`--gpu-decode`) and the cheap part (scale and normalise) runs on the batch, on
the model's device.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from models.errors import UserError
from models.family import ModelFamily
from models.registry import model_family
from models.settings import COMPILE_MODES, EmbedderSettings
from models.weights import ResolvedWeights, apply_weights, resolve_weights

log = logging.getLogger(__name__)

@dataclass
class EmbedResult:
    embeddings: np.ndarray  # float32 [N, D], unit L2 norm
    class_ids: np.ndarray  # int32 [N, k]
    class_probs: np.ndarray  # float32 [N, k]


def cpu_supports_bf16() -> bool:
    """AVX-512 BF16 or AMX: where oneDNN runs bf16 convolutions natively."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(device)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def default_batch_size(device: str) -> int:
    """Images per model batch when --batch-size is not given.

    Measured on the 2-core development machine (benchmarks/throughput.py): ResNet-50 bf16
    runs fastest at 8-16 images a batch (the activations of a batch stay in L2);
    at 64 it is 30% slower. GPUs want large batches to fill the card.
    """
    return 256 if resolve_device(device).type == "cuda" else 16


CUDA_MAX_BATCH = 512


def batch_size_that_fits(free_bytes: int, bytes_per_image: float, *, cap: int = CUDA_MAX_BATCH,
                         share: float = 0.5) -> int:
    """The largest power of two up to `cap` whose activations (`bytes_per_image`
    each) take at most `share` of `free_bytes`; 1 if even that does not fit (the
    run then finds out, and halving on out-of-memory has nowhere left to go).

    ResNet-50 on an H200 runs about as fast at 256 as at 512 (15,400 and 15,900
    img/s eager, bf16), so the cap is there to bound the padding of a short last
    batch, not to win speed."""
    n = 1 << max(0, int(cap).bit_length() - 1)
    while n > 1 and n * bytes_per_image > share * free_bytes:
        n //= 2
    return n


# The cores torch may use in this process (OMP_NUM_THREADS, else torch's default),
# read before any Embedder changes a thread's count.
CPU_CORES = torch.get_num_threads()
MAX_CPU_STREAMS = 8


def cpu_streams(cores: int = CPU_CORES) -> tuple[int, int]:
    """How a model on the CPU uses the cores: (streams, threads per stream).

    Batches run as independent model streams, one single-threaded stream per core
    (past 8 cores, 8 streams of `cores // 8` threads), rather than one batch at a
    time split across every core. A pass split across cores waits for its slowest
    core at every layer, so a decode thread sharing one core stalls all of them;
    an independent stream slows only itself. Measured on 2 cores, ResNet-50 bf16
    compiled, batch 16: two single-threaded streams 88-89 img/s, one two-threaded
    stream 72-76 (eager: 77 against 69).
    """
    streams = max(1, min(cores, MAX_CPU_STREAMS))
    return streams, max(1, cores // streams)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with torch's intra-op thread count at `n` (this thread's)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Compiling costs 10-20 s once per process and saves ~40% of model time on a
# bf16 CPU (ResNet-50: ~15 ms an image), so it pays for itself past ~1,500
# images; auto compiles from 3,000 to leave a margin for slower compiles.
COMPILE_MIN_IMAGES = 3000


def should_compile(mode: str, n_images: int) -> bool:
    if mode not in COMPILE_MODES:
        raise UserError(f"unknown compile mode {mode!r}: use one of {', '.join(COMPILE_MODES)}")
    return mode == "on" or (mode == "auto" and n_images >= COMPILE_MIN_IMAGES)


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one (`cuda` is the current card, so it equals `cuda:0` there)."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def stack_images(images: list[torch.Tensor], device: torch.device | str | None = None, *,
                 pin: bool = False) -> torch.Tensor:
    """Batch uint8 CHW images as NCHW in channels-last memory (the layout the model
    runs in) on `device` (default: the first image's), wherever each image is now.

    This is the one path by which pages reach the model: images decoded on the GPU
    (nvJPEG) and pages decoded on the CPU (PNGs, PDFs, JPEGs the GPU refused) are
    stacked per source device, and each group is moved once; a mixed batch never
    meets one `torch.stack`. CPU groups bound for a GPU are stacked straight into
    pinned memory (`pin`) so the copy runs without blocking. Images from
    `Embedder.preprocess` are channels-last already, so stacking is a plain copy."""
    if not images:
        raise ValueError("stack_images needs at least one image")
    target = torch.device(device) if device is not None else images[0].device
    groups: dict[torch.device, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.device, []).append(i)
    parts = []
    for source, index in groups.items():
        hwc = [images[i].permute(1, 2, 0) for i in index]
        if pin and source.type == "cpu" and target.type == "cuda":
            part = torch.stack(hwc, out=torch.empty((len(hwc), *hwc[0].shape), dtype=hwc[0].dtype, pin_memory=True))
        else:
            part = torch.stack(hwc)
        if not same_device(source, target):
            part = part.to(target, non_blocking=True)
        parts.append((index, part))
    if len(parts) == 1:
        return parts[0][1].permute(0, 3, 1, 2)
    first = parts[0][1]
    out = torch.empty((len(images), *first.shape[1:]), dtype=first.dtype, device=first.device)
    for index, part in parts:
        out[torch.tensor(index, device=out.device)] = part
    return out.permute(0, 3, 1, 2)


class Embedder:
    """Loads the model once; `embed` may be called from several threads at once.

    Throughput work goes through `stream_pool()`: `streams` threads, each running
    whole batches with its share of the cores (`cpu_streams`; one stream on a GPU).

    CPU: weights converted to bf16 where the CPU runs it natively, channels_last,
    optionally compiled with frozen weights (oneDNN prepacks them). CUDA: fp32
    weights under bf16/fp16 autocast (normalisation layers stay fp32), channels_last,
    inputs copied from pinned memory without blocking.
    """

    def __init__(self, settings: EmbedderSettings, *, weights: ResolvedWeights | None = None,
                 read: Callable[[str], bytes] | None = None) -> None:
        self.settings = settings
        self.family: ModelFamily = model_family(settings.model)
        self.weights = weights or resolve_weights(settings.weights, self.family,
                                                  expected_sha256=settings.weights_sha256, read=read)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.precision, self.device)

        if self.weights.is_random:
            torch.manual_seed(self.weights.seed)
        module = self.family.module()
        apply_weights(module, self.weights, self.family.name)
        net = self.family.network(module).eval().to(self.device, memory_format=torch.channels_last)
        # On CPU the weights themselves become bf16 (oneDNN's fast path, and what
        # compile freezes); on CUDA autocast does the casting per op.
        self._autocast = self.device.type == "cuda" and self.dtype != torch.float32
        self._input_dtype = torch.float32 if self._autocast else self.dtype
        if not self._autocast and self.dtype != torch.float32:
            net = net.to(self.dtype)
        self.net = net
        self._forward = net
        self.compiled = False
        prep = self.family.preprocessing
        mean = torch.tensor(prep.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(prep.std, device=self.device).view(1, 3, 1, 1)
        # x/255 then (x-mean)/std folded into one multiply-add.
        self._scale = (1.0 / (255.0 * std)).to(self._input_dtype)
        self._shift = (-mean / std).to(self._input_dtype)
        self._lock = threading.Lock()
        self._compiled_shapes: set[tuple[int, ...]] = set()
        if self.device.type == "cpu":
            self.streams, self.stream_threads = cpu_streams()
        else:
            self.streams, self.stream_threads = 1, CPU_CORES
        self._pool: ThreadPoolExecutor | None = None
        self._fitting_batch: int | None = None
        self._bytes_per_image: float | None = None
        log.info("loaded %s (%s weights, sha256 %s) on %s as %s", self.family.name, self.weights.source,
                 self.weights.sha256[:12], self.device, str(self.dtype).removeprefix("torch."))

    def enable_compile(self) -> None:
        """Compile the model with frozen weights (TorchInductor): about 1.6x on a
        bf16 CPU for ResNet-50, for 10-20 s of compilation on the first batch.
        Shapes are static (one compilation per process); `embed` pads a short
        last batch. Idempotent."""
        with self._lock:
            if not self.compiled:
                self._forward = torch.compile(self.net, dynamic=False, options={"freezing": True})
                self.compiled = True

    def stream_pool(self) -> ThreadPoolExecutor:
        """The `streams` threads that run batches, each with `stream_threads` torch
        threads; created on first use and kept for the process."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="batchsight-model",
                                                initializer=torch.set_num_threads, initargs=(self.stream_threads,))
            return self._pool

    def warm_up(self, batch_size: int) -> None:
        """Run one batch of zeros: compiles a compiled model for `batch_size`, so the
        first real batch is not charged for it."""
        side = self.family.preprocessing.crop_size
        shape = (batch_size, 3, side, side)
        self.embed(torch.zeros(shape, dtype=torch.uint8), pad_to=batch_size)

    @property
    def fingerprint(self) -> str:
        """Model plus weights: vectors with different fingerprints never share an index."""
        return self.family.fingerprint(self.weights.sha256)

    @property
    def dim(self) -> int:
        return self.family.dim

    @property
    def labels(self) -> tuple[str, ...]:
        return self.family.labels

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The family's `preprocess` as uint8 CHW in channels-last memory: a view of
        the HWC pixels, so no transposing copy here or when `stack_images` batches it."""
        return torch.from_numpy(self.family.preprocess(image)).permute(2, 0, 1)

    def fitting_batch_size(self) -> int:
        """The batch size a run starts from when none is given: 16 on a CPU
        (`default_batch_size`); on a GPU the largest power of two up to
        `CUDA_MAX_BATCH` whose activations, measured on a probe batch, take at most
        half of the card's free memory. Measured once per Embedder."""
        if self.device.type != "cuda":
            return default_batch_size("cpu")
        with self._lock:
            if self._fitting_batch is None:
                if self._bytes_per_image is None:
                    self._bytes_per_image = self._activation_bytes_per_image()
                self._fitting_batch = batch_size_that_fits(torch.cuda.mem_get_info(self.device)[0],
                                                           self._bytes_per_image)
                log.info("batch size %s fits %s", self._fitting_batch, torch.cuda.get_device_name(self.device))
            return self._fitting_batch

    def device_memory(self, batch_size: int) -> tuple[int, int]:
        """(bytes free on the model's GPU, bytes a batch of `batch_size` takes in
        activations), for budgets that share the card with the model; (0, 0) on a CPU."""
        if self.device.type != "cuda":
            return 0, 0
        with self._lock:
            if self._bytes_per_image is None:
                self._bytes_per_image = self._activation_bytes_per_image()
        return torch.cuda.mem_get_info(self.device)[0], int(batch_size * self._bytes_per_image)

    @torch.inference_mode()
    def _activation_bytes_per_image(self, probe: int = 8) -> float:
        size = self.family.preprocessing.crop_size
        x = torch.zeros((probe, 3, size, size), device=self.device, dtype=self._input_dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self._autocast):
            self.net(x)  # eager: a compiled model would compile for the probe's shape
        torch.cuda.synchronize(self.device)
        return max(1.0, (torch.cuda.max_memory_allocated(self.device) - before) / probe)

    def _forward_autocast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self._autocast):
            return self._forward(x)

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor, *, pad_to: int | None = None) -> EmbedResult:
        """`batch` is uint8 [N, 3, H, W] (on any device); returns unit embeddings and top-k classes.

        A compiled model is specialised to one batch shape: pass the run's batch
        size as `pad_to` and a short last batch is padded (and the padding dropped).
        """
        n = batch.shape[0]
        if self.compiled and pad_to and n < pad_to:
            batch = torch.cat([batch, batch[-1:].expand(pad_to - n, *batch.shape[1:])])
        x = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        x = x.to(self._input_dtype) * self._scale + self._shift
        if self.compiled and tuple(x.shape) not in self._compiled_shapes:
            # Compile once per shape, for the thread count the streams run with
            # (TorchInductor bakes the count into its CPU kernels).
            with self._lock, torch_threads(self.stream_threads):
                feats, logits = self._forward_autocast(x)
                self._compiled_shapes.add(tuple(x.shape))
        else:
            feats, logits = self._forward_autocast(x)
        feats = torch.nn.functional.normalize(feats[:n].float(), dim=1)
        probs = torch.softmax(logits[:n].float(), dim=1)
        k = min(self.settings.top_k, probs.shape[1])
        top = torch.topk(probs, k, dim=1)
        return EmbedResult(
            embeddings=feats.cpu().numpy(),
            class_ids=top.indices.to(torch.int32).cpu().numpy(),
            class_probs=top.values.cpu().numpy(),
        )


_cache_lock = threading.Lock()
_embedders: dict[EmbedderSettings, Embedder] = {}
_built = 0  # Embedders this process has built: a worker that reuses its model stays at 1


def embedders_built() -> int:
    return _built


def get_embedder(settings: EmbedderSettings, *, weights: ResolvedWeights | None = None,
                 read: Callable[[str], bytes] | None = None) -> Embedder:
    """The process's Embedder for `settings`: built once, reused by every shard
    this process (a thread-pool worker or a Dask worker) runs. `weights`, when
    the caller has resolved them already, are used instead of resolving again;
    `read` fetches weights given as a URL (see `resolve_weights`)."""
    with _cache_lock:
        embedder = _embedders.get(settings)
        if embedder is None:
            _embedders.clear()  # one model per process: a new model replaces the old
            embedder = _embedders[settings] = Embedder(settings, weights=weights, read=read)
            global _built
            _built += 1
        return embedder


@dataclass(frozen=True)
class ModelInfo:
    """What a run records about its model without building it: the flow's
    process needs this when the shards (and the model) run elsewhere."""

    name: str
    fingerprint: str
    embedding_dim: int


def describe_model(settings: EmbedderSettings, weights: ResolvedWeights) -> ModelInfo:
    """Name, fingerprint and embedding size of `settings` with `weights`, from the
    family alone (no model built, no weights loaded)."""
    family = model_family(settings.model)
    return ModelInfo(family.name, family.fingerprint(weights.sha256), family.dim)
