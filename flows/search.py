"""Similar images by catalogued key, by image file, or for a whole folder or CSV
of queries; near-duplicate groups. Each is one call that returns a DataFrame.

    >>> from flows.search import similar_images, search_queries, find_duplicates
    >>> similar_images("s3://inventory/catalog", key="photos/sku-123.jpg", k=10)
    >>> search_queries("./catalog", "queries/", k=5, prefix="photos/")
    >>> find_duplicates("./catalog", threshold=0.95).groups

Search is interactive, so these are plain functions (no Prefect server to start).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.engine import EmbedderSettings, get_embedder, stack_images
from models.errors import UserError
from tasks import duplicates as dups
from tasks import index as faiss_index
from tasks import layout
from tasks import tables
from tasks.catalog import Catalog, open_catalog
from tasks.decode import DecodeError, decode_pages, has_image_extension
from tasks.storage import url_reader

RESULT_COLUMNS = ["rank", "key", "page", "score", "top_class", "category", "image_id"]
QUERY_RESULT_COLUMNS = ["query", *RESULT_COLUMNS]
EMBED_BATCH = 32

class UnknownKey(UserError, KeyError):
    """Keys asked for that the catalogue does not hold (a 404 on the search page)."""


def weights_reader(cat: Catalog):
    """Reads weights given as a URL with the catalogue's own S3 endpoint."""
    return url_reader(getattr(cat.store, "endpoint_url", None))


def query_embedder_settings(cat: Catalog, *, weights: str | None = None, device: str = "auto") -> EmbedderSettings:
    """The model and weights that built `cat`, verified by sha256 (a weights file
    that has since changed is refused rather than silently mixing vectors)."""
    m = cat.manifest
    return EmbedderSettings(model=m.model, weights=weights or m.weights,
                            weights_sha256=None if m.weights_source == "random" else m.weights_sha256,
                            device=device)


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
    _check_k(k)
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
    _check_k(k)
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


def _check_k(k: int) -> None:
    if k < 1:
        raise UserError(f"k must be at least 1, not {k}")


def read_queries(path: Path) -> tuple[list[str], list[Path]]:
    """(catalogued keys, image files) named by a folder of images or a CSV."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and has_image_extension(p.name))
        if not files:
            raise UserError(f"no image files under {path} (looked for .jpg, .png, ... in every subfolder)")
        return [], files
    if path.suffix.lower() != ".csv":
        raise UserError(f"queries {path} must be a folder of images or a .csv file")
    if not path.exists():
        raise UserError(f"queries file {path} does not exist")
    frame = pd.read_csv(path, dtype=str)
    if not {"key", "image"} & set(frame.columns):
        raise UserError(f"{path} needs a 'key' column (catalogued objects) or an 'image' column (files); "
                         f"it has {', '.join(frame.columns)}")
    keys = frame["key"].dropna().tolist() if "key" in frame else []
    files = [path.parent / f for f in frame["image"].dropna()] if "image" in frame else []
    if not keys and not files:
        raise UserError(f"{path} lists no queries")
    return keys, files


def allowed_ids(cat: Catalog, *, prefix: str | None = None, category: str | None = None) -> np.ndarray | None:
    """Ids of the images a filtered search may return (None: no filter)."""
    if prefix is None and category is None:
        return None
    images = cat.images
    keep = np.ones(len(images), bool)
    if prefix is not None:
        keep &= images["key"].str.startswith(prefix).to_numpy()
    if category is not None:
        known = sorted(images["category"].dropna().unique())
        if not known:
            raise UserError(f"catalogue version {cat.manifest.version} has no categories (its category column "
                             "is empty); search without --category")
        if category not in known:
            raise UserError(f"no image has category {category!r}; categories are {', '.join(known[:20])}")
        keep &= (images["category"] == category).to_numpy()
    if not keep.any():
        raise UserError(f"no catalogued image matches prefix {prefix!r} and category {category!r} "
                         f"(version {cat.manifest.version})")
    return images["image_id"].to_numpy(np.int64)[keep]


def vectors_for_keys(cat: Catalog, keys: Sequence[str]) -> np.ndarray:
    """The stored embeddings of catalogued `keys` (a document's first page), read
    from their parts: exact whatever the index keeps (IVF-PQ holds approximations)."""
    # a multi-page document is found by its first page
    rows = cat.images.sort_values(["key", "page"]).drop_duplicates("key").set_index("key").reindex(keys)
    missing = [k for k, i in zip(keys, rows["image_id"], strict=True) if pd.isna(i)]
    if missing:
        raise UnknownKey(f"{missing[0]!r}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''} "
                         f"not in the catalogue (version {cat.manifest.version}); check the key, or search by "
                         "--image FILE")
    out = np.empty((len(keys), cat.manifest.embedding_dim), np.float32)
    positions = pd.Series(np.arange(len(keys)))
    for part, group in positions.groupby(rows["embedding_part"].to_numpy()):
        ids, _runs, vectors = tables.embeddings_from_table(cat.read_table(part))
        row_of = pd.Index(ids).get_indexer(rows["image_id"].to_numpy(np.int64)[group.to_numpy()])
        out[group.to_numpy()] = vectors[row_of]
    return out


def embed_images(cat: Catalog, images: Sequence[str | Path | bytes], *, weights: str | None = None) -> np.ndarray:
    """Embed query images with the catalogue's own model and weights, in batches;
    a document (PDF, multi-page TIFF) queries with its first page, the page by
    which search finds a catalogued document."""
    embedder = get_embedder(query_embedder_settings(cat, weights=weights), read=weights_reader(cat))
    out = []
    for start in range(0, len(images), EMBED_BATCH):
        batch = []
        for image in images[start:start + EMBED_BATCH]:
            data = image if isinstance(image, bytes) else Path(image).read_bytes()
            try:
                decoded = decode_pages(data, prepare=embedder.preprocess, min_side=embedder.preprocessing.resize_size,
                                       max_pages=1)[0]
            except DecodeError as exc:
                name = "query bytes" if isinstance(image, bytes) else str(image)
                raise UserError(f"query image {name} cannot be read ({exc}); remove it or fix the file") from None
            batch.append(decoded.image)
        out.append(embedder.embed(stack_images(batch)).embeddings)
    return np.concatenate(out)


def neighbours(cat: Catalog, queries: np.ndarray, k: int, *, allowed_ids: np.ndarray | None = None,
               exclude_keys: Sequence[str | None] | None = None) -> pd.DataFrame:
    """One row per (query, neighbour), best first: query_index, rank, key, page,
    score, top_class, category, image_id. Searches with the nprobe (and re-rank
    factor) the catalogue was tuned to. `exclude_keys[i]` (a key, or None) is left out of query i's
    results, every page of it: k more are searched for, so k still come back."""
    images = cat.images
    extra = 0
    if exclude_keys is not None and any(exclude_keys):
        extra = int(images["key"].isin([k for k in exclude_keys if k]).groupby(images["key"]).sum().max())
    scores, ids = faiss_index.search(cat.index, queries, k + extra, nprobe=cat.manifest.index_nprobe or None,
                                     allowed_ids=allowed_ids, rerank=cat.rerank,
                                     rerank_factor=cat.manifest.index_rerank_factor)
    query_index, rank = np.nonzero(ids >= 0)
    found = ids[query_index, rank]
    rows = images.set_index("image_id").loc[found]
    frame = pd.DataFrame({"query_index": query_index, "rank": rank + 1, "key": rows["key"].to_numpy(),
                          "page": rows["page"].to_numpy(), "score": scores[query_index, rank].astype(float),
                          "top_class": rows["top_class"].to_numpy(), "category": rows["category"].to_numpy(),
                          "image_id": found})
    if not extra:
        return frame
    own = np.asarray(exclude_keys, dtype=object)[frame["query_index"].to_numpy()]
    frame = frame[frame["key"].to_numpy() != own]
    frame = frame.assign(rank=frame.groupby("query_index").cumcount() + 1)
    return frame[frame["rank"] <= k].reset_index(drop=True)


def results_format(path: Path) -> str:
    """'csv' or 'parquet', from the file name."""
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("csv", "parquet"):
        raise UserError(f"results file {path} must end in .csv or .parquet")
    return fmt


def write_results(frame: pd.DataFrame, path: Path) -> None:
    if results_format(path) == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)


@dataclass
class DuplicatesReport:
    groups: pd.DataFrame  # group_id, image_id, key, group_size, best_score
    key: str | None  # where it was written in the catalogue (None: not written)
    version: int
    threshold: float

    @property
    def n_groups(self) -> int:
        return int(self.groups["group_id"].nunique())


def find_duplicates(catalog: str | Catalog, *, threshold: float = 0.95, endpoint_url: str | None = None,
                    write: bool = True) -> DuplicatesReport:
    """Groups of near-identical images in the live version (cosine above
    `threshold`), written as `tables/duplicates/<version>/threshold-T.parquet` (`layout.duplicates_key`)."""
    cat = _catalog(catalog, endpoint_url)
    m = cat.manifest
    pairs = dups.similar_pairs(cat.index, cat.embedding_blocks(), threshold, n_images=len(cat.images),
                               nprobe=m.index_nprobe or None, rerank=cat.rerank)
    groups = dups.duplicates_frame(dups.group_pairs(pairs), cat.images)
    key = None
    if write:
        key = layout.duplicates_key(m.version, m.run_id, threshold)
        cat.store.put(key, dups.duplicates_parquet(groups, manifest_key=cat.manifest_key, version=m.version,
                                                   threshold=threshold, index_factory=m.index_factory,
                                                   nprobe=m.index_nprobe))
    return DuplicatesReport(groups=groups, key=key, version=m.version, threshold=threshold)
