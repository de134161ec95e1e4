"""Similar images by catalogued key, by image file, or for a whole folder or CSV
of queries; near-duplicate groups. Each is one call that returns a DataFrame.

    >>> from flows.search import similar_images, search_queries, find_duplicates
    >>> similar_images("s3://inventory/catalog", key="photos/sku-123.jpg", k=10)
    >>> search_queries("./catalog", "queries/", k=5, prefix="photos/")
    >>> find_duplicates("./catalog", threshold=0.95).groups

Search is interactive, so these are plain functions (no Prefect server to start).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.errors import UserError
from tasks.catalog import layout
from tasks.catalog.reader import Catalog, open_catalog
from tasks.search import duplicates as dups
from tasks.search.query import (
    QUERY_RESULT_COLUMNS,
    RESULT_COLUMNS,
    allowed_ids,
    check_k,
    embed_images,
    neighbours,
    read_queries,
    vectors_for_keys,
)


def _catalog(catalog: str | Catalog, endpoint_url: str | None) -> Catalog:
    return catalog if isinstance(catalog, Catalog) else open_catalog(catalog, endpoint_url=endpoint_url)


def similar_images(catalog: str | Catalog, *, key: str | None = None, image: str | Path | bytes | None = None,
                   k: int = 10, prefix: str | None = None, category: str | None = None,
                   endpoint_url: str | None = None, weights: str | None = None,
                   include_self: bool = False) -> pd.DataFrame:
    """The `k` catalogued images nearest to `key` (a catalogued object) or
    `image` (a file path or bytes), best first: rank, key, page, score (cosine),
    top_class, category, image_id. `prefix` and `category` restrict what is
    returned; a `key` query leaves its own object (every page) out unless `include_self`."""
    if (key is None) == (image is None):
        raise UserError("pass exactly one of key= (a catalogued object) or image= (a file)")
    check_k(k)
    cat = _catalog(catalog, endpoint_url)
    allowed = allowed_ids(cat, prefix=prefix, category=category)
    query = vectors_for_keys(cat, [key]) if key is not None else embed_images(cat, [image], weights=weights)
    exclude = [key] if key is not None and not include_self else None
    return neighbours(cat, query, k, allowed_ids=allowed, exclude_keys=exclude)[RESULT_COLUMNS]


def search_queries(catalog: str | Catalog, queries: str | Path, *, k: int = 10, prefix: str | None = None,
                   category: str | None = None, endpoint_url: str | None = None,
                   weights: str | None = None, include_self: bool = False) -> pd.DataFrame:
    """Neighbours of many queries at once: every image in a folder, or the rows
    of a CSV with a `key` column (catalogued objects) and/or an `image` column
    (files, relative to the CSV). One row per (query, neighbour): query, rank,
    key, page, score, top_class, category, image_id. A key query leaves its own
    object out unless `include_self`."""
    check_k(k)
    keys, files = read_queries(Path(queries))
    cat = _catalog(catalog, endpoint_url)
    allowed = allowed_ids(cat, prefix=prefix, category=category)
    vectors = [vectors_for_keys(cat, keys)] if keys else []
    if files:
        vectors.append(embed_images(cat, files, weights=weights))
    labels = np.array(keys + [str(f) for f in files], dtype=object)
    exclude = None if include_self else keys + [None] * len(files)
    found = neighbours(cat, np.concatenate(vectors), k, allowed_ids=allowed, exclude_keys=exclude)
    return found.assign(query=labels[found["query_index"].to_numpy()])[QUERY_RESULT_COLUMNS]


@dataclass
class DuplicatesReport:
    groups: pd.DataFrame  # the `duplicates` table (`dups.DUPLICATES_SCHEMA`): a row per image, representative first
    key: str | None  # where it was written in the catalogue (None: not written)
    version: int
    threshold: float

    @property
    def n_groups(self) -> int:
        return int(self.groups["group_id"].nunique())

    def by_group(self) -> list[dict]:
        """One record a group: its representative (image_id, key, page) and members with their score to it."""
        return dups.group_records(self.groups)


def find_duplicates(catalog: str | Catalog, *, threshold: float = 0.95, endpoint_url: str | None = None,
                    write: bool = True) -> DuplicatesReport:
    """Groups of near-identical images in the live version: every member's cosine to
    its group's representative is above `threshold` (groups never chain through
    bridging pairs). Written as `tables/duplicates/<version>/threshold-T.parquet`
    (`layout.duplicates_key`)."""
    cat = _catalog(catalog, endpoint_url)
    m = cat.manifest
    pairs = dups.find_pairs(cat.index, cat.embedding_blocks(), threshold, n_images=len(cat.images),
                            rerank=cat.rerank)
    groups = dups.duplicates_frame(dups.centre_groups(pairs), cat.images)
    key = None
    if write:
        key = layout.duplicates_key(m.version, m.run_id, threshold)
        cat.store.put(key, dups.duplicates_parquet(groups, manifest_key=cat.manifest_key, version=m.version,
                                                   threshold=threshold, index_factory=m.index_factory,
                                                   nprobe=m.index_nprobe))
    return DuplicatesReport(groups=groups, key=key, version=m.version, threshold=threshold)
