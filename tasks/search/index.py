"""FAISS: build, update, (de)serialise and search the catalogue's index.

Vectors are unit-length, so inner product is cosine similarity. Ids are the
catalogue's stable 64-bit image ids on every kind of index, so changed and
deleted images are removed by id and a nightly update needs no rebuild.
Algorithms that read the vectors take re-iterable `blocks` of (ids, vectors),
so a catalogue larger than memory streams through them part by part. A version's
index is `Segments`: the main index, a delta segment of the vectors added since
its last compaction, and the ids removed from the main index, searched as one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import faiss
import numpy as np

from tasks.search.index_choice import IVF_KMEANS_ITERATIONS, IVF_KMEANS_POINTS_PER_CENTROID, RERANK_DTYPE, IndexChoice

log = logging.getLogger(__name__)

Blocks = Iterable[tuple[np.ndarray, np.ndarray]]  # (int64 ids [n], float32 vectors [n, d]) per block


@contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """FAISS's OpenMP threads capped at `n` for a block of work (a shared machine,
    or a process whose other threads already use the cores)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def is_ivf(index: faiss.Index | Segments) -> bool:
    return faiss.try_extract_index_ivf(main_index(index)) is not None


def new_index(choice: IndexChoice, dim: int) -> faiss.Index:
    """An empty index of `choice`. Flat is wrapped in IDMap2 (ids, `reconstruct`);
    the IVF kinds keep the image ids in their own lists, with a hashtable direct
    map so `remove_ids` and `reconstruct` work by id. (IDMap2 around an IVF is
    wrong after a removal: it renumbers, the IVF does not.)"""
    return faiss.index_factory(dim, choice.factory, faiss.METRIC_INNER_PRODUCT)


def trained_index(choice: IndexChoice, dim: int, training_sample: np.ndarray | None) -> faiss.Index:
    """An empty index of `choice`, trained on `training_sample` where it needs training."""
    index = new_index(choice, dim)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        assert training_sample is not None and len(training_sample) >= max(choice.nlist, 1), \
            f"{choice.factory} needs at least {choice.nlist} training vectors"
        ivf.cp.niter = IVF_KMEANS_ITERATIONS
        ivf.cp.max_points_per_centroid = IVF_KMEANS_POINTS_PER_CENTROID
        index.train(np.ascontiguousarray(training_sample, dtype=np.float32))
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


def build_index(choice: IndexChoice, dim: int, training_sample: np.ndarray | None, blocks: Blocks) -> faiss.Index:
    """Train `choice` on `training_sample` (IVF kinds) and add every block."""
    index = trained_index(choice, dim, training_sample)
    for ids, vectors in blocks:
        add_vectors(index, ids, vectors)
    return index


def add_vectors(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray) -> None:
    if len(ids) == 0:
        return
    assert vectors.shape == (len(ids), index.d), f"vectors {vectors.shape} do not match {len(ids)} ids of dim {index.d}"
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))


def remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    if len(ids) == 0:
        return 0
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    # An IVF's hashtable direct map removes by looking each id up (IDSelectorArray);
    # IDMap2 tests every stored id against the selector (IDSelectorBatch is a hash set).
    selector = faiss.IDSelectorArray(ids) if is_ivf(index) else faiss.IDSelectorBatch(ids)
    return int(index.remove_ids(selector))


def set_nprobe(index: faiss.Index | Segments, nprobe: int) -> None:
    """Stored in the serialised index too, for readers that load the file directly."""
    ivf = faiss.try_extract_index_ivf(main_index(index))
    if ivf is not None and nprobe > 0:
        ivf.nprobe = nprobe


def serialize(index: faiss.Index) -> memoryview:
    """The index as bytes, as a view over faiss's own buffer: an index of 1M
    2048-d vectors is 8 GB, and a `.tobytes()` copy would double that."""
    return memoryview(faiss.serialize_index(index))


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


class RerankVectors:
    """The full vectors of an index, as float16 rows of a file read through a memory
    map (only the rows a search touches come into RAM, via the page cache), and their
    ids, to re-rank candidates exactly. The file is a `.npy` array; its ids (in row
    order) are a second `.npy`."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        assert vectors.ndim == 2 and len(ids) == len(vectors), \
            f"{len(ids)} ids for re-rank vectors of shape {vectors.shape}"
        self.order = np.argsort(ids, kind="stable")
        self.sorted_ids = np.ascontiguousarray(ids[self.order], dtype=np.int64)
        self.vectors = vectors

    @classmethod
    def open(cls, ids_path: str | os.PathLike[str], vectors_path: str | os.PathLike[str]) -> RerankVectors:
        return cls(np.load(ids_path), np.load(vectors_path, mmap_mode="r"))

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id in the file; -1 for ids it does not hold (and for -1)."""
        at = np.minimum(np.searchsorted(self.sorted_ids, ids), len(self.sorted_ids) - 1)
        held = (self.sorted_ids[at] == ids) if len(self.sorted_ids) else np.zeros(ids.shape, bool)
        return np.where(held, self.order[at] if len(self.order) else -1, -1)

    def scores(self, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Exact inner products [Q, C] of each query with its candidate ids; -inf where absent."""
        rows = self.rows(candidates)
        gathered = np.asarray(self.vectors[np.maximum(rows, 0).ravel()], dtype=np.float32)
        out = np.matmul(gathered.reshape(*rows.shape, -1), queries[:, :, None])[:, :, 0]
        out[rows < 0] = -np.inf
        return out


def write_rerank_vectors(blocks: Blocks, n_vectors: int, dim: int, ids_path: str | os.PathLike[str],
                         vectors_path: str | os.PathLike[str]) -> None:
    """Stream `blocks` into the two `.npy` files of `RerankVectors` (rows in block
    order), by plain writes: a memory-mapped write would count the whole file in RSS."""
    ids = np.empty(n_vectors, np.int64)
    at = 0
    with open(vectors_path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(RERANK_DTYPE)),
                                                 "fortran_order": False, "shape": (n_vectors, dim)})
        for block_ids, vectors in blocks:
            assert at + len(block_ids) <= n_vectors, f"blocks hold more than the {n_vectors} vectors announced"
            ids[at:at + len(block_ids)] = block_ids
            f.write(np.ascontiguousarray(vectors, dtype=RERANK_DTYPE).tobytes())
            at += len(block_ids)
    assert at == n_vectors, f"blocks held {at} vectors, not the {n_vectors} announced"
    np.save(ids_path, ids)


class Segments:
    """A version's index as searches see it: the main index as it was trained, less
    the ids removed from it since (filtered inside the search), plus a delta segment
    of the vectors added since, kept exact (`IDMap2,Flat`). Results merge by score,
    so a search answers as one index holding the live vectors would: exactly where
    the main index is exact, and never worse than the main index where it is not.
    A quiet night writes the delta and the removed ids, not the main index;
    compaction folds them back into it."""

    def __init__(self, main: faiss.Index, delta: faiss.Index | None = None,
                 removed: np.ndarray | None = None) -> None:
        self.main = main
        self.delta = delta if delta is not None and delta.ntotal else None
        self.removed = np.unique(np.asarray(removed if removed is not None else [], dtype=np.int64))
        self.delta_ids = np.sort(faiss.vector_to_array(self.delta.id_map)) if self.delta is not None \
            else np.empty(0, np.int64)
        # built once, not per search: the main index's filter of the removed ids (None: none removed)
        self._removed_batch = faiss.IDSelectorBatch(self.removed) if len(self.removed) else None
        self.not_removed = faiss.IDSelectorNot(self._removed_batch) if len(self.removed) else None

    @property
    def ntotal(self) -> int:
        return self.main.ntotal - len(self.removed) + (self.delta.ntotal if self.delta is not None else 0)

    @property
    def d(self) -> int:
        return self.main.d

    def in_delta(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self.delta_ids):
            return np.zeros(ids.shape, bool)
        return self.delta_ids[np.minimum(np.searchsorted(self.delta_ids, ids), len(self.delta_ids) - 1)] == ids

    def reconstruct(self, image_id: int) -> np.ndarray:
        return self.reconstruct_batch(np.array([image_id], np.int64))[0]

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of `ids`; a RuntimeError (as faiss raises) for an id not live."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.d), np.float32)
        in_delta = self.in_delta(ids)
        if (gone := ~in_delta & np.isin(ids, self.removed)).any():
            raise RuntimeError(f"ids {ids[gone][:5].tolist()} were removed from the index")
        if in_delta.any():
            out[in_delta] = self.delta.reconstruct_batch(ids[in_delta])
        if (~in_delta).any():
            out[~in_delta] = self.main.reconstruct_batch(ids[~in_delta])
        return out

    def delta_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of the delta segment, to fold into a new main index."""
        if self.delta is None:
            return np.empty(0, np.int64), np.empty((0, self.d), np.float32)
        ids = faiss.vector_to_array(self.delta.id_map).astype(np.int64)
        return ids, self.delta.index.reconstruct_n(0, self.delta.ntotal)


def as_segments(index: faiss.Index | Segments) -> Segments:
    return index if isinstance(index, Segments) else Segments(index)


def main_index(index: faiss.Index | Segments) -> faiss.Index:
    return index.main if isinstance(index, Segments) else index


def new_delta(dim: int) -> faiss.Index:
    """An empty delta segment: exact vectors, stable ids."""
    return faiss.index_factory(dim, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)


def _id_filter(allowed_ids: np.ndarray | None, exclude: faiss.IDSelector | None) -> tuple:
    """(a selector of the ids in `allowed_ids` (all, when None) that `exclude` lets
    through, or None for no filter; the selectors it refers to, to keep alive)."""
    allowed = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64)) \
        if allowed_ids is not None else None
    if allowed is None or exclude is None:
        return allowed or exclude, (allowed, exclude)
    return faiss.IDSelectorAnd(allowed, exclude), (allowed, exclude)


def _search_params(index: faiss.Index, nprobe: int | None, selector: faiss.IDSelector | None):
    """Per-call search parameters (the shared index is never mutated by a search)."""
    extra = {"sel": selector} if selector is not None else {}
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        # SearchParametersIVF's own nprobe default is 1, so always pass the one meant
        return faiss.SearchParametersIVF(nprobe=nprobe or ivf.nprobe, **extra)
    return faiss.SearchParameters(**extra) if extra else None


RERANK_CHUNK = 64  # queries re-ranked at a time: 64 x 250 candidates x 2048-d float32 is 128 MB


def search(index: faiss.Index | Segments, queries: np.ndarray, k: int, *, nprobe: int | None = None,
           allowed_ids: np.ndarray | None = None, rerank: RerankVectors | None = None,
           rerank_factor: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], ids [Q, k]), best first; missing neighbours have id -1.
    `allowed_ids` restricts results to those ids (a filter applied inside the search).
    With `rerank` and a `rerank_factor`, the main index proposes k * factor candidates and
    the top k by exact inner product from the full vectors are returned."""
    segments = as_segments(index)
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    k = max(1, min(k, segments.ntotal)) if segments.ntotal else 1
    main_filter, _kept = _id_filter(allowed_ids, segments.not_removed)
    scores, ids = _search_one(segments.main, queries, k, _search_params(segments.main, nprobe, main_filter),
                              rerank, rerank_factor)
    if segments.delta is None:
        return scores, ids
    delta_filter, _kept_too = _id_filter(allowed_ids, None)
    d_scores, d_ids = segments.delta.search(queries, min(k, segments.delta.ntotal),
                                            params=_search_params(segments.delta, None, delta_filter))
    return merge_top(np.hstack([scores, d_scores]), np.hstack([ids, d_ids]), k)


def merge_top(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best of several segments' results (missing ones last, as id -1)."""
    scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_scores, top_ids = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
    if top_scores.shape[1] < k:
        pad = k - top_scores.shape[1]
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=-1)
    top_ids[~np.isfinite(top_scores)] = -1
    return top_scores, top_ids


def _search_one(index: faiss.Index, queries: np.ndarray, k: int, params, rerank: RerankVectors | None,
                rerank_factor: int) -> tuple[np.ndarray, np.ndarray]:
    if rerank is None or rerank_factor <= 1:
        return index.search(queries, min(k, max(index.ntotal, 1)), params=params)
    wide = min(k * rerank_factor, index.ntotal)
    _, candidates = index.search(queries, wide, params=params)
    k = min(k, wide)
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), RERANK_CHUNK):
        q, c = queries[start:start + RERANK_CHUNK], candidates[start:start + RERANK_CHUNK]
        exact = rerank.scores(q, c)
        top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        scores[start:start + len(q)] = np.take_along_axis(exact, top, axis=1)
        ids[start:start + len(q)] = np.take_along_axis(c, top, axis=1)
    missing = ~np.isfinite(scores)
    ids[missing], scores[missing] = -1, -np.inf
    return scores, ids


RERANK_RANGE_MARGIN = 0.05  # a range search on approximate codes looks this far below the threshold


def range_search(index: faiss.Index | Segments, queries: np.ndarray, threshold: float, *,
                 nprobe: int | None = None, rerank: RerankVectors | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lims [Q+1], scores, ids): query i's matches with cosine above `threshold`
    are scores[lims[i]:lims[i+1]]. With `rerank`, the main index is searched
    RERANK_RANGE_MARGIN below the threshold and every match is rescored exactly:
    scores are exact; a pair whose code score fell more than the margin short is missed."""
    segments = as_segments(index)
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    params = _search_params(segments.main, nprobe, segments.not_removed)
    if rerank is None:
        lims, scores, ids = segments.main.range_search(queries, float(threshold), params=params)
    else:
        lims, _, ids = segments.main.range_search(queries, float(threshold) - RERANK_RANGE_MARGIN, params=params)
        owner = np.repeat(np.arange(len(queries)), np.diff(lims).astype(np.int64))
        exact = np.empty(len(ids), np.float32)
        for start in range(0, len(ids), 1 << 16):
            stop = start + (1 << 16)
            exact[start:stop] = rerank.scores(queries[owner[start:stop]], ids[start:stop, None])[:, 0]
        keep = exact > threshold
        lims, scores, ids = _lims_of(owner[keep], len(queries), lims.dtype), exact[keep], ids[keep]
    if segments.delta is None:
        return lims, scores, ids
    d_lims, d_scores, d_ids = segments.delta.range_search(queries, float(threshold))
    owner = np.concatenate([np.repeat(np.arange(len(queries)), np.diff(lims).astype(np.int64)),
                            np.repeat(np.arange(len(queries)), np.diff(d_lims).astype(np.int64))])
    order = np.argsort(owner, kind="stable")
    return (_lims_of(owner, len(queries), lims.dtype), np.concatenate([scores, d_scores])[order],
            np.concatenate([ids, d_ids])[order])


def _lims_of(owner: np.ndarray, n_queries: int, dtype) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n_queries))]).astype(dtype)
