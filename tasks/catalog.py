"""The catalogue: versioned manifests, the atomic commit, the reader and its
checks, change planning, the runs log, leases, gc and the crash hook.
Versions are built in `tasks/versions.py` (`build_next_version` and `rollback`
here are thin callers); every key is named in `tasks/layout.py`.

Every file a writer writes has a new key (named by version and run id), so no
file a version names is ever overwritten; a version goes live only when
`CURRENT` moves, by a conditional put. Readers follow `CURRENT` and never see a
half-written version.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from models.errors import UserError
from tasks import index as faiss_index
from tasks import layout, tables
from tasks.layout import manifest_key, version_stem  # noqa: F401  (part of this module's API)
from tasks.options import RUN_DEFAULTS
from tasks.storage import (LocalStore, ObjectInfo, ObjectNotFound, ObjectStore, PreconditionFailed, StorageError,
                           cached_store)

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


class CatalogError(UserError, RuntimeError):
    """The output root holds no usable catalogue, or a version asked for is missing."""


class CatalogCorrupt(CatalogError):
    """A file the catalogue names is missing, truncated, altered or unreadable."""

    exit_code = 4  # `status --verify` names the file, rollback restores


class ConcurrentCommitError(UserError, RuntimeError):
    """Another run moved `CURRENT` while this one was running; nothing was committed."""

    exit_code = 3  # rerun to continue from the winner's version


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


@dataclass(frozen=True)
class FileRecord:
    """What the manifest knows of one file it names, to tell a damaged copy."""

    size: int
    sha256: str

    @classmethod
    def of(cls, data: bytes | memoryview) -> FileRecord:
        return cls(size=memoryview(data).nbytes, sha256=hashlib.sha256(data).hexdigest())


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
    def index_state(self) -> faiss_index.IndexState:
        return faiss_index.IndexState(kind=faiss_index.index_kind(self.index_type), factory=self.index_factory,
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


ROLLBACK_HINT = ("`batchsight status --catalog OUT --verify` names every damaged file; "
                 "`batchsight rollback --catalog OUT --to N` makes an earlier, whole version live again")


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


class Catalog:
    """A read-only view of one committed version."""

    def __init__(self, store: ObjectStore, manifest: Manifest, key: str) -> None:
        self.store = store
        self.manifest = manifest
        self.manifest_key = key

    @classmethod
    def open(cls, store: ObjectStore, version: int | None = None) -> Catalog:
        pointer, _ = read_pointer(store)
        if pointer is None:
            raise CatalogError(f"no catalogue at {store.url} (no CURRENT pointer); "
                               "run `batchsight run --source SRC --output OUT` first")
        key = pointer.manifest
        if version is not None and version != pointer.version:
            key = find_version(store, version, start=pointer.manifest)
        return cls(store, read_manifest(store, key), key)

    def read(self, key: str) -> bytes:
        """A file of this version, checked against the size and sha256 its manifest recorded."""
        return read_verified(self.store, key, self.manifest.files.get(key))

    def read_table(self, key: str, columns: Sequence[str] | None = None) -> pa.Table:
        data = self.read(key)
        try:
            return tables.read_parquet_bytes(data, columns)
        except (pa.ArrowException, OSError) as exc:
            raise CatalogCorrupt(f"{self.store.describe(key)} is not a readable Parquet file "
                                 f"({type(exc).__name__}: {exc}); {ROLLBACK_HINT}") from None

    def live_table(self, table: str, columns: Sequence[str] | None = None) -> pa.Table:
        """The live rows of `table` ("images" or "failures"): its parts, less the rows
        its deletes name. `columns` reads only those (a night's plan reads three)."""
        identity = ROW_IDENTITY[table]
        wanted = None if columns is None else list(dict.fromkeys([*columns, *identity]))
        parts = [self.read_table(key, wanted) for key in getattr(self.manifest, table)]
        rows = pa.concat_tables(parts, promote_options="default") if parts else None
        deletes_key = getattr(self.manifest, f"{table}_deletes")
        if rows is not None and deletes_key:
            rows = tables.without_rows(rows, self.read_table(deletes_key), identity)
        if rows is None:
            rows = (tables.IMAGES_SCHEMA if table == "images" else tables.FAILURES_SCHEMA).empty_table()
        return rows.select(list(columns)) if columns is not None else rows

    @cached_property
    def images(self) -> pd.DataFrame:
        """One DataFrame of the live rows, by key and page."""
        frame = tables.table_to_frame(self.live_table("images"))
        if "page" not in frame:  # written before documents had pages: every row is an image's only page
            frame["page"] = np.ones(len(frame), np.int32)
        frame["page"] = frame["page"].fillna(1).astype(np.int32)
        return frame.sort_values(["key", "page"], kind="stable").reset_index(drop=True)

    @cached_property
    def failures(self) -> pd.DataFrame:
        return tables.table_to_frame(self.live_table("failures")).sort_values("key", kind="stable") \
            .reset_index(drop=True)

    @cached_property
    def index(self) -> faiss_index.Segments:
        """The version's index as searches see it (main + delta - removed); never mutate it."""
        main = self._mapped_main() if faiss_index.index_kind(self.manifest.index_type) != "flat" else None
        return faiss_index.Segments(main if main is not None else self.load_index(), self.load_delta(),
                                    self.removed_ids())

    def load_index(self) -> faiss.Index:
        """A private copy of the main index, to build the next version from."""
        return self._faiss_file(self.manifest.index)

    def load_delta(self) -> faiss.Index | None:
        """A private copy of the delta segment (None: nothing added since the last compaction)."""
        return self._faiss_file(self.manifest.index_delta) if self.manifest.index_delta else None

    def removed_ids(self) -> np.ndarray:
        """The ids removed from the main index since its last compaction."""
        if not self.manifest.index_removed:
            return np.empty(0, np.int64)
        return self._npy(self.manifest.index_removed)

    def recall_truth(self) -> faiss_index.RecallTruth | None:
        """The held-out queries and their exact neighbours (None: not kept, versions before issue 14)."""
        if not self.manifest.index_truth:
            return None
        try:
            return faiss_index.RecallTruth.from_bytes(self.read(self.manifest.index_truth))
        except (ValueError, KeyError, OSError) as exc:
            raise CatalogCorrupt(f"{self.store.describe(self.manifest.index_truth)} cannot be read ({exc}); "
                                 f"{ROLLBACK_HINT}") from None

    def _npy(self, key: str) -> np.ndarray:
        try:
            return np.load(io.BytesIO(self.read(key)))
        except (ValueError, OSError) as exc:
            raise CatalogCorrupt(f"{self.store.describe(key)} cannot be read ({exc}); {ROLLBACK_HINT}") from None

    def _faiss_file(self, key: str) -> faiss.Index:
        data = self.read(key)
        try:
            return faiss_index.deserialize(data)
        except RuntimeError as exc:  # faiss reports a bad file as a RuntimeError with its C++ trace
            raise CatalogCorrupt(f"index {self.store.describe(key)} cannot be read by faiss ({_first_line(exc)}); "
                                 f"{ROLLBACK_HINT}") from None

    def _mapped_main(self) -> faiss.Index | None:
        """The main IVF index of a local catalogue read through a memory map (its lists
        stay in the page cache, shared by every process that searches it), after its
        sha256 is checked by streaming the file; None for a catalogue in S3."""
        if not isinstance(self.store, LocalStore):
            return None
        key = self.manifest.index
        path = self.store._path(key)
        if not path.exists():
            raise CatalogCorrupt(f"{self.store.describe(key)} is missing; {ROLLBACK_HINT}")
        self._check_once(key, path)
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
        except RuntimeError as exc:
            raise CatalogCorrupt(f"index {self.store.describe(key)} cannot be read by faiss ({_first_line(exc)}); "
                                 f"{ROLLBACK_HINT}") from None

    def _check_once(self, key: str, path: Path) -> None:
        """Check a large local file (the main index: 5 GB at 10M x 128) against its
        recorded size and sha256 by streaming it, once: a stamp under the
        catalogue's `VERIFIED_DIR` names the file as checked (device, inode, size,
        mtime), and later opens of the same unchanged file trust it, so a night does
        not hash the whole main index again. Any rewrite or truncation changes the
        stamp; a bit flipped in place does not, which `status --verify` (every byte,
        every time) is for."""
        record = self.manifest.files.get(key)
        if record is None:
            return
        st = path.stat()
        stamp = self.store.root / VERIFIED_DIR / record.sha256
        seen = f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns}"
        try:
            if stamp.read_text() == seen:
                return
        except OSError:
            pass
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        if st.st_size != record.size or digest.hexdigest() != record.sha256:
            raise CatalogCorrupt(f"{self.store.describe(key)} is damaged: "
                                 f"{_mismatch(st.st_size, record) or 'its sha256 differs from the manifest'}; "
                                 f"{ROLLBACK_HINT}")
        try:  # best effort: a catalogue mounted read-only is checked at every open
            stamp.parent.mkdir(exist_ok=True)
            tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
            tmp.write_text(seen)
            tmp.replace(stamp)
        except OSError:
            pass

    @cached_property
    def rerank(self) -> faiss_index.RerankVectors | None:
        """The version's re-rank vectors, memory-mapped (None when its index has no re-rank)."""
        m = self.manifest
        if not m.index_rerank or not m.index_rerank_ids:
            return None
        ids = np.load(io.BytesIO(self.read(m.index_rerank_ids)))
        return faiss_index.RerankVectors(ids, np.load(self._local_file(m.index_rerank), mmap_mode="r"))

    def _local_file(self, key: str) -> Path:
        """A local path to memory-map `key` from: the file itself in a local catalogue
        (its size checked), else a verified download into RERANK_CACHE named by its sha256."""
        record = self.manifest.files.get(key)
        if isinstance(self.store, LocalStore):
            path = self.store._path(key)
            size = path.stat().st_size if path.exists() else None
            if size is None or (record is not None and size != record.size):
                raise CatalogCorrupt(f"{self.store.describe(key)} is missing or of the wrong size; {ROLLBACK_HINT}")
            return path
        cache = Path(os.environ.get(RERANK_CACHE_ENV) or Path.home() / ".cache" / "batchsight" / "rerank")
        path = cache / f"{record.sha256 if record else hashlib.sha256(key.encode()).hexdigest()}.npy"
        if not path.exists() or (record is not None and path.stat().st_size != record.size):
            cache.mkdir(parents=True, exist_ok=True)
            data = self.read(key)  # verified; one copy in memory while it is written out
            tmp = path.with_suffix(f".{os.getpid()}.part")
            tmp.write_bytes(data)
            del data
            tmp.replace(path)
        return path

    def embedding_blocks(self) -> LiveEmbeddings:
        """The live vectors one part at a time (for catalogues larger than memory)."""
        return LiveEmbeddings(self.store, self.images, self.manifest.files)

    def check_sizes(self) -> list[str]:
        """Problems with this version's files found by one listing (missing or of the
        wrong size): cheap enough to run before every build, unlike full checksums."""
        return check_sizes(self.store, self.manifest)

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(image_ids, vectors) of the live images, in the order of `images`."""
        blocks = list(self.embedding_blocks())
        if not blocks:
            return np.empty(0, np.int64), np.empty((0, self.manifest.embedding_dim), np.float32)
        ids, vectors = np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])
        order = pd.Index(ids).get_indexer(self.images["image_id"].to_numpy())
        assert (order >= 0).all(), "every live image must have exactly one embedding"
        return ids[order], vectors[order]


class LiveEmbeddings:
    """Re-iterable (image_ids, vectors) blocks, one per embeddings part, holding
    only the vectors live in `images` (a part may also hold superseded ones)."""

    def __init__(self, store: ObjectStore, images: pd.DataFrame | pa.Table,
                 files: dict[str, FileRecord] | None = None) -> None:
        self.store = store
        self.files = files or {}
        # A part is written by one run (its key names the run), so the ids live in a
        # part are the rows that point at it.
        parts = pa.chunked_array(pa.array(images["embedding_part"], pa.string())
                                 if isinstance(images, pd.DataFrame) else images["embedding_part"]) \
            .cast(pa.string()).dictionary_encode().combine_chunks()
        ids = np.asarray(images["image_id"], np.int64)
        codes = pc.fill_null(parts.indices, -1).to_numpy()  # -1: a row without a part (none live)
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(parts.dictionary) + 1))
        self.live = {part: ids[order[bounds[i]:bounds[i + 1]]] for i, part in enumerate(parts.dictionary.to_pylist())
                     if bounds[i + 1] > bounds[i]}
        self.parts = sorted(self.live)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for part in self.parts:
            for ids, _runs, vectors in read_embedding_batches(self.store, part, self.files.get(part)):
                keep = np.isin(ids, self.live[part])
                yield ids[keep], vectors[keep]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else "unreadable"


def read_verified(store: ObjectStore, key: str, record: FileRecord | None) -> bytes:
    """`key`'s bytes, refused with `CatalogCorrupt` when missing or unlike `record`."""
    try:
        data = store.get(key)
    except ObjectNotFound:
        raise CatalogCorrupt(f"{store.describe(key)} is missing; {ROLLBACK_HINT}") from None
    if record is not None:
        problem = _mismatch(len(data), record) or (
            None if hashlib.sha256(data).hexdigest() == record.sha256 else "its sha256 differs from the manifest's")
        if problem:
            raise CatalogCorrupt(f"{store.describe(key)} is damaged: {problem}; {ROLLBACK_HINT}")
    return data


def _mismatch(size: int, record: FileRecord) -> str | None:
    return None if size == record.size else f"it is {size} bytes, the manifest recorded {record.size}"


def read_embedding_batches(store: ObjectStore, key: str, record: FileRecord | None
                           ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """An embeddings part, verified, a row group at a time; a damaged one names itself."""
    data = read_verified(store, key, record)
    try:
        yield from tables.iter_embedding_batches(data)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CatalogCorrupt(f"embeddings part {store.describe(key)} cannot be read ({type(exc).__name__}: "
                             f"{exc}); {ROLLBACK_HINT}") from None


def check_sizes(store: ObjectStore, manifest: Manifest) -> list[str]:
    """Missing or wrongly sized files of `manifest`, from one listing per top folder."""
    listed: dict[str, int] = {}
    for top in sorted({key.split("/", 1)[0] for key in manifest.named_files}):
        listed.update((o.key, o.size) for o in store.list(f"{top}/"))
    problems = []
    for key in manifest.named_files:
        if key not in listed:
            problems.append(f"{key} is missing")
        elif key in manifest.files and (why := _mismatch(listed[key], manifest.files[key])):
            problems.append(f"{key}: {why}")
    return problems


@dataclass
class VerifyReport:
    version: int
    checked: int  # files read and compared
    problems: list[str]  # one line per damaged or missing file
    unrecorded: int  # files named without a recorded checksum (versions written before checksums)


def verify_version(store: ObjectStore, manifest: Manifest) -> VerifyReport:
    """Read every file `manifest` names and compare it with its recorded size and
    sha256; a file without a record is checked for existence only."""
    problems, unrecorded = [], 0
    for key in manifest.named_files:
        record = manifest.files.get(key)
        unrecorded += record is None
        try:
            read_verified(store, key, record)
        except CatalogCorrupt as exc:
            problems.append(str(exc).split("; ")[0])
    return VerifyReport(manifest.version, len(manifest.named_files), problems, unrecorded)


def open_catalog(url: str, *, endpoint_url: str | None = None, version: int | None = None) -> Catalog:
    """The live (or a given) version of the catalogue at `url`."""
    try:
        store = cached_store(url, endpoint_url)
    except StorageError as exc:
        raise CatalogError(f"no catalogue at {url} ({exc}); run `batchsight run --source SRC --output OUT` first") from None
    return Catalog.open(store, version=version)


def find_version(store: ObjectStore, version: int, *, start: str | None) -> str:
    """Follow parent links from `start` back to `version`'s manifest key. Where the
    chain is broken (a damaged CURRENT or manifest), the manifests are listed
    instead: of several for one version (runs that lost a race wrote theirs too),
    the one a later manifest names as its parent."""
    key: str | None = start
    try:
        while key is not None:
            manifest = read_manifest(store, key)
            if manifest.version == version:
                return key
            if manifest.version < version:
                raise CatalogError(f"version {version} is not in the history of {store.url}; "
                                   "`batchsight status --catalog OUT` lists the versions")
            key = manifest.parent
    except CatalogCorrupt as exc:
        log.warning("history is broken (%s); looking for version %s among the manifests", exc, version)
    candidates = [o.key for o in store.list(layout.manifests_of_version(version))]
    if len(candidates) > 1:
        parents = set()
        for o in store.list(layout.MANIFESTS):
            try:
                parents.add(read_manifest(store, o.key).parent)
            except CatalogCorrupt:
                continue
        candidates = [k for k in candidates if k in parents] or candidates
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CatalogError(f"version {version} is not in the history of {store.url}; "
                           "`batchsight status --catalog OUT` lists the versions")
    raise CatalogError(f"version {version} has several manifests at {store.url} ({', '.join(candidates)}) and "
                       "no later version says which was committed; restore CURRENT by hand to one of them")


def newest_listed_version(store: ObjectStore) -> int:
    """The highest version number among the manifests (0 when there are none)."""
    numbers = (layout.manifest_version(o.key) for o in store.list(layout.MANIFESTS))
    return max((n for n in numbers if n is not None), default=0)


def list_versions(store: ObjectStore) -> list[Manifest]:
    """Committed versions, newest first (the parent chain from CURRENT)."""
    pointer, _ = read_pointer(store)
    out: list[Manifest] = []
    key = pointer.manifest if pointer else None
    while key is not None:
        try:
            manifest = Manifest.from_json(store.get(key), store.describe(key))
        except ObjectNotFound:
            break  # history older than a gc'd manifest
        out.append(manifest)
        key = manifest.parent
    return out


@dataclass
class ChangePlan:
    """What a run must do, from diffing the listing against the catalogue."""

    new: list[ObjectInfo] = field(default_factory=list)
    changed: list[ObjectInfo] = field(default_factory=list)
    retry: list[ObjectInfo] = field(default_factory=list)  # failed before, unchanged, attempts left
    deleted: list[str] = field(default_factory=list)  # keys gone from the source
    unchanged: int = 0
    given_up: int = 0  # failed max_attempts times and unchanged since
    deferred: list[ObjectInfo] = field(default_factory=list)  # past --limit, left for a later run
    catalogued: int = 0  # distinct keys the live version held (rows, failures): what mass deletes are measured against

    @property
    def to_process(self) -> list[ObjectInfo]:
        # Changed first: under --limit their stale rows are removed either way,
        # so doing them first keeps the catalogue as complete as possible.
        return self.changed + self.new + self.retry

    @property
    def is_empty(self) -> bool:
        return not self.to_process and not self.deleted and not self.deferred

    def counts(self) -> dict[str, int]:
        return {"new": len(self.new), "changed": len(self.changed), "retry": len(self.retry),
                "deleted": len(self.deleted), "unchanged": self.unchanged, "given_up": self.given_up,
                "deferred": len(self.deferred)}


def plan_changes(listing: Iterable[ObjectInfo], catalogued: pd.DataFrame | pa.Table, failed: pd.DataFrame, *,
                 reembed_all: bool = False, max_attempts: int = RUN_DEFAULTS.max_attempts,
                 limit: int | None = None) -> ChangePlan:
    """Diff a listing against the live rows by (key, etag, size).

    `catalogued` has columns key, etag, size; `failed` has key, etag, size,
    attempts and optionally stage. A failure to fetch (or in the model) is retried
    up to `max_attempts`; a failure to decode is final while the bytes stay the
    same (decoding the same bytes again gives the same answer). `reembed_all`
    (the model or weights changed) makes every listed object new or changed.
    `limit` caps the images processed; changed images past it are still removed
    (no stale row survives), to be redone later.
    """
    objects = listing if isinstance(listing, list) else list(listing)
    listed = pa.table({"key": pa.array([o.key for o in objects], pa.string()),
                       "etag": pa.array([o.etag for o in objects], pa.string()),
                       "size": pa.array(np.fromiter((o.size for o in objects), np.int64, len(objects))),
                       "listed_at": pa.array(np.arange(len(objects), dtype=np.int64))})
    known = _key_columns(catalogued)  # a document's pages are rows of one key, etag and size: the join takes them all
    failures = _one_row_a_key(failed, ["attempts", "stage"])
    prior, same, known_listed = _same_bytes(listed, known)
    changed = prior & (~same | reembed_all)
    was_failed, failed_same, failure_listed = _same_bytes(listed, failures, ["attempts", "stage"])
    failed_same &= ~prior & (not reembed_all)
    attempts = np.where(was_failed["stage"] == "decode", max_attempts, was_failed["attempts"])
    retry = failed_same & (attempts < max_attempts)
    plan = ChangePlan(new=[objects[i] for i in np.flatnonzero(~prior & ~failed_same)],
                      changed=[objects[i] for i in np.flatnonzero(changed)],
                      retry=[objects[i] for i in np.flatnonzero(retry)],
                      unchanged=int((same & ~changed).sum()), given_up=int((failed_same & ~retry).sum()))
    gone_known = set(known["key"].filter(pa.array(~known_listed)).to_pylist())
    plan.deleted = sorted(gone_known | set(failures["key"].filter(pa.array(~failure_listed)).to_pylist()))
    plan.catalogued = int(prior.sum()) + len(gone_known) + len(failures)  # listed keys are unique
    if limit is not None and len(plan.to_process) > limit:
        keep = plan.to_process[:limit]
        kept = {o.key for o in keep}
        plan.deferred = [o for o in plan.to_process if o.key not in kept]
        plan.new = [o for o in plan.new if o.key in kept]
        plan.changed = [o for o in plan.changed if o.key in kept]
        plan.retry = [o for o in plan.retry if o.key in kept]
    return plan


def _key_columns(rows: pd.DataFrame | pa.Table, extra: Sequence[str] = ()) -> pa.Table:
    """key, etag, size (and `extra`) of `rows`, as Arrow."""
    columns = ["key", "etag", "size", *[c for c in extra if c in rows.columns]]
    table = rows.select(columns) if isinstance(rows, pa.Table) \
        else pa.Table.from_pandas(rows[columns], preserve_index=False)
    return table.cast(pa.schema([(c, pa.string() if c in ("key", "etag", "stage") else pa.int64())
                                 for c in columns]))


def _one_row_a_key(rows: pd.DataFrame | pa.Table, extra: Sequence[str] = ()) -> pa.Table:
    """`_key_columns` of the last row of each key."""
    table = _key_columns(rows, extra)
    keys = table["key"]
    if len(pc.unique(keys)) == len(keys):
        return table
    last = pd.Series(np.arange(len(table))).groupby(keys.to_numpy(zero_copy_only=False)).last().to_numpy()
    return table.take(np.sort(last))


def _same_bytes(listed: pa.Table, rows: pa.Table, extra: Sequence[str] = ()) -> tuple:
    """(listed key has a row in `rows`, and that row has the listed etag and size), in
    listing order, and whether each of `rows` was listed, in its order: one hash join
    in Arrow. With `extra`, the first item is instead a dict of those columns of the
    matched rows (None where unmatched)."""
    n = len(listed)
    if not len(rows):  # nothing to match (a first run, a catalogue without failures)
        nothing = np.zeros(n, bool)
        return ({c: np.full(n, None, object) if c == "stage" else np.zeros(n, np.int64) for c in extra}
                if extra else nothing), nothing.copy(), np.zeros(0, bool)
    right = rows.rename_columns([c if c == "key" else f"row_{c}" for c in rows.column_names]) \
        .append_column("row_at", pa.array(np.arange(len(rows), dtype=np.int64)))
    joined = listed.join(right, "key", join_type="inner")
    at = joined["listed_at"].to_numpy()
    found = np.zeros(n, bool)
    found[at] = True
    row_listed = np.zeros(len(rows), bool)
    row_listed[joined["row_at"].to_numpy()] = True
    same = np.zeros(n, bool)
    same[at] = pc.and_(pc.equal(joined["etag"], joined["row_etag"]),
                       pc.equal(joined["size"], joined["row_size"])).fill_null(False).to_numpy(zero_copy_only=False)
    if not extra:
        return found, same, row_listed
    matched = {}
    for column in extra:
        values = np.full(n, None, dtype=object) if column == "stage" else np.zeros(n, np.int64)
        if f"row_{column}" in joined.column_names:
            values[at] = joined[f"row_{column}"].to_numpy(zero_copy_only=False)
        matched[column] = values
    return matched, same, row_listed


class MassDeleteRefused(CatalogError):
    """A plan would delete more of the catalogue than the run is allowed to."""


DEFAULT_MAX_DELETE_SHARE = RUN_DEFAULTS.max_delete_share


def check_deletions(plan: ChangePlan, catalogued: int, *, source: str, max_share: float = DEFAULT_MAX_DELETE_SHARE,
                    listed: int) -> None:
    """Refuse a plan that deletes more than `max_share` of the `catalogued` objects
    (any deletion at all when the listing came back empty): a typo in a prefix, an
    expired credential or a bucket emptied by mistake must not empty a catalogue."""
    if not catalogued or not plan.deleted:
        return
    share = len(plan.deleted) / catalogued
    if share <= max_share and listed:
        return
    raise MassDeleteRefused(
        f"this run would delete {len(plan.deleted)} of the {catalogued} catalogued objects ({share:.0%}; the limit "
        f"is --max-delete-share {max_share:.0%}) because the listing of {source} returned {listed} objects. Likely "
        "causes: a typo in the source prefix, credentials that can list nothing, or objects moved or deleted by "
        "mistake. Nothing was committed. If the deletions are meant, rerun with --allow-mass-delete.")


@dataclass
class ShardResult:
    """What one shard hands back to the flow: small rows, and the key of the
    embeddings part it wrote (vectors stay in storage, not in task results)."""

    shard: int
    rows: pd.DataFrame
    embedding_part: str | None
    failures: list[dict]
    times: dict[str, float]
    part_file: FileRecord | None = None  # size and sha256 of `embedding_part`
    thumbnail_part: str | None = None  # the thumbnails of its rows (None: none made)
    thumbnail_file: FileRecord | None = None
    ran_on: str = ""  # host:pid of the process that ran the shard
    model_loads: int = 0  # models that process had built when the shard ended (1: loaded once, then reused)


@dataclass
class BuildStats:
    index_s: float
    write_s: float


def build_next_version(store: ObjectStore, previous: Catalog | None, plan: ChangePlan,
                       shard_results: Sequence[ShardResult], *, run_id: str, source: str, model: str,
                       weights: str, weights_source: str, weights_sha256: str, embedding_dim: int,
                       reembed_all: bool, index_settings: faiss_index.IndexSettings | None = None,
                       categorizer: str | None = None) -> tuple[Manifest, BuildStats]:
    """One run's changes to the previous version, written by the one builder of
    versions (`tasks.versions.build_version`); not yet committed."""
    from tasks import versions  # it builds on this module

    deferred, deleted = {o.key for o in plan.deferred}, set(plan.deleted)
    change = versions.VersionChange(
        provenance=Provenance(source=source, model=model, weights=weights, weights_source=weights_source,
                              weights_sha256=weights_sha256, embedding_dim=embedding_dim, categorizer=categorizer),
        from_scratch=reembed_all,
        removed_keys=frozenset({o.key for o in plan.changed} | deferred | deleted),
        new_rows=[r.rows for r in shard_results],
        new_parts={r.embedding_part: r.part_file for r in shard_results if r.embedding_part is not None},
        new_files={r.thumbnail_part: r.thumbnail_file for r in shard_results if r.thumbnail_part is not None},
        index=index_settings or faiss_index.IndexSettings(),
        redecided=frozenset({o.key for o in plan.to_process} | deferred | deleted),
        new_failures=[f for r in shard_results for f in r.failures])
    parent = Pointer(previous.manifest.version, previous.manifest_key) if previous else None
    return versions.build_version(store, previous, change, parent=parent, run_id=run_id)


RERANK_CACHE_ENV = "BATCHSIGHT_RERANK_CACHE"
# Under a local catalogue's root, outside every prefix gc collects: stamps of large
# files whose sha256 has been checked (`Catalog._check_once`).
VERIFIED_DIR = ".verified"


def read_runs(store: ObjectStore) -> pd.DataFrame:
    """The runs log: one row per run, committed or not, oldest first."""
    parts = [tables.read_parquet_bytes(store.get(o.key)) for o in store.list(layout.RUNS)]
    if not parts:
        return tables.empty_frame(tables.RUNS_SCHEMA)
    return tables.table_to_frame(pa.concat_tables(parts)).sort_values("started_at").reset_index(drop=True)


def write_run_row(store: ObjectStore, row: dict) -> str:
    key = layout.run_row_key(row["run_id"])
    store.put(key, tables.to_parquet_bytes(tables.frame_to_table(pd.DataFrame([row]), tables.RUNS_SCHEMA)))
    return key


def rollback(store: ObjectStore, to_version: int) -> Manifest:
    """Make an earlier version live again, as a new version (history stays linear
    and auditable; the next nightly run diffs against the restored content).

    Works when the live version is damaged, `CURRENT` included: the target is then
    found among the manifests, and its files are checked before it goes live."""
    try:
        data, etag = store.get_with_etag(POINTER_KEY)
    except ObjectNotFound:
        raise CatalogError(f"no catalogue at {store.url}; nothing to roll back") from None
    try:
        pointer: Pointer | None = parse_pointer(store, data)
    except CatalogCorrupt as exc:
        log.warning("%s", exc)
        pointer = None
    if pointer is not None and to_version == pointer.version:
        raise CatalogError(f"version {to_version} is already live at {store.url}")
    target_key = find_version(store, to_version, start=pointer.manifest if pointer else None)
    target = read_manifest(store, target_key)
    problems = check_sizes(store, target)
    if problems:
        raise CatalogCorrupt(f"version {to_version} is damaged too ({'; '.join(problems[:3])}); "
                             "roll back to an earlier one")
    from tasks import versions  # it builds on this module

    # The restored version is the target's files unchanged, after the live one
    # (or, with CURRENT damaged, after the newest manifest listed).
    parent = pointer or Pointer(newest_listed_version(store), target_key)
    return versions.make_version(store, Catalog(store, target, target_key),
                                 versions.VersionChange(rolled_back_from=to_version), parent=parent,
                                 pointer_etag=etag, writer="rollback")


LEASE_PREFIX = layout.LEASES
LEASE_TTL_S = 15 * 60  # a lease not renewed for this long belongs to a run that died


class RunLease:
    """`leases/<run_id>.json` (`layout.lease_key`), renewed every `ttl_s / 15` while a run writes: gc
    leaves every file named by a run with a fresh lease alone, however long the
    run takes, so no grace period has to outlast a night."""

    def __init__(self, store: ObjectStore, run_id: str, *, ttl_s: float = LEASE_TTL_S) -> None:
        self.store = store
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.key = layout.lease_key(run_id)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="batchsight-lease", daemon=True)

    def _write(self) -> None:
        self.store.put(self.key, json.dumps({
            "run_id": self.run_id, "holder": f"{socket.gethostname()}:{os.getpid()}", "ttl_s": self.ttl_s,
            "renewed_at": datetime.now(UTC).isoformat(timespec="seconds")}).encode())

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 15):
            try:
                self._write()
            except Exception:  # a missed renewal is retried; the lease has 15 renewals of slack
                log.warning("could not renew the lease %s", self.key, exc_info=True)

    def __enter__(self) -> RunLease:
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self.store.delete(self.key)
        except Exception:  # it expires on its own
            log.warning("could not remove the lease %s", self.key, exc_info=True)


def live_leases(store: ObjectStore, now: float) -> tuple[set[str], list[ObjectInfo]]:
    """(run ids whose lease is fresh, lease files that expired)."""
    live, expired = set(), []
    for obj in store.list(LEASE_PREFIX):
        try:
            ttl = float(json.loads(store.get(obj.key)).get("ttl_s", LEASE_TTL_S))
        except (ValueError, AttributeError, ObjectNotFound):
            ttl = LEASE_TTL_S
        if now - obj.modified < ttl:
            live.add(layout.lease_run_id(obj.key))
        else:
            expired.append(obj)
    return live, expired


# gc looks under these prefixes only (`layout.GC_POLICY`): anything else under the root is not its to delete.
VERSION_FILE_PREFIXES = layout.VERSION_FILE_PREFIXES
VERSION_REPORT_PREFIXES = layout.VERSION_REPORT_PREFIXES


@dataclass
class GcReport:
    kept_versions: list[int]
    deleted: list[str]
    bytes_freed: int
    skipped_recent: int  # unreferenced but younger than the grace period
    skipped_running: int = 0  # files of runs whose lease is fresh


def collect_garbage(store: ObjectStore, *, keep_versions: int | None = None, min_age_s: float = 3600,
                    dry_run: bool = False, now: float | None = None) -> GcReport:
    """Delete the catalogue's own files that no retained version references: parts
    of crashed or losing runs, and (with `keep_versions`) the files and reports of
    versions older than the newest N.

    Only keys whose `layout.GC_POLICY` allows it are considered (version files,
    version reports, expired leases); nothing else under the root is touched:
    never the runs log, the categorisers or the labels (the audit trail of what
    made which rows). Files of a run whose lease is fresh are kept, however old;
    `min_age_s` is a last guard for writers without a lease.
    """
    retained = list_versions(store)
    if keep_versions is not None:
        if keep_versions < 1:
            raise UserError(f"keep_versions must be at least 1, not {keep_versions}")
        retained = retained[:keep_versions]
    referenced = {POINTER_KEY}
    kept_prefixes = []
    for m in retained:
        referenced |= {manifest_key(m.version, m.run_id), *m.named_files}
        kept_prefixes += layout.version_report_prefixes(m.version, m.run_id)
    now = time.time() if now is None else now
    running, expired = live_leases(store, now)
    report = GcReport(kept_versions=[m.version for m in retained], deleted=[], bytes_freed=0, skipped_recent=0)
    candidates = [o for prefix in VERSION_FILE_PREFIXES + VERSION_REPORT_PREFIXES for o in store.list(prefix)]
    for obj in candidates + expired:
        if obj.key in referenced or obj.key.startswith(tuple(kept_prefixes)):
            continue
        if any(run_id in obj.key for run_id in running):
            report.skipped_running += 1
            continue
        if now - obj.modified < min_age_s and not obj.key.startswith(LEASE_PREFIX):
            report.skipped_recent += 1
            continue
        if not dry_run:
            store.delete(obj.key)
        report.deleted.append(obj.key)
        report.bytes_freed += obj.size
    if isinstance(store, LocalStore) and not dry_run:  # stamps of files no retained version names
        named = {record.sha256 for m in retained for record in m.files.values()}
        for stamp in (store.root / VERIFIED_DIR).glob("*"):
            if stamp.name not in named:
                stamp.unlink(missing_ok=True)
    return report
