"""The Embedder: one loaded model per process, turning uint8 image batches into
L2-normalised embeddings (the input of the last Linear layer) and top-k classes.

Preprocessing is split so the expensive part (resize and crop, in Pillow) runs in
decode threads and the cheap part (scale and normalise) runs on the batch, on
the model's device.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from models.registry import ModelSpec, Preprocessing, get_model_spec
from models.weights import ResolvedWeights, apply_weights, resolve_weights

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class EmbedderSettings:
    """Everything that decides which model runs and how; hashable, so one Embedder
    per distinct settings is cached per process."""

    model: str = "resnet50"
    weights: str | None = None
    weights_sha256: str | None = None
    device: str = "auto"
    precision: str = "auto"
    top_k: int = 5
    endpoint_url: str | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}: use one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if not 1 <= self.top_k <= 20:
            raise ValueError(f"top_k must be between 1 and 20, not {self.top_k}")


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
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
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


COMPILE_MODES = ("auto", "on", "off")
# Compiling costs 10-20 s once per process and saves ~40% of model time on a
# bf16 CPU (ResNet-50: ~15 ms an image), so it pays for itself past ~1,500
# images; auto compiles from 3,000 to leave a margin for slower compiles.
COMPILE_MIN_IMAGES = 3000


def should_compile(mode: str, n_images: int) -> bool:
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}: use one of {', '.join(COMPILE_MODES)}")
    return mode == "on" or (mode == "auto" and n_images >= COMPILE_MIN_IMAGES)


_PIL_RESAMPLING = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
}


def center_crop_box(width: int, height: int, prep: Preprocessing) -> tuple[float, float, float, float]:
    """The region of a `width` x `height` image that torchvision's resize of the
    shorter side to `resize_size` followed by a centre crop to `crop_size` keeps,
    in the image's own pixel coordinates (same rounding as torchvision)."""
    short, long = min(width, height), max(width, height)
    new_long = int(prep.resize_size * long / short)
    new_w, new_h = (prep.resize_size, new_long) if width <= height else (new_long, prep.resize_size)
    left = int(round((new_w - prep.crop_size) / 2.0))
    top = int(round((new_h - prep.crop_size) / 2.0))
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + prep.crop_size) * sx, (top + prep.crop_size) * sy


def preprocess_image(image: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """torchvision's `ImageClassification` resize and centre crop for PIL input,
    in one Pillow call that computes only the pixels the crop keeps (`resize` with
    a source box: the same filter centres and support as resize-then-crop; a few
    pixels in ten thousand differ by one level from rounding).

    Returns uint8 CHW in channels-last memory: a view of the HWC pixels, so no
    transposing copy here or when `stack_images` batches it."""
    size = (prep.crop_size, prep.crop_size)
    image = image.resize(size, _PIL_RESAMPLING[prep.interpolation], box=center_crop_box(*image.size, prep))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Batch CHW images as NCHW in channels-last memory, the layout the model runs
    in. Images from `preprocess_image` are channels-last already, so this is a
    plain copy; contiguous CHW tensors are transposed on the way."""
    return torch.stack([im.permute(1, 2, 0) for im in images]).permute(0, 3, 1, 2)


def _last_linear_name(module: torch.nn.Module) -> str:
    names = [name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    if not names:
        raise ValueError(f"{type(module).__name__} has no Linear classification head to take embeddings from")
    return names[-1]


class FeaturesAndLogits(torch.nn.Module):
    """A classifier split at its last Linear layer: returns (the head's input, logits).

    The head's input is the globally pooled penultimate feature vector for every
    torchvision classifier (ResNet `fc`, ConvNeXt/EfficientNet `classifier[-1]`,
    ViT `heads.head`). An explicit module, not a forward hook, so it traces and
    compiles like any other.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        name = _last_linear_name(model)
        self.head = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, torch.nn.Identity())
        self.body = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.flatten(self.body(x), 1)
        return features, self.head(features)


class Embedder:
    """Loads the model once; `embed` may be called from several threads at once.

    Throughput work goes through `stream_pool()`: `streams` threads, each running
    whole batches with its share of the cores (`cpu_streams`; one stream on a GPU).

    CPU: weights converted to bf16 where the CPU runs it natively, channels_last,
    optionally compiled with frozen weights (oneDNN prepacks them). CUDA: fp32
    weights under bf16/fp16 autocast (normalisation layers stay fp32), channels_last,
    inputs copied from pinned memory without blocking.
    """

    def __init__(self, settings: EmbedderSettings, *, weights: ResolvedWeights | None = None) -> None:
        self.settings = settings
        self.spec: ModelSpec = get_model_spec(settings.model)
        self.weights = weights or resolve_weights(settings.weights, self.spec, expected_sha256=settings.weights_sha256,
                                                  endpoint_url=settings.endpoint_url)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.precision, self.device)
        self.preprocessing = self.spec.preprocessing
        self.categories = self.spec.categories

        if self.weights.is_random:
            torch.manual_seed(self.weights.seed)
        module = self.spec.builder(weights=None)
        apply_weights(module, self.weights, self.spec.name)
        net = FeaturesAndLogits(module)
        self.embedding_dim = net.head.in_features
        if net.head.out_features != len(self.categories):
            self.categories = [f"class_{i}" for i in range(net.head.out_features)]
        net = net.eval().to(self.device, memory_format=torch.channels_last)
        # On CPU the weights themselves become bf16 (oneDNN's fast path, and what
        # compile freezes); on CUDA autocast does the casting per op.
        self._autocast = self.device.type == "cuda" and self.dtype != torch.float32
        self._input_dtype = torch.float32 if self._autocast else self.dtype
        if not self._autocast and self.dtype != torch.float32:
            net = net.to(self.dtype)
        self.net = net
        self._forward = net
        self.compiled = False
        mean = torch.tensor(self.preprocessing.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocessing.std, device=self.device).view(1, 3, 1, 1)
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
        log.info("loaded %s (%s weights, sha256 %s) on %s as %s", self.spec.name, self.weights.source,
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
        shape = (batch_size, 3, self.preprocessing.crop_size, self.preprocessing.crop_size)
        self.embed(torch.zeros(shape, dtype=torch.uint8), pad_to=batch_size)

    @property
    def fingerprint(self) -> str:
        """Model plus weights: vectors with different fingerprints never share an index."""
        return f"{self.spec.name}@{self.weights.sha256}"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return preprocess_image(image, self.preprocessing)

    def preprocess_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """The same resize and crop for a uint8 CHW tensor already on the device
        (images decoded there by nvJPEG)."""
        image = TF.resize(image, [self.preprocessing.resize_size], interpolation=self.preprocessing.interpolation,
                          antialias=True)
        return TF.center_crop(image, [self.preprocessing.crop_size])

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


def get_embedder(settings: EmbedderSettings) -> Embedder:
    """The process's Embedder for `settings`: built once, reused by every shard
    this process (a thread-pool worker or a Dask worker) runs."""
    with _cache_lock:
        embedder = _embedders.get(settings)
        if embedder is None:
            _embedders.clear()  # one model per process: a new model replaces the old
            embedder = _embedders[settings] = Embedder(settings)
        return embedder
