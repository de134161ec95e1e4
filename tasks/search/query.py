"""Search over one catalogue version: which ids a filter allows, the stored
vectors of catalogued keys, query images embedded with the catalogue's own model
(through the shards' path, `tasks.pipeline.embed_blobs`), and the neighbours of
query vectors as rows. `flows/search.py` wires these into the calls users make;
the search page (`flows/ui.py`) uses them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from models.engine import get_embedder
from models.errors import UserError
from models.settings import EmbedderSettings
from tasks.catalog import tables
from tasks.catalog.reader import Catalog
from tasks.query_embedding import embed_blobs
from tasks.search import index as faiss_index
from tasks.shard.decode import has_image_extension
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


def check_k(k: int) -> None:
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
    blobs = [image if isinstance(image, bytes) else Path(image).read_bytes() for image in images]
    out = []
    for image, embedded in zip(images, embed_blobs(embedder, blobs, max_pages=1, batch_size=EMBED_BATCH), strict=True):
        if isinstance(embedded, tuple):
            name = "query bytes" if isinstance(image, bytes) else str(image)
            raise UserError(f"query image {name} cannot be read ({embedded[0]}: {embedded[1]}); remove it or fix "
                            "the file")
        out.append(embedded[0])
    return np.stack(out)


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
