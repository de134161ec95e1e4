"""The options of a run, each default written once.

`RunOptions` is what `batchsight run`, the `catalog_images` flow and the nightly
deployment share: the CLI's flags and the flow's parameters take their defaults
from `RUN_DEFAULTS`, and the modules that own a setting (decode, index,
catalogue) read theirs from here. Plain data, standard library only, so the
CLI can import it before anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunOptions:
    model: str = "resnet50"  # a torchvision classification model
    weights: str | None = None  # None: the model's DEFAULT torchvision weights
    weights_sha256: str | None = None
    batch_size: int | None = None  # None: 16 on a CPU, what fits on a GPU
    device: str = "auto"
    precision: str = "auto"
    limit: int | None = None
    shard_size: int = 2000
    io_workers: int | None = None  # None: twice the cores, at least 4
    compile: str = "auto"
    gpu_decode: bool = False
    pdf_dpi: int = 150
    max_pages: int = 50
    thumbnails: bool = True  # 160 px WebP made while decoding, for the web page (~1.1 ms of CPU an image)
    index_memory: str | None = None  # None: half of RAM
    recall_target: float = 0.95
    max_attempts: int = 3  # tries of an image that failed to fetch or embed
    max_delete_share: float = 0.2
    allow_mass_delete: bool = False
    endpoint_url: str | None = None
    cluster: str | None = None  # a Dask scheduler's address
    workers: int | None = None  # a local Dask cluster's worker processes


RUN_DEFAULTS = RunOptions()
