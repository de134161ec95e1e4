"""Fit and apply document categories.

    >>> from flows.categorize import fit_categories, apply_categories
    >>> fit_categories("s3://inventory-catalog/main", labels_csv="labels.csv")

Fitting trains a linear probe on stored embeddings (embedding only labelled
images the catalogue does not hold yet); applying re-categorises every row from
stored embeddings without the CNN. `categorize_catalog` is the same apply as a
Prefect flow, for a deployment after a new categoriser is fitted.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from prefect import flow

from models.categorizer import Categorizer
from models.engine import get_embedder
from models.errors import UserError
from tasks.catalog.reader import Catalog, open_catalog
from tasks.categories.apply import ApplyReport, apply_to_catalog, fit_from_catalog, suggest_clusters, write_suggestions
from tasks.categories.labels import LabelsError, labels_from_prefix, read_labels_csv, with_review_labels
from tasks.categories.labels import review_labels as read_review_labels
from tasks.categories.store import active_categorizer
from tasks.query_embedding import embed_blobs
from tasks.search.query import query_embedder_settings, weights_reader
from tasks.storage import ObjectStore, cached_store


def embed_objects(cat: Catalog, store: ObjectStore, keys: list[str]) -> list[list[np.ndarray]]:
    """Embed objects the catalogue does not hold (every page), with its own model."""
    embedder = get_embedder(query_embedder_settings(cat), read=weights_reader(cat))
    blobs = []
    for key in keys:
        try:
            blobs.append(store.get(key))
        except KeyError:
            raise LabelsError(f"labelled key {key!r} is neither in the catalogue nor at {store.url}") from None
    out = []
    for key, embedded in zip(keys, embed_blobs(embedder, blobs), strict=True):
        if isinstance(embedded, tuple):
            raise LabelsError(f"labelled image {store.describe(key)} cannot be decoded ({embedded[0]}: "
                              f"{embedded[1]}); fix or drop it from the labels")
        out.append(list(embedded))
    return out


def fit_categories(catalog: str, *, labels_csv: str | None = None, labels_prefix: str | None = None,
                   review_labels: bool = True, endpoint_url: str | None = None, val_fraction: float = 0.25,
                   target_precision: float = 0.95, seed: int = 0) -> tuple[Categorizer, str, int]:
    """Fit, evaluate on a held-out split, save and activate a categoriser.

    `labels_csv`: a file of `key,label` rows (keys as in the catalogue's source).
    `labels_prefix`: `SRC/labelled/` with one folder per category.
    `review_labels`: also use the labels people gave on the review page of
    `batchsight ui` (they win over the file's for the same key).
    Returns (categoriser with its report, its key, labelled images embedded now)."""
    if labels_csv is not None and labels_prefix is not None:
        raise UserError("pass exactly one of --labels FILE or --labels-prefix SRC/labelled/, not both")
    cat = open_catalog(catalog, endpoint_url=endpoint_url)
    reviewed = read_review_labels(cat.store) if review_labels else None
    if labels_csv is None and labels_prefix is None and (reviewed is None or reviewed.empty):
        raise UserError("pass exactly one of --labels FILE or --labels-prefix SRC/labelled/ (or label images on "
                         "the review page of `batchsight ui` first)")
    source = None
    if labels_csv is None and labels_prefix is None:
        labels = reviewed.iloc[:0]
    elif labels_prefix is not None:
        # Under the catalogued source the labelled keys are the catalogue's own
        # (no re-embedding); anywhere else the prefix is a store of its own.
        catalogued = cached_store(cat.manifest.source, endpoint_url).url.rstrip("/")
        labelled = cached_store(labels_prefix, endpoint_url).url.rstrip("/")
        if labelled.startswith(catalogued + "/"):
            source, prefix = cat.manifest.source, labelled[len(catalogued) + 1:]
        else:
            source, prefix = labels_prefix, ""
        labels = labels_from_prefix(cached_store(source, endpoint_url), prefix)
    else:
        labels = read_labels_csv(labels_csv)
    if reviewed is not None:
        labels = with_review_labels(labels, reviewed, cat.images["key"])
    return fit_from_catalog(catalog, labels, endpoint_url=endpoint_url, source=source,
                            embed_missing=lambda store, keys: embed_objects(cat, store, keys),
                            val_fraction=val_fraction, target_precision=target_precision, seed=seed)


def apply_categories(catalog: str, *, endpoint_url: str | None = None) -> ApplyReport:
    """Re-categorise the whole catalogue with the active categoriser; commits a new version."""
    cat = open_catalog(catalog, endpoint_url=endpoint_url)
    active = active_categorizer(cat.store)
    if active is None:
        raise LabelsError(f"no categoriser at {catalog}; fit one: batchsight categories fit --catalog "
                          f"{catalog} --labels labels.csv")
    return apply_to_catalog(cat, *active)


@flow(name="categorize-catalog")
def categorize_catalog(catalog: str, endpoint_url: str | None = None) -> ApplyReport:
    return apply_categories(catalog, endpoint_url=endpoint_url)


def suggest_categories(catalog: str, *, k: int = 8, samples_per_cluster: int = 5,
                       endpoint_url: str | None = None) -> tuple[pd.DataFrame, str]:
    """Cluster the catalogue into `k` groups and write sample keys per cluster; returns (table, its key)."""
    cat = open_catalog(catalog, endpoint_url=endpoint_url)
    frame = suggest_clusters(cat, k, samples_per_cluster=samples_per_cluster)
    return frame, write_suggestions(cat, frame, k)
