"""The vertical slice end to end: a real Prefect flow over a local folder and
over moto's S3 server, real resnet18 with seeded random weights from a file,
real FAISS. The same test body runs on both kinds of storage."""

from __future__ import annotations

import uuid

import boto3
import numpy as np
import pandas as pd
import pytest

from flows.search import similar_images
from tasks.catalog.reader import Catalog
from tasks.sample_data import reencoded_copy, write_samples
from tasks.storage import LocalStore, S3Store, cached_store
from tests.helpers import run_flow

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(params=["local", "s3"])
def roots(request, tmp_path):
    """(source URL, output URL, endpoint) on local folders or on two S3 buckets."""
    if request.param == "local":
        LocalStore(tmp_path / "src", create=True)
        return str(tmp_path / "src"), str(tmp_path / "out"), None
    endpoint = request.getfixturevalue("moto_endpoint")
    make = request.getfixturevalue("new_bucket")
    return f"s3://{make()}/incoming/photos", f"s3://{make()}/catalog", endpoint


def source_store(url, endpoint):
    if url.startswith("s3://"):
        bucket, _, prefix = url[5:].partition("/")
        return S3Store(bucket, prefix, endpoint_url=endpoint)
    return LocalStore(url)


def catalogue_samples(roots, samples, weights):
    source, output, endpoint = roots
    write_samples(source_store(source, endpoint), samples)
    summary = run_flow(source=source, output=output, model="resnet18", weights=str(weights),
                             batch_size=16, shard_size=20, endpoint_url=endpoint)
    cat = Catalog.open(cached_store(output, endpoint))
    return summary, cat, roots


@pytest.fixture
def catalogued(roots, samples, resnet18_weights):
    """A catalogue of its own, for a test that changes it."""
    return catalogue_samples(roots, samples, resnet18_weights)


@pytest.fixture(scope="module", params=["local", "s3"])
def shared(request, tmp_path_factory, samples, resnet18_weights):
    """One catalogue a store kind for the tests that only read it (built once,
    not once a test: 9 s each on S3)."""
    if request.param == "local":
        root = tmp_path_factory.mktemp("e2e")
        LocalStore(root / "src", create=True)
        roots = str(root / "src"), str(root / "out"), None
    else:
        endpoint = request.getfixturevalue("moto_endpoint")
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        buckets = [f"bs-e2e-shared-{side}-{uuid.uuid4().hex[:8]}" for side in ("src", "out")]
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        roots = f"s3://{buckets[0]}/incoming/photos", f"s3://{buckets[1]}/catalog", endpoint
    return catalogue_samples(roots, samples, resnet18_weights)


def test_every_good_image_has_one_row_and_one_vector(shared, samples):
    summary, cat, _ = shared
    good = sorted(s.key for s in samples if s.kind != "broken")
    images = cat.images
    assert summary.status == "committed" and cat.manifest.version == 1
    assert sorted(images["key"]) == good
    assert images["image_id"].is_unique
    assert cat.index.ntotal == len(images) == len(good)
    ids, vectors = cat.embeddings()
    np.testing.assert_array_equal(ids, images["image_id"].to_numpy())
    assert vectors.shape == (len(good), 512)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    # the index holds exactly the table's vectors under the table's ids
    np.testing.assert_allclose(cat.index.reconstruct_batch(ids), vectors, atol=1e-6)
    row = images.iloc[0]
    assert row["model"] == "resnet18" and row["weights_sha256"] == cat.manifest.weights_sha256
    assert len(row["class_ids"]) == 5 and row["top_class"] == row["class_labels"][0]
    assert row["width"] > 0 and row["height"] > 0


def test_broken_files_land_in_failures_and_the_rest_is_processed(shared):
    summary, cat, _ = shared
    failures = cat.failures.set_index("key")
    assert set(failures.index) == {"broken/truncated.jpg", "broken/empty.jpg", "broken/notes.jpg"}
    assert failures.loc["broken/truncated.jpg", "error_type"] == "truncated"
    assert failures.loc["broken/empty.jpg", "error_type"] == "empty"
    assert failures.loc["broken/notes.jpg", "error_type"] == "not_an_image"
    assert (failures["stage"] == "decode").all() and (failures["attempts"] == 1).all()
    assert summary.failed == 3 and summary.processed == 50


def test_image_ids_are_stable_for_a_key(shared, resnet18_weights, tmp_path):
    _, cat, (source, _, endpoint) = shared
    other = run_flow(source=source, output=str(tmp_path / "second"), model="resnet18",
                           weights=str(resnet18_weights), endpoint_url=endpoint)
    again = Catalog.open(LocalStore(tmp_path / "second"))
    assert other.version == 1
    pd.testing.assert_series_equal(cat.images.set_index("key")["image_id"],
                                   again.images.set_index("key")["image_id"])


def test_search_by_key_leaves_itself_out_unless_asked(shared):
    _, cat, _ = shared
    key = cat.images["key"].iloc[7]
    result = similar_images(cat, key=key, k=5)
    assert list(result.columns) == ["rank", "key", "page", "score", "top_class", "category", "image_id"]
    assert key not in set(result["key"]) and list(result["rank"]) == [1, 2, 3, 4, 5]
    assert len(result) == 5 and result["score"].is_monotonic_decreasing
    with_self = similar_images(cat, key=key, k=5, include_self=True)
    assert with_self.iloc[0]["key"] == key and with_self.iloc[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert list(with_self["key"][1:]) == list(result["key"][:4])  # the same neighbours, one place down


def test_a_catalogue_written_before_pages_existed_still_searches(catalogued):
    """Images tables written before documents had pages have no `page` column
    (and their manifests, written before checksums, no file records; and before
    parts, format 1, one snapshot a table)."""
    import json

    from tasks.catalog import tables

    _, cat, _ = catalogued
    (snapshot,) = cat.manifest.images
    old = tables.read_parquet_bytes(cat.store.get(snapshot)).drop_columns(["page"])
    cat.store.put(snapshot, tables.to_parquet_bytes(old))
    manifest = json.loads(cat.store.get(cat.manifest_key))
    del manifest["files"]
    for field in ("images_deletes", "failures_deletes", "index_delta", "index_removed", "index_truth"):
        del manifest[field]
    manifest |= {"format": 1, "images": snapshot, "failures": manifest["failures"][0]}
    cat.store.put(cat.manifest_key, json.dumps(manifest).encode())
    reopened = Catalog.open(cat.store)
    key = reopened.images["key"].iloc[3]
    best = similar_images(reopened, key=key, k=2, include_self=True).iloc[0]
    assert (best["key"], best["page"]) == (key, 1)


def test_reencoded_resized_copy_finds_its_original(shared, samples):
    _, cat, _ = shared
    photos = [s for s in samples if s.kind == "product"][:4]
    for original in photos:
        copy = reencoded_copy(original.data, scale=0.7, quality=75)
        result = similar_images(cat, image=copy, k=3)
        assert original.key in result["key"].tolist(), (original.key, result)
