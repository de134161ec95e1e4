"""How good an index's answers are: recall@10 against exact search on held-out
vectors, nprobe (and re-rank depth) tuned to a target, and the held-out queries'
exact neighbours kept with each version (`RecallTruth`).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace

import faiss
import numpy as np

from tasks.search.index import (
    Blocks,
    RerankVectors,
    Segments,
    as_segments,
    is_ivf,
    main_index,
    merge_top,
    search,
    set_nprobe,
)
from tasks.search.index_choice import RERANK_FACTORS, RERANK_TRIM, IndexChoice

log = logging.getLogger(__name__)


RECALL_K = 10

RECALL_QUERIES = 1000

RECALL_PLATEAU = 0.005  # raising nprobe stops when doubling it gains less recall than this


@dataclass(frozen=True)
class RecallReport:
    recall_at_10: float
    nprobe: int  # 0 for flat (nothing to probe)
    queries: int
    target: float
    curve: tuple[tuple[int, float], ...] = ()  # (nprobe, recall) tried, in order
    rerank_factor: int = 0  # candidates a result re-ranked exactly (0: no re-rank)


def split_sample(ids: np.ndarray, n_queries: int, choice: IndexChoice,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(query ids, training ids): queries for measuring recall are held out of
    training, unless the catalogue is too small to train without them."""
    perm = ids[rng.permutation(len(ids))]  # not permutation(ids): it refuses a read-only empty array
    queries, rest = perm[:n_queries], perm[n_queries:]
    train = rest[:choice.train_size] if len(rest) >= choice.min_train_size else perm[:choice.train_size]
    return queries, train


def gather_vectors(blocks: Blocks, wanted: np.ndarray, dim: int) -> np.ndarray:
    """The vectors of `wanted` ids (repeats allowed), in that order, in one pass over `blocks`."""
    unique, order = np.unique(wanted, return_inverse=True)
    out = np.empty((len(unique), dim), np.float32)
    found = 0
    if not len(unique):
        return out
    for ids, vectors in blocks:
        # by binary search in the sorted ids: np.isin would sort the sample again for
        # every block (at 10M vectors and a 656k sample, most of an hour)
        at = np.minimum(np.searchsorted(unique, ids), len(unique) - 1)
        hit = np.flatnonzero(unique[at] == ids)
        out[at[hit]] = vectors[hit]
        found += len(hit)
    assert found == len(unique), f"found {found} of {len(unique)} sampled vectors in the blocks"
    return out[order]


def exact_neighbours(queries: np.ndarray, blocks: Blocks, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`k` inner-product (scores, ids) over all blocks, block by block."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for ids, vectors in _coalesced(blocks, EXACT_CHUNK_BYTES):
        scores, positions = faiss.knn(queries, vectors, min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(positions >= 0, ids[np.maximum(positions, 0)], -1))
    heap.finalize()
    return heap.D, heap.I


EXACT_CHUNK_BYTES = 32 << 20  # blocks joined to this size for one knn call: a part's 1,024-row batches cost 3x


def _coalesced(blocks: Blocks, chunk_bytes: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`blocks` joined into chunks of about `chunk_bytes` of float32 vectors (never empty)."""
    ids_buf, vec_buf, held = [], [], 0
    for ids, vectors in blocks:
        if len(ids):
            ids_buf.append(ids)
            vec_buf.append(np.asarray(vectors, dtype=np.float32))
            held += vectors.shape[0] * vectors.shape[1] * 4
        if held >= chunk_bytes:
            yield np.concatenate(ids_buf), np.ascontiguousarray(np.concatenate(vec_buf))
            ids_buf, vec_buf, held = [], [], 0
    if ids_buf:
        yield np.concatenate(ids_buf), np.ascontiguousarray(np.concatenate(vec_buf))


def drop_self(neighbour_ids: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row's first `k` ids other than the query's own: recall is about finding
    the *other* near items (a query always finds itself in its own list)."""
    out = np.empty((len(neighbour_ids), k), np.int64)
    for row, (found, own) in enumerate(zip(neighbour_ids, query_ids, strict=True)):
        out[row] = found[found != own][:k]
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row's true neighbours that were found."""
    k = truth.shape[1]
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth, strict=True))
    return hits / (k * len(truth)) if len(truth) else 1.0


def tune_nprobe(index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray,
                target: float, *, rerank: RerankVectors | None = None, start: int = 1,
                start_factor: int = 0) -> RecallReport:
    """Raise nprobe `start`, 2 x `start`, ... until recall@k reaches `target`. IVF-Flat always
    gets there (at nprobe = nlist it is exact). Where codes cap recall below
    the target, stop when doubling gains under RECALL_PLATEAU and keep the
    smallest nprobe within that of the best. With `rerank`, each of RERANK_FACTORS
    is tried in turn (fewest candidates first) until one reaches the target; when
    the first does, the fewest of RERANK_TRIM that still reach it at that nprobe
    are kept (its curve stays the one nprobe was tuned on). A night passes its
    base's factor as `start_factor`: while recall holds there, that is one pass at
    the base's nprobe and factor, not a pass at every factor and trim from the
    smallest (each pass reads most of the main index's lists)."""
    if rerank is None:
        return _tune_nprobe(index, queries, query_ids, truth, target, rerank=None, factor=0, start=start)
    if start_factor:
        report = _tune_nprobe(index, queries, query_ids, truth, target, rerank=rerank, factor=start_factor,
                              start=start)
        if report.recall_at_10 >= target:
            return report
    best = None
    for factor in RERANK_FACTORS:
        report = _tune_nprobe(index, queries, query_ids, truth, target, rerank=rerank, factor=factor, start=start)
        if best is None or report.recall_at_10 > best.recall_at_10 + RECALL_PLATEAU:
            best = report
        if report.recall_at_10 >= target:
            return _trim_rerank(index, queries, query_ids, truth, report, rerank) if factor == RERANK_FACTORS[0] \
                else report
    return best


def _trim_rerank(index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray,
                 report: RecallReport, rerank: RerankVectors) -> RecallReport:
    k = truth.shape[1]
    for factor in RERANK_TRIM:
        _, found = search(index, queries, k + 1, nprobe=report.nprobe, rerank=rerank, rerank_factor=factor)
        recall = recall_at_k(drop_self(found, query_ids, k), truth)
        if recall >= report.target:
            return replace(report, recall_at_10=recall, rerank_factor=factor)
    return report


def _tune_nprobe(index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray,
                 target: float, *, rerank: RerankVectors | None, factor: int, start: int = 1) -> RecallReport:
    k = truth.shape[1]
    ivf = faiss.extract_index_ivf(main_index(index))
    nlist, exact_codes = ivf.nlist, ivf.code_size == 4 * ivf.d  # IVF-Flat stores the float32 vectors
    curve: list[tuple[int, float]] = []
    nprobe = max(1, min(start, nlist))
    while True:
        _, found = search(index, queries, k + 1, nprobe=nprobe, rerank=rerank, rerank_factor=factor)
        curve.append((nprobe, recall_at_k(drop_self(found, query_ids, k), truth)))
        reached = curve[-1][1] >= target
        flat_out = not exact_codes and len(curve) > 1 and curve[-1][1] - curve[-2][1] < RECALL_PLATEAU
        if reached or flat_out or nprobe >= nlist:
            break
        nprobe = min(2 * nprobe, nlist)
    best = max(r for _, r in curve)
    good_enough = target if best >= target else best - RECALL_PLATEAU
    chosen = next((p, r) for p, r in curve if r >= good_enough)
    return RecallReport(recall_at_10=chosen[1], nprobe=chosen[0], queries=len(queries), target=target,
                        curve=tuple(curve), rerank_factor=factor)


TRUTH_DEPTH = 50  # exact neighbours kept a query: removals eat into them night by night


@dataclass
class RecallTruth:
    """The held-out queries of a version and their exact neighbours, kept with the
    version so recall is measured each night without a pass over every vector:
    the ids that left are dropped from each list and the night's new vectors are
    merged in. A list stays exact for its first `depth` entries (the true top-m of
    the catalogue stays the top-m of what is left, plus any new vector better
    than its m-th); a query whose depth falls below k + 1 is left out until the
    next compaction measures all of them again."""

    query_ids: np.ndarray  # [Q]
    queries: np.ndarray  # [Q, d] float32
    ids: np.ndarray  # [Q, T] best first, -1 past a list's end
    scores: np.ndarray  # [Q, T]
    depth: np.ndarray  # [Q] leading entries known to be exact

    @classmethod
    def exact(cls, queries: np.ndarray, query_ids: np.ndarray, blocks: Blocks, depth: int = TRUTH_DEPTH
              ) -> RecallTruth:
        scores, ids = exact_neighbours(queries, blocks, depth)
        return cls(np.asarray(query_ids, np.int64), np.ascontiguousarray(queries, np.float32), ids, scores,
                   (ids >= 0).sum(axis=1))

    def updated(self, gone_ids: np.ndarray, new_blocks: Blocks) -> RecallTruth:
        """The truth after `gone_ids` left and the vectors of `new_blocks` came in."""
        ids, scores = self.ids.copy(), self.scores.copy()
        gone = np.isin(ids, np.asarray(gone_ids, np.int64)) & (ids >= 0)
        within = np.arange(ids.shape[1])[None, :] < self.depth[:, None]
        depth = self.depth - (gone & within).sum(axis=1)
        ids[gone], scores[gone] = -1, -np.inf
        order = np.argsort(ids < 0, axis=1, kind="stable")  # kept entries first, in their order
        ids, scores = np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)
        new_scores, new_ids = exact_neighbours(self.queries, new_blocks, ids.shape[1])
        merged_scores, merged_ids = merge_top(np.hstack([scores, new_scores]), np.hstack([ids, new_ids]),
                                               ids.shape[1])
        return RecallTruth(self.query_ids, self.queries, merged_ids, merged_scores, depth)

    def usable(self, k: int) -> np.ndarray:
        return self.depth >= k + 1

    def to_bytes(self) -> bytes:
        sink = io.BytesIO()
        np.savez(sink, query_ids=self.query_ids, queries=self.queries, ids=self.ids, scores=self.scores,
                 depth=self.depth)
        return sink.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> RecallTruth:
        with np.load(io.BytesIO(data)) as f:
            return cls(f["query_ids"], f["queries"], f["ids"], f["scores"], f["depth"])


def measure_recall(index: faiss.Index | Segments, queries: np.ndarray, query_ids: np.ndarray, blocks: Blocks, *,
                   target: float, k: int = RECALL_K, rerank: RerankVectors | None = None) -> RecallReport:
    """recall@k of `index` (re-ranked from `rerank` where given) against exact search
    over `blocks` (the same vectors), for `queries` drawn from them; tunes and sets
    nprobe on an IVF index, and the re-rank factor."""
    return measure_recall_against(index, RecallTruth.exact(queries, query_ids, blocks, k + 1), target=target, k=k,
                                  rerank=rerank)


def measure_recall_against(index: faiss.Index | Segments, truth: RecallTruth, *, target: float, k: int = RECALL_K,
                           rerank: RerankVectors | None = None, start_nprobe: int = 1,
                           start_rerank_factor: int = 0) -> RecallReport:
    """`measure_recall` with the exact neighbours known (`truth`, kept with the version).
    A night starts from the nprobe and re-rank factor its base was tuned to
    (`start_nprobe`, `start_rerank_factor`): one pass when recall still reaches the
    target (each pass reads most of the main index's lists: 5 GB at 10M x 128),
    doubling only when it no longer does; a compaction tunes from 1 again."""
    k = min(k, as_segments(index).ntotal - 1)
    if not is_ivf(index) or k < 1:
        return RecallReport(recall_at_10=1.0, nprobe=0, queries=0, target=target)  # exact by construction
    usable = truth.usable(k)
    queries, query_ids = truth.queries[usable], truth.query_ids[usable]
    report = tune_nprobe(index, queries, query_ids, drop_self(truth.ids[usable, :k + 1], query_ids, k), target,
                         rerank=rerank, start=start_nprobe, start_factor=start_rerank_factor)
    set_nprobe(index, report.nprobe)
    log.info("recall@%s %.3f at nprobe %s, re-rank factor %s (target %.2f, %s queries; tried %s)", k,
             report.recall_at_10, report.nprobe, report.rerank_factor, target, report.queries, report.curve)
    return report
