"""Thumbnails for the web page: small WebP images, a few KB each, addressed by
image id.

Runs make them in the decode step, from the page they decode for the model
(`encode_thumbnail`), and write one thumbnails part per shard beside its
embeddings part (`layout.thumbnails_part_key`); an `images` row names its part
(`thumbnail_part`) and the manifest lists the live parts, so they are versioned,
verified and collected like the embeddings. `thumbnail_of` serves a row's
thumbnail from its part (parts are immutable: a process keeps the last few it
read). Rows without one (catalogues made before, JPEGs decoded on a GPU) get
theirs made from the source object on first request and cached in the catalogue
under `thumbnails/cache/` (`layout.thumbnail_key`), keyed by image id and the
object's ETag so a changed object never shows a stale picture.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import pandas as pd

from tasks.catalog import layout
from tasks.shard.decode import DecodeError, decode_pages
from tasks.shard.thumbnails import THUMBNAIL_SIDE, encode_thumbnail
from tasks.storage import ObjectNotFound, ObjectStore

THUMBNAIL_PREFIX = layout.THUMBNAILS

THUMBNAIL_MEDIA_TYPE = "image/webp"

PARTS_KEPT = 32  # thumbnails parts a process keeps read (a shard's is ~1,000 x a few KB)

_parts_lock = threading.Lock()

_parts: OrderedDict[tuple[int, str], dict[int, bytes]] = OrderedDict()


def make_thumbnail(data: bytes, *, page: int = 1, side: int = THUMBNAIL_SIDE) -> bytes:
    """WebP bytes of page `page` of an image or document, fitted in `side` x `side`.
    Decoded with the runs' safe decoder, so a bomb or broken file is a `DecodeError`."""
    pages = decode_pages(data, min_side=side, max_pages=page)
    if len(pages) < page:
        raise DecodeError("corrupt", f"the object has {len(pages)} pages, not {page}")
    return encode_thumbnail(pages[page - 1].image, side)


def _part_thumbnails(cat, part: str) -> dict[int, bytes]:
    """image id -> thumbnail of one thumbnails part, read once and kept (the last `PARTS_KEPT`)."""
    cache_key = (id(cat.store), part)
    with _parts_lock:
        if cache_key in _parts:
            _parts.move_to_end(cache_key)
            return _parts[cache_key]
    table = cat.read_table(part)
    found = dict(zip(table.column("image_id").to_pylist(), table.column("thumbnail").to_pylist(), strict=True))
    with _parts_lock:
        _parts[cache_key] = found
        while len(_parts) > PARTS_KEPT:
            _parts.popitem(last=False)
    return found


def thumbnail_of(cat, row: pd.Series, source_store: Callable[[], ObjectStore]) -> bytes:
    """The thumbnail of one `images` row of `cat` (a `tasks.catalog.Catalog`): from
    the part its run wrote, else made from the source object and cached
    (`cached_thumbnail`). `source_store` opens the source only when needed."""
    part = row.get("thumbnail_part")
    if isinstance(part, str) and part:
        found = _part_thumbnails(cat, part).get(int(row["image_id"]))
        if found is not None:
            return found
    return cached_thumbnail(cat.store, source_store, row)


def cached_thumbnail(catalog_store: ObjectStore, source_store: Callable[[], ObjectStore], row: pd.Series) -> bytes:
    """The thumbnail of one `images` row: from the cache, or made from the source
    object and cached. `row` carries image_id, key, etag and page."""
    key = layout.thumbnail_key(int(row["image_id"]), str(row["etag"]))
    try:
        return catalog_store.get(key)
    except ObjectNotFound:
        pass
    data = make_thumbnail(source_store().get(str(row["key"])), page=int(row["page"]))
    catalog_store.put(key, data)  # two makers racing write the same bytes
    return data
