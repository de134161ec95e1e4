"""FAISS: choose, build, update, measure, (de)serialise and search the catalogue's index.

Vectors are unit-length, so inner product is cosine similarity. Ids are the
catalogue's stable 64-bit image ids on every kind of index, so changed and
deleted images are removed by id and a nightly update needs no rebuild.
Algorithms that read the vectors take re-iterable `blocks` of (ids, vectors),
so a catalogue larger than memory streams through them part by part.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from math import log2, sqrt

import faiss
import numpy as np

from models.errors import UserError
from tasks.options import RUN_DEFAULTS

log = logging.getLogger(__name__)

Blocks = Iterable[tuple[np.ndarray, np.ndarray]]  # (int64 ids [n], float32 vectors [n, d]) per block

# The ladder, most accurate first: full float32 vectors, then 16-, 8-, 6- and 4-bit
# scalar codes (SQfp16 is 2d bytes a vector, SQ4 d/2), then product quantisation.
KINDS = ("flat", "ivf-flat", "ivf-sqfp16", "ivf-sq8", "ivf-sq6", "ivf-sq4", "ivf-pq")
SQ_CODES = {"ivf-sqfp16": ("SQfp16", 16), "ivf-sq8": ("SQ8", 8), "ivf-sq6": ("SQ6", 6),
            "ivf-sq4": ("SQ4", 4)}  # kind -> (faiss name, bits a dimension)
# Codes this lossy rank candidates only: the final top-k comes from an exact re-rank
# of k * factor candidates against full vectors in a float16 file outside RAM.
RERANK_KINDS = ("ivf-sq8", "ivf-sq6", "ivf-sq4", "ivf-pq")
RERANK_FACTORS = (4, 10, 25)  # candidates per result, tried in order until recall reaches the target
# then, at the nprobe found with the first, fewer while the target holds: gathering and
# widening the float16 rows was half of a batched search at 1M x 2048 (SQ4, nprobe 4, x4)
RERANK_TRIM = (2, 3)
RERANK_DTYPE = np.float16  # 2d bytes a vector on disk; scores from it are within ~1e-3 of float32's
RERANK_ROW_BYTES = 16  # in RAM a vector: its id and its row (np.argsort order) to find it in the file
# An IVF's lists are std::vectors grown by doubling while adding, so a list holds
# 1-2x its size (1.32x measured for IVF4096,Flat at 1M x 2048); counted in every estimate.
LIST_SLACK = 1.35
IVF_KMEANS_ITERATIONS = 10  # faiss's default 25 costs 2.5x the training time for centroids barely better
# k-means for the lists samples this many training points a list (faiss subsamples):
# its cost is points x nlist x d an iteration, nlist^2 at a fixed number a list, and at
# IVF4096 x 2048-d 40 a list took 235-340 s of a 10-minute build on 2 cores. 10, 20 and
# 40 a list gave the same recall curve (IVF1024, 200k x 2048 clustered); the codes
# (SQ ranges, PQ codebooks) still train on the whole sample.
IVF_KMEANS_POINTS_PER_CENTROID = 20
LEGACY_KINDS = {"flat-ip": "flat"}  # index_type written before IVF existed

# Below this many vectors exact search wins outright: a flat scan of 50k x 2048-d
# is ~100M multiply-adds, about 15 ms a query on one core (20k x 2048 measured at
# 165 queries/s), recall is exactly 1, and an IVF would need ~40k training points
# for lists that save little.
FLAT_MAX_VECTORS = 50_000
NLIST_PER_SQRT_N = 4  # lists per sqrt(n); faiss suggests 4 to 16 (benchmarks/index.py --lists-per-sqrt-n compares)
MIN_POINTS_PER_CENTROID = 39  # faiss k-means warns below this
TRAIN_POINTS_PER_CENTROID = 40  # just above faiss's warning: the sample and its residuals (PQ) are 2 copies in RAM
PQ_NBITS = 8
PQ_CENTROIDS = 1 << PQ_NBITS  # per sub-quantizer; its k-means needs at least this many points
PQ_TRAIN_POINTS = PQ_CENTROIDS * TRAIN_POINTS_PER_CENTROID
PQ_M_CHOICES = (512, 256, 128, 64, 48, 32, 24, 16, 8, 4)
PQ_MIN_DIMS_PER_CODE = 8  # finer sub-quantizers train far too slowly: IVF1024,PQ512x8 (4 dims a code) took 636 s at 100k x 2048 on 2 cores
OPQ_MIN_DIMS_PER_CODE = 8  # OPQ's rotation pays off when each sub-quantizer squeezes 8+ dims into a byte
# An index keeps its trained centroids while the catalogue stays within this factor
# of the size it was trained at: nlist grows as sqrt(n), so at 4x the ideal nlist
# has doubled and each list is 4x longer than planned (slower probes, staler centroids).
GROWTH_FACTOR = 4
ID_BYTES = 8
ID_MAP_BYTES = 40  # an id -> position hashtable entry (IDMap2's rev_map, an IVF's direct map); ~36 measured
RECALL_K = 10
RECALL_QUERIES = 1000
DEFAULT_RECALL_TARGET = RUN_DEFAULTS.recall_target
RECALL_PLATEAU = 0.005  # raising nprobe stops when doubling it gains less recall than this
# The index is built and then held in one process, next to a training sample and
# a block of vectors; half of memory leaves the rest of the machine its share.
DEFAULT_MEMORY_SHARE = 0.5
MEMORY_ENV = "BATCHSIGHT_INDEX_MEMORY"


@dataclass(frozen=True)
class IndexChoice:
    """Which index suits a catalogue, and what it will cost."""

    kind: str  # one of KINDS
    factory: str  # the faiss index_factory string
    nlist: int = 0  # inverted lists (IVF kinds)
    pq_m: int = 0  # bytes a vector (ivf-pq)
    pq_nbits: int = 0
    opq: bool = False
    opq_dim: int = 0  # output dimension of the OPQ rotation
    train_size: int = 0  # vectors to train on (0: no training)
    min_train_size: int = 0  # fewer than this and faiss trains badly
    estimated_bytes: int = 0  # RAM while building and searching: codes, ids, id map, list slack, re-rank ids
    rerank: bool = False  # exact re-rank of candidates from a float16 file of the full vectors
    disk_bytes: int = 0  # that file's size (0 without a re-rank)

    def describe(self) -> str:
        extra = f" + re-rank from a {self.disk_bytes / 2**20:,.0f} MiB float16 file" if self.rerank else ""
        return f"{self.kind} {self.factory}{extra} (~{self.estimated_bytes / 2**20:,.0f} MiB in RAM)"


@dataclass(frozen=True)
class IndexSettings:
    """How a build chooses its index and how hard it tunes search."""

    memory_budget_bytes: int | None = None  # None: $BATCHSIGHT_INDEX_MEMORY, else half of memory
    recall_target: float = DEFAULT_RECALL_TARGET
    flat_max_vectors: int = FLAT_MAX_VECTORS
    rerank: bool = True  # allow SQ8 / PQ codes with an exact re-rank from a float16 file on disk
    # A night compacts (folds the delta segment and the removed ids into a new main index)
    # once the vectors added and removed since the last compaction pass this share of the
    # catalogue and this many: the delta is rewritten each night, so its size bounds a
    # quiet night's bytes (2% of 512-d vectors is ~1.2% of the catalogue's bytes).
    compact_share: float = 0.02
    compact_min_changes: int = 10_000

    def __post_init__(self) -> None:
        if not 0 < self.recall_target <= 1:
            raise UserError(f"recall target must be in (0, 1], not {self.recall_target}")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise UserError(f"index memory budget must be positive, not {self.memory_budget_bytes}")

    def budget(self) -> int:
        if self.memory_budget_bytes is not None:
            return self.memory_budget_bytes
        if os.environ.get(MEMORY_ENV):
            try:
                return parse_memory_size(os.environ[MEMORY_ENV])
            except ValueError as exc:
                raise UserError(f"${MEMORY_ENV}: {exc}") from None
        return default_memory_budget()


@dataclass(frozen=True)
class IndexState:
    """What a committed index is, as its manifest records it."""

    kind: str
    factory: str
    trained_n: int  # catalogue size when the index was last trained (0: never trained)
    nlist: int = 0
    rerank: bool = False


@dataclass(frozen=True)
class RecallReport:
    recall_at_10: float
    nprobe: int  # 0 for flat (nothing to probe)
    queries: int
    target: float
    curve: tuple[tuple[int, float], ...] = ()  # (nprobe, recall) tried, in order
    rerank_factor: int = 0  # candidates a result re-ranked exactly (0: no re-rank)


def parse_memory_size(text: str) -> int:
    """'16G', '512MiB', '2.5GB', '1000000' -> bytes (binary units: G = 2^30)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise UserError(f"memory size {text!r} is not a size; use a number of bytes or e.g. 512M, 16G")
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
    """About NLIST_PER_SQRT_N * sqrt(n) lists (a power of two, as autofaiss does), but never
    so many that a list gets fewer than MIN_POINTS_PER_CENTROID training points."""
    nlist = 2 ** round(log2(NLIST_PER_SQRT_N * sqrt(max(n_vectors, 1))))
    return max(1, min(nlist, n_vectors // MIN_POINTS_PER_CENTROID))


def _ivf_bytes(n_vectors: int, code_bytes: float, nlist: int, dim: int) -> int:
    """Codes and ids in the lists (with their growth slack), the id hashtable, the centroids."""
    return int(n_vectors * ((code_bytes + ID_BYTES) * LIST_SLACK + ID_MAP_BYTES) + nlist * dim * 4)


def _with_rerank(choice: IndexChoice, n_vectors: int, dim: int) -> IndexChoice:
    return replace(choice, rerank=True, estimated_bytes=choice.estimated_bytes + n_vectors * RERANK_ROW_BYTES,
                   disk_bytes=n_vectors * dim * np.dtype(RERANK_DTYPE).itemsize)


def flat_choice(n_vectors: int, dim: int) -> IndexChoice:
    return IndexChoice(kind="flat", factory="IDMap2,Flat",
                       estimated_bytes=n_vectors * (4 * dim + ID_BYTES + ID_MAP_BYTES))


def ivf_flat_choice(n_vectors: int, dim: int) -> IndexChoice:
    nlist = ivf_nlist(n_vectors)
    return IndexChoice(kind="ivf-flat", factory=f"IVF{nlist},Flat", nlist=nlist,
                       train_size=min(n_vectors, TRAIN_POINTS_PER_CENTROID * nlist),
                       min_train_size=min(n_vectors, MIN_POINTS_PER_CENTROID * nlist),
                       estimated_bytes=_ivf_bytes(n_vectors, 4 * dim, nlist, dim))


def ivf_sq_choice(n_vectors: int, dim: int, kind: str) -> IndexChoice:
    """IVF with scalar codes of SQ_CODES[kind]'s bits a dimension (their trained range is 2d floats)."""
    name, bits = SQ_CODES[kind]
    nlist = ivf_nlist(n_vectors)
    return IndexChoice(kind=kind, factory=f"IVF{nlist},{name}", nlist=nlist,
                       train_size=min(n_vectors, TRAIN_POINTS_PER_CENTROID * nlist),
                       min_train_size=min(n_vectors, MIN_POINTS_PER_CENTROID * nlist),
                       estimated_bytes=_ivf_bytes(n_vectors, -(-bits * dim // 8), nlist, dim) + 2 * dim * 4)


def ivf_pq_choice(n_vectors: int, dim: int, memory_budget_bytes: int, *, rerank: bool = False) -> IndexChoice | None:
    """The largest PQ code (best recall) whose index fits the budget, or None."""
    fitting = [c for c in _pq_codes(n_vectors, dim, rerank=rerank) if c.estimated_bytes <= memory_budget_bytes]
    return fitting[0] if fitting else None


def _pq_codes(n_vectors: int, dim: int, *, rerank: bool = False) -> list[IndexChoice]:
    """Every IVF-PQ that suits `dim`, largest code first (none below PQ_CENTROIDS vectors).
    With a re-rank, no OPQ: the re-rank recovers what it would, and its training at
    d=2048 takes longer than the rest of the build."""
    if n_vectors < PQ_CENTROIDS:
        return []
    codes = [c for m in PQ_M_CHOICES if (c := ivf_pq_for_code(n_vectors, dim, m, opq=False if rerank else None))]
    return [_with_rerank(c, n_vectors, dim) for c in codes] if rerank else codes


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
    size = (_ivf_bytes(n_vectors, m, nlist, d_out) + PQ_CENTROIDS * d_out * 4 + (dim * d_out * 4 if opq else 0))
    prefix = f"OPQ{m}_{d_out}," if opq else ""
    return IndexChoice(kind="ivf-pq", factory=f"{prefix}IVF{nlist},PQ{m}x{PQ_NBITS}np", nlist=nlist, pq_m=m,
                       pq_nbits=PQ_NBITS, opq=opq, opq_dim=d_out if opq else 0,
                       train_size=min(n_vectors, max(TRAIN_POINTS_PER_CENTROID * nlist, PQ_TRAIN_POINTS)),
                       min_train_size=min(n_vectors, max(MIN_POINTS_PER_CENTROID * nlist, PQ_CENTROIDS)),
                       estimated_bytes=size)


def index_ladder(n_vectors: int, dim: int, *, flat_max_vectors: int = FLAT_MAX_VECTORS,
                 rerank: bool = True) -> list[IndexChoice]:
    """Every index `choose_index` considers for this catalogue, most accurate first:
    flat (small catalogues), IVF-Flat, IVF with 16-, 8-, 6- and 4-bit scalar codes,
    IVF-PQ from the largest code down; those of RERANK_KINDS with an exact re-rank when `rerank`."""
    if n_vectors < 0 or dim < 1:
        raise ValueError(f"cannot index {n_vectors} vectors of dimension {dim}")
    ladder = [flat_choice(n_vectors, dim)] if n_vectors < flat_max_vectors else []
    ladder.append(ivf_flat_choice(n_vectors, dim))
    for kind in SQ_CODES:
        sq = ivf_sq_choice(n_vectors, dim, kind)
        ladder.append(_with_rerank(sq, n_vectors, dim) if rerank and kind in RERANK_KINDS else sq)
    return ladder + _pq_codes(n_vectors, dim, rerank=rerank)


def choose_index(n_vectors: int, dim: int, memory_budget_bytes: int, *,
                 flat_max_vectors: int = FLAT_MAX_VECTORS, rerank: bool = True) -> IndexChoice:
    """The most accurate index of `index_ladder` that fits the budget.

    HNSW is left out on purpose: it cannot remove ids, and nightly updates must.
    """
    ladder = index_ladder(n_vectors, dim, flat_max_vectors=flat_max_vectors, rerank=rerank)
    fitting = [c for c in ladder if c.estimated_bytes <= memory_budget_bytes]
    if not fitting:
        need = min(c.estimated_bytes for c in [flat_choice(n_vectors, dim), *ladder])
        raise UserError(f"no index for {n_vectors:,} vectors of dimension {dim} fits in {memory_budget_bytes:,} "
                         f"bytes (the smallest needs about {need:,}); raise --index-memory")
    return fitting[0]


def stronger_choice(n_vectors: int, dim: int, choice: IndexChoice, *, flat_max_vectors: int = FLAT_MAX_VECTORS,
                    rerank: bool = True) -> IndexChoice | None:
    """The next rung up the ladder from `choice` (more memory, more recall), or None at the top;
    named when a build misses its recall target."""
    ladder = index_ladder(n_vectors, dim, flat_max_vectors=max(flat_max_vectors, n_vectors + 1), rerank=rerank)
    above = [c for c in ladder if c.estimated_bytes > choice.estimated_bytes and (c.kind, c.pq_m) != (choice.kind, choice.pq_m)]
    return min(above, key=lambda c: c.estimated_bytes) if above else None


def next_option_up(state: IndexState, n_vectors: int, dim: int) -> IndexChoice | None:
    """`stronger_choice` for a committed index as its manifest records it (its rung found
    by codes and re-rank, whatever its list count): what `status` names when the measured
    recall misses the target. None at the top, or where no ladder of this size holds it."""
    ladder = index_ladder(n_vectors, dim, flat_max_vectors=n_vectors + 1, rerank=state.rerank)
    current = next((c for c in ladder if _codes(c.factory) == _codes(state.factory) and c.rerank == state.rerank), None)
    return None if current is None else stronger_choice(n_vectors, dim, current, rerank=state.rerank)


def next_option_hint(stronger: IndexChoice | None) -> str:
    """What to do when recall misses its target: the next rung up and the budget it needs."""
    if stronger is None:
        return "no index reaches it"
    return (f"the next option up is {stronger.describe()}: raise --index-memory to about "
            f"{stronger.estimated_bytes:,} bytes")


def _codes(factory: str) -> str:
    """A factory string without its list count: what a vector's code is."""
    return re.sub(r"IVF\d+", "IVF", factory)


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
    if _codes(previous.factory) != _codes(choice.factory):
        return f"the codes change from {previous.factory} to {choice.factory}"
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
    return _merge_top(np.hstack([scores, d_scores]), np.hstack([ids, d_ids]), k)


def _merge_top(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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
        merged_scores, merged_ids = _merge_top(np.hstack([scores, new_scores]), np.hstack([ids, new_ids]),
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
