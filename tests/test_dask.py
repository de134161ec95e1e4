"""Scale-out: shards on a real Dask cluster through prefect-dask.

Real parts only: `distributed.LocalCluster` with worker processes (or a scheduler
and a worker started as `dask scheduler` / `dask worker` subprocesses), moto's S3
server, the Prefect test harness (its API URL handed to the workers, as the
runner does for the clusters it starts), seeded random resnet18 weights from a file.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from distributed import Client, LocalCluster
from prefect import task
from prefect.cache_policies import NO_CACHE
from typer.testing import CliRunner

from flows.cli import app
from flows.runners import shard_runner, shard_size_for
from models import engine
from tasks.catalog.reader import Catalog, open_catalog
from tasks.config import ShardConfig
from tasks.sample_data import generate_samples, write_samples
from tasks.shard.progress import reporting_progress
from tasks.storage import LocalStore, S3Store
from tests.catalog_checks import assert_exactly_once
from tests.helpers import free_port, run_small

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.timeout(900)]


def api_url() -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def vectors_by_key(c: Catalog) -> dict[str, np.ndarray]:
    ids, vectors = c.embeddings()
    key_of = dict(zip(c.images["image_id"], c.images["key"], strict=True))
    return {key_of[i]: v for i, v in zip(ids.tolist(), vectors, strict=True)}


class CountingProgress:
    def __init__(self) -> None:
        self.total, self.done = 0, 0
        self.lock = threading.Lock()

    def start(self, total: int) -> None:
        self.total = total

    def advance(self, n: int) -> None:
        with self.lock:
            self.done += n


def run(source, output, weights, endpoint=None, **kw):
    return run_small(source, output, weights, endpoint, batch_size=4, precision="fp32", device="cpu",
                     shard_size=kw.pop("shard_size", 2000), **kw)


def test_shards_on_a_local_cluster_give_the_same_catalogue_as_one_process(new_bucket, moto_endpoint,
                                                                         resnet18_weights):
    src_bucket = new_bucket()
    samples = generate_samples(14, seed=51)  # generated photos and documents, and the broken files
    write_samples(S3Store(src_bucket, "photos", endpoint_url=moto_endpoint), samples)
    source = f"s3://{src_bucket}/photos"
    here = f"s3://{new_bucket()}/here"
    on_cluster = f"s3://{new_bucket()}/cluster"

    one = run(source, here, resnet18_weights, moto_endpoint, shard_size=4)
    built_before = engine.embedders_built()
    progress = CountingProgress()
    with reporting_progress(progress):
        # shards of 100 would be one shard for two workers: the flow cuts them to two a worker at least
        spread = run(source, on_cluster, resnet18_weights, moto_endpoint, shard_size=100, workers=2)

    assert spread.status == "committed" and spread.runner == "a local Dask cluster of 2 worker processes"
    assert engine.embedders_built() == built_before, "the flow's process loaded no model: the workers did"
    me = f"{socket.gethostname()}:{os.getpid()}"
    assert me not in spread.shards_by_process and 1 <= len(spread.shards_by_process) <= 2
    size = math.ceil((one.processed + one.failed) / 4)  # two shards a worker
    assert sum(spread.shards_by_process.values()) == spread.shards == math.ceil((one.processed + one.failed) / size)
    assert spread.shards >= 4 and one.shards == 5  # shards of 4 in this process
    assert spread.models_built == 1, "each worker process built its model once and reused it for its next shards"
    # The workers built their models while the flow planned: no shard waited for one (building
    # resnet18 from its file takes a few hundred ms; finding it built, microseconds).
    assert spread.stage_s["load_s"] < 0.05, spread.stage_s
    # The bar in this process counted every object the workers read, each once.
    assert progress.total == progress.done == spread.processed + spread.failed == one.processed + one.failed
    assert spread.stage_s["to_first_batch_s"] > 0 and spread.stage_s["model_s"] > 0

    a, b = open_catalog(here, endpoint_url=moto_endpoint), open_catalog(on_cluster, endpoint_url=moto_endpoint)
    assert_exactly_once(b, set(a.images["key"]))
    assert set(b.failures["key"]) == set(a.failures["key"]) and len(b.failures) > 0
    va, vb = vectors_by_key(a), vectors_by_key(b)
    for key, v in va.items():
        np.testing.assert_allclose(vb[key], v, atol=1e-4)
    assert b.manifest.weights_sha256 == a.manifest.weights_sha256


@pytest.fixture
def cluster():
    """Two worker processes, one thread each, reporting task runs to the harness."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      env={"PREFECT_API_URL": api_url(), "OMP_NUM_THREADS": "1"}) as c, Client(c) as client:
        yield c, client


def test_a_worker_killed_mid_shard_leaves_every_image_exactly_once(tmp_path, resnet18_weights, cluster):
    local_cluster, client = cluster
    src, out = tmp_path / "src", tmp_path / "out"
    samples = generate_samples(40, seed=52, broken=False)
    write_samples(LocalStore(src, create=True), samples)
    pids = client.run(os.getpid)
    outcome: dict = {}

    def go():
        try:
            outcome["summary"] = run(str(src), str(out), resnet18_weights, shard_size=5,
                                     cluster=local_cluster.scheduler_address)
        except BaseException as exc:  # noqa: BLE001 - the test decides what is acceptable
            outcome["error"] = exc

    thread = threading.Thread(target=go)
    thread.start()
    killed = None
    deadline = time.time() + 600
    while time.time() < deadline and thread.is_alive() and killed is None:
        parts = out / "tables" / "embeddings"
        if parts.exists() and any(parts.rglob("*.parquet")):  # warm: a shard has finished, others run
            busy = [w for w, keys in client.processing().items() if keys]
            if busy:
                finished = sum(1 for _ in parts.rglob("*.parquet"))  # shards done by then, by any worker
                killed = pids[busy[0]]
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.05)
    thread.join(timeout=600)
    assert killed is not None, f"no shard was caught running: {outcome}"

    expected = {s.key for s in samples}
    print(f"killed worker {killed} mid-shard; the run {'completed' if 'summary' in outcome else 'failed'}: "
          f"{outcome.get('summary', outcome.get('error'))!r:.300}")
    if "summary" in outcome:  # the shard reran on a worker that lived
        assert outcome["summary"].status == "committed"
        by_process = outcome["summary"].shards_by_process
        assert sum(by_process.values()) == 8  # 40 objects, shards of 5: each shard's result once
        # The killed worker's results are only shards it had finished (and the flow had
        # gathered) before the kill; the one it was running ran again on a worker that lived.
        assert sum(n for p, n in by_process.items() if p.endswith(f":{killed}")) <= finished, (by_process, finished)
        assert_exactly_once(open_catalog(str(out)), expected)
    else:  # or the run failed cleanly: nothing committed, and a rerun finishes
        assert not (out / "CURRENT").exists()
        run(str(src), str(out), resnet18_weights, shard_size=5)
        assert_exactly_once(open_catalog(str(out)), expected)




def test_a_lost_scheduler_commits_nothing_and_a_rerun_finishes(tmp_path, resnet18_weights):
    src, out = tmp_path / "src", tmp_path / "out"
    samples = generate_samples(40, seed=53, broken=False)
    write_samples(LocalStore(src, create=True), samples)
    address = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, PREFECT_API_URL=api_url(), OMP_NUM_THREADS="1")
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", address.rsplit(":", 1)[1], "--dashboard-address", ":0"],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                               "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
        outcome: dict = {}

        def go():
            try:
                outcome["summary"] = run(str(src), str(out), resnet18_weights, shard_size=5, cluster=address)
            except BaseException as exc:  # noqa: BLE001
                outcome["error"] = exc

        thread = threading.Thread(target=go)
        thread.start()
        parts = out / "tables" / "embeddings"
        deadline, mid_run = time.time() + 600, False
        while time.time() < deadline and thread.is_alive():
            if parts.exists() and any(parts.rglob("*.parquet")):
                mid_run = True
                break
            time.sleep(0.05)
        assert mid_run, f"the run never wrote a part before the scheduler was killed: {outcome}"
        scheduler.send_signal(signal.SIGKILL)
        scheduler.wait(timeout=30)
        thread.join(timeout=600)
        assert not thread.is_alive(), "the run hung after its scheduler went away"
        assert "error" in outcome, f"the run went on without its scheduler: {outcome}"
        assert not (out / "CURRENT").exists(), "nothing is committed by a run that lost its cluster"
    finally:
        for proc in (worker, scheduler):
            proc.kill()
            proc.wait(timeout=30)
    rerun = run(str(src), str(out), resnet18_weights, shard_size=5)  # in this process: the cluster is gone
    assert rerun.status == "committed" and rerun.counts["new"] == len(samples)
    assert_exactly_once(open_catalog(str(out)), {s.key for s in samples})


@task(cache_policy=NO_CACHE)
def hold_the_card(spec: int) -> tuple[int, int, float, float]:
    """Stands in for a shard: which process ran it, and when."""
    started = time.time()
    time.sleep(0.5)
    return spec, os.getpid(), started, time.time()


def _overlaps(runs: list[tuple[int, int, float, float]]) -> bool:
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for _, pid, start, end in runs:
        by_pid.setdefault(pid, []).append((start, end))
    return any(b[0] < a[1] for spans in by_pid.values() for a, b in zip(sorted(spans), sorted(spans)[1:]))


@pytest.mark.parametrize("gpu", [True, False])
def test_two_shards_never_share_a_gpu(gpu):
    """One worker with two threads: with a GPU resource, its shards run one at a
    time; without one (the control), two run at once, so the check can fail."""
    resources = {"GPU": 1} if gpu else None
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None,
                      resources=resources, env={"PREFECT_API_URL": api_url()}) as local_cluster:
        with shard_runner(ShardConfig(cluster=local_cluster.scheduler_address)) as runner:
            runs = runner.run(hold_the_card, list(range(4))).results
    assert [r[0] for r in runs] == [0, 1, 2, 3]
    assert _overlaps(runs) is not gpu


def test_cluster_flags_are_checked_before_any_work(tmp_path):
    cli = CliRunner()
    args = ["run", "--source", str(tmp_path / "src"), "--output", str(tmp_path / "out")]
    (tmp_path / "src").mkdir()
    both = cli.invoke(app, [*args, "--cluster", "tcp://127.0.0.1:8786", "--workers", "2"])
    assert both.exit_code == 2 and "not both" in both.output
    nobody = cli.invoke(app, [*args, "--cluster", f"tcp://127.0.0.1:{free_port()}"])
    assert nobody.exit_code == 2 and "no Dask scheduler answers" in nobody.output
    assert not (tmp_path / "out").exists(), "nothing was written"
    bad = cli.invoke(app, [*args, "--cluster", "http://example:8786"])
    assert bad.exit_code == 2 and "tcp://HOST:8786" in bad.output


def test_several_workers_share_a_card_and_the_cores(monkeypatch):
    """Several shard processes may feed one GPU (one interpreter batching and
    writing every image was the wall on an H200). No GPU here: the card count is
    set by hand (`local_gpus`), and a real local cluster of two workers on that
    one "card" is asked where each worker is pinned, what share of the cores its
    decode processes get, and whether it may start them (not daemonic)."""
    import multiprocessing
    from types import SimpleNamespace

    import torch

    from flows import dask_shards
    from tasks.shard.read import WORKER_CORES_ENV, decode_process_count

    def worker_setup() -> tuple[str | None, str | None, bool]:
        return (os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get(WORKER_CORES_ENV),
                multiprocessing.current_process().daemon)

    monkeypatch.setattr(dask_shards, "local_gpus", lambda: 1)
    with dask_shards.DaskShards(ShardConfig(workers=2)) as runner:  # was refused: more workers than GPUs
        client = runner.connected()
        seen = list(client.run(worker_setup).values())
        resources = [w["resources"] for w in client.scheduler_info(n_workers=-1)["workers"].values()]
    share = str(max(1, (os.cpu_count() or 1) // 2))
    assert seen == [("0", share, False)] * 2 and resources == [{"GPU": 1}] * 2

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # restored as it was when the test ends
    pinned = []
    for name in range(4):  # two cards, four workers
        dask_shards.PinGpu(2).setup(SimpleNamespace(name=name))
        pinned.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert pinned == ["0", "1", "0", "1"]

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert decode_process_count(cuda) == 14  # one process: all 16 cores, two left to the shard's own process
    monkeypatch.setenv(WORKER_CORES_ENV, "4")
    assert decode_process_count(cuda) == 3 and decode_process_count(cpu) == 4  # a worker's share of 4

    monkeypatch.setattr(dask_shards, "local_gpus", lambda: 2)
    with pytest.raises(dask_shards.RunnerError, match="use a multiple of 2"):
        with dask_shards.DaskShards(ShardConfig(workers=3)):
            pass


@pytest.mark.parametrize("objects,shards,expected", [
    (5000, ShardConfig(shard_size=2000, workers=4), 625),  # 3 shards for 4 workers -> 8 shards of 625
    (100_000, ShardConfig(shard_size=2000, workers=4), 2000),  # plenty of shards already: never larger
    (5000, ShardConfig(shard_size=2000), 2000),  # in this process: one shard at a time anyway
    (5000, ShardConfig(shard_size=2000, cluster="tcp://10.0.0.5:8786"), 2000),  # a remote cluster's size is unknown here
    (3, ShardConfig(shard_size=2000, workers=4), 1),
])
def test_a_local_cluster_gets_at_least_two_shards_a_worker(objects, shards, expected):
    assert shard_size_for(objects, shards) == expected
