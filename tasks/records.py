"""Plain data that crosses stages and processes: what a listing names
(`ObjectInfo`), what a plan decides (`ChangePlan`), what a shard hands back
(`ShardResult`, `ImageFailure`, `StageTimes`) and what the catalogue records of a
file (`FileRecord`). Standard library, numpy and pandas only; every stage imports
it and it imports no stage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pandas as pd


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One listed object: its key relative to the store root, ETag and size."""

    key: str
    etag: str
    size: int
    modified: float = 0.0  # seconds since the epoch; gc's grace period reads it


@dataclass(frozen=True)
class FileRecord:
    """What the manifest knows of one file it names, to tell a damaged copy."""

    size: int
    sha256: str

    @classmethod
    def of(cls, data: bytes | memoryview) -> FileRecord:
        return cls(size=memoryview(data).nbytes, sha256=hashlib.sha256(data).hexdigest())


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
    copied: int = 0  # objects whose rows and vectors came from identical bytes embedded before: no model pass


@dataclass
class BuildStats:
    index_s: float
    write_s: float


@dataclass(frozen=True)
class ImageFailure:
    key: str
    etag: str
    size: int
    stage: str  # fetch | decode | model
    error_type: str
    message: str


@dataclass
class StageTimes:
    """Seconds spent per stage, summed over the threads and processes that do it:
    decode threads or processes (fetch, decode), model streams (model); `wait` is
    the batching thread's time waiting for decoded images."""

    fetch: float = 0.0
    decode: float = 0.0
    model: float = 0.0
    wait: float = 0.0  # model thread idle, waiting for decoded images

    def add(self, other: StageTimes) -> None:
        self.fetch += other.fetch
        self.decode += other.decode
        self.model += other.model
        self.wait += other.wait

    def as_dict(self) -> dict[str, float]:
        return {"fetch_s": self.fetch, "decode_s": self.decode, "model_s": self.model, "wait_s": self.wait}


@dataclass
class ShardsDone:
    results: list[Any]  # in spec order
    start_s: float  # seconds to start or reach the cluster (0 in process)
    ready_at: float  # epoch seconds when the first shard was submitted to a running cluster
