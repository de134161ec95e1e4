"""Thumbnails made during the run: one part per shard beside its embeddings,
named by each row and listed (with its sha256) by the manifest, served without
reading the originals; older rows get theirs on demand, cached. Real Prefect
flow, real resnet18 (seeded random weights from a file), local folders."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tasks.catalog import layout
from tasks.catalog.errors import CatalogCorrupt
from tasks.catalog.gc import collect_garbage
from tasks.catalog.reader import Catalog
from tasks.sample_data import write_samples
from tasks.search.thumbnails import thumbnail_of
from tasks.shard.thumbnails import THUMBNAIL_SIDE
from tasks.storage import LocalStore, cached_store
from tests.helpers import run_flow

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _no_source():
    raise AssertionError("the original was read: a thumbnail made during the run should have been served")


@pytest.fixture
def catalogued(tmp_path, samples, resnet18_weights):
    source, output = tmp_path / "src", tmp_path / "out"
    write_samples(LocalStore(source, create=True), samples)
    run_flow(source=str(source), output=str(output), model="resnet18", weights=str(resnet18_weights),
                   batch_size=16, shard_size=20)
    return source, output, Catalog.open(cached_store(str(output), None))


def test_every_row_has_a_thumbnail_from_its_run_and_browsing_never_reads_originals(catalogued, samples):
    _, _, cat = catalogued
    images = cat.images
    assert images["thumbnail_part"].notna().all()
    parts = sorted(set(images["thumbnail_part"]))
    assert cat.manifest.thumbnails == parts and len(parts) == len(cat.manifest.embeddings) == 3  # one a shard
    assert all(p.startswith(layout.THUMBNAIL_PARTS) and p in cat.manifest.files for p in parts)
    by_key = {s.key: s for s in samples}
    for _, row in images.iterrows():
        data = thumbnail_of(cat, row, _no_source)
        thumb = Image.open(io.BytesIO(data))
        assert thumb.format == "WEBP" and max(thumb.size) == min(THUMBNAIL_SIDE, max(row["width"], row["height"]))
        assert len(data) < 20_000
        # the picture of this row's object: the same aspect ratio as its page
        assert abs(thumb.width / thumb.height - row["width"] / row["height"]) < 0.05, by_key[row["key"]].key


def test_rows_without_one_are_made_on_demand_and_cached(catalogued):
    source, _, cat = catalogued
    row = cat.images.iloc[0].copy()
    row["thumbnail_part"] = None  # as in a catalogue made before thumbnails were made during runs
    made = thumbnail_of(cat, row, lambda: LocalStore(source))
    assert Image.open(io.BytesIO(made)).format == "WEBP"
    assert cat.store.get(layout.thumbnail_key(int(row["image_id"]), str(row["etag"]))) == made
    assert thumbnail_of(cat, row, _no_source) == made  # the cache now answers


def test_a_damaged_thumbnails_part_names_itself(catalogued):
    _, output, cat = catalogued
    row = cat.images.iloc[0]
    path = output / row["thumbnail_part"]
    path.write_bytes(path.read_bytes()[:-10])
    fresh = Catalog.open(LocalStore(output))  # a new reader: no part kept from before
    with pytest.raises(CatalogCorrupt, match="thumbnails"):
        thumbnail_of(fresh, row, _no_source)


def test_gc_keeps_the_parts_a_retained_version_names_and_collects_the_rest(catalogued, samples, resnet18_weights):
    source, output, cat = catalogued
    first_parts = set(cat.manifest.thumbnails)
    store = LocalStore(source)
    images = cat.images
    for key in set(images.loc[images["thumbnail_part"] == min(first_parts), "key"]):  # a whole shard leaves
        store.delete(key)
    run_flow(source=str(source), output=str(output), model="resnet18", weights=str(resnet18_weights),
                   batch_size=16, shard_size=20, allow_mass_delete=True)
    live = Catalog.open(LocalStore(output))
    still_named = set(live.manifest.thumbnails)
    assert still_named < first_parts  # the part of a shard whose rows all left is no longer listed
    collect_garbage(LocalStore(output), keep_versions=1, min_age_s=0)
    on_disk = {str(p.relative_to(output)) for p in (output / layout.THUMBNAIL_PARTS).rglob("*.parquet")}
    assert on_disk == still_named
    for _, row in live.images.iterrows():
        thumbnail_of(live, row, _no_source)


def test_a_run_without_thumbnails_writes_none_and_the_page_makes_them_on_demand(tmp_path, samples, resnet18_weights):
    source, output = tmp_path / "src", tmp_path / "out"
    write_samples(LocalStore(source, create=True), samples[:12])
    run_flow(source=str(source), output=str(output), model="resnet18", weights=str(resnet18_weights),
                   batch_size=16, thumbnails=False)
    cat = Catalog.open(cached_store(str(output), None))
    assert cat.images["thumbnail_part"].isna().all() and cat.manifest.thumbnails == []
    assert not (output / layout.THUMBNAIL_PARTS).exists()
    row = cat.images.iloc[0]
    assert Image.open(io.BytesIO(thumbnail_of(cat, row, lambda: LocalStore(source)))).format == "WEBP"
