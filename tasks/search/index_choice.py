"""Which FAISS index a catalogue gets, and when it must be retrained: pure
decisions over the number of vectors, their dimension and a memory budget
(as autofaiss's `optimize.py`), pinned by table-driven tests.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from math import log2, sqrt

import numpy as np

from models.errors import UserError

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

DEFAULT_RECALL_TARGET = 0.95

RECALL_PLATEAU = 0.005  # raising nprobe stops when doubling it gains less recall than this

# The index is built and then held in one process, next to a training sample and
# a block of vectors; half of memory leaves the rest of the machine its share.
DEFAULT_MEMORY_SHARE = 0.5


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

    memory_budget_bytes: int | None = None  # None: half of memory (`default_memory_budget`)
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
        return self.memory_budget_bytes if self.memory_budget_bytes is not None else default_memory_budget()


@dataclass(frozen=True)
class IndexState:
    """What a committed index is, as its manifest records it."""

    kind: str
    factory: str
    trained_n: int  # catalogue size when the index was last trained (0: never trained)
    nlist: int = 0
    rerank: bool = False


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
