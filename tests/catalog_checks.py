"""Checks on a committed catalogue that several test files make."""

from __future__ import annotations

import numpy as np

from tasks.catalog.reader import Catalog


def assert_exactly_once(c: Catalog, expected_keys: set[str]) -> None:
    """Each live image once in images, once in embeddings, once in the index."""
    images = c.images
    assert set(images["key"]) == expected_keys
    assert images["key"].is_unique and images["image_id"].is_unique
    ids, vectors = c.embeddings()
    assert len(ids) == len(images) and len(set(ids.tolist())) == len(ids)
    assert c.index.ntotal == len(images)
    np.testing.assert_allclose(c.index.reconstruct_batch(ids), vectors, atol=1e-6)
