"""Nightly-run guarantees: incremental, exactly once across crashes, one winner
in a race, retries, rollback, gc. Real Prefect, real FAISS, and moto's S3 server
where the guarantee depends on S3 semantics (conditional puts, listings)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flows.search import similar_images
from tasks.catalog.errors import CatalogError, ConcurrentCommitError
from tasks.catalog.gc import collect_garbage
from tasks.catalog.history import list_versions
from tasks.catalog.layout import version_stem
from tasks.catalog.leases import LEASE_PREFIX, LEASE_TTL_S
from tasks.catalog.manifest import commit_manifest, read_pointer
from tasks.catalog.reader import Catalog, open_catalog
from tasks.catalog.runs_log import read_runs
from tasks.catalog.versions import build_next_version, rollback
from tasks.records import ChangePlan
from tasks.sample_data import generate_samples, reencoded_copy, write_samples
from tasks.storage import LocalStore, S3Store
from tests.catalog_checks import assert_exactly_once
from tests.helpers import run_small as run

pytestmark = pytest.mark.usefixtures("prefect_harness")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def s3_roots(new_bucket, moto_endpoint):
    src, out = new_bucket(), new_bucket()
    return S3Store(src, "photos", endpoint_url=moto_endpoint), f"s3://{src}/photos", f"s3://{out}/cat", moto_endpoint




def open_cat(output, endpoint=None):
    return open_catalog(output, endpoint_url=endpoint)


def local_bucket(tmp_path, n: int, seed: int):
    """A local source of `n` good generated images: (store, samples, source, output)."""
    store = LocalStore(tmp_path / "src", create=True)
    samples = generate_samples(n, seed=seed, broken=False)
    write_samples(store, samples)
    return store, samples, str(tmp_path / "src"), str(tmp_path / "out")


def test_incremental_reruns_process_only_what_changed(s3_roots, resnet18_weights):
    store, source, output, endpoint = s3_roots
    samples = generate_samples(20, seed=21)  # with 3 broken files
    write_samples(store, samples)
    first = run(source, output, resnet18_weights, endpoint, max_attempts=1)
    assert (first.status, first.version, first.processed, first.failed) == ("committed", 1, 20, 3)
    v1 = open_cat(output, endpoint)

    again = run(source, output, resnet18_weights, endpoint, max_attempts=1)
    assert again.status == "no_changes" and again.processed == 0 and again.failed == 0
    assert again.counts["unchanged"] == 20 and again.counts["given_up"] == 3
    assert [v.version for v in list_versions(v1.store)] == [1]

    good = sorted(s.key for s in samples if s.kind != "broken")
    changed, deleted = good[0], good[1]
    old_row = v1.images.set_index("key").loc[changed]
    other = generate_samples(2, seed=99, broken=False)
    store.put(changed, other[0].data)  # new bytes under the same key
    store.delete(deleted)
    store.put("photos/new-item.jpg", other[1].data)

    third = run(source, output, resnet18_weights, endpoint, max_attempts=1)
    assert third.version == 2 and third.processed == 2
    assert (third.counts["new"], third.counts["changed"], third.counts["deleted"]) == (1, 1, 1)
    v2 = open_cat(output, endpoint)
    assert_exactly_once(v2, set(good) - {deleted} | {"photos/new-item.jpg"})
    new_row = v2.images.set_index("key").loc[changed]
    assert new_row["image_id"] == old_row["image_id"] and new_row["etag"] != old_row["etag"]
    assert new_row["run_id"] == third.run_id
    old_vec = v1.index.reconstruct(int(old_row["image_id"]))
    assert not np.allclose(v2.index.reconstruct(int(new_row["image_id"])), old_vec)
    deleted_id = int(v1.images.set_index("key").loc[deleted, "image_id"])
    ids, _ = v2.embeddings()
    assert deleted_id not in set(ids.tolist())
    with pytest.raises(RuntimeError):  # gone from the index too
        v2.index.reconstruct(deleted_id)
    runs = read_runs(v2.store)
    assert runs["status"].tolist() == ["committed", "no_changes", "committed"]


def test_model_change_reembeds_everything_into_a_new_index(tmp_path, resnet18_weights):
    from models.weights import save_random_weights

    src = tmp_path / "src"
    write_samples(LocalStore(src, create=True), generate_samples(12, seed=4, broken=False))
    run(str(src), str(tmp_path / "out"), resnet18_weights)
    v1 = open_cat(str(tmp_path / "out"))
    other = tmp_path / "other-resnet18.pth"
    other_sha = save_random_weights("resnet18", 1, other)
    summary = run(str(src), str(tmp_path / "out"), other)
    assert summary.version == 2 and summary.counts["changed"] == 12 and summary.processed == 12
    v2 = open_cat(str(tmp_path / "out"))
    assert v2.manifest.index != v1.manifest.index
    assert set(v2.images["weights_sha256"]) == {other_sha} == {v2.manifest.weights_sha256}
    assert_exactly_once(v2, set(v1.images["key"]))
    assert not set(v2.manifest.embeddings) & set(v1.manifest.embeddings)
    assert Catalog.open(v1.store, version=1).index.ntotal == 12  # the old version is untouched


def test_undecodable_files_are_final_until_their_bytes_change(tmp_path, resnet18_weights):
    """Decoding the same bytes again gives the same answer: a corrupt file is one
    failure, and nights with no new bytes commit no new version."""
    src, out = tmp_path / "src", str(tmp_path / "out")
    store = LocalStore(src, create=True)
    write_samples(store, generate_samples(5, seed=8))
    first = run(str(src), out, resnet18_weights, max_attempts=3)
    assert (first.version, first.failed) == (1, 3)
    second = run(str(src), out, resnet18_weights, max_attempts=3)
    assert second.status == "no_changes" and second.counts["given_up"] == 3 and second.counts["retry"] == 0
    assert [v.version for v in list_versions(open_cat(out).store)] == [1]
    store.put("broken/empty.jpg", generate_samples(1, seed=5, broken=False)[0].data)  # fixed upstream
    third = run(str(src), out, resnet18_weights, max_attempts=3)
    c = open_cat(out)
    assert third.processed == 1 and "broken/empty.jpg" in set(c.images["key"])
    assert "broken/empty.jpg" not in set(c.failures["key"]) and len(c.failures) == 2


def test_fetch_failures_are_retried_then_given_up(s3_roots, resnet18_weights):
    from tests.fault_proxy import FaultProxy, Faults

    store, source, output, endpoint = s3_roots
    write_samples(store, generate_samples(4, seed=9, broken=False))
    denied = store.list().__next__().key
    faults = Faults(deny=lambda method, path: method == "GET" and path.split("?")[0].endswith("/" + denied))
    attempts = []
    with FaultProxy(endpoint, faults) as proxy:
        for _ in range(3):
            summary = run(source, output, resnet18_weights, proxy.url, max_attempts=3)
            attempts.append(open_cat(output, endpoint).failures.set_index("key")["attempts"].to_dict())
        assert [a[denied] for a in attempts] == [1, 2, 3]
        assert summary.counts["retry"] == 1 and summary.processed == 0
        fourth = run(source, output, resnet18_weights, proxy.url, max_attempts=3)
    assert fourth.status == "no_changes" and fourth.counts["given_up"] == 1
    assert open_cat(output, endpoint).failures.set_index("key").loc[denied, "stage"] == "fetch"


def subprocess_env(**extra: str) -> dict[str, str]:
    """The harness's Prefect API for child processes, so they need no server of their own."""
    import prefect.settings

    env = dict(os.environ, PREFECT_API_URL=prefect.settings.PREFECT_API_URL.value(), PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def cli_run(source: str, output: str, weights: Path, *extra: str, env: dict | None = None,
            wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "flows.cli", "run", "--source", source, "--output", output, "--model", "resnet18",
           "--weights", str(weights), "--batch-size", "8", "--shard-size", "6", "--json", *extra]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env or subprocess_env(), timeout=300)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or subprocess_env())


@pytest.mark.parametrize("crash_at", ["after-shard-1", "before-index-write", "after-index-write", "before-commit"])
def test_a_killed_run_leaves_the_previous_version_and_a_rerun_is_exactly_once(tmp_path, resnet18_weights, crash_at):
    src, out = tmp_path / "src", tmp_path / "out"
    store = LocalStore(src, create=True)
    samples = generate_samples(24, seed=31, broken=False)
    write_samples(store, samples[:14])
    run(str(src), str(out), resnet18_weights)
    before = open_cat(str(out))
    before_rows = before.images.copy()

    write_samples(store, samples[14:])  # 10 new
    store.put(samples[0].key, samples[20].data)  # 1 changed
    store.delete(samples[1].key)  # 1 deleted
    for s in samples[2:5]:  # 3 new keys whose bytes the catalogue has: their rows are carried by content
        store.put(f"copies/{s.key}", s.data)
    store.put(samples[5].key, samples[5].data)  # rewritten with the same bytes: a new ETag, carried too
    proc = cli_run(str(src), str(out), resnet18_weights, env=subprocess_env(BATCHSIGHT_CRASH_AT=crash_at))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    after_crash = open_cat(str(out))  # a reader following CURRENT sees the previous complete version
    assert after_crash.manifest.version == 1
    assert after_crash.images.equals(before_rows)
    assert_exactly_once(after_crash, set(before_rows["key"]))
    leftovers = {o.key for o in LocalStore(out).list()}
    assert any(k.startswith("tables/embeddings/") and before.manifest.run_id not in k for k in leftovers)

    rerun = run(str(src), str(out), resnet18_weights)
    assert rerun.version == 2 and rerun.reused == 4
    live = open_cat(str(out))
    expected = {s.key for s in samples if s.key != samples[1].key} | {f"copies/{s.key}" for s in samples[2:5]}
    assert_exactly_once(live, expected)
    assert_carried(live, {f"copies/{s.key}": s.key for s in samples[2:5]})
    # The killed run's lease is still fresh: gc cannot tell it from a slow run, so it waits.
    waiting = collect_garbage(live.store, min_age_s=0)
    assert waiting.deleted == [] and waiting.skipped_running > 0
    expired = time.time() + LEASE_TTL_S + 1  # once the lease runs out, its files are garbage
    orphans = collect_garbage(live.store, min_age_s=0, now=expired)
    assert orphans.deleted, "the killed run's parts are garbage"
    assert any(k.startswith(LEASE_PREFIX) for k in orphans.deleted)
    assert all(live.manifest.run_id not in k and before.manifest.run_id not in k for k in orphans.deleted)
    assert_exactly_once(open_cat(str(out)), expected)  # gc removed nothing live
    again = collect_garbage(live.store, min_age_s=0, now=expired)
    assert again.deleted == []


def test_an_external_sigkill_mid_run_is_recovered(tmp_path, resnet18_weights):
    """No injected crash point: kill the real process as soon as it has written a part."""
    src, out = tmp_path / "src", tmp_path / "out"
    samples = generate_samples(30, seed=41, broken=False)
    write_samples(LocalStore(src, create=True), samples)
    proc = cli_run(str(src), str(out), resnet18_weights, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "tables" / "embeddings").exists() and any((out / "tables" / "embeddings").rglob("*.parquet")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "CURRENT").exists() or open_cat(str(out)).manifest.version == 1
    run(str(src), str(out), resnet18_weights)
    assert_exactly_once(open_cat(str(out)), {s.key for s in samples})


def test_two_commits_from_one_version_one_wins(tmp_path, resnet18_weights):
    """The commit protocol itself, with the race forced: both runs build on v1."""
    src, out = tmp_path / "src", tmp_path / "out"
    store = LocalStore(src, create=True)
    write_samples(store, generate_samples(6, seed=2, broken=False))
    run(str(src), str(out), resnet18_weights)
    out_store = LocalStore(out)
    pointer, etag = read_pointer(out_store)
    previous = Catalog.open(out_store)
    plan = ChangePlan(deleted=[previous.images["key"].iloc[0]])
    meta = dict(source=str(src), model="resnet18", weights="w", weights_source="file",
                weights_sha256=previous.manifest.weights_sha256, embedding_dim=512, reembed_all=False)
    a, _ = build_next_version(out_store, previous, plan, [], run_id="run-a", **meta)
    b, _ = build_next_version(out_store, previous, plan, [], run_id="run-b", **meta)
    commit_manifest(out_store, a, etag)
    with pytest.raises(ConcurrentCommitError, match="another run committed.*committed nothing"):
        commit_manifest(out_store, b, etag)
    live = Catalog.open(out_store)
    assert live.manifest.run_id == "run-a" and live.manifest.version == 2
    assert_exactly_once(live, set(previous.images["key"]) - set(plan.deleted))


def assert_carried(cat, copies: dict[str, str]) -> None:
    """Each copy's rows hold its original's bytes' hash and exactly its original's vectors."""
    ids, vectors = cat.embeddings()
    by_id = dict(zip(ids.tolist(), vectors, strict=True))
    rows = cat.images.set_index("key")
    for copy, original in copies.items():
        assert rows.loc[copy, "content_sha256"] == rows.loc[original, "content_sha256"]
        np.testing.assert_array_equal(by_id[rows.loc[copy, "image_id"]], by_id[rows.loc[original, "image_id"]])


def test_two_runs_carrying_rows_by_content_started_together_one_commits(s3_roots, resnet18_weights):
    """A night that carries rows by content (objects copied under new keys) run twice at once."""
    store, source, output, endpoint = s3_roots
    samples = generate_samples(10, seed=13, broken=False)
    write_samples(store, samples)
    run(source, output, resnet18_weights, endpoint)
    for s in samples[:6]:
        store.put(f"copies/{s.key}", s.data)
    env = subprocess_env(AWS_ENDPOINT_URL=endpoint)
    procs = [cli_run(source, output, resnet18_weights, env=env, wait=False) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    committed = [json.loads(o) for code, o, _ in results if code == 0 and json.loads(o)["status"] == "committed"]
    assert len(committed) == 1 and committed[0]["reused"] == 6, results
    live = open_cat(output, endpoint)
    assert [v.version for v in list_versions(live.store)] == [2, 1]
    assert_exactly_once(live, {s.key for s in samples} | {f"copies/{s.key}" for s in samples[:6]})
    assert_carried(live, {f"copies/{s.key}": s.key for s in samples[:6]})


def test_two_runs_started_together_one_commits(s3_roots, resnet18_weights):
    store, source, output, endpoint = s3_roots
    samples = generate_samples(16, seed=12, broken=False)
    write_samples(store, samples)
    env = subprocess_env(AWS_ENDPOINT_URL=endpoint)
    procs = [cli_run(source, output, resnet18_weights, env=env, wait=False) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    committed = [json.loads(o) for code, o, _ in results if code == 0 and json.loads(o)["status"] == "committed"]
    assert len(committed) == 1, results
    loser = [r for r in results if not (r[0] == 0 and json.loads(r[1])["status"] == "committed")][0]
    # The loser either lost the conditional put on CURRENT (exit 3, a clear message)
    # or started after the winner committed and found nothing to do.
    assert (loser[0] == 3 and "conditional put on CURRENT failed" in loser[2]) or \
        (loser[0] == 0 and json.loads(loser[1])["status"] == "no_changes"), loser
    live = open_cat(output, endpoint)
    assert [v.version for v in list_versions(live.store)] == [1]
    assert_exactly_once(live, {s.key for s in samples})


def test_rollback_restores_an_earlier_version_and_search_follows(tmp_path, resnet18_weights):
    store, samples, src, out = local_bucket(tmp_path, 10, seed=6)
    run(src, out, resnet18_weights)
    gone = samples[3]
    store.delete(gone.key)
    run(src, out, resnet18_weights)
    assert gone.key not in set(open_cat(out).images["key"])

    restored = rollback(open_cat(out).store, 1)
    live = open_cat(out)
    assert (live.manifest.version, live.manifest.rolled_back_from) == (3, 1)
    assert_exactly_once(live, {s.key for s in samples})
    hits = similar_images(out, image=reencoded_copy(gone.data, scale=0.9), k=1)
    assert hits["key"].tolist() == [gone.key]
    assert restored.index == Catalog.open(live.store, version=1).manifest.index
    with pytest.raises(CatalogError, match="not in the history"):
        rollback(live.store, 7)
    nxt = run(src, out, resnet18_weights)  # the next night diffs against the restored content
    assert nxt.version == 4 and nxt.counts["deleted"] == 1 and nxt.processed == 0


def test_gc_keeps_what_versions_reference(tmp_path, resnet18_weights):
    store, samples, src, out = local_bucket(tmp_path, 8, seed=9)
    run(src, out, resnet18_weights)
    store.put(samples[0].key, samples[1].data)
    run(src, out, resnet18_weights)
    c = open_cat(out)
    assert collect_garbage(c.store, min_age_s=3600).deleted == []  # too recent: left alone
    assert collect_garbage(c.store, min_age_s=0).deleted == []  # everything is referenced by v1 or v2
    # reports and categorisers are not version data but must survive gc with their version
    v1, v2 = list_versions(c.store)[::-1]
    c.store.put(f"tables/duplicates/{version_stem(v2.version, v2.run_id)}/threshold-0.9900.parquet", b"r2")
    c.store.put(f"tables/duplicates/{version_stem(v1.version, v1.run_id)}/threshold-0.9900.parquet", b"r1")
    c.store.put("categorizers/20261129T000000Z-abcdef.json", b"{}")
    report = collect_garbage(c.store, keep_versions=1, min_age_s=0)
    assert any(k.startswith("manifests/v000001") for k in report.deleted)
    assert not set(report.deleted) & set(v2.named_files)  # v2 still reads v1's main index and first part
    assert [k for k in report.deleted if k.startswith("tables/duplicates/")] == [
        f"tables/duplicates/{version_stem(v1.version, v1.run_id)}/threshold-0.9900.parquet"]
    assert c.store.exists("categorizers/20261129T000000Z-abcdef.json")
    assert_exactly_once(open_cat(out), {s.key for s in samples})
    assert [v.version for v in list_versions(c.store)] == [2]
