"""Reading one committed version: `Catalog` (its rows, failures, vectors and
index, every file checked against the size and sha256 its manifest recorded),
and the checks `status --verify` and a run's build make.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tasks.catalog import tables
from tasks.catalog.errors import ROLLBACK_HINT, CatalogCorrupt, CatalogError
from tasks.catalog.history import find_version
from tasks.catalog.manifest import ROW_IDENTITY, Manifest, read_manifest, read_pointer
from tasks.records import FileRecord
from tasks.search import index as faiss_index
from tasks.search import index_choice, index_recall
from tasks.storage import LocalStore, ObjectNotFound, ObjectStore, StorageError, cached_store

RERANK_CACHE_ENV = "BATCHSIGHT_RERANK_CACHE"

# Under a local catalogue's root, outside every prefix gc collects: stamps of large
# files whose sha256 has been checked (`Catalog._check_once`).
VERIFIED_DIR = ".verified"


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
        main = self._mapped_main() if index_choice.index_kind(self.manifest.index_type) != "flat" else None
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

    def recall_truth(self) -> index_recall.RecallTruth | None:
        """The held-out queries and their exact neighbours (None: not kept, versions before issue 14)."""
        if not self.manifest.index_truth:
            return None
        try:
            return index_recall.RecallTruth.from_bytes(self.read(self.manifest.index_truth))
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
