"""Near-duplicate groups: every live vector range-searched on the index for its
neighbours above a cosine threshold (block by block, never an N x N matrix), and
groups formed around centres, so a group cannot chain: every member is above the
threshold to its group's representative.

Connected components of the same pairs (the grouping before issue 28) let one
bridging pair join two unrelated groups, and a run of them make one group of
dozens. Here the representatives are chosen first, most neighbours first, so no
two are above the threshold to each other; then each other image joins the
representative it is closest to. A group's id is the smallest image id in it,
so the same images get the same group id in every report. A report is computed
from one catalogue version and written under that version's name; it is derived
data, not part of the version.
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
    ("group_id", pa.int64()),  # the smallest image_id in the group: the same while its members are
    ("image_id", pa.int64()),
    ("key", pa.string()),
    ("page", pa.int32()),  # of a multi-page document (null where the catalogue predates pages)
    ("group_size", pa.int32()),
    ("representative_id", pa.int64()),  # the group's centre: every member's cosine to it is above the threshold
    ("representative_key", pa.string()),
    ("representative_page", pa.int32()),
    ("score", pa.float32()),  # cosine to the representative (1.0 on the representative's own row)
    ("best_score", pa.float32()),  # highest cosine to another member of the group
])
"""The `duplicates` table: one row per image in a group, the groups in `group_id`
order, each group's representative first, then its members by `score`, best first.
Readers (the web page, the CSV export, pandas/DuckDB) take these columns as they are."""

GROUP_COLUMNS = ["image_id", "group_id", "group_size", "representative_id", "score", "best_score"]

# More matched pairs than this an image on average means the threshold finds
# "similar", not "the same": stop before the pairs fill memory. Grouping holds
# about 80 bytes a pair at its peak, so at most ~1.3 KB an image (1.3 GB at 1M
# images), next to an index of 1M x 2048 in 2 GiB.
MAX_PAIRS_PER_IMAGE = 16

# IVF lists a duplicates search probes per image, at most. A near-duplicate lies in
# the image's own list or the next nearest one; the nprobe a version was tuned to is
# for its 10th nearest neighbour, far further out, and each probe costs a scan of a
# list for each of the N images: at 100k x 2048 (IVF1024, tuned nprobe 8) probing 2
# found every pair above 0.95 that 8 found, 1 lost 0.15%, and 2 was 2-3x faster
# (benchmarks/duplicates_scale.py measures it at 1M).
DUPLICATES_NPROBE = 2


@dataclass(frozen=True)
class SimilarPairs:
    """Pairs of image ids (a < b, each pair once) whose vectors' cosine is above the threshold."""

    a: np.ndarray
    b: np.ndarray
    score: np.ndarray

    @classmethod
    def empty(cls) -> SimilarPairs:
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))

    @classmethod
    def of(cls, a: np.ndarray, b: np.ndarray, score: np.ndarray) -> SimilarPairs:
        """Pairs as found, in either order and possibly twice (once from each end, as an
        approximate index may find a pair from one end only): each unordered pair once,
        a < b, at its highest score; pairs of an image with itself dropped."""
        a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
        score = np.asarray(score, np.float32)
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        keep = lo != hi
        lo, hi, score = lo[keep], hi[keep], score[keep]
        order = np.lexsort((-score, hi, lo))
        lo, hi, score = lo[order], hi[order], score[order]
        first = np.ones(len(lo), bool)
        first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
        return cls(lo[first], hi[first], score[first])

    def __len__(self) -> int:
        return len(self.a)


def duplicates_nprobe(index_nprobe: int) -> int | None:
    """The nprobe a duplicates search uses on an index tuned to `index_nprobe` (0: flat, nothing to probe)."""
    return min(index_nprobe, DUPLICATES_NPROBE) if index_nprobe > 0 else None


def similar_pairs(index: faiss.Index | faiss_index.Segments, blocks: faiss_index.Blocks, threshold: float, *,
                  n_images: int, nprobe: int | None = None,
                  rerank: faiss_index.RerankVectors | None = None) -> SimilarPairs:
    """Every pair above `threshold`, by range-searching each block of vectors on
    `index` (which holds the same vectors); only the pairs are kept, never a
    block's distances to everything. Scores are exact on flat and IVF-Flat, and
    wherever `rerank` rescoring is given (SQ/PQ codes with a re-rank file);
    without it they are the codes' approximations."""
    if not -1 <= threshold < 1:
        raise UserError(f"threshold is a cosine similarity in [-1, 1), not {threshold}")
    found_a, found_b, found_s = [], [], []
    found = 0
    limit = MAX_PAIRS_PER_IMAGE * max(n_images, 1)
    for ids, vectors in blocks:
        lims, scores, neighbours = faiss_index.range_search(index, vectors, threshold, nprobe=nprobe, rerank=rerank)
        queries = np.repeat(np.asarray(ids, np.int64), np.diff(lims).astype(np.int64))
        # the match with itself goes; both ends of a pair stay, in case the index found it from one only
        keep = queries != neighbours
        block = SimilarPairs.of(queries[keep], neighbours[keep], scores[keep])
        found_a.append(block.a)
        found_b.append(block.b)
        found_s.append(block.score)
        found += len(block)
        if found > 2 * limit:  # a pair is counted at most twice here (once from each end)
            raise _too_many(threshold, found // 2, n_images)
    pairs = SimilarPairs.of(np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_s)) \
        if found_a else SimilarPairs.empty()
    if len(pairs) > limit:
        raise _too_many(threshold, len(pairs), n_images)
    return pairs


def _too_many(threshold: float, pairs: int, n_images: int) -> UserError:
    return UserError(f"threshold {threshold} matches over {pairs:,} pairs among {n_images:,} images (more than "
                     f"{MAX_PAIRS_PER_IMAGE} an image): that is similarity, not duplication; use a higher threshold")


def centre_groups(pairs: SimilarPairs) -> pd.DataFrame:
    """Groups around centres, from the pairs above the threshold (a pure function
    of them: the same pairs give the same groups, whatever their order).

    1. Representatives, in order of most neighbours, then highest total score to
       them, then smallest id: an image becomes one unless it is a neighbour of an
       earlier representative. So no two representatives are neighbours, and every
       other image in a pair is a neighbour of at least one.
    2. Every other image joins the representative it is closest to (ties: the
       earlier one). So every member is above the threshold to its representative,
       and a bridging image goes where it belongs rather than pulling two groups
       together.
    3. A representative that no image joined is left out (no group of one).

    Columns: image_id, group_id (smallest image_id of the group), group_size,
    representative_id, score (cosine to the representative; 1.0 for it),
    best_score (highest cosine to another member); sorted by group, the
    representative first, then by score, best first."""
    if not len(pairs):
        return _group_frame(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int32),
                            np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.float32))
    m = len(pairs)
    nodes, ends = np.unique(np.concatenate([pairs.a, pairs.b]), return_inverse=True)
    n = len(nodes)
    src = ends
    dst = np.concatenate([ends[m:], ends[:m]])
    score = np.concatenate([pairs.score, pairs.score]).astype(np.float32)
    degree = np.bincount(src, minlength=n)
    strength = np.bincount(src, weights=score, minlength=n)
    priority = np.lexsort((nodes, -strength, -degree))
    rank = np.empty(n, np.int64)
    rank[priority] = np.arange(n)

    by_src = np.argsort(src, kind="stable")
    starts = np.zeros(n + 1, np.int64)
    np.cumsum(degree, out=starts[1:])
    is_centre = greedy_centres(priority, starts, dst[by_src])

    # each other image to its closest representative (ties: the one earlier in priority)
    to_centre = is_centre[dst] & ~is_centre[src]
    member, centre, member_score = src[to_centre], dst[to_centre], score[to_centre]
    order = np.lexsort((rank[centre], -member_score, member))
    first = np.ones(len(order), bool)
    first[1:] = member[order][1:] != member[order][:-1]
    chosen = order[first]
    assert len(chosen) == int((~is_centre).sum()), "every image in a pair must have a representative among its neighbours"
    rep = np.arange(n)
    rep_score = np.ones(n, np.float32)
    rep[member[chosen]] = centre[chosen]
    rep_score[member[chosen]] = member_score[chosen]

    size = np.bincount(rep, minlength=n)
    smallest = np.full(n, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(smallest, rep, nodes)
    same_group = rep[src] == rep[dst]
    best = np.full(n, -np.inf, np.float32)
    np.maximum.at(best, src[same_group], score[same_group])
    kept = size[rep] > 1
    return _group_frame(nodes[kept], smallest[rep][kept], size[rep][kept].astype(np.int32), nodes[rep][kept],
                        rep_score[kept], best[kept])


def greedy_centres(priority: np.ndarray, starts: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Which nodes are centres: in `priority` order, a node not yet next to a centre
    becomes one (the first maximal independent set in that order). Node i's
    neighbours are neighbours[starts[i]:starts[i + 1]]. A loop over the nodes in
    pairs only; each centre marks its neighbours once."""
    covered = np.zeros(len(starts) - 1, bool)
    is_centre = np.zeros(len(starts) - 1, bool)
    bounds = starts.tolist()
    for u in priority.tolist():
        if covered[u]:
            continue
        is_centre[u] = covered[u] = True
        covered[neighbours[bounds[u]:bounds[u + 1]]] = True
    return is_centre


def _group_frame(image_id: np.ndarray, group_id: np.ndarray, group_size: np.ndarray, representative_id: np.ndarray,
                 score: np.ndarray, best_score: np.ndarray) -> pd.DataFrame:
    groups = pd.DataFrame({"image_id": image_id, "group_id": group_id, "group_size": group_size,
                           "representative_id": representative_id, "score": score.astype(np.float32),
                           "best_score": best_score.astype(np.float32)})
    not_rep = (groups["image_id"] != groups["representative_id"]).to_numpy()
    order = np.lexsort((groups["image_id"].to_numpy(), -groups["score"].to_numpy(), not_rep,
                        groups["group_id"].to_numpy()))
    return groups.iloc[order].reset_index(drop=True)[GROUP_COLUMNS]


def duplicates_frame(groups: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """The groups with each image's key and page, and its representative's, in the table's column order."""
    rows = images.set_index("image_id")[["key", "page"]]
    own = rows.reindex(groups["image_id"])
    rep = rows.reindex(groups["representative_id"])
    out = groups.assign(key=own["key"].to_numpy(), page=own["page"].to_numpy(),
                        representative_key=rep["key"].to_numpy(), representative_page=rep["page"].to_numpy())
    return out[DUPLICATES_SCHEMA.names]


def group_records(frame: pd.DataFrame) -> list[dict]:
    """The `duplicates` table as one record a group: group_id, size, representative
    (image_id, key, page), members (image_id, key, page, score to the representative,
    best first; the representative not among them)."""
    out = []
    for group_id, rows in frame.groupby("group_id", sort=True):
        head = rows.iloc[0]
        assert head["image_id"] == head["representative_id"], f"group {group_id}: the representative's row comes first"
        members = rows.iloc[1:]
        out.append({
            "group_id": int(group_id), "size": int(head["group_size"]),
            "representative": {"image_id": int(head["image_id"]), "key": head["key"], "page": _page(head["page"])},
            "members": [{"image_id": int(i), "key": k, "page": _page(p), "score": round(float(s), 6)}
                        for i, k, p, s in zip(members["image_id"], members["key"], members["page"], members["score"],
                                              strict=True)],
        })
    return out


def _page(page: object) -> int | None:
    return None if pd.isna(page) else int(page)


def duplicates_parquet(frame: pd.DataFrame, *, manifest_key: str, version: int, threshold: float,
                       index_factory: str, nprobe: int) -> bytes:
    table = tables.frame_to_table(frame, DUPLICATES_SCHEMA)
    table = table.replace_schema_metadata({
        "batchsight.manifest": manifest_key, "batchsight.version": str(version),
        "batchsight.threshold": repr(threshold), "batchsight.index": index_factory,
        "batchsight.nprobe": str(nprobe), "batchsight.grouping": "centres",
    })
    return tables.to_parquet_bytes(table)
