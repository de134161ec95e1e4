"""Clustered synthetic unit vectors, generated block by block, for the index tests
and benchmarks. Like real embeddings they are clustered (products of a kind look
alike) and of low intrinsic dimension (most variance in a few dozen directions,
with a decaying spectrum), so neighbours are learnable by IVF and by PQ codes;
isotropic noise on all dimensions would make every neighbour a coin toss."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClusteredVectors:
    """`n` unit vectors of dimension `dim`: a random centre per cluster, plus
    variation in a shared `intrinsic_dim`-dimensional subspace (norm about
    `spread` relative to the centre's), plus isotropic `noise`. Ids are
    `id_offset + position`. Re-iterable and deterministic: block `b` is drawn
    from its own seed, so a million 2048-d vectors never have to be in memory at once."""

    n: int
    dim: int
    clusters: int = 100
    spread: float = 1.0
    intrinsic_dim: int = 32
    noise: float = 0.1
    seed: int = 0
    block_size: int = 10_000
    id_offset: int = 0

    def structure(self) -> tuple[np.ndarray, np.ndarray]:
        """(cluster centres [clusters, dim], scaled subspace basis [r, dim])."""
        rng = np.random.default_rng([self.seed, 0])
        centres = rng.standard_normal((self.clusters, self.dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        r = min(self.intrinsic_dim, self.dim)
        basis = np.linalg.qr(rng.standard_normal((self.dim, r)))[0].T.astype(np.float32)
        spectrum = 1 / np.sqrt(np.arange(1, r + 1, dtype=np.float32))
        return centres, basis * (spectrum * self.spread / np.linalg.norm(spectrum))[:, None]

    def block(self, b: int, structure: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        centres, basis = structure or self.structure()
        start = b * self.block_size
        size = min(self.block_size, self.n - start)
        rng = np.random.default_rng([self.seed, 1, b])
        vectors = centres[rng.integers(0, self.clusters, size)]
        vectors += rng.standard_normal((size, len(basis)), dtype=np.float32) @ basis
        vectors += rng.standard_normal((size, self.dim), dtype=np.float32) * np.float32(self.noise / np.sqrt(self.dim))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.arange(start, start + size, dtype=np.int64) + self.id_offset, vectors

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        structure = self.structure()
        for b in range(-(-self.n // self.block_size)):
            yield self.block(b, structure)

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        blocks = list(self)
        return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])
