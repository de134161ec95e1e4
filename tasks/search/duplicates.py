"""Near-duplicate groups: a range search of every live vector on the index (never
an N x N matrix), pairs above a cosine threshold, and connected components.

A group's id is the smallest image id in it, so the same images get the same
group id in every report. A report is computed from one catalogue version and
written under that version's name; it is derived data, not part of the version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa

from models.errors import UserError
from tasks.catalog import tables
from tasks.search import index as faiss_index

log = logging.getLogger(__name__)

DUPLICATES_SCHEMA = pa.schema([
    ("group_id", pa.int64()),  # the smallest image_id in the group
    ("image_id", pa.int64()),
    ("key", pa.string()),
    ("page", pa.int32()),  # of a multi-page document (null where the catalogue predates pages)
    ("group_size", pa.int32()),
    ("best_score", pa.float32()),  # highest cosine to another member of the group
])
# More matched pairs than this per image means the threshold finds "similar", not
# "the same": stop before the pairs fill memory.
MAX_PAIRS_PER_IMAGE = 64


@dataclass(frozen=True)
class SimilarPairs:
    """Pairs of image ids (a < b) whose vectors' cosine is above the threshold."""

    a: np.ndarray
    b: np.ndarray
    score: np.ndarray


def similar_pairs(index: faiss.Index, blocks: faiss_index.Blocks, threshold: float, *, n_images: int,
                  nprobe: int | None = None, rerank: faiss_index.RerankVectors | None = None) -> SimilarPairs:
    """Every pair above `threshold`, by range-searching each block of vectors on
    `index` (which holds the same vectors). Scores are exact on flat and IVF-Flat,
    and wherever `rerank` rescoring is given (SQ8/PQ codes with a re-rank file);
    without it they are the codes' approximations."""
    if not -1 <= threshold < 1:
        raise UserError(f"threshold is a cosine similarity in [-1, 1), not {threshold}")
    found_a, found_b, found_s = [], [], []
    total = 0
    for ids, vectors in blocks:
        lims, scores, neighbours = faiss_index.range_search(index, vectors, threshold, nprobe=nprobe, rerank=rerank)
        queries = np.repeat(ids, np.diff(lims).astype(np.int64))
        keep = queries < neighbours  # drops the match with itself and the mirror of each pair
        found_a.append(queries[keep])
        found_b.append(neighbours[keep])
        found_s.append(scores[keep])
        total += int(keep.sum())
        if total > MAX_PAIRS_PER_IMAGE * max(n_images, 1):
            raise UserError(f"threshold {threshold} already matches {total:,} pairs among {n_images:,} images (more than "
                             f"{MAX_PAIRS_PER_IMAGE} an image): that is similarity, not duplication; use a higher "
                             "threshold")
    if not found_a:
        return SimilarPairs(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
    return SimilarPairs(np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_s))


def group_pairs(pairs: SimilarPairs) -> pd.DataFrame:
    """Connected components of the pairs: image_id, group_id (the smallest
    image_id in the component), group_size, best_score; sorted by group, image."""
    nodes, ends = np.unique(np.concatenate([pairs.a, pairs.b]), return_inverse=True)
    a, b = ends[:len(pairs.a)], ends[len(pairs.a):]
    label = nodes.copy()
    while True:  # min-label propagation: each pass spreads the smallest id one hop further
        lowest = np.minimum(label[a], label[b])
        spread = label.copy()
        np.minimum.at(spread, a, lowest)
        np.minimum.at(spread, b, lowest)
        if np.array_equal(spread, label):
            break
        label = spread
    best = np.full(len(nodes), -np.inf, np.float32)
    np.maximum.at(best, a, pairs.score)
    np.maximum.at(best, b, pairs.score)
    groups = pd.DataFrame({"image_id": nodes, "group_id": label, "best_score": best})
    groups["group_size"] = groups.groupby("group_id")["image_id"].transform("size").astype(np.int32)
    return groups.sort_values(["group_id", "image_id"]).reset_index(drop=True)


def duplicates_frame(groups: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """The groups with each image's key (and page), in the table's column order."""
    rows = images.set_index("image_id").reindex(groups["image_id"])
    out = groups.assign(key=rows["key"].to_numpy(), page=rows["page"].to_numpy())
    return out[DUPLICATES_SCHEMA.names]


def duplicates_parquet(frame: pd.DataFrame, *, manifest_key: str, version: int, threshold: float,
                       index_factory: str, nprobe: int) -> bytes:
    table = tables.frame_to_table(frame, DUPLICATES_SCHEMA)
    table = table.replace_schema_metadata({
        "batchsight.manifest": manifest_key, "batchsight.version": str(version),
        "batchsight.threshold": repr(threshold), "batchsight.index": index_factory,
        "batchsight.nprobe": str(nprobe),
    })
    return tables.to_parquet_bytes(table)
