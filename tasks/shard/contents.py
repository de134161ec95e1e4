"""Identity by content: rows are named by key, vectors by the bytes they were made
from. An object whose bytes (sha256) a catalogue already embedded with the same
model and weights is not decoded or embedded again: its rows are the known rows
of those bytes under its own key, with their vectors.

`KnownContents` is what a shard process knows: the live rows of the catalogue it
builds on, and of a `--seed` catalogue, by content, as fixed-width arrays (about
70 bytes a row), built once a process a version. Decode processes need only
"is this sha256 known?", before they decode: a sorted array of the digests'
first 8 bytes, memory-mapped from a file the shard process writes
(`KnownContents.prefix_file`). Within a shard, identical bytes seen a second
time are copies of the first (`SeenContents`): one model pass for both.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.errors import UserError
from tasks.catalog.errors import ROLLBACK_HINT, CatalogCorrupt
from tasks.catalog.manifest import read_manifest
from tasks.catalog.reader import Catalog, open_catalog, read_embedding_batches
from tasks.shard.inputs import Inputs, Pages
from tasks.storage import StoreSpec

CONTENT_COLUMNS = ["content_sha256", "image_id", "page", "width", "height", "class_ids", "class_probs",
                   "embedding_part"]


def content_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_prefix(sha256_hex: str) -> int:
    """The first 8 bytes of a digest, as the signed 64-bit number the prefix arrays hold."""
    return int.from_bytes(bytes.fromhex(sha256_hex[:16]), "big", signed=True)


def _prefixes(hexes: pa.Array) -> np.ndarray:
    """`content_prefix` of each hex digest: the first 16 hex digits of all of them
    decoded at once, read as big-endian signed 64-bit numbers (1M digests: 0.13 s,
    0.64 s parsed one by one)."""
    heads = pc.utf8_slice_codeunits(hexes, 0, 16).to_pylist()
    return np.frombuffer(bytes.fromhex("".join(heads)), ">i8").astype(np.int64)


@dataclass
class KnownRows:
    """The known rows of some contents, each row of each content, aligned arrays."""

    sha256: list[str]
    image_id: np.ndarray  # of the row that holds the vector now
    page: np.ndarray
    size: np.ndarray  # [n, 2] width, height
    class_ids: np.ndarray  # [n, k]
    class_probs: np.ndarray  # [n, k]
    part: list[tuple[Catalog, str]]  # (catalogue, embeddings part) holding the vector


class KnownContents:
    """The contents one or more catalogue versions embedded, looked up by sha256."""

    def __init__(self, catalogs: list[Catalog]) -> None:
        self.catalogs = catalogs
        prefix, image_id, page, size, ids, probs, part = [], [], [], [], [], [], []
        self._parts: list[tuple[Catalog, str]] = []
        shas: list[pa.Array] = []
        for cat in catalogs:
            rows = cat.live_table("images", CONTENT_COLUMNS)
            rows = rows.filter(pc.is_valid(rows["content_sha256"]))
            if not len(rows):
                continue
            parts = pc.dictionary_encode(rows["embedding_part"].cast(pa.string()).combine_chunks())
            base = len(self._parts)
            self._parts += [(cat, p) for p in parts.dictionary.to_pylist()]
            part.append(parts.indices.to_numpy().astype(np.int32) + base)
            sha = rows["content_sha256"].combine_chunks()
            shas.append(sha)
            prefix.append(_prefixes(sha))
            image_id.append(rows["image_id"].to_numpy())
            page.append(rows["page"].fill_null(1).to_numpy().astype(np.int32))
            size.append(np.stack([rows["width"].to_numpy(), rows["height"].to_numpy()], axis=1).astype(np.int32))
            ids.append(np.stack(rows["class_ids"].to_numpy(zero_copy_only=False)).astype(np.int32))
            probs.append(np.stack(rows["class_probs"].to_numpy(zero_copy_only=False)).astype(np.float32))
        if prefix:
            all_prefix = np.concatenate(prefix)
            order = np.argsort(all_prefix, kind="stable")
            self.prefix = all_prefix[order]
            self._sha_all = pa.concat_arrays(shas).take(pa.array(order))
            self.image_id = np.concatenate(image_id)[order]
            self.page = np.concatenate(page)[order]
            self.size = np.concatenate(size)[order]
            self.class_ids = np.concatenate(ids)[order]
            self.class_probs = np.concatenate(probs)[order]
            self.part = np.concatenate(part)[order]
        else:
            self.prefix = np.empty(0, np.int64)
        self._file: Path | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.prefix)

    def rows_of(self, sha256_hex: str) -> KnownRows | None:
        """Every known row of these bytes (one a page, pages in order), or None."""
        p = content_prefix(sha256_hex)
        lo, hi = np.searchsorted(self.prefix, p, "left"), np.searchsorted(self.prefix, p, "right")
        if lo == hi:
            return None
        match = [i for i in range(lo, hi) if self._sha_all[i].as_py() == sha256_hex]
        if not match:
            return None
        pages: dict[int, int] = {}  # the same bytes decode to the same pages, under whichever key
        for i in match:
            pages.setdefault(int(self.page[i]), i)
        index = np.array([pages[p] for p in sorted(pages)])
        return KnownRows([sha256_hex] * len(index), self.image_id[index], self.page[index], self.size[index],
                         self.class_ids[index], self.class_probs[index], [self._parts[j] for j in self.part[index]])

    def prefix_file(self) -> str:
        """A file of the sorted prefixes, for decode processes to map (written once)."""
        with self._lock:
            if self._file is None:
                self._file = _scratch() / f"known-{id(self)}-{len(self.prefix)}.npy"
                np.save(self._file, self.prefix)
            return str(self._file)


def known_prefixes(path: str | None) -> np.ndarray:
    """The prefix array a `prefix_file` holds (memory-mapped, kept a process), or none."""
    return _mapped(path) if path else np.empty(0, np.int64)


@lru_cache(maxsize=4)
def _mapped(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def is_known(prefixes: np.ndarray, sha256_hex: str) -> bool:
    """Whether a digest's prefix is among `prefixes` (a prefix match; the shard checks the whole digest)."""
    if not len(prefixes):
        return False
    p = content_prefix(sha256_hex)
    at = int(np.searchsorted(prefixes, p))
    return at < len(prefixes) and int(prefixes[at]) == p


_scratch_dir: Path | None = None


def _scratch() -> Path:
    """This process's scratch folder, removed when it exits."""
    global _scratch_dir
    if _scratch_dir is None:
        _scratch_dir = Path(tempfile.mkdtemp(prefix="batchsight-contents-"))
        atexit.register(shutil.rmtree, _scratch_dir, True)
    return _scratch_dir


_known_lock = threading.Lock()
_known: dict[tuple[str, ...], KnownContents] = {}


def known_contents(catalogs: list[Catalog]) -> KnownContents:
    """The process's `KnownContents` of these catalogue versions: built once, reused by every shard."""
    key = tuple(f"{c.store.url}|{c.manifest_key}" for c in catalogs)
    with _known_lock:
        known = _known.get(key)
        if known is None:
            _known.clear()  # one set of versions at a time: the run's
            known = _known[key] = KnownContents(catalogs)
        return known


class VectorsOf:
    """Vectors of known rows, read from their embeddings parts: a part is read (and
    checked) once, whole, and the last `PARTS_KEPT` parts read are kept, since the
    copies of one bucket come mostly from few parts, in order."""

    PARTS_KEPT = 4

    def __init__(self) -> None:
        self._parts: OrderedDict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, rows: KnownRows) -> np.ndarray:
        out = []
        for (cat, part), image_id in zip(rows.part, rows.image_id.tolist(), strict=True):
            ids, vectors = self._part(cat, part)
            at = int(np.searchsorted(ids, image_id))
            if at == len(ids) or ids[at] != image_id:
                raise CatalogCorrupt(f"{cat.store.describe(part)} holds no vector for image {image_id}, which a row "
                                     f"of version {cat.manifest.version} says it does; {ROLLBACK_HINT}")
            out.append(vectors[at])
        return np.stack(out)

    def _part(self, cat: Catalog, part: str) -> tuple[np.ndarray, np.ndarray]:
        key = (id(cat), part)
        if key in self._parts:
            self._parts.move_to_end(key)
            return self._parts[key]
        blocks = list(read_embedding_batches(cat.store, part, cat.manifest.files.get(part)))
        ids = np.concatenate([b[0] for b in blocks]) if blocks else np.empty(0, np.int64)
        vectors = np.concatenate([b[2] for b in blocks]) if blocks else np.empty((0, cat.manifest.embedding_dim),
                                                                                  np.float32)
        order = np.argsort(ids, kind="stable")
        self._parts[key] = (ids[order], vectors[order])
        while len(self._parts) > self.PARTS_KEPT:
            self._parts.popitem(last=False)
        return self._parts[key]


@dataclass(frozen=True)
class CatalogRef:
    """A catalogue version named as plain data (it travels in a `ShardSpec`)."""

    store: StoreSpec
    manifest_key: str

    def open(self) -> Catalog:
        store = self.store.open()
        return Catalog(store, read_manifest(store, self.manifest_key), self.manifest_key)


class SeenContents:
    """Within a shard, bytes are embedded once: the first object to claim them is
    (decoded, embedded), and every other object with the same bytes is a copy of
    it (not decoded where the read stage can ask first, and never embedded; the
    writer gives it the first one's vectors under its own key, whichever of the
    two it meets first)."""

    def __init__(self) -> None:
        self.first: dict[str, str] = {}  # sha256 -> key of the object that claimed it
        self._lock = threading.Lock()

    def claim(self, content: str, key: str) -> bool:
        """Whether the object `key` is the one to embed these bytes (the first to claim them)."""
        with self._lock:
            return self.first.setdefault(content, key) == key

    def dedupe(self, chunks: Iterator[Inputs]) -> Iterator[Inputs]:
        """Chunks read where the claim could not be asked first (decode processes):
        inputs of an object whose bytes another object claimed become copies."""
        for chunk in chunks:
            later = {key for key, content in chunk.contents.items() if not self.claim(content, key)}
            later -= {info.key for info in chunk.copies.infos}
            if later:
                chunk = self._as_copies(chunk, later)
            yield chunk

    @staticmethod
    def _as_copies(chunk: Inputs, later: set[str]) -> Inputs:
        copies, kept = [chunk.copies], {}
        for name in ("decoded", "raw"):
            pages: Pages = getattr(chunk, name)
            is_later = np.fromiter((info.key in later for info in pages.infos), bool, len(pages))
            kept[name] = pages.select(~is_later)
            first_page = is_later & np.fromiter((k == 0 or pages.infos[k - 1].key != pages.infos[k].key
                                                 for k in range(len(pages))), bool, len(pages))
            copies.append(pages.take(first_page))
        return Inputs(kept["decoded"], kept["raw"], chunk.failures, Pages.concat(copies), chunk.fetch_s,
                      chunk.decode_s, chunk.contents)


def seed_catalog(url: str, endpoint_url: str | None, fingerprint: str) -> CatalogRef:
    """The live version of `--seed` URL, refused unless its vectors were made by the
    same model and weights (`fingerprint`): reused vectors must be the run's own."""
    cat = open_catalog(url, endpoint_url=endpoint_url)
    if cat.manifest.fingerprint != fingerprint:
        raise UserError(f"--seed {url} was made with {cat.manifest.fingerprint[:60]}; this run embeds with "
                        f"{fingerprint[:60]}: its vectors cannot be reused. Seed from a catalogue of the same "
                        "model and weights, or drop --seed")
    return CatalogRef(StoreSpec(url, endpoint_url), cat.manifest_key)
