"""FAISS: build, update, (de)serialise and search the catalogue's index.

Vectors are unit-length, so inner product is cosine similarity. Ids are the
catalogue's stable 64-bit image ids, so changed and deleted images are removed
by id and the index never needs a rebuild to stay in step with the tables.
"""

from __future__ import annotations

import faiss
import numpy as np


def new_flat_index(dim: int) -> faiss.Index:
    """Exact inner-product search with explicit ids (IndexIDMap2 also supports
    `reconstruct`, which search-by-key uses)."""
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def add_vectors(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray) -> None:
    if len(ids) == 0:
        return
    assert vectors.shape == (len(ids), index.d), f"vectors {vectors.shape} do not match {len(ids)} ids of dim {index.d}"
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))


def remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    if len(ids) == 0:
        return 0
    return int(index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))))


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], ids [Q, k]); missing neighbours have id -1."""
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    return index.search(queries, k)


def reconstruct(index: faiss.Index, image_id: int) -> np.ndarray:
    return index.reconstruct(int(image_id))
