"""Thumbnails for the web page: small WebP images, a few KB each, addressed by
image id. Made from the source object on first request and cached in the
catalogue under `thumbnails/cache/` (`layout.thumbnail_key`), keyed by image id and the object's ETag so
a changed object never shows a stale picture; later requests read the cache."""

from __future__ import annotations

import io

import pandas as pd
from PIL import Image

from tasks import layout
from tasks.decode import DecodeError, decode_pages
from tasks.storage import ObjectNotFound, ObjectStore

THUMBNAIL_PREFIX = layout.THUMBNAILS
THUMBNAIL_SIDE = 160  # the longer side, in pixels: a grid cell on the page
THUMBNAIL_QUALITY = 70
THUMBNAIL_MEDIA_TYPE = "image/webp"


def make_thumbnail(data: bytes, *, page: int = 1, side: int = THUMBNAIL_SIDE) -> bytes:
    """WebP bytes of page `page` of an image or document, fitted in `side` x `side`.
    Decoded with the runs' safe decoder, so a bomb or broken file is a `DecodeError`."""
    pages = decode_pages(data, min_side=side, max_pages=page)
    if len(pages) < page:
        raise DecodeError("corrupt", f"the object has {len(pages)} pages, not {page}")
    image: Image.Image = pages[page - 1].image
    image.thumbnail((side, side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, "WEBP", quality=THUMBNAIL_QUALITY, method=4)
    return buf.getvalue()


def cached_thumbnail(catalog_store: ObjectStore, source_store: ObjectStore, row: pd.Series) -> bytes:
    """The thumbnail of one `images` row: from the cache, or made from the source
    object and cached. `row` carries image_id, key, etag and page."""
    key = layout.thumbnail_key(int(row["image_id"]), str(row["etag"]))
    try:
        return catalog_store.get(key)
    except ObjectNotFound:
        pass
    data = make_thumbnail(source_store.get(str(row["key"])), page=int(row["page"]))
    catalog_store.put(key, data)  # two makers racing write the same bytes
    return data
