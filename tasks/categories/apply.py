"""Categories applied: a categoriser fitted on stored embeddings, every row
re-categorised as a new version (through the one builder), rows of a shard
categorised as they are written, and k-means clusters to start labelling.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, replace

import faiss
import numpy as np
import pandas as pd

from models.categorizer import Categorizer, fit_categorizer
from models.errors import UserError
from tasks.catalog import layout
from tasks.catalog.errors import ConcurrentCommitError
from tasks.catalog.manifest import Pointer, Provenance, read_pointer
from tasks.catalog.reader import Catalog, open_catalog
from tasks.catalog.versions import CATEGORY_COLUMNS, VersionChange, make_version
from tasks.categories.labels import LabelsError
from tasks.categories.store import save_categorizer
from tasks.search import index_recall
from tasks.storage import ObjectStore, cached_store


def labelled_embeddings(cat: Catalog, labels: pd.DataFrame, *, source: ObjectStore,
                        embed_missing) -> tuple[np.ndarray, list[str], list[str], int]:
    """Vectors for the labelled keys: stored ones from the catalogue (every page of a
    document), the rest embedded now from `source` by `embed_missing(store, keys)`.
    Returns (vectors, labels, the key of each vector, how many were embedded now).
    Stored vectors are read in one streaming pass over the parts, so the whole
    catalogue is never in memory."""
    by_key = cat.images.groupby("key")["image_id"].apply(list).to_dict()
    wanted, names, keys, missing = [], [], [], []
    for key, label in zip(labels["key"], labels["label"], strict=True):
        if key in by_key:
            wanted.extend(by_key[key])
            names.extend([label] * len(by_key[key]))
            keys.extend([key] * len(by_key[key]))
        else:
            missing.append((key, label))
    vecs = list(index_recall.gather_vectors(cat.embedding_blocks(), np.asarray(wanted, np.int64),
                                           cat.manifest.embedding_dim)) if wanted else []
    if missing:
        fresh = embed_missing(source, [k for k, _ in missing])
        for (key, label), key_vecs in zip(missing, fresh, strict=True):
            for v in key_vecs:
                vecs.append(v)
                names.append(label)
                keys.append(key)
    if not vecs:
        raise LabelsError("none of the labelled keys could be embedded")
    return np.stack(vecs), names, keys, len(missing)


def categorize_rows(rows: pd.DataFrame, vectors: np.ndarray, categorizer: Categorizer | None) -> pd.DataFrame:
    """Set `category` and `category_confidence` on `rows` (aligned with `vectors`)."""
    rows = rows.copy()
    if categorizer is None or rows.empty:
        return rows
    names, confidence = categorizer.predict(vectors)
    rows["category"] = names
    rows["category_confidence"] = confidence
    return rows


@dataclass
class ApplyReport:
    version: int
    rows: int
    rows_per_s: float
    counts: dict[str, int]


def apply_to_catalog(cat: Catalog, categorizer: Categorizer, categorizer_key: str) -> ApplyReport:
    """Re-categorise every row from stored embeddings (no CNN) and commit the result
    as a new version that shares the previous version's vectors and index.
    Raises `ConcurrentCommitError` when another writer commits first."""
    categorizer.check_fits(cat.manifest.fingerprint)
    pointer, etag = read_pointer(cat.store)
    if pointer is None or pointer.manifest != cat.manifest_key:
        raise ConcurrentCommitError(
            f"the catalogue at {cat.store.url} moved on from version {cat.manifest.version} (to "
            f"{pointer.version if pointer else 'none'}) before categorising began; nothing was committed. "
            "Run the command again: it will start from the newer version.")
    t0 = time.perf_counter()
    _, vectors = cat.embeddings()
    rows = categorize_rows(cat.images, vectors, categorizer)
    elapsed = time.perf_counter() - t0
    change = VersionChange(provenance=replace(Provenance.of(cat.manifest), categorizer=categorizer_key),
                           categories=rows[["image_id", *CATEGORY_COLUMNS]])
    manifest = make_version(cat.store, cat, change, parent=Pointer(cat.manifest.version, cat.manifest_key),
                            pointer_etag=etag, writer="categorize")
    counts = rows["category"].value_counts().to_dict() if len(rows) else {}
    return ApplyReport(version=manifest.version, rows=len(rows), rows_per_s=len(rows) / elapsed if elapsed > 0 else 0.0,
                       counts={str(k): int(v) for k, v in counts.items()})


def suggest_clusters(cat: Catalog, k: int, *, samples_per_cluster: int = 5, seed: int = 0) -> pd.DataFrame:
    """FAISS k-means over the stored embeddings: per cluster, its size and the keys
    nearest its centre, as a starting point for labelling."""
    ids, vectors = cat.embeddings()
    if len(vectors) < k:
        raise UserError(f"cannot make {k} clusters of {len(vectors)} images; pass a smaller --k")
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=25, seed=seed, spherical=True, verbose=False)
    kmeans.train(np.ascontiguousarray(vectors))
    distances, assignment = kmeans.index.search(np.ascontiguousarray(vectors), 1)
    keys = cat.images.set_index("image_id").loc[ids]
    frame = pd.DataFrame({"cluster": assignment[:, 0], "score": distances[:, 0], "key": keys["key"].to_numpy(),
                          "page": keys["page"].to_numpy()})
    sizes = frame["cluster"].value_counts()
    frame["cluster_size"] = frame["cluster"].map(sizes)
    picked = (frame.sort_values(["cluster", "score"], ascending=[True, False])
              .groupby("cluster").head(samples_per_cluster).reset_index(drop=True))
    return picked[["cluster", "cluster_size", "key", "page", "score"]]


def write_suggestions(cat: Catalog, frame: pd.DataFrame, k: int) -> str:
    key = layout.category_suggestions_key(cat.manifest.version, cat.manifest.run_id, k)
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    cat.store.put(key, buf.getvalue())
    return key


def fit_from_catalog(catalog: str, labels: pd.DataFrame, *, endpoint_url: str | None = None,
                     source: str | None = None, embed_missing=None, **fit_kwargs) -> tuple[Categorizer, str, int]:
    """Fit on the catalogue's embeddings of the labelled keys, save, activate.
    Returns (categoriser, its key, how many labelled images had to be embedded now)."""

    cat = open_catalog(catalog, endpoint_url=endpoint_url)
    source_store = cached_store(source or cat.manifest.source, endpoint_url)
    vectors, names, keys, embedded_now = labelled_embeddings(cat, labels, source=source_store,
                                                             embed_missing=embed_missing)
    categorizer = fit_categorizer(vectors, names, model=cat.manifest.model, groups=keys,
                                  weights_sha256=cat.manifest.weights_sha256, **fit_kwargs)
    key = save_categorizer(cat.store, categorizer)
    return categorizer, key, embedded_now
