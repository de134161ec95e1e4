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
from collections.abc import Iterable, Iterator, Sequence
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
    copies: Pages = field(default_factory=Pages)  # objects whose bytes were seen before, passed on to the writer
    contents: dict[str, str] = field(default_factory=dict)  # key -> sha256 of the objects read
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
                   [f for p in parts for f in p.failures], Pages.concat([p.copies for p in parts]),
                   {k: v for p in parts for k, v in p.contents.items()}, sum(p.objects_done for p in parts),
                   sum(p.fetch_s for p in parts), sum(p.decode_s for p in parts), sum(p.model_s for p in parts))


def assemble_batch(pixels: Sequence[np.ndarray], on_device: torch.Tensor | None, target: torch.device, *,
                   pin: bool = False) -> torch.Tensor:
    """Pages decoded on a CPU (uint8 [k, S, S, 3] segments) and images already on a
    device (uint8 [m, 3, S, S]) as one uint8 NCHW batch on `target`: the one path
    by which inputs reach the model. The CPU segments are copied once, into one
    (pinned, where `pin`) buffer, and moved to `target` whole and without
    blocking; tensors on two devices never meet in one op. Device images alone
    are the batch as they are."""
    parts = []
    if len(pixels):
        n = sum(len(p) for p in pixels)
        host = torch.empty((n, *pixels[0].shape[1:]), dtype=torch.uint8,
                           pin_memory=pin and target.type == "cuda") if len(pixels) > 1 or pin else None
        if host is None:
            host = torch.from_numpy(pixels[0])
        else:
            at = 0
            for segment in pixels:
                host[at:at + len(segment)] = torch.from_numpy(segment)
                at += len(segment)
        parts.append(host.permute(0, 3, 1, 2))
    if on_device is not None:
        parts.append(on_device)
    if not parts:
        raise ValueError("assemble_batch needs at least one image")
    moved = [p if same_device(p.device, target) else p.to(target, non_blocking=True) for p in parts]
    return moved[0] if len(moved) == 1 else torch.cat(moved)


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
        out.copies, out.contents = inputs.copies, inputs.contents
        out.objects_done = inputs.objects_done()
        return out

    def _embed(self, inputs: Inputs) -> Embedded:
        on_device, refused, device_pages, failures, decode_s = self._decode_raw(inputs)
        on_cpu = Pages.concat([inputs.decoded, refused])
        pages = Pages.concat([on_cpu, device_pages])  # the batch's rows: CPU pixels first, then the device's
        if not len(pages):
            return Embedded(Pages(), *self._no_vectors(), failures=failures, decode_s=decode_s)
        batch = assemble_batch(on_cpu.pixels, on_device, self.embedder.device, pin=self.pin)
        result = self.embedder.embed(batch, pad_to=self.size)
        bad = non_finite_rows(result)
        if bad.any():
            failures += [failure(info, "model", "non_finite_embedding", NON_FINITE_MESSAGE)
                         for info, b in zip(pages.infos, bad, strict=True) if b]
            good = ~bad
            pages = pages.take(good)
            result = EmbedResult(result.embeddings[good], result.class_ids[good], result.class_probs[good])
        return Embedded(pages, result.embeddings, result.class_ids, result.class_probs, failures, decode_s=decode_s)

    def _no_vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = self.embedder.settings.top_k
        return (np.empty((0, self.embedder.dim), np.float32), np.empty((0, k), np.int32),
                np.empty((0, k), np.float32))

    def _decode_raw(self, inputs: Inputs) -> tuple[torch.Tensor | None, Pages, Pages, list[ImageFailure], float]:
        """The batch's raw JPEGs: those the device decoded, as one tensor there, with
        their pages (metadata); the pages of those it refused, decoded on this CPU
        (with their pixels); and the failures of those no decoder could read."""
        raw = inputs.raw
        if not len(raw):
            return None, Pages(), Pages(), [], 0.0
        t0 = time.perf_counter()
        on_device, done = (decode_on_device(raw.jpegs, raw.size.tolist(), self.jpeg_decoder,
                                            self.embedder.family.preprocess_on_device, self.budget)
                           if self.jpeg_decoder is not None else (None, np.zeros(len(raw), bool)))
        keep, segments, failures = np.zeros(len(raw), bool), [], []
        for i in np.flatnonzero(~done):
            pixels = decode_to_pixels(raw.jpegs[i], self.embedder.family, DEFAULT_PDF_DPI, 1)
            if isinstance(pixels, tuple):
                failures.append(failure(raw.infos[i], "decode", *pixels))
            else:
                keep[i] = True
                segments.append(pixels[0][3][None])
        refused = raw.take(keep)
        refused.pixels = segments
        return on_device, refused, raw.take(done), failures, time.perf_counter() - t0

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
