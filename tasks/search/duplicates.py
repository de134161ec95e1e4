"""Near-duplicate groups: every pair of live images whose cosine is above a
threshold (by joining the index's lists, or a range search on a flat index;
never an N x N matrix), and groups formed around centres, so a group cannot
chain: every member is above the threshold to its group's representative.

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
from faiss.contrib.inspect_tools import get_invlist

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
# Below this many pairs the memory is small whatever the threshold (8 MB): a small
# catalogue of look-alikes (every sample alike under random weights) still groups.
MIN_PAIRS_LIMIT = 100_000


def pair_limit(n_images: int) -> int:
    """The pairs a report may hold before the threshold is refused as similarity, not duplication."""
    return max(MAX_PAIRS_PER_IMAGE * max(n_images, 1), MIN_PAIRS_LIMIT)

# On an IVF index the pairs come from joining lists, not from a search per image:
# each list with itself, and each image with the NEXT_LISTS lists it is next
# nearest to (the pairs a search probing 1 + NEXT_LISTS lists finds), as matrix
# products (BLAS), where a search per image compares it with every centroid and
# then scans lists code by code (at 1M x 2048, IVF4096,SQ4: 776 s for the search
# at nprobe 2). With one next list a pair close to where three lists meet was
# missed (the image in one, its copy in another, both nearer a third). An image's
# next nearest lists are looked for among the lists of the NEIGHBOUR_LISTS
# centroids nearest its own list's, not among all (that comparison is what makes a
# search per image slow): at 1M x 2048 with 4,096 lists the true second list was
# among the nearest 8 for 89% of images, 32 for 94%, 64 for 94%, at a cost of
# NEIGHBOUR_LISTS x d a image. See `similar_pairs_by_lists`.
NEXT_LISTS = 2
NEIGHBOUR_LISTS = 32


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


def find_pairs(index: faiss.Index | faiss_index.Segments, blocks: faiss_index.Blocks, threshold: float, *,
               n_images: int, rerank: faiss_index.RerankVectors | None = None,
               neighbour_lists: int = NEIGHBOUR_LISTS) -> SimilarPairs:
    """Every pair above `threshold` among the live vectors: by joining lists on an IVF
    index (`similar_pairs_by_lists`), by a range search of each block of `blocks`
    (the same vectors) on a flat one, which is exact and fast with BLAS, and on an
    IVF behind a rotation (OPQ), whose lists live in the rotated space."""
    check_threshold(threshold)
    main = faiss_index.main_index(index)
    if faiss_index.is_ivf(index) and not isinstance(faiss.downcast_index(main), faiss.IndexPreTransform):
        return similar_pairs_by_lists(index, threshold, n_images=n_images, rerank=rerank,
                                      neighbour_lists=neighbour_lists)
    return similar_pairs(index, blocks, threshold, n_images=n_images, rerank=rerank)


def check_threshold(threshold: float) -> None:
    if not -1 <= threshold < 1:
        raise UserError(f"threshold is a cosine similarity in [-1, 1), not {threshold}")


def similar_pairs(index: faiss.Index | faiss_index.Segments, blocks: faiss_index.Blocks, threshold: float, *,
                  n_images: int, nprobe: int | None = None,
                  rerank: faiss_index.RerankVectors | None = None) -> SimilarPairs:
    """Every pair above `threshold`, by range-searching each block of vectors on
    `index` (which holds the same vectors); only the pairs are kept, never a
    block's distances to everything. Scores are exact on flat and IVF-Flat, and
    wherever `rerank` rescoring is given (SQ/PQ codes with a re-rank file);
    without it they are the codes' approximations."""
    check_threshold(threshold)
    found_a, found_b, found_s = [], [], []
    found = 0
    limit = pair_limit(n_images)
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


def nearest_lists(centroids: np.ndarray, m: int, *, chunk: int = 1024) -> np.ndarray:
    """[nlist, m]: each list's `m` nearest other lists by centroid (L2, whatever the
    index's metric), nearest first; `chunk` lists at a time (16k lists would be a
    1 GB distance matrix)."""
    nlist = len(centroids)
    m = min(m, nlist - 1)
    if m < 1:
        return np.empty((nlist, 0), np.int64)
    c = np.asarray(centroids, np.float32)
    sq = (c * c).sum(1)
    out = np.empty((nlist, m), np.int64)
    for start in range(0, nlist, chunk):
        rows = np.arange(start, min(start + chunk, nlist))
        dist = sq[rows, None] + sq[None, :] - 2 * (c[rows] @ c.T)
        dist[np.arange(len(rows)), rows] = np.inf
        nearest = np.argpartition(dist, m - 1, axis=1)[:, :m]
        order = np.argsort(np.take_along_axis(dist, nearest, axis=1), axis=1, kind="stable")
        out[rows] = np.take_along_axis(nearest, order, axis=1)
    return out


def similar_pairs_by_lists(index: faiss.Index | faiss_index.Segments, threshold: float, *, n_images: int,
                           rerank: faiss_index.RerankVectors | None = None, next_lists: int = NEXT_LISTS,
                           neighbour_lists: int = NEIGHBOUR_LISTS) -> SimilarPairs:
    """Every pair above `threshold` that a search probing 1 + `next_lists` lists finds,
    on an IVF index, by joining lists: each list's vectors against themselves, then
    each list against the images for which it is one of the `next_lists` next nearest
    (looked for among the lists of the `neighbour_lists` centroids nearest their
    own), as matrix products. Scores are
    exact where the vectors are (IVF-Flat, or the re-rank file's float16 rows); other
    codes are decoded. Ids removed from the main index are left out; the delta
    segment's vectors (a few % of the catalogue at most) are range-searched on the
    whole index, probing as many lists. Memory: a list and its visitors at a time,
    an id and a list number for each image's next lists, and the pairs."""
    check_threshold(threshold)
    segments = faiss_index.as_segments(index)
    ivf = faiss.extract_index_ivf(segments.main)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    near = nearest_lists(centroids, neighbour_lists)
    by_ip = ivf.quantizer.metric_type == faiss.METRIC_INNER_PRODUCT
    half_sq = 0.5 * (centroids * centroids).sum(1)
    pairs = _PairCollector(threshold, n_images)
    visitors, next_list = [], []
    for list_no in range(ivf.nlist):  # each list with itself; where its images go next
        ids, vectors = _list_vectors(ivf, segments, list_no, rerank)
        if not len(ids):
            continue
        own = vectors @ vectors.T
        pairs.add(ids, ids, own, np.triu(own > threshold, k=1))
        if near.shape[1] and next_lists > 0:
            candidates = near[list_no]
            closeness = vectors @ centroids[candidates].T  # the quantizer's order: IP, or -L2/2 up to a constant
            if not by_ip:
                closeness -= half_sq[candidates]
            k = min(next_lists, len(candidates))
            nearest = np.argpartition(-closeness, k - 1, axis=1)[:, :k] if k < len(candidates) \
                else np.broadcast_to(np.arange(k), (len(ids), k))
            visitors.append(np.repeat(ids, k))
            next_list.append(candidates[nearest].ravel())
    if visitors:  # each list with the images whose next nearest list it is
        visitor_ids, next_list = np.concatenate(visitors), np.concatenate(next_list)
        order = np.argsort(next_list, kind="stable")
        bounds = np.searchsorted(next_list[order], np.arange(ivf.nlist + 1))
        for list_no in range(ivf.nlist):
            if bounds[list_no] == bounds[list_no + 1]:
                continue
            ids, vectors = _list_vectors(ivf, segments, list_no, rerank)
            if not len(ids):
                continue
            guest_ids, guests = _vectors_of(segments, visitor_ids[order[bounds[list_no]:bounds[list_no + 1]]],
                                            rerank)
            cross = guests @ vectors.T
            pairs.add(guest_ids, ids, cross, cross > threshold)
    if segments.delta is not None:
        delta_ids, delta_vectors = segments.delta_vectors()
        lims, scores, neighbours = faiss_index.range_search(segments, delta_vectors, threshold,
                                                            nprobe=1 + next_lists,
                                                            rerank=rerank)
        queries = np.repeat(delta_ids, np.diff(lims).astype(np.int64))
        pairs.add(queries, neighbours, scores[:, None], np.ones((len(queries), 1), bool), paired=True)
    return pairs.result()


class _PairCollector:
    """Pairs above a threshold gathered from score matrices; refused past MAX_PAIRS_PER_IMAGE an image."""

    def __init__(self, threshold: float, n_images: int) -> None:
        self.threshold, self.n_images = threshold, n_images
        self.limit = pair_limit(n_images)
        self.a, self.b, self.score = [], [], []
        self.found = 0

    def add(self, ids_a: np.ndarray, ids_b: np.ndarray, scores: np.ndarray, mask: np.ndarray, *,
            paired: bool = False) -> None:
        """Where `mask` holds, (ids_a[i], ids_b[j], scores[i, j]); with `paired`, row i pairs ids_a[i] with ids_b[i]."""
        i, j = np.nonzero(mask)
        self.a.append(ids_a[i])
        self.b.append(ids_b[i] if paired else ids_b[j])
        self.score.append(scores[i, j])
        self.found += len(i)
        if self.found > 2 * self.limit:  # a pair is counted at most twice here (once from each end)
            raise _too_many(self.threshold, self.found // 2, self.n_images)

    def result(self) -> SimilarPairs:
        if not self.a:
            return SimilarPairs.empty()
        pairs = SimilarPairs.of(np.concatenate(self.a), np.concatenate(self.b), np.concatenate(self.score))
        if len(pairs) > self.limit:
            raise _too_many(self.threshold, len(pairs), self.n_images)
        return pairs


def _list_vectors(ivf: faiss.IndexIVF, segments: faiss_index.Segments, list_no: int,
                  rerank: faiss_index.RerankVectors | None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 vectors) of one list's live entries: the codes themselves on
    IVF-Flat, else as `_vectors_of` finds them."""
    ids, codes = get_invlist(ivf.invlists, list_no)
    if len(segments.removed):
        live = ~np.isin(ids, segments.removed)
        ids, codes = ids[live], codes[live]
    if rerank is None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFlat):
        return ids, np.ascontiguousarray(codes).view(np.float32).reshape(len(ids), ivf.d)
    return _vectors_of(segments, ids, rerank)


def _vectors_of(segments: faiss_index.Segments, ids: np.ndarray, rerank: faiss_index.RerankVectors | None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 vectors) of main-index ids, in an order of its choosing: the
    re-rank file's rows (read in file order) where there is one, else the codes
    decoded by id."""
    if rerank is None:
        return ids, segments.main.reconstruct_batch(ids) if len(ids) else np.empty((0, segments.d), np.float32)
    rows = rerank.rows(ids)
    assert (rows >= 0).all(), f"ids {ids[rows < 0][:5].tolist()} are not in the re-rank file"
    order = np.argsort(rows, kind="stable")
    return ids[order], np.asarray(rerank.vectors[rows[order]], dtype=np.float32)


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
        "batchsight.pairs": "IVF lists joined (own and next nearest list)" if "IVF" in index_factory
        else "range search",
    })
    return tables.to_parquet_bytes(table)
