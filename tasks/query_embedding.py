"""A few objects in hand (search queries, labelled examples) embedded through
the shards' own decode and preprocessing and the process's one `Embedder`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models.engine import Embedder, stack_images
from tasks.shard.decode import DEFAULT_MAX_PAGES, DEFAULT_PDF_DPI
from tasks.shard.pixels import decode_to_pixels


def embed_blobs(embedder: Embedder, blobs: Sequence[bytes], *, max_pages: int = DEFAULT_MAX_PAGES,
                batch_size: int = 32) -> list[np.ndarray | tuple[str, str]]:
    """A few objects in hand (search queries, labelled examples) through the
    shards' own path: `decode_to_pixels` (decode, resize, crop), `stack_images`,
    `Embedder.embed`, in batches of pages. Per object: its pages' embeddings
    [pages, dim], or its refusal (reason, message)."""
    decoded = [decode_to_pixels(data, embedder.family, DEFAULT_PDF_DPI, max_pages) for data in blobs]
    pages = [pixels for d in decoded if isinstance(d, list) for _, _, _, pixels, _ in d]
    vectors = [embedder.embed(stack_images([torch.from_numpy(p).permute(2, 0, 1) for p in pages[i:i + batch_size]],
                                           embedder.device)).embeddings for i in range(0, len(pages), batch_size)]
    flat = np.concatenate(vectors) if vectors else np.empty((0, embedder.dim), np.float32)
    out, at = [], 0
    for d in decoded:  # the vectors are in page order: each object takes its pages' run of them
        if isinstance(d, tuple):
            out.append(d)
        else:
            out.append(flat[at:at + len(d)])
            at += len(d)
    return out
