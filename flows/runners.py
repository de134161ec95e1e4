"""Where shards run: the runner the run's `ShardConfig` names (CLI `--cluster` /
`--workers`, or the deployment config's `shards`).

- neither: in this process, one shard at a time (a shard already uses every
  core: decode threads or processes, and the model's streams);
- `workers=N`: a temporary `LocalCluster` of N worker processes on this machine,
  one shard at a time each; on a machine with GPUs, N a multiple of the GPUs,
  each worker pinned to a card;
- `cluster="tcp://scheduler:8786"`: an existing Dask cluster.

`shard_runner` is entered first of all in the flow, so a local cluster starts
while the model is checked and its workers load the model while the flow plans
(`ShardRunner.warm`). The Dask side is flows/dask_shards.py; another distributed
runner (Ray, a batch system) would be one more class with `warm` and `run`,
chosen here, and its address scheme in `tasks/config.scheduler_address`.

Both Dask cases go through `prefect_dask.DaskTaskRunner`: a shard is the same
Prefect task wherever it runs. The model is loaded once per worker process
(`models.engine.get_embedder`). Workers that advertise a `GPU` resource get
shards annotated with `resources={"GPU": 1}`, so two shards never share a card.
Progress crosses processes as Dask events (`log_event` on the worker,
`subscribe_topic` here), per shard and cumulative, so a shard rerun on another
worker after its first one died does not count its images twice.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from prefect.task_runners import ThreadPoolTaskRunner

from tasks.config import RunnerError, ShardConfig, scheduler_address
from tasks.records import ShardsDone

if TYPE_CHECKING:
    from tasks.shard.progress import ProgressReporter

SCHEDULER_CONNECT_TIMEOUT_S = 10.0


SHARDS_PER_WORKER = 2  # at least, on a local cluster: no worker idles while one shard is left


def shard_size_for(objects: int, shards: ShardConfig) -> int:
    """`shards.shard_size`, made smaller where a local cluster of `shards.workers` would
    otherwise get fewer than `SHARDS_PER_WORKER` shards a worker (a night of
    5,000 images in shards of 2,000 kept one of 4 workers idle and the last
    shard running alone). Never larger; a remote cluster's size is not known
    before it is reached, so its shards keep `shard_size`."""
    if not shards.workers or objects <= 0:
        return shards.shard_size
    return max(1, min(shards.shard_size, -(-objects // (SHARDS_PER_WORKER * shards.workers))))


def check_reachable(runner: ShardConfig, timeout_s: float = SCHEDULER_CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, before any listing, when the scheduler does not answer."""
    if not runner.cluster:
        return
    host, port = scheduler_address(runner.cluster)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RunnerError(f"no Dask scheduler answers at {runner.cluster} ({exc}); start one with `dask scheduler` "
                          "and workers with `dask worker ADDRESS --nthreads 1` (docs/operations.md), or drop "
                          "--cluster to run here") from None


class InProcess:
    """Shards in the flow's process, one at a time (a shard already uses every core:
    decode threads or processes, and the model's streams); the flow has loaded the model."""

    def warm(self, spec: Any) -> None:
        """Nothing to do: the model is this process's, loaded by the flow."""

    def run(self, task, specs: Sequence[Any], *, progress: ProgressReporter | None = None,
            topic: str | None = None) -> ShardsDone:
        ready_at = time.time()
        with ThreadPoolTaskRunner(max_workers=1) as task_runner:
            return ShardsDone([f.result() for f in task_runner.map(task, {"spec": list(specs)})], 0.0, ready_at)


class ShardRunner(Protocol):
    """Where a run's shards go: `warm` prepares the processes that will run them
    (while the flow plans), `run` runs `task(spec)` for every spec, in spec order."""

    def warm(self, spec: Any) -> None: ...

    def run(self, task, specs: Sequence[Any], *, progress: ProgressReporter | None = None,
            topic: str | None = None) -> ShardsDone: ...


@contextmanager
def shard_runner(shards: ShardConfig) -> Iterator[ShardRunner]:
    """The runner `shards` names, entered: a local cluster starts at once, in the
    background, and is closed (every process it started ended) on the way out."""
    if shards.in_process:
        yield InProcess()
        return
    from flows.dask_shards import DaskShards  # dask and distributed load only for --workers or --cluster

    with DaskShards(shards) as runner:
        yield runner


def shard_progress(local: ProgressReporter | None, topic: str | None, shard: int
                   ) -> tuple[Callable[[int], None] | None, Callable[[], None]]:
    """(on_progress, finish) for a shard: the local bar when the shard runs in
    the flow's process, else events to it from the Dask worker it runs on."""
    if local is not None:
        return local.advance, lambda: None
    if not topic:
        return None, lambda: None
    from flows.dask_shards import WorkerProgress

    remote = WorkerProgress.here(topic, shard)
    if remote is None:
        return None, lambda: None
    return remote.advance, remote.flush
