"""A quiet night costs what changed (issue 14): rows as parts plus deletes, the
index as a main index plus a delta segment and removed ids, recall from a truth
kept with the version, and compaction. Real FAISS, real Parquet, the real
builder and commit; vectors are synthetic (no model)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.catalog.errors import CatalogCorrupt
from tasks.catalog.gc import collect_garbage
from tasks.catalog.reader import VERIFIED_DIR, Catalog, verify_version
from tasks.catalog.tables import image_id_for
from tasks.catalog.versions import compact, rollback
from tasks.search import index as faiss_index
from tasks.search import index_choice, index_recall
from tasks.synthetic_vectors import ClusteredVectors
from tests.test_index import SyntheticCatalogue, brute_force


@pytest.fixture(autouse=True)
def one_faiss_thread():
    with faiss_index.faiss_threads(1):
        yield


def live_vectors(cat: Catalog) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of the live rows, read from the embeddings parts (not the index)."""
    return cat.embeddings()


def exact_search(cat: Catalog, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids, vectors = live_vectors(cat)
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def nights(dim: int, settings: index_choice.IndexSettings, root, *, n: int = 600, rounds: int = 3, seed: int = 3):
    """A catalogue of `n` images, then `rounds` nights each adding, changing and deleting some."""
    pool = ClusteredVectors(n + 100 * rounds, dim, clusters=12, seed=seed)
    _, vectors = pool.all()
    keys = [f"photos/item-{i:05d}.jpg" for i in range(pool.n)]
    rng = np.random.default_rng(seed)
    sc = SyntheticCatalogue(root, dim, settings)
    sc.commit(keys[:n], vectors[:n])
    live = list(keys[:n])
    for night in range(rounds):
        fresh = keys[n + 100 * night: n + 100 * (night + 1)]
        picked = rng.choice(len(live), 40, replace=False)
        changed, deleted = [live[i] for i in picked[:20]], [live[i] for i in picked[20:]]
        new_vectors = np.concatenate([ClusteredVectors(20, dim, clusters=12, seed=100 + night).all()[1],
                                      vectors[n + 100 * night: n + 100 * (night + 1)]])
        sc.commit(changed + fresh, new_vectors, changed=changed, deleted=deleted)
        live = [k for k in live if k not in set(deleted)] + fresh
    return sc, set(live)


def test_quiet_nights_append_parts_and_segments_and_search_answers_as_exact_search(tmp_path):
    dim = 16
    sc, live = nights(dim, index_choice.IndexSettings(), tmp_path / "cat")
    cat = sc.catalog()
    m = cat.manifest
    # rows: the first version's part plus one part a night, the rows that left named in the deletes
    assert len(m.images) == 4 and m.images_deletes is not None
    assert set(cat.images["key"]) == live and cat.images["image_id"].is_unique and len(cat.images) == len(live)
    night_part = pq.read_table(sc.store._path(m.images[-1]))
    assert night_part.num_rows == 120  # 20 changed + 100 new: the night's rows, not the catalogue's
    deletes = pq.read_table(sc.store._path(m.images_deletes))
    assert deletes.num_rows == 3 * 40 and deletes.column_names == ["image_id", "run_id"]
    # the index: the first version's main index, a delta of every vector added since, the ids that left it
    first = Catalog.open(sc.store, version=1).manifest
    assert m.index == first.index and m.index_delta and m.index_removed
    assert cat.index.ntotal == len(cat.images) == m.counts["vectors"]
    assert m.counts["index_main"] - m.counts["index_removed"] + m.counts["index_delta"] == len(live)
    ids, vectors = live_vectors(cat)
    np.testing.assert_allclose(cat.index.reconstruct_batch(ids), vectors, atol=1e-6)

    # searches answer exactly as exact search over the live vectors: same ids, same scores
    queries = vectors[::7]
    scores, found = faiss_index.search(cat.index, queries, 10)
    truth_scores, truth_ids = exact_search(cat, queries, 10)
    np.testing.assert_allclose(scores, truth_scores, atol=1e-5)
    assert (found == truth_ids).mean() > 0.999  # ties in score may swap places
    # a filter applies to both segments; removed vectors never come back
    allowed = ids[::3]
    _, found = faiss_index.search(cat.index, queries, 5, allowed_ids=allowed)
    assert set(found[found >= 0].ravel()) <= set(allowed.tolist())
    # allowing every live id (changed ones included, whose old vectors the main index still
    # holds) keeps the removed ones out: the answer is the unfiltered one, no id twice
    every_scores, every_found = faiss_index.search(cat.index, queries, 10, allowed_ids=ids)
    np.testing.assert_allclose(every_scores, truth_scores, atol=1e-5)
    assert all(len(set(row.tolist())) == len(row) for row in every_found)
    gone_ids = set(Catalog.open(sc.store, version=1).images["image_id"]) - set(ids.tolist())
    everything = faiss_index.search(cat.index, vectors, 20)[1]
    assert not gone_ids & set(everything.ravel().tolist())
    # range search (near-duplicates) finds the same pairs as brute force
    lims, range_scores, range_ids = faiss_index.range_search(cat.index, queries, 0.9)
    exact = queries @ vectors.T
    for q in range(len(queries)):
        assert set(range_ids[lims[q]:lims[q + 1]].tolist()) == set(ids[exact[q] > 0.9].tolist())


def test_compaction_keeps_every_answer_and_folds_everything_into_one(tmp_path):
    dim = 16
    sc, live = nights(dim, index_choice.IndexSettings(), tmp_path / "cat")
    before = sc.catalog()
    ids, vectors = live_vectors(before)
    queries = vectors[::5]
    answer = faiss_index.search(before.index, queries, 10)

    status = CliRunner().invoke(app, ["status", "--catalog", str(tmp_path / "cat"), "--json"])
    index = json.loads(status.output)["index"]
    assert (index["delta_vectors"], index["removed_from_main"]) == \
        (before.manifest.counts["index_delta"], before.manifest.counts["index_removed"]) and index["delta_vectors"]

    result = CliRunner().invoke(app, ["compact", "--catalog", str(tmp_path / "cat")])
    assert result.exit_code == 0, result.output
    after = sc.catalog()
    m = after.manifest
    assert m.version == before.manifest.version + 1
    assert len(m.images) == 1 and m.images_deletes is None and m.index_delta is None and m.index_removed is None
    assert (m.counts["index_delta"], m.counts["index_removed"], m.counts["index_main"]) == (0, 0, len(live))
    pd.testing.assert_frame_equal(after.images, before.images)
    np.testing.assert_allclose(faiss_index.search(after.index, queries, 10)[0], answer[0], atol=1e-5)
    assert (faiss_index.search(after.index, queries, 10)[1] == answer[1]).mean() > 0.999

    # the parts only the older versions name stay while those versions are kept
    report = collect_garbage(sc.store, min_age_s=0)
    assert not report.deleted
    report = collect_garbage(sc.store, min_age_s=0, keep_versions=1)
    assert set(report.deleted) >= set(before.manifest.images) - set(m.images)
    assert sc.catalog().images.equals(after.images)


def test_a_night_past_the_threshold_compacts_on_its_own_and_rollback_restores_segments(tmp_path):
    dim = 16
    sc, _ = nights(dim, index_choice.IndexSettings(compact_min_changes=200, compact_share=0.0), tmp_path / "cat", rounds=2)
    v2, v3 = (Catalog.open(sc.store, version=v).manifest for v in (2, 3))
    assert v2.index_delta is not None and len(v2.images) == 2  # 160 changes: appended
    assert v3.index_delta is None and len(v3.images) == 1 and v3.index != v2.index  # 160 + 160 > 200: compacted
    restored = rollback(sc.store, 2)
    cat = sc.catalog()
    assert restored.version == 4 and (restored.index, restored.index_delta, restored.images) == \
        (v2.index, v2.index_delta, v2.images)
    ids, vectors = live_vectors(cat)
    assert cat.index.ntotal == len(ids) == v2.counts["images"]
    np.testing.assert_allclose(cat.index.reconstruct_batch(ids), vectors, atol=1e-6)


def test_recall_truth_kept_with_the_version_equals_an_exact_pass(tmp_path, caplog):
    """An IVF catalogue: each night's recall is measured against the truth carried
    over (ids that left dropped, new vectors merged in), which must equal exact
    neighbours computed afresh over the live vectors."""
    dim = 24
    settings = index_choice.IndexSettings(flat_max_vectors=500, memory_budget_bytes=1 << 30)
    with caplog.at_level("INFO", logger="tasks.search.index_recall"):
        sc, _ = nights(dim, settings, tmp_path / "cat", n=3000, rounds=3)
    curves = [r.args[-1] for r in caplog.records if r.getMessage().startswith("recall@")]
    cat = sc.catalog()
    m = cat.manifest
    assert m.index_type == "ivf-flat" and m.index_delta and m.index_truth and m.index_recall_queries > 900
    assert m.index_recall_at_10 >= 0.95
    truth = cat.recall_truth()
    ids, vectors = live_vectors(cat)
    fresh = brute_force(vectors, ids, truth.queries, truth.ids.shape[1])
    for row in range(len(truth.query_ids)):
        depth = truth.depth[row]
        assert depth >= 11
        np.testing.assert_array_equal(truth.ids[row, :depth], fresh[row, :depth])
    assert (truth.depth < index_recall.TRUTH_DEPTH).any()  # some lists lost entries to the nights' removals
    # a night starts from the nprobe its base was tuned to: one pass while recall holds
    tuned = [Catalog.open(sc.store, version=v).manifest.index_nprobe for v in range(1, m.version + 1)]
    assert tuned == sorted(tuned) and tuned[0] > 1, tuned
    assert len(curves) == len(tuned) and curves[0][0][0] == 1  # the first version tunes from 1
    assert [curve[0][0] for curve in curves[1:]] == tuned[:-1], (curves, tuned)  # each night from its base's
    report = index_recall.measure_recall_against(cat.index, truth, target=0.95, start_nprobe=m.index_nprobe)
    assert report.curve[0][0] == m.index_nprobe and len(report.curve) == 1 and report.recall_at_10 >= 0.95
    assert index_recall.measure_recall_against(cat.index, truth, target=0.95).curve[0][0] == 1  # a compaction's: from 1


def test_the_main_index_is_hashed_once_and_verify_still_reads_every_byte(tmp_path):
    """A night opens the main index through a memory map after checking its sha256;
    once checked, an unchanged file (same inode, size and mtime) is trusted, so a
    night does not stream gigabytes again. A rewritten file is checked anew, and
    `status --verify` hashes everything, every time."""
    settings = index_choice.IndexSettings(flat_max_vectors=500, memory_budget_bytes=1 << 30)
    sc, _ = nights(16, settings, tmp_path / "cat", n=2000, rounds=1)
    cat = sc.catalog()
    assert cat.manifest.index_type == "ivf-flat"
    path = sc.store._path(cat.manifest.index)
    assert cat.index.ntotal == len(cat.images)
    stamp = sc.store.root / VERIFIED_DIR / cat.manifest.files[cat.manifest.index].sha256
    st = path.stat()
    assert stamp.read_text() == f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns}"

    # a byte flipped in place, times put back: trusted by a night, found by verify
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sc.catalog().index.ntotal == len(cat.images)
    report = verify_version(sc.store, cat.manifest)
    assert len(report.problems) == 1 and cat.manifest.index in report.problems[0]
    # the file changed (its mtime moved): checked again, and refused
    os.utime(path)
    with pytest.raises(CatalogCorrupt, match="sha256 differs"):
        sc.catalog().index
    path.write_bytes(original)
    assert sc.catalog().index.ntotal == len(cat.images)

    # gc drops the stamps of files no kept version names
    assert compact(sc.store, settings).index_type == "ivf-flat"
    assert sc.catalog().index.ntotal == len(cat.images)
    assert len(list(stamp.parent.iterdir())) == 2
    collect_garbage(sc.store, min_age_s=0, keep_versions=1)
    assert [p.name for p in stamp.parent.iterdir()] == [sc.catalog().manifest.files[sc.catalog().manifest.index].sha256]


def readme_recipes() -> list[str]:
    """The README's Python blocks that read a catalogue laid out at `./catalog` by hand."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return [b for b in blocks if 'open("catalog/CURRENT")' in b]


def test_readers_see_one_table_of_live_rows(tmp_path, monkeypatch):
    """`open_catalog(...).images` and the README's recipes (plain pandas over the
    manifest's parts less its deletes; DuckDB's read_parquet over the same list),
    run as written, give the same live rows."""
    sc, live = nights(16, index_choice.IndexSettings(), tmp_path / "catalog", rounds=2)
    cat = sc.catalog()
    assert len(cat.manifest.images) == 3 and cat.manifest.images_deletes
    recipes = readme_recipes()
    assert len(recipes) == 2 and any("duckdb" in r for r in recipes)
    monkeypatch.chdir(tmp_path)
    expected = cat.images.set_index("image_id").sort_index()
    for recipe in recipes:
        scope: dict = {}
        exec(recipe, scope)
        images = scope["images"]
        assert set(images["key"]) == live and len(images) == len(live), recipe
        got = images.set_index("image_id").sort_index()
        assert (got["key"] == expected["key"]).all() and (got["run_id"] == expected["run_id"]).all()
    row = cat.images.set_index("key").loc[sorted(live)[0]]
    assert row["image_id"] == image_id_for(sorted(live)[0])
