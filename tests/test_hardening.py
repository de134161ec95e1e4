"""What an unlucky operator or an attacker meets: overlapping roots, gc next to
other data, runs that outlive any grace period, empty versions, S3 faults, lost
commit replies, damaged catalogue files, bad weights, a full disk."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from models.registry import model_family
from models.weights import WeightsError, resolve_weights
from tasks.catalog.errors import CatalogCorrupt
from tasks.catalog.gc import collect_garbage
from tasks.catalog.leases import RunLease
from tasks.catalog.manifest import read_pointer
from tasks.catalog.reader import open_catalog
from tasks.catalog.runs_log import read_runs
from tasks.config import RunConfig
from tasks.sample_data import generate_samples, write_samples
from tasks.storage import LocalStore, S3Store, key_for_local_name
from tests.fault_proxy import FaultProxy, Faults
from tests.helpers import invoke
from tests.helpers import run_small as run

pytestmark = pytest.mark.usefixtures("prefect_harness")
runner = CliRunner()






def more_samples(n: int, seed: int, folder: str) -> list:
    """New good images under `folder/`, so their keys never clash with a first batch."""
    return [replace(s, key=f"{folder}/{s.key}") for s in generate_samples(n, seed=seed, broken=False)]


def catalogue(tmp_path: Path, weights: Path, n: int = 8, seed: int = 5) -> tuple[LocalStore, Path, list]:
    src = LocalStore(tmp_path / "src", create=True)
    samples = generate_samples(n, seed=seed, broken=False)
    write_samples(src, samples)
    run(str(tmp_path / "src"), str(tmp_path / "out"), weights)
    return src, tmp_path / "out", samples


# 1. Overlapping roots and gc's reach


@pytest.mark.parametrize("source, output", [
    ("{d}/photos", "{d}/photos"),          # the same folder
    ("{d}/photos", "{d}/photos/catalog"),  # the catalogue inside the source
    ("{d}", "{d}/catalog"),                # the source above the catalogue
    ("{d}/photos/", "{d}/photos/../photos/cat"),
])
def test_overlapping_local_roots_are_refused_before_anything_runs(tmp_path, resnet18_weights, source, output):
    write_samples(LocalStore(tmp_path / "photos", create=True), generate_samples(3, seed=1, broken=False))
    src, out = source.format(d=tmp_path), output.format(d=tmp_path)
    code, text = invoke("run", "--source", src, "--output", out, "--model", "resnet18", "--weights", resnet18_weights)
    assert code == 2 and "overlap" in text and "outside the images" in text, text
    assert not list(tmp_path.rglob("CURRENT")) and not list(tmp_path.rglob("*.parquet"))


def test_overlapping_s3_roots_are_refused(new_bucket, moto_endpoint, resnet18_weights):
    bucket = new_bucket()
    for source, output in ((f"s3://{bucket}/photos", f"s3://{bucket}"), (f"s3://{bucket}", f"s3://{bucket}/cat"),
                           (f"s3://{bucket}/photos", f"s3://{bucket}/photos/cat")):
        code, text = invoke("run", "--source", source, "--output", output, "--model", "resnet18", "--weights",
                            resnet18_weights, "--endpoint-url", moto_endpoint)
        assert code == 2 and "overlap" in text, text
    with pytest.raises(ValidationError, match="overlap"):  # a deployment's config too, before its run starts
        RunConfig.model_validate({"source": f"s3://{bucket}/photos", "output": f"s3://{bucket}/photos/c"})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_gc_deletes_only_the_catalogues_own_files(tmp_path, resnet18_weights, new_bucket, moto_endpoint, where):
    """Files that are not the catalogue's, under its root, survive gc whatever their age."""
    samples = generate_samples(6, seed=9, broken=False)
    if where == "local":
        write_samples(LocalStore(tmp_path / "src", create=True), samples)
        source, output, endpoint = str(tmp_path / "src"), str(tmp_path / "out"), None
        out = LocalStore(tmp_path / "out", create=True)
    else:
        src_bucket, out_bucket = new_bucket(), new_bucket()
        write_samples(S3Store(src_bucket, "photos", endpoint_url=moto_endpoint), samples)
        source, output, endpoint = f"s3://{src_bucket}/photos", f"s3://{out_bucket}", moto_endpoint
        out = S3Store(out_bucket, "", endpoint_url=moto_endpoint)
    foreign = ["photos/p0.png", "notes.txt", "tables/exports/mine.csv", "indexes/other.faiss"]
    for key in foreign:
        out.put(key, b"not the catalogue's")
    run(source, output, resnet18_weights, endpoint)
    out.put("tables/embeddings/dead-run/shard-00000.parquet", b"orphan of a crashed run")
    code, text = invoke("gc", "--catalog", output, "--min-age-hours", "0", "--dry-run",
                        *(["--endpoint-url", endpoint] if endpoint else []))
    assert code == 0 and "would delete tables/embeddings/dead-run/shard-00000.parquet" in text
    assert not any(k in text for k in foreign), text
    report = collect_garbage(out, min_age_s=0)
    assert report.deleted == ["tables/embeddings/dead-run/shard-00000.parquet"]
    assert all(out.get(k) == b"not the catalogue's" for k in foreign)


def test_gc_leaves_a_long_run_alone_while_its_lease_is_renewed(tmp_path, resnet18_weights):
    """A run's parts older than any grace period are kept while the run lives."""
    _, out_path, _ = catalogue(tmp_path, resnet18_weights)
    out = LocalStore(out_path)
    part = "tables/embeddings/20260101T000000Z-abcdef/shard-00000.parquet"
    with RunLease(out, "20260101T000000Z-abcdef", ttl_s=1.5) as lease:
        out.put(part, b"a part of a run in progress")
        seven_hours_ago = time.time() - 7 * 3600
        os.utime(out_path / part, (seven_hours_ago, seven_hours_ago))
        time.sleep(2.0)  # longer than the ttl: only the renewals keep the lease fresh
        report = collect_garbage(out, min_age_s=6 * 3600)
        assert report.deleted == [] and report.skipped_running == 1
        assert out.exists(part) and out.exists(lease.key)
    assert not out.exists(lease.key)  # a finished run removes its lease
    assert collect_garbage(out, min_age_s=0).deleted == [part]


# 4. Empty versions


def test_an_emptied_bucket_commits_an_empty_version(tmp_path, resnet18_weights):
    src, out, samples = catalogue(tmp_path, resnet18_weights, n=6)
    for s in samples:
        src.delete(s.key)
    summary = run(str(tmp_path / "src"), str(out), resnet18_weights, allow_mass_delete=True)
    assert summary.status == "committed" and summary.version == 2
    live = open_catalog(str(out))
    assert len(live.images) == 0 and live.index.ntotal == 0 and live.manifest.counts["images"] == 0
    code, text = invoke("search", "--catalog", out, "--key", samples[0].key)
    assert code == 2 and "not in the catalogue" in text
    assert open_catalog(str(out), version=1).index.ntotal == 6  # history keeps the old content


def test_a_first_run_where_every_object_fails_records_the_failures(tmp_path, resnet18_weights):
    src = LocalStore(tmp_path / "src", create=True)
    for i in range(30):
        src.put(f"empty/{i:02d}.jpg", b"")  # zero-byte objects
    src.put("garbage.png", b"not a png at all")
    summary = run(str(tmp_path / "src"), str(tmp_path / "out"), resnet18_weights)
    assert (summary.status, summary.version, summary.processed, summary.failed) == ("committed", 1, 0, 31)
    live = open_catalog(str(tmp_path / "out"))
    assert len(live.images) == 0 and live.index.ntotal == 0
    assert len(live.failures) == 31 and set(live.failures["error_type"]) == {"empty", "not_an_image"}


# 5 and 7. S3 faults: bodies cut short, throttling, a lost commit reply


def _source_bucket(new_bucket, moto_endpoint, n: int, seed: int):
    bucket = new_bucket()
    samples = generate_samples(n, seed=seed)  # with broken files, which must fail the same way
    write_samples(S3Store(bucket, "photos", endpoint_url=moto_endpoint), samples)
    return f"s3://{bucket}/photos", samples


def _content(output: str, endpoint: str) -> tuple[dict, dict]:
    live = open_catalog(output, endpoint_url=endpoint)
    ids, vectors = live.embeddings()
    rows = live.images.set_index("image_id").loc[ids]
    return ({(k, p): v for k, p, v in zip(rows["key"], rows["page"], vectors, strict=True)},
            dict(zip(live.failures["key"], live.failures["error_type"], strict=True)))


def test_faulty_s3_gives_the_same_catalogue_as_a_clean_one(new_bucket, moto_endpoint, resnet18_weights):
    source, _ = _source_bucket(new_bucket, moto_endpoint, 24, seed=12)
    clean_out, faulty_out = f"s3://{new_bucket()}/cat", f"s3://{new_bucket()}/cat"
    run(source, clean_out, resnet18_weights, moto_endpoint, max_attempts=1)
    faults = Faults(p503=0.2, p500=0.05, p_cut=0.15, seed=4)
    with FaultProxy(moto_endpoint, faults) as proxy:
        summary = run(source, faulty_out, resnet18_weights, proxy.url, max_attempts=1)
    assert proxy.injected["cut"] >= 3 and proxy.injected["503"] >= 10, proxy.injected
    assert summary.status == "committed"
    clean_rows, clean_failures = _content(clean_out, moto_endpoint)
    faulty_rows, faulty_failures = _content(faulty_out, moto_endpoint)
    assert faulty_failures == clean_failures  # only the broken files, for the same reasons
    assert faulty_rows.keys() == clean_rows.keys()
    for key, vector in clean_rows.items():
        np.testing.assert_allclose(faulty_rows[key], vector, atol=1e-5)


def test_a_lost_reply_to_the_commit_is_reported_as_committed(new_bucket, moto_endpoint, resnet18_weights):
    source, _ = _source_bucket(new_bucket, moto_endpoint, 6, seed=13)
    output = f"s3://{new_bucket()}/cat"
    lost = []

    def lose_first_commit(method: str, path: str, headers: dict[str, str]) -> bool:
        if method == "PUT" and path.split("?")[0].endswith("/cat/CURRENT") and not lost:
            lost.append(path)
            return True
        return False

    with FaultProxy(moto_endpoint, Faults(lose_reply=lose_first_commit)) as proxy:
        summary = run(source, output, resnet18_weights, proxy.url)
    assert lost and proxy.injected["lost_reply"] == 1
    assert (summary.status, summary.version) == ("committed", 1)
    live = open_catalog(output, endpoint_url=moto_endpoint)
    assert live.manifest.run_id == summary.run_id
    runs = read_runs(live.store)
    assert runs.iloc[-1]["status"] == "committed"


# 6. Integrity


def test_verify_names_a_damaged_file_run_refuses_and_rollback_restores(tmp_path, resnet18_weights):
    src, out, samples = catalogue(tmp_path, resnet18_weights, n=8)
    code, text = invoke("status", "--catalog", out, "--verify")
    assert code == 0 and "0 damaged" in text, text
    write_samples(src, more_samples(3, 77, "more"))
    run(str(tmp_path / "src"), str(out), resnet18_weights)
    v2 = open_catalog(str(out)).manifest
    assert set(v2.files) == set(v2.named_files)

    night_part = v2.images[-1]  # the rows version 2 wrote (its others are version 1's)
    images = out / night_part
    images.write_bytes(images.read_bytes()[:-100])  # truncated
    code, text = invoke("status", "--catalog", out, "--verify", "--json")
    assert code == 4
    report = json.loads(text[:text.rindex("}") + 1])
    assert len(report["verify"]["damaged"]) == 1 and night_part in report["verify"]["damaged"][0]
    assert "rollback --catalog" in text and "--to 1" in text

    write_samples(src, more_samples(2, 78, "later"))
    code, text = invoke("run", "--source", tmp_path / "src", "--output", out, "--model", "resnet18",
                        "--weights", resnet18_weights)
    assert code == 4 and night_part in text and "rollback" in text, text
    assert read_pointer(LocalStore(out))[0].version == 2  # nothing committed

    code, text = invoke("rollback", "--catalog", out, "--to", 1)
    assert code == 0, text
    summary = run(str(tmp_path / "src"), str(out), resnet18_weights)
    assert summary.status == "committed" and summary.version == 4
    assert len(open_catalog(str(out)).images) == 8 + 3 + 2


def test_a_damaged_carried_part_is_caught_before_it_is_carried_on(tmp_path, resnet18_weights):
    src, out, _ = catalogue(tmp_path, resnet18_weights, n=8)
    part = out / open_catalog(str(out)).manifest.embeddings[0]
    part.write_bytes(part.read_bytes()[: len(part.read_bytes()) // 2])
    write_samples(src, more_samples(2, 79, "new"))
    with pytest.raises(CatalogCorrupt, match=r"shard-00000-[0-9a-f]{8}\.parquet.*the manifest recorded"):
        run(str(tmp_path / "src"), str(out), resnet18_weights)


def test_garbage_index_and_current_give_clear_errors_and_rollback_still_works(tmp_path, resnet18_weights):
    src, out, samples = catalogue(tmp_path, resnet18_weights, n=6)
    write_samples(src, more_samples(2, 80, "new"))
    run(str(tmp_path / "src"), str(out), resnet18_weights)
    live = open_catalog(str(out)).manifest
    assert live.index_delta is not None  # the night's vectors: a file of version 2's own
    (out / live.index_delta).write_bytes(b"\x00garbage" * 100)
    code, text = invoke("search", "--catalog", out, "--key", samples[0].key)
    assert code == 4 and live.index_delta in text and "Traceback" not in text, text

    (out / "CURRENT").write_bytes(b"{not json")
    code, text = invoke("status", "--catalog", out)
    assert code == 4 and "CURRENT is damaged" in text and "versions up to 2" in text, text
    code, text = invoke("rollback", "--catalog", out, "--to", 1)
    assert code == 0 and "version 3 is live" in text, text
    restored = open_catalog(str(out))
    assert restored.manifest.rolled_back_from == 1 and len(restored.images) == 6
    code, text = invoke("status", "--catalog", out, "--verify")
    assert code == 0, text


# 8. Weights


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_weights_holding_nan_or_infinity_are_refused(tmp_path, poison):
    spec = model_family("resnet18")
    state = spec.module().state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = poison
    path = tmp_path / "poisoned.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="NaN or infinite values in 1 tensors.*layer2.0.conv1.weight"):
        resolve_weights(str(path), spec)


# 10. Smaller things


def test_names_with_backslashes_and_batchsight_prefixes_are_catalogued(tmp_path, resnet18_weights):
    LocalStore(tmp_path / "src", create=True)
    good = generate_samples(3, seed=81, broken=False)
    names = ["scans\\2024\\a.jpg", ".batchsight-photo.jpg", "plain.jpg"]
    for name, sample in zip(names, good, strict=True):
        (tmp_path / "src" / name).write_bytes(sample.data)
    (tmp_path / "src" / ".batchsight-notes.txt").write_text("not an image")
    summary = run(str(tmp_path / "src"), str(tmp_path / "out"), resnet18_weights)
    assert summary.processed == 3 and summary.skipped == 1
    # a backslash is the escape character of local keys (see key_for_local_name), so it is written twice
    assert set(open_catalog(str(tmp_path / "out")).images["key"]) == {key_for_local_name(n) for n in names}
    assert key_for_local_name(names[0]) == "scans\\\\2024\\\\a.jpg"


def test_a_full_disk_says_so_and_leaves_the_live_version_intact(tmp_path, resnet18_weights):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:  # needs root; CI and the development machines run as root
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        src = LocalStore(tmp_path / "src", create=True)
        write_samples(src, generate_samples(4, seed=82, broken=False))
        run(str(tmp_path / "src"), str(disk / "out"), resnet18_weights)
        (disk / "filler").write_bytes(b"\0" * (3 * 1024 * 1024 - sum(
            f.stat().st_size for f in disk.rglob("*") if f.is_file()) - 64 * 1024))
        write_samples(src, more_samples(40, 83, "big"))
        code, text = invoke("run", "--source", tmp_path / "src", "--output", disk / "out", "--model", "resnet18",
                            "--weights", resnet18_weights)
        assert code == 2 and "no space left" in text and "intact" in text and "Traceback" not in text, text
        (disk / "filler").unlink()
        live = open_catalog(str(disk / "out"))
        assert live.manifest.version == 1 and len(live.images) == 4
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# The mass-delete guard (issue 11): a bad listing cannot empty a catalogue


def test_a_listing_that_lost_its_keys_commits_nothing(new_bucket, moto_endpoint, resnet18_weights):
    bucket = new_bucket()
    photos = S3Store(bucket, "photos", endpoint_url=moto_endpoint)
    samples = generate_samples(10, seed=84, broken=False)
    write_samples(photos, samples)
    output = f"s3://{new_bucket()}/cat"
    run(f"s3://{bucket}/photos", output, resnet18_weights, moto_endpoint)
    base = ("--output", output, "--model", "resnet18", "--weights", resnet18_weights, "--endpoint-url", moto_endpoint)

    code, text = invoke("run", "--source", f"s3://{bucket}/photo", *base)  # a typo: lists nothing
    assert code == 2 and "would delete 10 of the 10 catalogued objects" in text and "typo" in text, text
    assert "returned 0 objects" in text and "--allow-mass-delete" in text

    for s in samples[:5]:  # half the keys gone
        photos.delete(s.key)
    code, text = invoke("run", "--source", f"s3://{bucket}/photos", *base)
    assert code == 2 and "would delete 5 of the 10" in text and "50%" in text, text
    assert open_catalog(output, endpoint_url=moto_endpoint).manifest.version == 1  # nothing committed

    code, text = invoke("run", "--source", f"s3://{bucket}/photos", "--max-delete-share", "0.6", *base)
    assert code == 0, text
    assert len(open_catalog(output, endpoint_url=moto_endpoint).images) == 5

    photos.delete(samples[5].key)  # 1 of 5 is 20%: within the default share
    code, text = invoke("run", "--source", f"s3://{bucket}/photos", *base)
    assert code == 0, text
    for s in samples[6:]:  # an emptied prefix is refused however few it held, unless allowed
        photos.delete(s.key)
    code, text = invoke("run", "--source", f"s3://{bucket}/photos", *base)
    assert code == 2 and "returned 0 objects" in text, text
    code, text = invoke("run", "--source", f"s3://{bucket}/photos", "--allow-mass-delete", *base)
    assert code == 0, text
    assert len(open_catalog(output, endpoint_url=moto_endpoint).images) == 0
