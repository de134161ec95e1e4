"""Search over one catalogue version: which ids a filter allows, the stored
vectors of catalogued keys, query images embedded with the catalogue's own model
(through the shards' path, `tasks.pipeline.embed_blobs`), and the neighbours of
query vectors as rows. `flows/search.py` wires these into the calls users make;
the search page (`flows/ui/`) makes the same calls, keeping one `SearchLookups`
a version so that a search costs the index search and not a pass over the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
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
from tasks.search import index_choice
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


class SearchLookups:
    """What searches of one version look up in its `images` table, each built on
    first use and then kept: the first page of each key, the number of pages of
    each key, and the columns a result row shows. At 100,000 images they take
    ~0.1 s to build and a key search with them ~1 ms; built per search, a key
    search spent ~90 ms on them. A caller that searches one version many times
    (the page) keeps one and passes it in; a single search builds its own."""

    SHOWN = ("key", "page", "top_class", "category")

    def __init__(self, cat: Catalog) -> None:
        self.cat = cat

    @cached_property
    def _first_pages(self) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
        # a multi-page document is found by its first page; keys are looked up in
        # dicts (a pandas Index costs more to look a few keys up in than a search)
        first = self.cat.images.sort_values(["key", "page"]).drop_duplicates("key")
        return ({key: row for row, key in enumerate(first["key"].tolist())}, first["image_id"].to_numpy(np.int64),
                first["embedding_part"].to_numpy(object))

    @cached_property
    def _pages_of_key(self) -> dict[str, int]:
        return self.cat.images["key"].value_counts().to_dict()

    @cached_property
    def _rows_by_id(self) -> tuple[np.ndarray, np.ndarray]:
        # sorted ids and their rows: a search looks ten up in microseconds (a pandas Index took ~0.1 ms)
        ids = self.cat.images["image_id"].to_numpy(np.int64)
        order = np.argsort(ids, kind="stable")
        return ids[order], order

    @cached_property
    def _shown(self) -> dict[str, np.ndarray]:
        return {c: self.cat.images[c].to_numpy() for c in self.SHOWN}

    @cached_property
    def exact_index(self) -> bool:
        """Flat and IVF-Flat indexes keep the stored vectors exactly; PQ codes are approximations."""
        return index_choice.index_kind(self.cat.manifest.index_type) in ("flat", "ivf-flat")

    def first_pages(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(image ids, embedding parts) of the first page of each of `keys`; an
        `UnknownKey` naming those the version does not hold."""
        row_of_key, ids, parts = self._first_pages
        rows = [row_of_key.get(k, -1) for k in keys]
        if -1 in rows:
            missing = [k for k, r in zip(keys, rows, strict=True) if r < 0]
            raise UnknownKey(f"{missing[0]!r}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''} "
                             f"not in the catalogue (version {self.cat.manifest.version}); check the key, or "
                             "search by --image FILE")
        return ids[rows], parts[rows]

    def most_pages(self, keys: Sequence[str]) -> int:
        """The most pages any of `keys` has (0: none is catalogued)."""
        return max((self._pages_of_key.get(k, 0) for k in keys), default=0)

    def shown(self, image_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The `SHOWN` columns of the rows of `image_ids` (numpy arrays: text as objects)."""
        sorted_ids, order = self._rows_by_id
        at = np.minimum(np.searchsorted(sorted_ids, image_ids), max(len(sorted_ids) - 1, 0))
        known = sorted_ids[at] == image_ids if len(sorted_ids) else np.zeros(len(image_ids), bool)
        assert known.all(), f"ids {image_ids[~known][:5].tolist()} are in the index but not in the table"
        rows = order[at]
        return {c: values[rows] for c, values in self._shown.items()}

    def built(self) -> SearchLookups:
        """Every lookup built now, so that no search waits for one."""
        for name in ("_first_pages", "_pages_of_key", "_rows_by_id", "_shown", "exact_index"):
            getattr(self, name)
        return self


def vectors_for_keys(cat: Catalog, keys: Sequence[str], *, lookups: SearchLookups | None = None) -> np.ndarray:
    """The stored embeddings of catalogued `keys` (a document's first page): from
    the index where it keeps them exactly (flat, IVF-Flat), else read from their
    parts (IVF-PQ holds approximations)."""
    lookups = lookups or SearchLookups(cat)
    ids, parts = lookups.first_pages(keys)
    if lookups.exact_index:
        return cat.index.reconstruct_batch(ids)
    out = np.empty((len(keys), cat.manifest.embedding_dim), np.float32)
    for part, group in pd.Series(np.arange(len(keys))).groupby(parts):
        part_ids, _runs, vectors = tables.embeddings_from_table(cat.read_table(part))
        out[group.to_numpy()] = vectors[pd.Index(part_ids).get_indexer(ids[group.to_numpy()])]
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
               exclude_keys: Sequence[str | None] | None = None,
               lookups: SearchLookups | None = None) -> pd.DataFrame:
    """One row per (query, neighbour), best first: query_index, rank, key, page,
    score, top_class, category, image_id. Searches with the nprobe (and re-rank
    factor) the catalogue was tuned to. `exclude_keys[i]` (a key, or None) is left out of query i's
    results, every page of it: k more are searched for, so k still come back."""
    return pd.DataFrame(neighbour_columns(cat, queries, k, allowed_ids=allowed_ids, exclude_keys=exclude_keys,
                                          lookups=lookups))


def neighbour_columns(cat: Catalog, queries: np.ndarray, k: int, *, allowed_ids: np.ndarray | None = None,
                      exclude_keys: Sequence[str | None] | None = None,
                      lookups: SearchLookups | None = None) -> dict[str, np.ndarray]:
    """The columns of `neighbours` as numpy arrays, without the DataFrame: a caller
    that writes the rows straight out as JSON (the page) then spends about as
    much on them as on the search itself, not twice as much."""
    lookups = lookups or SearchLookups(cat)
    extra = 0
    if exclude_keys is not None and any(exclude_keys):
        extra = lookups.most_pages([k for k in exclude_keys if k])
    scores, ids = faiss_index.search(cat.index, queries, k + extra, nprobe=cat.manifest.index_nprobe or None,
                                     allowed_ids=allowed_ids, rerank=cat.rerank,
                                     rerank_factor=cat.manifest.index_rerank_factor)
    query_index, rank = np.nonzero(ids >= 0)  # row-major: query by query, best first
    found = ids[query_index, rank]
    columns = {"query_index": query_index, "rank": rank, "image_id": found,
               "score": scores[query_index, rank].astype(float), **lookups.shown(found)}
    if extra:
        other = np.nonzero(columns["key"] != np.asarray(exclude_keys, dtype=object)[query_index])[0]
        qi = query_index[other]
        rank = np.arange(len(qi)) - np.searchsorted(qi, qi)  # numbered again within each query
        kept = other[rank < k]
        columns = {c: v[kept] for c, v in columns.items()}
        columns["rank"] = rank[rank < k]
    columns["rank"] = columns["rank"] + 1
    return {c: columns[c] for c in ("query_index", *RESULT_COLUMNS)}


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
