"""Bytes to model inputs: every page decoded (`tasks.shard.decode`), resized and
cropped by the model family's own preprocessing, and its thumbnail made from the
same decoded page. Plain Pillow and numpy at run time, so decode worker
processes run it; what crosses back is plain data."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tasks.shard.decode import DecodeError, decode_pages
from tasks.shard.thumbnails import encode_thumbnail

if TYPE_CHECKING:
    from models.family import ModelFamily


DecodedPixels = list[tuple[int, int, int, np.ndarray, bytes | None]] | tuple[str, str]


def decode_to_pixels(data: bytes, family: ModelFamily, pdf_dpi: int, max_pages: int,
                     thumbnail_side: int = 0) -> DecodedPixels:
    """Bytes -> model-sized uint8 HWC pixels of every page (`family.preprocess`) and,
    with a `thumbnail_side`, its WebP thumbnail made from the same decoded page, as
    (page, width, height, pixels, thumbnail or None), or the refusal as (reason,
    message). Plain Pillow and numpy: this is what decode worker processes run,
    and what crosses back is plain data."""

    def prepare(image):
        return family.preprocess(image), encode_thumbnail(image, thumbnail_side) if thumbnail_side else None

    try:
        decoded = decode_pages(data, prepare=prepare, min_side=family.preprocessing.resize_size,
                               dpi=pdf_dpi, max_pages=max_pages)
    except DecodeError as exc:
        return exc.reason, exc.message
    return [(d.page, d.width, d.height, *d.image) for d in decoded]
