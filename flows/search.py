"""Similar images, by catalogued key or by an image file; one call, one DataFrame.

    >>> from flows.search import similar_images
    >>> similar_images("s3://inventory/catalog", key="photos/sku-123.jpg", k=10)

Search is interactive, so it is a plain function (no Prefect server to start).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from models.engine import EmbedderSettings, get_embedder
from tasks import index as faiss_index
from tasks.catalog import Catalog, open_catalog
from tasks.decode import decode_image

RESULT_COLUMNS = ["rank", "key", "score", "top_class", "image_id"]


def query_embedder_settings(cat: Catalog, *, weights: str | None = None, device: str = "auto") -> EmbedderSettings:
    """The model and weights that built `cat`, verified by sha256 (a weights file
    that has since changed is refused rather than silently mixing vectors)."""
    m = cat.manifest
    return EmbedderSettings(model=m.model, weights=weights or m.weights,
                            weights_sha256=None if m.weights_source == "random" else m.weights_sha256,
                            device=device)


def similar_images(catalog: str | Catalog, *, key: str | None = None, image: str | Path | bytes | None = None,
                   k: int = 10, endpoint_url: str | None = None, weights: str | None = None) -> pd.DataFrame:
    """The `k` catalogued images nearest to `key` (a catalogued object) or
    `image` (a file path or bytes), best first: rank, key, score (cosine), top_class, image_id."""
    if (key is None) == (image is None):
        raise ValueError("pass exactly one of key= (a catalogued object) or image= (a file)")
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    cat = catalog if isinstance(catalog, Catalog) else open_catalog(catalog, endpoint_url=endpoint_url)
    if key is not None:
        query = vector_for_key(cat, key)
    else:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        query = embed_query_bytes(cat, data, weights=weights)
    return neighbours(cat, query, k)


def vector_for_key(cat: Catalog, key: str) -> np.ndarray:
    rows = cat.images.loc[cat.images["key"] == key, "image_id"]
    if rows.empty:
        raise KeyError(f"{key!r} is not in the catalogue (version {cat.manifest.version}); "
                       "check the key, or search by --image FILE")
    return faiss_index.reconstruct(cat.index, int(rows.iloc[0]))


def embed_query_bytes(cat: Catalog, data: bytes, *, weights: str | None = None) -> np.ndarray:
    embedder = get_embedder(query_embedder_settings(cat, weights=weights))
    decoded = decode_image(data, min_side=embedder.preprocessing.resize_size)
    return embedder.embed(embedder.preprocess(decoded.image).unsqueeze(0)).embeddings[0]


def neighbours(cat: Catalog, query: np.ndarray, k: int) -> pd.DataFrame:
    scores, ids = faiss_index.search(cat.index, query, k)
    by_id = cat.images.set_index("image_id")
    rows = []
    for rank, (score, image_id) in enumerate(zip(scores[0], ids[0], strict=True), start=1):
        if image_id < 0:
            continue
        row = by_id.loc[image_id]
        rows.append({"rank": rank, "key": row["key"], "score": float(score), "top_class": row["top_class"],
                     "image_id": int(image_id)})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)
