"""FAISS: choose, build, update, measure, (de)serialise and search the catalogue's index.

Vectors are unit-length, so inner product is cosine similarity. Ids are the
catalogue's stable 64-bit image ids on every kind of index, so changed and
deleted images are removed by id and a nightly update needs no rebuild.
Algorithms that read the vectors take re-iterable `blocks` of (ids, vectors),
so a catalogue larger than memory streams through them part by part.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from math import log2, sqrt

import faiss
import numpy as np

log = logging.getLogger(__name__)

Blocks = Iterable[tuple[np.ndarray, np.ndarray]]  # (int64 ids [n], float32 vectors [n, d]) per block

KINDS = ("flat", "ivf-flat", "ivf-pq")
LEGACY_KINDS = {"flat-ip": "flat"}  # index_type written before IVF existed

# Below this many vectors exact search wins outright: a flat scan of 50k x 2048-d
# is ~100M multiply-adds, about 15 ms a query on one core (20k x 2048 measured at
# 165 queries/s), recall is exactly 1, and an IVF would need ~40k training points
# for lists that save little.
FLAT_MAX_VECTORS = 50_000
MIN_POINTS_PER_CENTROID = 39  # faiss k-means warns below this
TRAIN_POINTS_PER_CENTROID = 64  # better centroids than the minimum; faiss subsamples past 256
PQ_NBITS = 8
PQ_CENTROIDS = 1 << PQ_NBITS  # per sub-quantizer; its k-means needs at least this many points
PQ_TRAIN_POINTS = PQ_CENTROIDS * TRAIN_POINTS_PER_CENTROID
PQ_M_CHOICES = (512, 256, 128, 64, 48, 32, 24, 16, 8, 4)
PQ_MIN_DIMS_PER_CODE = 4  # more than d/4 bytes a vector costs memory for little recall over d/4
OPQ_MIN_DIMS_PER_CODE = 8  # OPQ's rotation pays off when each sub-quantizer squeezes 8+ dims into a byte
# An index keeps its trained centroids while the catalogue stays within this factor
# of the size it was trained at: nlist grows as sqrt(n), so at 4x the ideal nlist
# has doubled and each list is 4x longer than planned (slower probes, staler centroids).
GROWTH_FACTOR = 4
ID_BYTES = 8
ID_MAP_BYTES = 40  # an id -> position hashtable entry (IDMap2's rev_map, an IVF's direct map); ~36 measured
RECALL_K = 10
RECALL_QUERIES = 1000
DEFAULT_RECALL_TARGET = 0.95
RECALL_PLATEAU = 0.005  # raising nprobe stops when doubling it gains less recall than this
# The index is built and then held in one process, next to a training sample and
# a block of vectors; half of memory leaves the rest of the machine its share.
DEFAULT_MEMORY_SHARE = 0.5
MEMORY_ENV = "BATCHSIGHT_INDEX_MEMORY"


@dataclass(frozen=True)
class IndexChoice:
    """Which index suits a catalogue, and what it will cost."""

    kind: str  # flat | ivf-flat | ivf-pq
    factory: str  # the faiss index_factory string
    nlist: int = 0  # inverted lists (IVF kinds)
    pq_m: int = 0  # bytes a vector (ivf-pq)
    pq_nbits: int = 0
    opq: bool = False
    opq_dim: int = 0  # output dimension of the OPQ rotation
    train_size: int = 0  # vectors to train on (0: no training)
    min_train_size: int = 0  # fewer than this and faiss trains badly
    estimated_bytes: int = 0  # as loaded; while adding, IVF lists grow by doubling (measured ~1.3x at 20k)


@dataclass(frozen=True)
class IndexSettings:
    """How a build chooses its index and how hard it tunes search."""

    memory_budget_bytes: int | None = None  # None: $BATCHSIGHT_INDEX_MEMORY, else half of memory
    recall_target: float = DEFAULT_RECALL_TARGET
    flat_max_vectors: int = FLAT_MAX_VECTORS

    def __post_init__(self) -> None:
        if not 0 < self.recall_target <= 1:
            raise ValueError(f"recall target must be in (0, 1], not {self.recall_target}")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise ValueError(f"index memory budget must be positive, not {self.memory_budget_bytes}")

    def budget(self) -> int:
        if self.memory_budget_bytes is not None:
            return self.memory_budget_bytes
        if os.environ.get(MEMORY_ENV):
            try:
                return parse_memory_size(os.environ[MEMORY_ENV])
            except ValueError as exc:
                raise ValueError(f"${MEMORY_ENV}: {exc}") from None
        return default_memory_budget()


@dataclass(frozen=True)
class IndexState:
    """What a committed index is, as its manifest records it."""

    kind: str
    factory: str
    trained_n: int  # catalogue size when the index was last trained (0: never trained)
    nlist: int = 0


@dataclass(frozen=True)
class RecallReport:
    recall_at_10: float
    nprobe: int  # 0 for flat (nothing to probe)
    queries: int
    target: float
    curve: tuple[tuple[int, float], ...] = ()  # (nprobe, recall) tried, in order


def parse_memory_size(text: str) -> int:
    """'16G', '512MiB', '2.5GB', '1000000' -> bytes (binary units: G = 2^30)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"memory size {text!r} is not a size; use a number of bytes or e.g. 512M, 16G")
    unit = m.group(2).lower()
    return int(float(m.group(1)) * (1024 ** ("kmgt".index(unit) + 1) if unit else 1))


def default_memory_budget() -> int:
    """Half of this machine's memory, or of the container's limit where that is smaller."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return int(total * DEFAULT_MEMORY_SHARE)


def ivf_nlist(n_vectors: int) -> int:
    """About 4*sqrt(n) lists (a power of two, as autofaiss does), but never so many
    that a list gets fewer than MIN_POINTS_PER_CENTROID training points."""
    nlist = 2 ** round(log2(4 * sqrt(max(n_vectors, 1))))
    return max(1, min(nlist, n_vectors // MIN_POINTS_PER_CENTROID))


def flat_choice(n_vectors: int, dim: int) -> IndexChoice:
    return IndexChoice(kind="flat", factory="IDMap2,Flat",
                       estimated_bytes=n_vectors * (4 * dim + ID_BYTES + ID_MAP_BYTES))


def ivf_flat_choice(n_vectors: int, dim: int) -> IndexChoice:
    nlist = ivf_nlist(n_vectors)
    size = n_vectors * (4 * dim + ID_BYTES + ID_MAP_BYTES) + nlist * dim * 4
    return IndexChoice(kind="ivf-flat", factory=f"IVF{nlist},Flat", nlist=nlist,
                       train_size=min(n_vectors, TRAIN_POINTS_PER_CENTROID * nlist),
                       min_train_size=min(n_vectors, MIN_POINTS_PER_CENTROID * nlist), estimated_bytes=size)


def ivf_pq_choice(n_vectors: int, dim: int, memory_budget_bytes: int) -> IndexChoice | None:
    """The largest PQ code (best recall) whose index fits the budget, or None."""
    fitting = [c for c in _pq_codes(n_vectors, dim) if c.estimated_bytes <= memory_budget_bytes]
    return fitting[0] if fitting else None


def _pq_codes(n_vectors: int, dim: int) -> list[IndexChoice]:
    """Every IVF-PQ that suits `dim`, largest code first (none below PQ_CENTROIDS vectors)."""
    if n_vectors < PQ_CENTROIDS:
        return []
    return [c for m in PQ_M_CHOICES if (c := ivf_pq_for_code(n_vectors, dim, m))]


def ivf_pq_for_code(n_vectors: int, dim: int, m: int, *, opq: bool | None = None) -> IndexChoice | None:
    """IVF-PQ with `m` bytes a vector (OPQ by the rule unless `opq` says), or
    None where `m` does not suit `dim`."""
    if m * PQ_MIN_DIMS_PER_CODE > dim:
        return None
    opq = dim // m >= OPQ_MIN_DIMS_PER_CODE if opq is None else opq
    if not opq and dim % m:
        return None
    # autofaiss's OPQ output: a multiple of m a little above min(d, 6m), so little is lost
    d_out = (min(dim // m, 6) + 1) * m if opq else dim
    nlist = ivf_nlist(n_vectors)
    size = (n_vectors * (m + ID_BYTES + ID_MAP_BYTES) + nlist * d_out * 4
            + PQ_CENTROIDS * d_out * 4 + (dim * d_out * 4 if opq else 0))
    prefix = f"OPQ{m}_{d_out}," if opq else ""
    return IndexChoice(kind="ivf-pq", factory=f"{prefix}IVF{nlist},PQ{m}x{PQ_NBITS}np", nlist=nlist, pq_m=m,
                       pq_nbits=PQ_NBITS, opq=opq, opq_dim=d_out if opq else 0,
                       train_size=min(n_vectors, max(TRAIN_POINTS_PER_CENTROID * nlist, PQ_TRAIN_POINTS)),
                       min_train_size=min(n_vectors, max(MIN_POINTS_PER_CENTROID * nlist, PQ_CENTROIDS)),
                       estimated_bytes=size)


def choose_index(n_vectors: int, dim: int, memory_budget_bytes: int, *,
                 flat_max_vectors: int = FLAT_MAX_VECTORS) -> IndexChoice:
    """Exact flat inner product for small catalogues; IVF-Flat when it fits the
    budget; else IVF-PQ (with OPQ at high compression) with the largest code that fits.

    HNSW is left out on purpose: it cannot remove ids, and nightly updates must.
    """
    if n_vectors < 0 or dim < 1:
        raise ValueError(f"cannot index {n_vectors} vectors of dimension {dim}")
    flat = flat_choice(n_vectors, dim)
    if n_vectors < flat_max_vectors and flat.estimated_bytes <= memory_budget_bytes:
        return flat
    ivf = ivf_flat_choice(n_vectors, dim)
    if ivf.estimated_bytes <= memory_budget_bytes:
        return ivf
    pq = ivf_pq_choice(n_vectors, dim, memory_budget_bytes)
    if pq is None:
        need = min(c.estimated_bytes for c in [flat, *_pq_codes(n_vectors, dim)])
        raise ValueError(f"no index for {n_vectors:,} vectors of dimension {dim} fits in {memory_budget_bytes:,} "
                         f"bytes (the smallest needs about {need:,}); raise --index-memory")
    return pq


def index_kind(index_type: str) -> str:
    return LEGACY_KINDS.get(index_type, index_type)


def retrain_reason(previous: IndexState | None, choice: IndexChoice, n_vectors: int, *,
                   growth_factor: float = GROWTH_FACTOR) -> str | None:
    """Why the next version needs a newly trained index, or None to update the
    previous one in place (remove and add by id)."""
    if previous is None:
        return "no index to update"
    if index_kind(previous.kind) != choice.kind:
        return f"the index kind changes from {index_kind(previous.kind)} to {choice.kind}"
    if choice.kind != "flat" and n_vectors > previous.trained_n * growth_factor:
        return (f"the catalogue grew to {n_vectors} vectors, past {growth_factor:g}x the "
                f"{previous.trained_n} the index was trained at")
    return None


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


def is_ivf(index: faiss.Index) -> bool:
    return faiss.try_extract_index_ivf(index) is not None


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


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Stored in the serialised index too, for readers that load the file directly."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and nprobe > 0:
        ivf.nprobe = nprobe


def serialize(index: faiss.Index) -> memoryview:
    """The index as bytes, as a view over faiss's own buffer: an index of 1M
    2048-d vectors is 8 GB, and a `.tobytes()` copy would double that."""
    return memoryview(faiss.serialize_index(index))


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def _search_params(index: faiss.Index, nprobe: int | None, allowed_ids: np.ndarray | None):
    """Per-call search parameters (the shared index is never mutated by a search)."""
    extra = {}
    if allowed_ids is not None:
        extra["sel"] = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        # SearchParametersIVF's own nprobe default is 1, so always pass the one meant
        return faiss.SearchParametersIVF(nprobe=nprobe or ivf.nprobe, **extra)
    return faiss.SearchParameters(**extra) if extra else None


def search(index: faiss.Index, queries: np.ndarray, k: int, *, nprobe: int | None = None,
           allowed_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], ids [Q, k]), best first; missing neighbours have id -1.
    `allowed_ids` restricts results to those ids (a filter applied inside the search)."""
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    return index.search(queries, k, params=_search_params(index, nprobe, allowed_ids))


def range_search(index: faiss.Index, queries: np.ndarray, threshold: float, *,
                 nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lims [Q+1], scores, ids): query i's matches with cosine above `threshold`
    are scores[lims[i]:lims[i+1]]."""
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    return index.range_search(queries, float(threshold), params=_search_params(index, nprobe, None))


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
    for ids, vectors in blocks:
        hit = np.flatnonzero(np.isin(ids, unique))
        out[np.searchsorted(unique, ids[hit])] = vectors[hit]
        found += len(hit)
    assert found == len(unique), f"found {found} of {len(unique)} sampled vectors in the blocks"
    return out[order]


def exact_neighbours(queries: np.ndarray, blocks: Blocks, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`k` inner-product (scores, ids) over all blocks, block by block."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for ids, vectors in blocks:
        if len(ids) == 0:
            continue
        scores, positions = faiss.knn(queries, np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(ids)),
                                      metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(positions >= 0, ids[np.maximum(positions, 0)], -1))
    heap.finalize()
    return heap.D, heap.I


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
                target: float) -> RecallReport:
    """Raise nprobe 1, 2, 4, ... until recall@k reaches `target`. IVF-Flat always
    gets there (at nprobe = nlist it is exact). Where PQ codes cap recall below
    the target, stop when doubling gains under RECALL_PLATEAU and keep the
    smallest nprobe within that of the best."""
    k = truth.shape[1]
    ivf = faiss.extract_index_ivf(index)
    nlist, exact_codes = ivf.nlist, ivf.code_size == 4 * ivf.d  # IVF-Flat stores the float32 vectors
    curve: list[tuple[int, float]] = []
    nprobe = 1
    while True:
        _, found = search(index, queries, k + 1, nprobe=nprobe)
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
                        curve=tuple(curve))


def measure_recall(index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray, blocks: Blocks, *,
                   target: float, k: int = RECALL_K) -> RecallReport:
    """recall@k of `index` against exact search over `blocks` (the same vectors),
    for `queries` drawn from them; tunes and sets nprobe on an IVF index."""
    k = min(k, index.ntotal - 1)
    if not is_ivf(index) or k < 1:
        return RecallReport(recall_at_10=1.0, nprobe=0, queries=0, target=target)  # exact by construction
    _, truth = exact_neighbours(queries, blocks, k + 1)
    report = tune_nprobe(index, queries, query_ids, drop_self(truth, query_ids, k), target)
    set_nprobe(index, report.nprobe)
    log.info("recall@%s %.3f at nprobe %s (target %.2f, %s queries; tried %s)", k, report.recall_at_10,
             report.nprobe, target, report.queries, report.curve)
    return report
