"""Identity by content: rows are named by key, vectors by bytes. Every row carries
its object's sha256; bytes a catalogue (the one a run builds on, or a --seed
one) has embedded with the same model are not decoded or embedded again under
another key; identical files within a run are embedded once. The model's work
is counted by wrapping the real embedder's `embed` (which runs) with a counter."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from boto3.s3.transfer import TransferConfig

from flows.search import find_duplicates, similar_images
from models.engine import Embedder
from tasks.catalog import tables
from tasks.catalog.reader import open_catalog
from tasks.records import FileRecord
from tasks.sample_data import distinct_bytes, encode, generate_samples, make_product_photo, write_samples
from tasks.storage import LocalStore, S3Store
from tests.helpers import invoke, run_small

pytestmark = pytest.mark.usefixtures("prefect_harness")

SAME = ["key", "page", "image_id", "content_sha256", "width", "height", "top_class", "top_prob"]


@pytest.fixture
def model_images(monkeypatch) -> list[int]:
    """The batch sizes the model runs on (the real model runs)."""
    sizes: list[int] = []
    real = Embedder.embed

    def counting(self, batch, **kw):
        sizes.append(int(batch.shape[0]))
        return real(self, batch, **kw)

    monkeypatch.setattr(Embedder, "embed", counting)
    return sizes


def assert_same_rows_and_vectors(a, b) -> None:
    """Two catalogues hold the same rows (but for etag, run and time) and the same vectors."""
    pd.testing.assert_frame_equal(a.images[SAME], b.images[SAME])
    (ids_a, vec_a), (ids_b, vec_b) = a.embeddings(), b.embeddings()
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_allclose(vec_a, vec_b, atol=1e-6)


def test_every_row_carries_the_sha256_of_its_bytes(tmp_path, resnet18_weights):
    store = LocalStore(tmp_path / "src", create=True)
    samples = generate_samples(10, seed=81, broken=False)
    write_samples(store, samples)
    run_small(tmp_path / "src", tmp_path / "out", resnet18_weights)
    images = open_catalog(str(tmp_path / "out")).images
    expected = {s.key: hashlib.sha256(s.data).hexdigest() for s in samples}
    assert dict(zip(images["key"], images["content_sha256"], strict=True)) == expected  # a document's pages share it


@pytest.mark.slow
def test_a_copied_folder_catalogued_with_a_seed_costs_no_model_pass(tmp_path, resnet18_weights, model_images):
    """2,000 images catalogued, the folder copied with `cp -r` (new mtimes: new ETags),
    the copy catalogued into a new catalogue seeded from the first: every object is
    fetched and hashed, none decoded or embedded, and the rows and vectors are a
    fresh run's (the first catalogue is one: same bytes under the same keys). The
    2,000 are 200 generated images, each written ten times with bytes of its own
    (`distinct_bytes`: generating 2,000 took 89 s of this test)."""
    samples = generate_samples(200, seed=83, broken=False, document_fraction=0.1)
    photos = LocalStore(tmp_path / "photos", create=True)
    for i in range(2000):
        sample = samples[i % len(samples)]
        stem, ext = sample.key.rsplit(".", 1)
        photos.put(f"{stem}-{i:04d}.{ext}", distinct_bytes(sample.data, i))
    first = run_small(tmp_path / "photos", tmp_path / "cat-a", resnet18_weights, batch_size=32, shard_size=1000)
    assert first.reused == 0 and sum(model_images) >= 2000
    shutil.copytree(tmp_path / "photos", tmp_path / "photos-copy", copy_function=shutil.copy)  # as cp -r: new mtimes
    model_images.clear()
    second = run_small(tmp_path / "photos-copy", tmp_path / "cat-b", resnet18_weights, batch_size=32,
                       shard_size=1000, seed=str(tmp_path / "cat-a"))
    assert model_images == [], "the second run embedded images"
    assert second.status == "committed" and second.processed == first.processed == second.reused
    assert_same_rows_and_vectors(open_catalog(str(tmp_path / "cat-a")), open_catalog(str(tmp_path / "cat-b")))


def test_a_moved_source_keeps_its_catalogue_without_a_model_pass(tmp_path, resnet18_weights, model_images):
    """The same catalogue, its source moved to a copy: every key's ETag changed, its
    bytes did not; the night reads each object, reuses its vector, and version 2
    holds what version 1 held."""
    write_samples(LocalStore(tmp_path / "photos", create=True), generate_samples(60, seed=84, broken=False))
    run_small(tmp_path / "photos", tmp_path / "cat", resnet18_weights)
    v1 = open_catalog(str(tmp_path / "cat"))
    shutil.copytree(tmp_path / "photos", tmp_path / "moved", copy_function=shutil.copy)  # as cp -r: new mtimes
    model_images.clear()
    moved = run_small(tmp_path / "moved", tmp_path / "cat", resnet18_weights)
    assert model_images == [] and moved.counts["changed"] == 60 and moved.reused == moved.processed
    v2 = open_catalog(str(tmp_path / "cat"))
    assert v2.manifest.version == 2
    assert_same_rows_and_vectors(v1, v2)


def test_a_multipart_copy_to_a_new_prefix_costs_no_model_pass(new_bucket, s3, moto_endpoint, resnet18_weights,
                                                              model_images):
    """On S3: objects copied to a new prefix by a multipart copy (a new ETag, with
    `-1`), catalogued seeded from the first catalogue."""
    bucket = new_bucket()
    samples = generate_samples(24, seed=85, broken=False)
    write_samples(S3Store(bucket, "photos", endpoint_url=moto_endpoint), samples)
    run_small(f"s3://{bucket}/photos", f"s3://{bucket}/cat-a", resnet18_weights, moto_endpoint)
    multipart = TransferConfig(multipart_threshold=1, multipart_chunksize=5 * 2**20)
    for s in samples:
        s3.copy({"Bucket": bucket, "Key": f"photos/{s.key}"}, bucket, f"copied/{s.key}", Config=multipart)
    head = s3.head_object(Bucket=bucket, Key=f"copied/{samples[0].key}")
    assert head["ETag"].strip('"').endswith("-1"), head["ETag"]  # not the MD5 the first upload had
    model_images.clear()
    second = run_small(f"s3://{bucket}/copied", f"s3://{bucket}/cat-b", resnet18_weights, moto_endpoint,
                       seed=f"s3://{bucket}/cat-a")
    assert model_images == [] and second.reused == second.processed == 24
    assert_same_rows_and_vectors(open_catalog(f"s3://{bucket}/cat-a", endpoint_url=moto_endpoint),
                                 open_catalog(f"s3://{bucket}/cat-b", endpoint_url=moto_endpoint))


def test_identical_files_within_a_run_are_embedded_once(tmp_path, resnet18_weights, model_images):
    """1,000 objects holding 100 distinct contents: 100 images through the model,
    1,000 rows each under its own key with its content's vector; search and
    duplicates see them as the exact duplicates they are."""
    store = LocalStore(tmp_path / "src", create=True)
    rng = np.random.default_rng(86)
    photos = [encode(make_product_photo(rng, (160, 120)), "JPEG") for _ in range(100)]
    for i in range(1000):
        store.put(f"sku-{i:04d}.jpg", photos[i % 100])
    summary = run_small(tmp_path / "src", tmp_path / "out", resnet18_weights, batch_size=32, shard_size=2000)
    assert sum(model_images) == 100
    assert summary.processed == 1000 and summary.reused == 900
    cat = open_catalog(str(tmp_path / "out"))
    images = cat.images.set_index("key")
    assert len(images) == 1000 and images["image_id"].is_unique
    ids, vectors = cat.embeddings()
    by_id = dict(zip(ids.tolist(), vectors, strict=True))
    for i in range(100, 1000, 97):
        original, copy = images.loc[f"sku-{i % 100:04d}.jpg"], images.loc[f"sku-{i:04d}.jpg"]
        assert copy["content_sha256"] == original["content_sha256"] == hashlib.sha256(photos[i % 100]).hexdigest()
        np.testing.assert_array_equal(by_id[copy["image_id"]], by_id[original["image_id"]])
    hits = similar_images(cat, key="sku-0007.jpg", k=9)
    assert set(hits["key"]) == {f"sku-{i:04d}.jpg" for i in range(107, 1000, 100)}
    assert (hits["score"] > 0.9999).all()
    groups = find_duplicates(cat, threshold=0.9999, write=False).groups
    assert groups.groupby("group_id")["key"].count().eq(10).all() and groups["group_id"].nunique() == 100


def test_status_counts_rows_written_before_they_carried_a_sha256(tmp_path, resnet18_weights):
    """A catalogue written before rows carried their bytes' hash is simulated by
    rewriting its one images part without the column (manifest record updated):
    status says how many rows lack it, and a night that changes objects gives
    their new rows one."""
    store = LocalStore(tmp_path / "src", create=True)
    write_samples(store, generate_samples(8, seed=87, broken=False, document_fraction=0.0))
    run_small(tmp_path / "src", tmp_path / "out", resnet18_weights)
    out = LocalStore(tmp_path / "out")
    cat = open_catalog(str(tmp_path / "out"))
    (part,) = cat.manifest.images
    old = pq.read_table(io.BytesIO(out.get(part))).drop_columns(["content_sha256"])
    data = tables.to_parquet_bytes(old)
    out.put(part, data)
    manifest_key = cat.manifest_key
    raw = json.loads(out.get(manifest_key))
    raw["files"][part] = {"size": FileRecord.of(data).size, "sha256": FileRecord.of(data).sha256}
    out.put(manifest_key, json.dumps(raw).encode())

    code, text = invoke("status", "--catalog", tmp_path / "out", "--json")
    assert code == 0 and json.loads(text)["rows_without_content_sha256"] == 8, text
    rng = np.random.default_rng(88)
    changed = sorted(store.list(), key=lambda o: o.key)[:3]
    for o in changed:
        store.put(o.key, encode(make_product_photo(rng, (320, 240)), "JPEG"))
    run_small(tmp_path / "src", tmp_path / "out", resnet18_weights)
    code, text = invoke("status", "--catalog", tmp_path / "out", "--json")
    assert json.loads(text)["rows_without_content_sha256"] == 5
    code, text = invoke("status", "--catalog", tmp_path / "out")
    assert "5 rows were written before rows carried their bytes' sha256" in " ".join(text.split())


def test_a_seed_of_another_model_is_refused_before_any_work(tmp_path, resnet18_weights):
    from models.weights import save_random_weights

    write_samples(LocalStore(tmp_path / "src", create=True), generate_samples(4, seed=89, broken=False))
    run_small(tmp_path / "src", tmp_path / "cat-a", resnet18_weights)
    other = tmp_path / "other.pth"
    save_random_weights("resnet18", 5, other)
    code, text = invoke("run", "--source", tmp_path / "src", "--output", tmp_path / "cat-b", "--model", "resnet18",
                        "--weights", other, "--seed", tmp_path / "cat-a")
    assert code == 2 and "its vectors cannot be reused" in " ".join(text.split()), text
    assert not (tmp_path / "cat-b" / "CURRENT").exists()


def test_a_run_of_thousands_of_objects_from_the_command_line(tmp_path, resnet18_weights, model_images):
    """The CLI plans first and hands its plan to the flow by token: a plan of 3,000
    objects is well past the 512 KB Prefect accepts as a flow run's parameters (it
    was one, and a run of 5,000 objects was refused). The 3,000 objects hold one
    photo's bytes under their own keys: one image through the model a shard."""
    store = LocalStore(tmp_path / "src", create=True)
    photo = encode(make_product_photo(np.random.default_rng(90), (120, 90)), "JPEG")
    for i in range(3000):
        store.put(f"a/very/long/prefix/of/keys/{i:06d}-product-photo-with-a-long-name.jpg", photo)
    code, text = invoke("run", "--source", tmp_path / "src", "--output", tmp_path / "out", "--model", "resnet18",
                        "--weights", resnet18_weights, "--compile", "off", "--json")
    assert code == 0, text[-3000:]
    summary = json.loads(text[text.index("{"):])
    # bytes are embedded once a shard (two shards of up to 2,000 here)
    assert summary["status"] == "committed" and summary["processed"] == 3000 and summary["shards"] == 2
    assert summary["reused"] == 3000 - 2 and sum(model_images) == 2
