"""A version's manifest, the `CURRENT` pointer and the one commit point.

Every file a writer writes has a new key (named by version and run id), so no
file a version names is ever overwritten; a version goes live only when
`CURRENT` moves, by a conditional put (`commit_manifest`). Readers follow
`CURRENT` and never see a half-written version.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime

import numpy as np

from tasks.catalog import layout
from tasks.catalog.errors import ROLLBACK_HINT, CatalogCorrupt, CatalogError, ConcurrentCommitError
from tasks.catalog.layout import manifest_key
from tasks.records import FileRecord
from tasks.search import index_choice
from tasks.storage import ObjectNotFound, ObjectStore, PreconditionFailed

log = logging.getLogger(__name__)

POINTER_KEY = layout.POINTER_KEY

# 2: rows are parts plus deletes, the index a main index plus a delta segment and
# removed ids (issue 14). A format-1 manifest names one snapshot of each table and
# one index, and is read as parts of one.
FORMAT_VERSION = 2

READABLE_FORMATS = (1, 2)

# The columns that name a row in its table's deletes: a row is live while no
# delete names it. A changed image keeps its image_id; its new row has a new run_id.
ROW_IDENTITY = {"images": ("image_id", "run_id"), "failures": ("key", "run_id")}


def crash_point(name: str) -> None:
    """Fault injection for the crash-safety tests: `BATCHSIGHT_CRASH_AT=name` kills
    this process with SIGKILL here, as the OOM killer or a lost node would.
    A no-op unless that variable names this point."""
    if os.environ.get("BATCHSIGHT_CRASH_AT") == name:
        log.warning("BATCHSIGHT_CRASH_AT=%s: killing this process", name)
        os.kill(os.getpid(), signal.SIGKILL)


def new_run_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{np.random.default_rng().integers(0, 1 << 24):06x}"


def put_recorded(store: ObjectStore, key: str, data: bytes | memoryview) -> FileRecord:
    """Write an immutable catalogue file and return the record its manifest keeps."""
    record = FileRecord.of(data)
    store.put(key, data)
    return record


@dataclass(kw_only=True)
class Provenance:
    """What made a version's rows: where they were listed, the model and weights
    that embedded them, the categoriser that named their categories."""

    source: str
    model: str
    weights: str
    weights_source: str
    weights_sha256: str
    embedding_dim: int
    categorizer: str | None = None  # key of the categoriser whose labels are in `images.category`

    @classmethod
    def of(cls, made: Provenance) -> Provenance:
        """Just the provenance of `made` (a manifest, say), to describe another version's."""
        return cls(**{f.name: getattr(made, f.name) for f in fields(cls)})


@dataclass(kw_only=True)
class Manifest(Provenance):
    """One complete catalogue version: what to read, and what produced it."""

    version: int
    run_id: str
    created_at: str
    parent: str | None  # manifest key of the version this one was built from
    images: list[str]  # parts of rows, oldest first; a row is live unless `images_deletes` names it
    failures: list[str]  # parts of failures, the same way
    embeddings: list[str]  # embedding parts that hold live vectors (and, until compaction, parts that did)
    index: str  # the main index
    index_type: str  # flat | ivf-flat | ivf-pq ("flat-ip" in versions written before IVF)
    counts: dict[str, int] = field(default_factory=dict)
    rolled_back_from: int | None = None  # set on a version made by `batchsight rollback`
    format: int = FORMAT_VERSION
    # The index in detail (defaults describe the exact flat index of older versions).
    index_factory: str = "IDMap2,Flat"
    index_trained_n: int = 0  # catalogue size when the index was last trained (0: untrained flat)
    index_nlist: int = 0
    index_nprobe: int = 0  # tuned to reach index_recall_target; searches use it
    index_recall_at_10: float | None = None  # vs exact search, on held-out indexed vectors
    index_recall_target: float | None = None
    index_recall_queries: int = 0
    # The float16 full vectors (and their ids) an index with an exact re-rank reads candidates from
    index_rerank: str | None = None
    index_rerank_ids: str | None = None
    index_rerank_factor: int = 0  # candidates a result, tuned with nprobe
    # Since the main index was last compacted: the exact segment of vectors added, the ids
    # removed from the main index, and the held-out queries' exact neighbours (None: none)
    index_delta: str | None = None
    index_removed: str | None = None
    index_truth: str | None = None
    images_deletes: str | None = None  # (image_id, run_id) of rows gone from `images`' parts
    failures_deletes: str | None = None  # (key, run_id) of failures gone from `failures`' parts
    thumbnails: list[str] = field(default_factory=list)  # thumbnails parts that hold a live row's thumbnail
    # size and sha256 of every file named above (empty in versions written before checksums)
    files: dict[str, FileRecord] = field(default_factory=dict)

    @property
    def named_files(self) -> list[str]:
        """Every file this version reads (the manifest itself aside)."""
        optional = [k for k in (self.images_deletes, self.failures_deletes, self.index_delta, self.index_removed,
                                self.index_truth, self.index_rerank_ids, self.index_rerank) if k]
        return [*self.images, *self.failures, self.index, *optional, *self.embeddings, *self.thumbnails]

    @property
    def index_state(self) -> index_choice.IndexState:
        return index_choice.IndexState(kind=index_choice.index_kind(self.index_type), factory=self.index_factory,
                                      trained_n=self.index_trained_n, nlist=self.index_nlist,
                                      rerank=self.index_rerank is not None)

    @property
    def fingerprint(self) -> str:
        return f"{self.model}@{self.weights_sha256}"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, key: str = "manifest") -> Manifest:
        try:
            raw = json.loads(data)
            if raw.get("format") not in READABLE_FORMATS:
                raise CatalogError(f"manifest format {raw.get('format')} of {key} is not supported by this "
                                   f"batchsight (it reads {', '.join(map(str, READABLE_FORMATS))}); upgrade batchsight")
            for table in ROW_IDENTITY:  # format 1: one snapshot, read as a table of one part
                if isinstance(raw.get(table), str):
                    raw[table] = [raw[table]]
            raw["files"] = {k: FileRecord(**v) for k, v in raw.get("files", {}).items()}
            return cls(**raw)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:  # JSONDecodeError is a ValueError
            raise CatalogCorrupt(f"manifest {key} is damaged ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class Pointer:
    version: int
    manifest: str

    def to_json(self) -> bytes:
        return json.dumps({"version": self.version, "manifest": self.manifest}).encode()


def read_pointer(store: ObjectStore) -> tuple[Pointer | None, str | None]:
    """The live pointer and the ETag a commit must match, or (None, None) for an empty root."""
    try:
        data, etag = store.get_with_etag(POINTER_KEY)
    except ObjectNotFound:
        return None, None
    return parse_pointer(store, data), etag


def parse_pointer(store: ObjectStore, data: bytes) -> Pointer:
    try:
        raw = json.loads(data)
        return Pointer(int(raw["version"]), str(raw["manifest"]))
    except (ValueError, TypeError, KeyError) as exc:
        raise CatalogCorrupt(f"{store.describe(POINTER_KEY)} is damaged ({type(exc).__name__}: {exc}); the "
                             f"manifests hold versions up to {newest_listed_version(store)}: `batchsight rollback "
                             "--catalog OUT --to N` makes one of them live") from None


def read_manifest(store: ObjectStore, key: str) -> Manifest:
    try:
        data = store.get(key)
    except ObjectNotFound:
        raise CatalogCorrupt(f"manifest {store.describe(key)} is missing; {ROLLBACK_HINT}") from None
    return Manifest.from_json(data, store.describe(key))


def commit_manifest(store: ObjectStore, manifest: Manifest, expected_pointer_etag: str | None) -> Pointer:
    """Write the manifest, then move `CURRENT` to it with a conditional put: the
    one commit point. Losing the condition means another run committed first.

    When the put fails in any way, `CURRENT` is read back: a reply lost after S3
    applied the put (botocore then retries and gets 412) is a commit all the same."""
    key = manifest_key(manifest.version, manifest.run_id)
    store.put(key, manifest.to_json(), if_none_match=True)
    crash_point("before-commit")
    pointer = Pointer(manifest.version, key)
    try:
        if expected_pointer_etag is None:
            store.put(POINTER_KEY, pointer.to_json(), if_none_match=True)
        else:
            store.put(POINTER_KEY, pointer.to_json(), if_match=expected_pointer_etag)
    except Exception as exc:
        if _pointer_is(store, pointer):
            log.warning("the reply to the commit of version %s was lost (%s), but CURRENT points at it: committed",
                        manifest.version, type(exc).__name__)
            return pointer
        if isinstance(exc, PreconditionFailed):
            raise ConcurrentCommitError(
                f"another run committed to {store.url} while run {manifest.run_id} was running "
                f"(the conditional put on CURRENT failed); this run committed nothing. "
                "Run again: it will start from the newer version."
            ) from None
        raise
    return pointer


def _pointer_is(store: ObjectStore, pointer: Pointer) -> bool:
    """Whether `CURRENT` now holds exactly `pointer` (it names a manifest with this run's id)."""
    try:
        return store.get(POINTER_KEY) == pointer.to_json()
    except Exception:  # unreadable now: the outcome stays unknown, and the original error is raised
        log.warning("could not read CURRENT back after a failed commit", exc_info=True)
        return False


def newest_listed_version(store: ObjectStore) -> int:
    """The highest version number among the manifests (0 when there are none)."""
    numbers = (layout.manifest_version(o.key) for o in store.list(layout.MANIFESTS))
    return max((n for n in numbers if n is not None), default=0)
