"""Shards on a Dask cluster, through `prefect_dask.DaskTaskRunner` (the choice
of runner is flows/runners.py).

- `--workers N`: a temporary `LocalCluster` of N worker processes, one shard at a
  time each, the cores shared out (`OMP_NUM_THREADS` for the model's CPU
  streams, `BATCHSIGHT_WORKER_CORES` for decode processes), task runs reported
  to this flow's Prefect API; on a machine with GPUs, N a multiple of the GPUs,
  each worker pinned to a card by `PinGpu` and advertising `GPU=1`: several
  shard processes can feed one card, so no single interpreter batches and
  writes every image.
- `--cluster ADDRESS`: a running cluster; its workers are set up by whoever
  started them (docs/operations.md).

Workers that advertise a `GPU` resource get shards annotated with
`resources={"GPU": 1}`, so two shards never share a card. The model is loaded
in each worker process on its first shard and reused (`models.engine.get_embedder`).
Progress crosses processes as Dask events (`log_event` on the worker,
`subscribe_topic` here): per shard and cumulative, so a shard rerun on another
worker after the first one died does not count its images twice.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import dask
from distributed import Client, LocalCluster, get_worker
from distributed.diagnostics.plugin import WorkerPlugin
from prefect_dask import DaskTaskRunner

from tasks.config import RunnerError, ShardConfig
from tasks.records import ShardsDone
from tasks.shard.progress import ProgressReporter
from tasks.shard.read import WORKER_CORES_ENV
from tasks.shard.runner import warm_shard_process

PROGRESS_EVERY_S = 0.5  # a worker sends a shard's count at most this often


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class PinGpu(WorkerPlugin):
    """A Dask worker plugin: worker `name` (0, 1, ...) sees only GPU `name` modulo
    the GPUs (several workers share a card when there are more workers than
    cards), set before anything in the worker touches CUDA."""

    name = "batchsight-pin-gpu"

    def __init__(self, gpus: int) -> None:
        self.gpus = gpus

    def setup(self, worker) -> None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(int(worker.name) % self.gpus)


def _local_cluster_kwargs(workers: int, gpus: int, api_url: str | None) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    share = str(max(1, cores // workers))
    # The model's CPU streams and the decode processes share the cores out.
    env = {"OMP_NUM_THREADS": share, WORKER_CORES_ENV: share}
    if api_url:  # task runs report to this flow's API, not to a temporary server of each worker's own
        env["PREFECT_API_URL"] = api_url
    kwargs: dict[str, Any] = {"n_workers": workers, "threads_per_worker": 1, "processes": True,
                              "dashboard_address": None, "env": env}
    if gpus:
        kwargs["resources"] = {"GPU": 1}
    return kwargs


def _flow_api_url() -> str | None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


END_GRACE_S = 10.0  # a worker process this long past its cluster's close is killed


def end_processes(pids: Sequence[int], grace_s: float = END_GRACE_S) -> list[int]:
    """Make sure each of `pids` has ended: wait up to `grace_s` for all, then SIGKILL
    the rest (their decode processes die with them: PR_SET_PDEATHSIG). Returns
    those killed. A local cluster's close terminates its workers; this is for the
    worker that does not exit, which would hold its GPU memory past the run."""
    deadline = time.monotonic() + grace_s
    while (alive := [p for p in pids if process_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if alive:
        logging.getLogger(__name__).warning("killed %s worker processes still running %.0f s after their cluster "
                                            "closed: %s", len(alive), grace_s, alive)
    return alive


@contextlib.contextmanager
def _cluster_settings(gpus: int) -> Iterator[None]:
    """Dask settings while a local cluster starts its workers. GPU workers decode in
    processes of their own, which a daemonic process may not start. Dask's
    MALLOC_TRIM_THRESHOLD_ turns off glibc's adaptive mmap threshold, so every
    batch-sized tensor is mmapped, faulted in and unmapped: measured on 2 cores it
    doubled the model's time (a quarter of the CPU in the kernel); batchsight's
    workers keep glibc's default. (None unsets a variable there:
    distributed.nanny._get_env_variables.)"""
    with dask.config.set({"distributed.worker.daemon": not gpus,
                          "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}), _quiet_cluster_logs():
        yield


class DaskShards:
    """Shards on Dask: a temporary local cluster of `shards.workers` processes, or
    the running cluster at `shards.cluster`. A local cluster starts in the
    background as soon as the runner is entered (the flow enters it first of all),
    and `warm` has every worker load the model, start its decode processes and run
    a batch, so both happen while the flow checks the model and plans; `run` waits
    for them only then. On exit the cluster closes and every worker process it
    started has ended (`end_processes`)."""

    def __init__(self, shards: ShardConfig) -> None:
        self.shards = shards
        self.cluster: LocalCluster | None = None
        self.client: Client | None = None
        self.pids: set[int] = set()
        self._ready = concurrent.futures.Future()
        self._warmed: concurrent.futures.Future | None = None
        self._started = time.perf_counter()

    def __enter__(self) -> DaskShards:
        self._api_url = _flow_api_url()
        gpus = 0 if self.shards.cluster else local_gpus()
        if gpus and self.shards.workers % gpus:
            raise RunnerError(f"this machine has {gpus} GPUs and --workers {self.shards.workers} would give some "
                              f"cards more workers than others: use a multiple of {gpus}")
        threading.Thread(target=_into(self._ready, lambda: self._start(gpus)), name="batchsight-cluster-start",
                         daemon=True).start()
        return self

    def connected(self) -> Client:
        """The client, once the cluster has started (or been reached) and its workers are up."""
        return self._ready.result()

    def _start(self, gpus: int) -> Client:
        if self.shards.cluster:
            self.client = Client(self.shards.cluster, timeout=SCHEDULER_TIMEOUT_S)
            return self.client
        with _cluster_settings(gpus):
            self.cluster = LocalCluster(**_local_cluster_kwargs(self.shards.workers, gpus, self._api_url))
        self.client = Client(self.cluster)
        if gpus:
            self.client.register_plugin(PinGpu(gpus))
        self.client.wait_for_workers(self.shards.workers)
        self.note_workers()
        return self.client

    def note_workers(self) -> None:
        """Remember the local cluster's worker processes, to end them with it (a
        worker restarted since the start included)."""
        if self.cluster is not None and self.client is not None:
            with contextlib.suppress(Exception):  # a scheduler that went away has no workers to list
                self.pids |= set(self.client.run(os.getpid).values())

    def warm(self, spec: Any) -> None:
        """Every worker builds what `spec`'s shards need, in the background: the
        model (loaded once a process, `get_embedder`), decode processes, a batch run."""
        def warm_all() -> None:
            self.connected().run(warm_shard_process, spec)

        self._warmed = concurrent.futures.Future()
        threading.Thread(target=_into(self._warmed, warm_all), name="batchsight-warm", daemon=True).start()

    def run(self, task, specs: Sequence[Any], *, progress: ProgressReporter | None = None,
            topic: str | None = None) -> ShardsDone:
        """`task(spec)` for every spec, in spec order, once the workers are up (and warm)."""
        client = self.connected()
        if self._warmed is not None:
            try:
                self._warmed.result()
            except Exception:  # the shard that meets the same problem reports it, with its images
                logging.getLogger(__name__).warning("warming the workers up failed", exc_info=True)
        start_s, ready_at = time.perf_counter() - self._started, time.time()
        if progress is not None and topic:
            client.subscribe_topic(topic, _ForwardProgress(progress))
        try:
            with DaskTaskRunner(address=client.scheduler.address) as task_runner, \
                    dask.annotate(resources={"GPU": 1}) if _wants_gpu(client) else contextlib.nullcontext():
                futures = task_runner.map(task, {"spec": list(specs)})
                return ShardsDone([f.result() for f in futures], start_s, ready_at)
        finally:
            if progress is not None and topic:
                with contextlib.suppress(Exception):  # a scheduler that went away takes its topics with it
                    client.unsubscribe_topic(topic)

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(Exception):
            self._ready.result(timeout=CLOSE_WAIT_S)  # a start still in progress finishes, to be closed
        self.note_workers()
        for resource in (self.client, self.cluster):
            if resource is not None:
                with contextlib.suppress(Exception), _quiet_cluster_logs():
                    resource.close()
        end_processes(sorted(self.pids))


SCHEDULER_TIMEOUT_S = 30
CLOSE_WAIT_S = 120  # a local cluster still starting when the run ends is waited for, then closed


def _into(future: concurrent.futures.Future, fn) -> Any:
    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            future.set_exception(exc)
    return run


@contextlib.contextmanager
def _quiet_cluster_logs() -> Iterator[None]:
    """A temporary cluster's start-up and shutdown chatter (INFO lines, a nanny
    killing a worker that is slow to exit) stays out of a run's output; errors
    still show."""
    logger = logging.getLogger("distributed")
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with dask.config.set({"logging.distributed": "error"}):  # the worker processes too
            yield
    finally:
        logger.setLevel(before)


def _wants_gpu(client) -> bool:
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return any(w.get("resources", {}).get("GPU") for w in workers)


class _ForwardProgress:
    """Events from the workers -> this process's progress bar: each event is
    (timestamp, [shard, objects done so far in this attempt]); the bar advances
    by the growth of each shard's largest count."""

    def __init__(self, progress: ProgressReporter) -> None:
        self.progress = progress
        self.done: dict[int, int] = {}
        self.lock = threading.Lock()

    def __call__(self, event: tuple[float, Any]) -> None:
        shard, count = event[1]
        with self.lock:
            grown = count - self.done.get(shard, 0)
            if grown <= 0:
                return
            self.done[shard] = count
        self.progress.advance(grown)


class WorkerProgress:
    """A shard's progress from a Dask worker: its running count, sent as an event
    at most every `PROGRESS_EVERY_S` and once more at the end."""

    def __init__(self, worker, topic: str, shard: int) -> None:
        self.worker, self.topic, self.shard = worker, topic, shard
        self.count, self.sent_at, self.sent = 0, 0.0, 0

    @classmethod
    def here(cls, topic: str | None, shard: int) -> WorkerProgress | None:
        """A reporter when this code runs on a Dask worker and the run listens."""
        if not topic:
            return None
        try:
            return cls(get_worker(), topic, shard)
        except ValueError:  # not on a Dask worker
            return None

    def advance(self, n: int) -> None:
        self.count += n
        if time.monotonic() - self.sent_at >= PROGRESS_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.count != self.sent:
            self.worker.log_event(self.topic, [self.shard, self.count])
            self.sent, self.sent_at = self.count, time.monotonic()


