"""Near-duplicate groups: range search on the index, connected components with
stable group ids, on synthetic vectors and end to end on a catalogued folder
holding re-encoded, resized and cropped copies of some photos."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.search import find_duplicates
from tasks.catalog import tables
from tasks.catalog.reader import Catalog
from tasks.sample_data import generate_samples, reencoded_copy, write_samples
from tasks.search import duplicates as dups
from tasks.search import index as faiss_index
from tasks.search import index_choice, index_recall
from tasks.storage import LocalStore
from tests.helpers import run_flow


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """The machine is shared; FAISS would otherwise take every core."""
    with faiss_index.faiss_threads(1):
        yield


def test_groups_are_connected_components_named_by_their_smallest_id():
    pairs = dups.SimilarPairs(a=np.array([9, 5, 20, 3, 12]), b=np.array([12, 9, 21, 40, 30]),
                              score=np.array([0.97, 0.99, 0.96, 0.98, 0.95], np.float32))
    groups = dups.group_pairs(pairs)
    assert groups.groupby("group_id")["image_id"].apply(list).to_dict() == {
        3: [3, 40], 5: [5, 9, 12, 30], 20: [20, 21]}  # 5-9-12-30 is one chain
    assert groups.set_index("image_id")["group_size"].to_dict() == {3: 2, 40: 2, 5: 4, 9: 4, 12: 4, 30: 4, 20: 2, 21: 2}
    assert groups.set_index("image_id").loc[9, "best_score"] == pytest.approx(0.99)
    assert dups.group_pairs(dups.SimilarPairs(np.empty(0, np.int64), np.empty(0, np.int64),
                                              np.empty(0, np.float32))).empty


def planted_duplicates(seed: int = 0):
    """2,000 distinct 32-d unit vectors, and 2 noisy copies of each of the first 30."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((2000, 32)).astype(np.float32)
    copies = np.repeat(base[:30], 2, axis=0) + 0.05 * rng.standard_normal((60, 32)).astype(np.float32)
    vectors = np.concatenate([base, copies])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = rng.choice(np.arange(1_000_000, 9_000_000, dtype=np.int64), len(vectors), replace=False)
    expected = {frozenset([ids[i], ids[2000 + 2 * i], ids[2001 + 2 * i]]) for i in range(30)}
    return ids, vectors, expected


@pytest.mark.parametrize("kind", ["flat", "ivf-flat"])
def test_planted_copies_form_their_groups_and_nothing_else_does(kind):
    ids, vectors, expected = planted_duplicates()
    blocks = [(ids[i:i + 500], vectors[i:i + 500]) for i in range(0, len(ids), 500)]
    choice = index_choice.flat_choice(len(ids), 32) if kind == "flat" else index_choice.ivf_flat_choice(len(ids), 32)
    index = faiss_index.build_index(choice, 32, vectors, blocks)
    nprobe = None
    if kind == "ivf-flat":
        nprobe = index_recall.measure_recall(index, vectors[:200], ids[:200], blocks, target=0.95).nprobe
    pairs = dups.similar_pairs(index, blocks, 0.9, n_images=len(ids), nprobe=nprobe)
    groups = dups.group_pairs(pairs)
    found = {frozenset(g) for g in groups.groupby("group_id")["image_id"].apply(list)}
    assert found == expected
    smallest = groups.groupby("group_id")["image_id"].min()
    assert (smallest.index == smallest.to_numpy()).all()


def test_a_threshold_that_matches_everything_is_refused():
    ids, vectors, _ = planted_duplicates()
    index = faiss_index.build_index(index_choice.flat_choice(len(ids), 32), 32, None, [(ids, vectors)])
    with pytest.raises(ValueError, match="that is similarity, not duplication; use a higher threshold"):
        dups.similar_pairs(index, [(ids, vectors)], -0.5, n_images=len(ids))
    with pytest.raises(ValueError, match=r"threshold is a cosine similarity in \[-1, 1\), not 1.5"):
        dups.similar_pairs(index, [(ids, vectors)], 1.5, n_images=len(ids))


# Seeded random ResNet-18 weights (no pretrained ones can be downloaded here) map
# every image to cosine 0.99+ of every other, so near-identical is a narrow band:
# for these product photos distinct pairs stay below 0.998 and copies above 0.9985.
# With pretrained weights the same test would use about 0.95.
RANDOM_WEIGHTS_THRESHOLD = 0.9982


@pytest.mark.usefixtures("prefect_harness")
def test_reencoded_resized_and_cropped_copies_land_in_one_group(tmp_path, resnet18_weights):
    
    photos = generate_samples(12, seed=5, document_fraction=0.0, broken=False)
    originals = photos[:2]
    copies = {}
    for i, o in enumerate(originals):
        stem = o.key.rsplit(".", 1)[0].replace("photos/", "copies/")
        copies[o.key] = {f"{stem}-small.jpg": reencoded_copy(o.data, scale=0.6, quality=60),
                         f"{stem}-cropped.jpg": reencoded_copy(o.data, scale=0.8, quality=75, crop=0.05)}
    bucket = LocalStore(tmp_path / "bucket", create=True)
    write_samples(bucket, photos)
    for group in copies.values():
        for key, data in group.items():
            bucket.put(key, data)
    out = tmp_path / "catalog"
    run_flow(source=str(tmp_path / "bucket"), output=str(out), model="resnet18", weights=str(resnet18_weights),
                   device="cpu", precision="fp32", batch_size=8)

    result = CliRunner().invoke(app, ["duplicates", "--catalog", str(out), "--threshold",
                                      str(RANDOM_WEIGHTS_THRESHOLD), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    members = pd.DataFrame(report["members"])
    found = {frozenset(g) for g in members.groupby("group_id")["key"].apply(list)}
    assert found == {frozenset([o, *c]) for o, c in copies.items()}  # the other ten photos are in no group

    cat = Catalog.open(LocalStore(out))
    ids = cat.images.set_index("key")["image_id"]
    for group_id, group in members.groupby("group_id"):
        assert group_id == ids[group["key"]].min()  # stable: the smallest image id of the group
    assert report["version"] == 1
    assert report["table"] == f"tables/duplicates/v000001-{cat.manifest.run_id}/threshold-0.9982.parquet"
    table = tables.read_parquet_bytes(cat.store.get(report["table"]))
    assert table.schema.metadata[b"batchsight.manifest"].decode() == cat.manifest_key
    pd.testing.assert_frame_equal(table.to_pandas(), find_duplicates(cat, threshold=RANDOM_WEIGHTS_THRESHOLD,
                                                                     write=False).groups)


def test_duplicates_on_a_missing_catalogue_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["duplicates", "--catalog", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no catalogue at" in result.output
