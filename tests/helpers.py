"""Helpers every test module shares: run the nightly flow, invoke the CLI in
this process or in a child process of its own, find a free port, give a child
process the harness's Prefect API."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import prefect.settings
from typer.testing import CliRunner

from flows.cli import app
from flows.nightly import catalog_images
from tasks.config import config_from_flat
from tasks.records import ImageFailure
from tasks.report import RunSummary
from tasks.shard.decode import DecodeOptions
from tasks.shard.device import DeviceBudget, device_jpeg_decoder
from tasks.shard.embed import Embedded, EmbedStage
from tasks.shard.read import ShardReader, decode_process_count, decode_processes, decodes_in_processes
from tasks.shard.runner import run_shard
from tasks.storage import ObjectStore, StoreSpec

ROOT = Path(__file__).resolve().parents[1]
_runner = CliRunner()


def run_flow(source: str, output: str, **options: Any) -> RunSummary:
    """The `catalog_images` flow on a config made from `batchsight run`'s flags as keywords."""
    return catalog_images(config_from_flat(source=str(source), output=str(output), **options))


def run_small(source: str, output: str, weights: Path, endpoint: str | None = None, **options: Any) -> RunSummary:
    """A run with the tests' small model: resnet18 with seeded random weights from a file, batches of 8,
    shards of 10 (each overridable)."""
    options = {"model": "resnet18", "weights": str(weights), "batch_size": 8, "shard_size": 10,
               "endpoint_url": endpoint} | options
    return run_flow(source, output, **options)


def invoke(*args: Any) -> tuple[int, str]:
    """`batchsight ARGS` in this process: (exit code, output)."""
    result = _runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The harness's Prefect API for child processes, so they need no server of their own."""
    env = dict(os.environ, PREFECT_API_URL=prefect.settings.PREFECT_API_URL.value(), PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def cli_process(*args: Any, env: dict[str, str], wait: bool = True, timeout: float = 300
                ) -> subprocess.CompletedProcess | subprocess.Popen:
    """`batchsight ARGS` in a child process of its own (`python -m flows.cli`)."""
    cmd = [sys.executable, "-m", "flows.cli", *map(str, args)]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@dataclass
class ShardRun:
    """What `embed_objects` gives: the batches that reached the writer (those with
    vectors), every failure, and the batch size the shard ended with."""

    batches: list[Embedded]
    failures: list[ImageFailure]
    batch_size: int

    def records(self) -> list[tuple[str, int, int, int]]:
        """(key, width, height, page) of each vector, in order."""
        return [(info.key, int(w), int(h), int(p)) for b in self.batches
                for info, (w, h), p in zip(b.pages.infos, b.pages.size, b.pages.page, strict=True)]

    def vectors(self) -> np.ndarray:
        return np.concatenate([b.embeddings for b in self.batches])

    def by_key(self) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
        return {key: (vector, (w, h)) for (key, w, h, _), vector in zip(self.records(), self.vectors(), strict=True)}


def embed_objects(store: ObjectStore, embedder, *, batch_size: int, decode: DecodeOptions = DecodeOptions(),
                  jpeg_decoder=None, budget: DeviceBudget | None = None, on_progress=None,
                  items: list | None = None, write=None) -> ShardRun:
    """A shard's read, embed and batching stages over `store`'s objects, as
    `process_shard` builds them, with the embedded batches collected (and handed to
    `write`, where given) instead of written."""
    if decode.on_device and jpeg_decoder is None:
        jpeg_decoder = device_jpeg_decoder(embedder.device)
    processes = decode_processes(decode_process_count(embedder.device)) \
        if decodes_in_processes(decode.decode_in, embedder.device) else None
    reader = ShardReader(StoreSpec(store.url), embedder.family, decode, processes=processes)
    embed = EmbedStage(embedder, batch_size, jpeg_decoder=jpeg_decoder, budget=budget)
    collected: list[Embedded] = []

    def keep(batch: Embedded) -> None:
        collected.append(batch)
        if write is not None:
            write(batch)

    run_shard(items if items is not None else list(store.list()), reader, embed, keep, on_progress=on_progress)
    return ShardRun([b for b in collected if len(b.pages)], [f for b in collected for f in b.failures], embed.size)
