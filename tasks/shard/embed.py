"""The embed stage: a batch of `Inputs` in, its embeddings and top-k classes out.

A batch's JPEGs are decoded on the model's device first (within the device
budget, `tasks/shard/device.py`); every input then reaches the model's device
through `assemble_batch`, and the model runs on one of the embedder's streams
(`Embedder.stream_pool`). What can go wrong has a method of its own: out of
memory anywhere in a batch (decode, copy, model) backs off to smaller batches
and a smaller device budget (`_back_off`); a model error on a batch is retried
input by input, so one poison input cannot fail its neighbours (`_one_by_one`);
an embedding with NaN or inf fails its input and is never stored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from models.engine import Embedder, EmbedResult, same_device
from tasks.records import ImageFailure, ObjectInfo
from tasks.shard.decode import DEFAULT_PDF_DPI
from tasks.shard.device import DeviceBudget, DeviceJpegDecoder, decode_on_device
from tasks.shard.inputs import Inputs, Pages
from tasks.shard.pixels import decode_to_pixels
from tasks.shard.read import bounded_map

log = logging.getLogger(__name__)

NON_FINITE_MESSAGE = ("the model's embedding for this image holds NaN or inf values, so it was not stored; check "
                      "the weights (a NaN in them), or run with --precision fp32 (fp16 can overflow)")


def failure(info: ObjectInfo, stage: str, error_type: str, message: str) -> ImageFailure:
    return ImageFailure(info.key, info.etag, info.size, stage, error_type, message)


def non_finite_rows(result: EmbedResult) -> np.ndarray:
    """Rows whose embedding or class probabilities hold NaN or inf (fp16 overflow,
    broken weights): such a vector would poison every search it meets."""
    return ~(np.isfinite(result.embeddings).all(axis=1) & np.isfinite(result.class_probs).all(axis=1))


@dataclass
class Embedded:
    """A batch after the model: `pages` (metadata of the inputs embedded, in the
    order of the vectors), their vectors and classes, the failures met on the way
    (read, device decode, model), the objects the batch finishes, and seconds."""

    pages: Pages
    embeddings: np.ndarray
    class_ids: np.ndarray
    class_probs: np.ndarray
    failures: list[ImageFailure] = field(default_factory=list)
    objects_done: int = 0
    fetch_s: float = 0.0
    decode_s: float = 0.0
    model_s: float = 0.0

    @classmethod
    def empty(cls, dim: int, k: int) -> Embedded:
        return cls(Pages(), np.empty((0, dim), np.float32), np.empty((0, k), np.int32), np.empty((0, k), np.float32))

    @classmethod
    def concat(cls, parts: list[Embedded]) -> Embedded:
        if len(parts) == 1:
            return parts[0]
        return cls(Pages.concat([p.pages for p in parts]), np.concatenate([p.embeddings for p in parts]),
                   np.concatenate([p.class_ids for p in parts]), np.concatenate([p.class_probs for p in parts]),
                   [f for p in parts for f in p.failures], sum(p.objects_done for p in parts),
                   sum(p.fetch_s for p in parts), sum(p.decode_s for p in parts), sum(p.model_s for p in parts))


def assemble_batch(pixels: np.ndarray | None, on_device: list[torch.Tensor], target: torch.device, *,
                   pin: bool = False) -> torch.Tensor:
    """Pages decoded on a CPU (uint8 [n, S, S, 3]) and images already on a device
    (uint8 [k, 3, S, S] groups) as one uint8 NCHW batch in channels-last memory on `target`:
    the one path by which inputs reach the model. Each group moves to `target`
    once, whole (CPU pixels through pinned memory without blocking where `pin`);
    tensors on two devices never meet in one op."""
    parts = []
    if pixels is not None and len(pixels):
        host = torch.from_numpy(pixels)
        if pin and target.type == "cuda":
            host = torch.empty(host.shape, dtype=host.dtype, pin_memory=True).copy_(host)
        parts.append(host)
    if on_device:
        parts.append((on_device[0] if len(on_device) == 1 else torch.cat(on_device)).permute(0, 2, 3, 1))
    if not parts:
        raise ValueError("assemble_batch needs at least one image")
    moved = [p if same_device(p.device, target) else p.to(target, non_blocking=True) for p in parts]
    return (moved[0] if len(moved) == 1 else torch.cat(moved)).permute(0, 3, 1, 2)


class EmbedStage:
    """Runs batches through the embedder's model streams, in order, at most
    `streams + 1` batches at the model; decodes JPEGs on the device first where
    a `jpeg_decoder` is given. `size` is the batch size, halved (with the device
    budget) when the device runs out of memory and kept so for the shard."""

    def __init__(self, embedder: Embedder, batch_size: int, *, jpeg_decoder: DeviceJpegDecoder | None = None,
                 budget: DeviceBudget | None = None) -> None:
        self.embedder = embedder
        self.size = batch_size
        self.jpeg_decoder = jpeg_decoder
        self.budget = budget or DeviceBudget(1 << 62)
        self.pin = embedder.device.type == "cuda"
        self._lock = threading.Lock()

    def map(self, batches: Iterable[Inputs]) -> Iterator[Embedded]:
        yield from bounded_map(self.embedder.stream_pool(), self.embed, batches,
                               max_in_flight=self.embedder.streams + 1)

    def embed(self, inputs: Inputs) -> Embedded:
        """One batch, whatever happens to it: a failure per input that could not be embedded."""
        t0 = time.perf_counter()
        try:
            out = self._embed(inputs)
        except torch.cuda.OutOfMemoryError as exc:
            out = self._back_off(inputs, exc)
        except RuntimeError as exc:
            out = self._one_by_one(inputs, exc)
        out.model_s = time.perf_counter() - t0 - out.decode_s
        out.fetch_s += inputs.fetch_s
        out.decode_s += inputs.decode_s
        out.failures[:0] = inputs.failures
        out.objects_done = inputs.objects_done()
        return out

    def _embed(self, inputs: Inputs) -> Embedded:
        decoded, failures, decode_s = self._decode_raw(inputs)
        pages = Pages.concat([inputs.decoded, decoded])
        if not len(pages):
            return Embedded(Pages(), *self._no_vectors(), failures=failures, decode_s=decode_s)
        on_device = [p for p in decoded.pixels if isinstance(p, torch.Tensor)]
        on_cpu = [p for p in pages.pixels if not isinstance(p, torch.Tensor)]
        batch = assemble_batch(np.concatenate(on_cpu) if len(on_cpu) > 1 else (on_cpu[0] if on_cpu else None),
                               on_device, self.embedder.device, pin=self.pin)
        order = self._order(pages, on_cpu)
        result = self.embedder.embed(batch, pad_to=self.size)
        result = EmbedResult(result.embeddings[order], result.class_ids[order], result.class_probs[order])
        bad = non_finite_rows(result)
        if bad.any():
            failures += [failure(info, "model", "non_finite_embedding", NON_FINITE_MESSAGE)
                         for info, b in zip(pages.infos, bad, strict=True) if b]
            good = ~bad
            pages = pages.take(good)
            result = EmbedResult(result.embeddings[good], result.class_ids[good], result.class_probs[good])
        return Embedded(pages, result.embeddings, result.class_ids, result.class_probs, failures, decode_s=decode_s)

    @staticmethod
    def _order(pages: Pages, on_cpu: list[np.ndarray]) -> np.ndarray:
        """The batch holds CPU pixels first, then device images: the row of each page in it."""
        is_cpu = np.concatenate([np.full(len(s), not isinstance(s, torch.Tensor)) for s in pages.pixels]) \
            if pages.pixels else np.zeros(0, bool)
        n_cpu = int(is_cpu.sum())
        rows = np.empty(len(is_cpu), np.int64)
        rows[is_cpu] = np.arange(n_cpu)
        rows[~is_cpu] = n_cpu + np.arange(len(is_cpu) - n_cpu)
        return rows

    def _no_vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = self.embedder.settings.top_k
        return (np.empty((0, self.embedder.dim), np.float32), np.empty((0, k), np.int32),
                np.empty((0, k), np.float32))

    def _decode_raw(self, inputs: Inputs) -> tuple[Pages, list[ImageFailure], float]:
        """The batch's raw JPEGs as pages: decoded on the device (one pixel segment a
        JPEG, a tensor there), or where the device refused one, on this CPU."""
        raw = inputs.raw
        if not len(raw):
            return Pages(), [], 0.0
        t0 = time.perf_counter()
        images = decode_on_device(raw.jpegs, [tuple(s) for s in raw.size], self.jpeg_decoder,
                                  self.embedder.family.preprocess_on_device, self.budget) \
            if self.jpeg_decoder is not None else [None] * len(raw)
        keep, segments, failures = np.ones(len(raw), bool), [], []
        for i, image in enumerate(images):
            if image is not None:
                segments.append(image.unsqueeze(0))
                continue
            pixels = decode_to_pixels(raw.jpegs[i], self.embedder.family, DEFAULT_PDF_DPI, 1)
            if isinstance(pixels, tuple):
                failures.append(failure(raw.infos[i], "decode", *pixels))
                keep[i] = False
            else:
                segments.append(pixels[0][3][None])
        pages = raw.take(keep)
        pages.pixels = segments
        return pages, failures, time.perf_counter() - t0

    def _back_off(self, inputs: Inputs, error: torch.cuda.OutOfMemoryError) -> Embedded:
        """Out of device memory: the same inputs again in halves, at half the batch
        size and half the device budget (kept for the rest of the shard), down to one
        input; one that does not fit even alone fails, not the shard."""
        with self._lock:
            if len(inputs) <= self.size:
                self.size = max(1, self.size // 2)
                self.budget.halve()
            size = self.size
        if len(inputs) <= 1:
            return self._failed(inputs, error)
        log.warning("a batch of %s ran out of device memory; retrying at batch size %s (device decode budget "
                    "%.0f MiB)", len(inputs), size, self.budget.bytes / 2**20)
        torch.cuda.empty_cache()
        return Embedded.concat([self._embed_or_back_off(piece) for piece in inputs.pieces(size)])

    def _embed_or_back_off(self, inputs: Inputs) -> Embedded:
        try:
            return self._embed(inputs)
        except torch.cuda.OutOfMemoryError as exc:
            return self._back_off(inputs, exc)

    def _failed(self, inputs: Inputs, error: Exception) -> Embedded:
        """One input the model could not take: its failure, no vector."""
        out = Embedded(Pages(), *self._no_vectors())
        for info in inputs.decoded.infos + inputs.raw.infos:
            out.failures.append(failure(info, "model", type(error).__name__, str(error)))
        return out

    def _one_by_one(self, inputs: Inputs, error: RuntimeError) -> Embedded:
        """A model error on a batch: each input alone, so one poison input fails only itself."""
        if len(inputs) <= 1:
            return self._failed(inputs, error)
        log.warning("batch of %s failed in the model (%s); retrying image by image", len(inputs), error)
        parts = []
        for single in inputs.pieces(1):
            single.failures = []
            try:
                parts.append(self._embed_or_back_off(single))
            except RuntimeError as exc:
                parts.append(self._failed(single, exc))
        return Embedded.concat(parts)
