"""JPEGs decoded on the model's device (`--gpu-decode`), within a memory budget
in bytes.

Which JPEGs go there is decided from their headers (`device_jpeg_size`): JPEGs
up to `DecodeOptions.device_max_pixels`; larger ones decode on a CPU core in
draft mode. How many decode at once is decided by arithmetic, not by count:
`plan_device_chunks` cuts a batch's JPEGs into chunks whose decoded pixels and
resize working memory (`device_decode_bytes`) fit `DeviceBudget.bytes`, taken
from the device's free memory once the model and its batch have theirs. Each
image is resized right after its chunk is decoded, and stays uint8 until it is
model-sized, so a batch of 512 camera photos costs a chunk of them at a time,
never 68 GiB at once. A JPEG the device refuses goes back to the CPU decoder.
Working memory is planned with `device_decode_bytes`: 18 bytes a pixel (the
decoded uint8, its stacked copy, and the float32 copy the antialiased resize makes).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from tasks.shard.decode import DecodeOptions

log = logging.getLogger(__name__)

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


def device_jpeg_size(data: bytes, options: DecodeOptions) -> tuple[int, int] | None:
    """The JPEG's size where it goes to the device decoder (a JPEG of at most
    `options.device_max_pixels`), else None: it decodes on a CPU."""
    if not options.on_device or data[:3] != b"\xff\xd8\xff":
        return None
    size = jpeg_size(data)
    return size if size and size[0] * size[1] <= options.device_max_pixels else None


# Bytes a pixel costs on the device from its decode until it is model-sized: its
# decoded uint8 RGB and the copy stacking a same-size group makes (3 + 3), and
# the float32 copy the antialiased resize works on (12); the resize's
# intermediate pass and the model-sized result are smaller.
DECODED_BYTES_PER_PIXEL = 6
RESIZE_BYTES_PER_PIXEL = 12
# Of the free device memory left once the model and its batch are in place, the
# share decoding may use; and its ceiling, so a large card keeps its memory for the model.
DECODE_SHARE = 0.25
DECODE_MAX_BYTES = 4 << 30


def device_decode_bytes(width: int, height: int) -> int:
    """Device memory one image needs from its decode until it is model-sized."""
    return (DECODED_BYTES_PER_PIXEL + RESIZE_BYTES_PER_PIXEL) * width * height


@dataclass
class DeviceBudget:
    """The bytes device decoding may hold at once; halved when the device runs out
    of memory anyway (the shard's later batches keep the smaller budget)."""

    bytes: int

    @classmethod
    def from_free(cls, free_bytes: int, batch_bytes: int) -> DeviceBudget:
        """`DECODE_SHARE` of what is free once the model's batch (`batch_bytes` of
        activations) is set aside, at most `DECODE_MAX_BYTES`."""
        return cls(max(0, min(DECODE_MAX_BYTES, int((free_bytes - batch_bytes) * DECODE_SHARE))))

    def halve(self) -> None:
        self.bytes //= 2


def plan_device_chunks(sizes: Sequence[tuple[int, int]], budget: int) -> tuple[list[list[int]], list[int]]:
    """Cut JPEGs of `sizes` (width, height), in order, into chunks decoded and
    resized together: a chunk's `device_decode_bytes`, summed, stay within `budget`.
    Returns (chunks of indices, indices of JPEGs too large for the budget even
    alone: they decode on a CPU)."""
    chunks: list[list[int]] = []
    too_large: list[int] = []
    current: list[int] = []
    held = 0
    for i, (w, h) in enumerate(sizes):
        need = device_decode_bytes(w, h)
        if need > budget:
            too_large.append(i)
            continue
        if current and held + need > budget:
            chunks.append(current)
            current, held = [], 0
        current.append(i)
        held += need
    if current:
        chunks.append(current)
    return chunks, too_large


def planned_peak_bytes(sizes: Sequence[tuple[int, int]], chunk: Sequence[int]) -> int:
    """The device memory a chunk holds at its peak, by the same arithmetic as the plan."""
    return sum(device_decode_bytes(*sizes[i]) for i in chunk)


class DeviceJpegDecoder(Protocol):
    """Decodes a batch of JPEGs on a device: uint8 RGB CHW tensors there (EXIF
    orientation applied), None for each JPEG it refuses."""

    def decode(self, jpegs: list[bytes]) -> list[torch.Tensor | None]: ...


class NvJpegDecoder:
    """nvJPEG through `torchvision.io.decode_jpeg(device="cuda")`, a chunk per call."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def _decode(self, jpegs: list[bytes]) -> list[torch.Tensor]:
        return decode_jpeg([torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs],
                           mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)

    def decode(self, jpegs: list[bytes]) -> list[torch.Tensor | None]:
        try:
            return list(self._decode(jpegs))
        except torch.cuda.OutOfMemoryError:
            raise  # the caller backs off with a smaller budget
        except RuntimeError:  # one file nvJPEG refuses fails the whole call: decode one by one
            images: list[torch.Tensor | None] = []
            for j in jpegs:
                try:
                    images.append(self._decode([j])[0])
                except torch.cuda.OutOfMemoryError:
                    raise
                except RuntimeError:
                    images.append(None)
            return images


@lru_cache(maxsize=4)
def device_jpeg_decoder(device: torch.device) -> NvJpegDecoder | None:
    """nvJPEG for `device`, checked on a tiny JPEG once per process; None, after a
    one-line notice, where this torchvision cannot decode JPEGs there (a build
    without nvJPEG): the run then decodes every JPEG on the CPU."""
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


def decode_on_device(jpegs: Sequence[bytes], sizes: Sequence[tuple[int, int]], decoder: DeviceJpegDecoder,
                     preprocess: Callable[[list[torch.Tensor]], list[torch.Tensor]], budget: DeviceBudget
                     ) -> tuple[torch.Tensor | None, np.ndarray]:
    """The model-sized uint8 images of `jpegs` on the device as one [k, 3, S, S]
    batch (None when there are none), and which of `jpegs` it holds, in order:
    the rest were refused by the device or too large for the budget, for the
    caller to decode on a CPU. Chunk by chunk per `plan_device_chunks`: a chunk is
    decoded, resized and cropped (`preprocess`: the model family's
    `preprocess_on_device`, same-size images as one batch) and stacked, and its
    decoded pixels let go before the next. An out-of-memory error is the caller's
    to back off from (`EmbedStage`)."""
    done = np.zeros(len(jpegs), bool)
    batches: list[torch.Tensor] = []
    chunks, _ = plan_device_chunks(sizes, budget.bytes)
    for chunk in chunks:
        decoded = decoder.decode([jpegs[i] for i in chunk])
        images = [image for image in decoded if image is not None]
        done[[i for i, image in zip(chunk, decoded, strict=True) if image is not None]] = True
        del decoded
        if images:
            batches.append(torch.stack(preprocess(images)))
        del images
    if not batches:
        return None, done
    return (batches[0] if len(batches) == 1 else torch.cat(batches)), done
