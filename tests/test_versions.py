"""The three writers of versions (a run, `categories apply`, rollback) share one
builder, one commit and one key layout: a crash of any of them leaves the live
version whole, a race between them has one winner and a loser that commits
nothing (exit 3), and every key any of them writes is one the layout names."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from flows import nightly
from tasks.catalog import layout, versions
from tasks.catalog.errors import ConcurrentCommitError
from tasks.catalog.gc import collect_garbage
from tasks.catalog.history import list_versions
from tasks.catalog.leases import LEASE_TTL_S
from tasks.catalog.reader import Catalog, verify_version
from tasks.catalog.versions import rollback
from tasks.categories.apply import fit_from_catalog
from tasks.categories.labels import Label, save_labels
from tasks.categories.store import active_categorizer
from tasks.sample_data import generate_samples, write_samples
from tasks.search.thumbnails import cached_thumbnail
from tasks.storage import LocalStore
from tests.helpers import invoke, run_flow
from tests.test_nightly import assert_exactly_once, subprocess_env

pytestmark = pytest.mark.usefixtures("prefect_harness")
runner = CliRunner()
WRITERS = ("run", "apply", "rollback", "compact")


@dataclass
class Roots:
    src: Path
    out: Path
    weights: Path

    @property
    def store(self) -> LocalStore:
        return LocalStore(self.out)

    def live(self) -> Catalog:
        return Catalog.open(self.store)

    def command(self, writer: str) -> list[str]:
        """The `batchsight` arguments that make the next version with `writer`."""
        if writer == "run":
            return ["run", "--source", str(self.src), "--output", str(self.out), "--model", "resnet18",
                    "--weights", str(self.weights), "--batch-size", "8", "--shard-size", "6"]
        if writer == "apply":
            return ["categories", "apply", "--catalog", str(self.out)]
        if writer == "compact":
            return ["compact", "--catalog", str(self.out)]
        return ["rollback", "--catalog", str(self.out), "--to", "1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, resnet18_weights) -> Roots:
    """Version 1 of 12 images, version 2 with one deleted and one added, and an
    active categoriser (not yet applied): each writer has something to do."""
    root = tmp_path_factory.mktemp("versions")
    src = LocalStore(root / "src", create=True)
    samples = generate_samples(14, seed=61, broken=False)
    write_samples(src, samples[:12])
    roots = Roots(root / "src", root / "out", resnet18_weights)
    run_flow(source=str(roots.src), output=str(roots.out), model="resnet18", weights=str(resnet18_weights))
    src.delete(samples[0].key)
    write_samples(src, samples[12:13])
    run_flow(source=str(roots.src), output=str(roots.out), model="resnet18", weights=str(resnet18_weights))
    keys = sorted(roots.live().images["key"])
    labels = pd.DataFrame({"key": keys, "label": ["left" if i % 2 else "right" for i in range(len(keys))]})
    fit_from_catalog(str(roots.out), labels)
    return roots


@pytest.fixture
def roots(base, tmp_path) -> Roots:
    """A private copy of the base catalogue (and its source, with one new image),
    so each test may crash, race and collect garbage in it."""
    copy = Roots(tmp_path / "src", tmp_path / "out", base.weights)
    shutil.copytree(base.src, copy.src)  # copy2 keeps mtimes, so local ETags are unchanged
    shutil.copytree(base.out, copy.out)
    write_samples(LocalStore(copy.src), [generate_samples(14, seed=61, broken=False)[13]])
    return copy




def snapshot(c: Catalog) -> tuple[str, pd.DataFrame, list[str]]:
    return c.manifest_key, c.images.copy(), sorted(c.manifest.named_files)


def assert_whole(c: Catalog) -> None:
    """Every file the version names is there and unaltered, and its rows, vectors and index agree."""
    report = verify_version(c.store, c.manifest)
    assert report.problems == [], report.problems
    assert_exactly_once(c, set(c.images["key"]))


def expected_after(writer: str, roots: Roots, before: Catalog) -> set[str]:
    if writer == "rollback":
        return set(Catalog.open(roots.store, version=1).images["key"])
    if writer == "run":
        return set(before.images["key"]) | {generate_samples(14, seed=61, broken=False)[13].key}
    return set(before.images["key"])


# Crashes: SIGKILL at the builder's last write, and between the manifest and CURRENT


@pytest.mark.parametrize("writer, crash_at", [  # runs are killed at before-commit (and earlier) in test_nightly.py
    ("run", "after-version-files"), ("apply", "after-version-files"), ("apply", "before-commit"),
    ("rollback", "after-version-files"), ("rollback", "before-commit"),
    ("compact", "after-index-write"), ("compact", "before-commit")])
def test_a_writer_killed_mid_version_leaves_the_live_version_whole(roots, writer, crash_at):
    before = roots.live()
    live_key, live_rows, live_files = snapshot(before)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *roots.command(writer)], capture_output=True,
                          text=True, env=subprocess_env(BATCHSIGHT_CRASH_AT=crash_at), timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    after = roots.live()  # a reader following CURRENT sees the version it saw before, whole
    assert snapshot(after)[0] == live_key and snapshot(after)[2] == live_files
    pd.testing.assert_frame_equal(after.images, live_rows)
    assert_whole(after)
    leases = [o.key for o in roots.store.list(layout.LEASES)]
    assert len(leases) == 1, leases  # the killed writer's, still fresh
    killed = layout.lease_run_id(leases[0])
    if crash_at == "before-commit":  # its manifest was written; CURRENT never moved to it
        assert any(killed in o.key for o in roots.store.list(layout.MANIFESTS))

    code, text = invoke(*roots.command(writer))  # the same command again
    assert code == 0, text
    done = roots.live()
    assert done.manifest.version == before.manifest.version + 1 and killed not in done.manifest_key
    assert set(done.images["key"]) == expected_after(writer, roots, before)
    assert_whole(done)

    expired = time.time() + LEASE_TTL_S + 1  # once its lease runs out, the killed writer's files go
    report = collect_garbage(roots.store, min_age_s=0, now=expired)
    assert report.deleted and all(killed in key for key in report.deleted), report.deleted
    assert_whole(roots.live())


# Races: another writer commits while one is building; the loser commits nothing


WINNER = {"run": "rollback", "apply": "rollback", "rollback": "apply", "compact": "rollback"}


def commit_from_elsewhere(roots: Roots, writer: str) -> None:
    """Another process's writer, on its own store object: a rollback or an apply."""
    store = LocalStore(roots.out)
    if writer == "rollback":
        rollback(store, 1)
    else:
        from tasks.categories.apply import apply_to_catalog

        apply_to_catalog(Catalog.open(store), *active_categorizer(store))


@pytest.mark.parametrize("loser", WRITERS)
def test_a_writer_that_loses_the_race_commits_nothing_and_exits_3(roots, loser, monkeypatch):
    before = roots.live()
    winner = WINNER[loser]
    fired = []
    original = versions.crash_point

    def interleave(name: str) -> None:
        # the loser has written its files and holds the old CURRENT's ETag: the
        # other writer commits now, before the loser's manifest and CURRENT put
        if name == "after-version-files" and not fired:
            fired.append(name)
            commit_from_elsewhere(roots, winner)
        original(name)

    monkeypatch.setattr(versions, "crash_point", interleave)
    code, text = invoke(*roots.command(loser))
    assert fired and code == 3, text
    assert "another run committed" in text and "committed nothing" in text, text

    live = roots.live()  # the winner's version, whole
    assert live.manifest.version == before.manifest.version + 1
    assert live.manifest.run_id.startswith({"rollback": "rollback-", "apply": "categorize-"}[winner])
    assert set(live.images["key"]) == expected_after(winner, roots, before)
    assert_whole(live)
    if winner == "apply":
        assert live.images["category"].notna().all()
    else:
        assert live.manifest.rolled_back_from == 1

    monkeypatch.setattr(versions, "crash_point", original)
    code, text = invoke(*roots.command(loser))  # the loser, run again, builds on the winner's version
    assert code == 0, text
    final = roots.live()
    assert final.manifest.version == before.manifest.version + 2 and final.manifest.parent == live.manifest_key
    assert_whole(final)
    report = collect_garbage(roots.store, min_age_s=0)  # the loser's files are garbage, nothing live is
    assert all(k not in final.manifest.named_files and k not in live.manifest.named_files for k in report.deleted)
    assert_whole(roots.live())


def test_an_apply_begun_on_a_version_no_longer_live_is_refused(roots):
    from tasks.categories.apply import apply_to_catalog

    stale = roots.live()
    rollback(roots.store, 1)
    with pytest.raises(ConcurrentCommitError, match="moved on from version 2.*nothing was committed"):
        apply_to_catalog(stale, *active_categorizer(roots.store))
    assert roots.live().manifest.rolled_back_from == 1


# One builder: what each writer writes, and what it shares with the version before


def test_each_writer_makes_its_version_through_the_one_builder_and_commit(roots, monkeypatch):
    calls = []
    build, commit = versions.build_version, versions.commit_manifest
    monkeypatch.setattr(versions, "build_version", lambda *a, **kw: calls.append("build") or build(*a, **kw))
    monkeypatch.setattr(versions, "commit_manifest", lambda *a, **kw: calls.append("commit") or commit(*a, **kw))
    monkeypatch.setattr(nightly, "commit_manifest", lambda *a, **kw: calls.append("commit") or commit(*a, **kw))
    for writer in WRITERS:
        calls.clear()
        code, text = invoke(*roots.command(writer))
        assert code == 0, text
        assert calls == ["build", "commit"], (writer, calls)


def test_apply_shares_vectors_and_index_and_rollback_writes_no_table(roots):
    v2 = roots.live().manifest
    code, text = invoke(*roots.command("apply"))
    assert code == 0, text
    applied = roots.live().manifest
    assert applied.images != v2.images and applied.categorizer == active_categorizer(roots.store)[1]
    assert (applied.index, applied.embeddings, applied.failures) == (v2.index, v2.embeddings, v2.failures)
    assert applied.files[applied.index] == v2.files[v2.index]

    tables_before = {o.key for o in roots.store.list("tables/")} | {o.key for o in roots.store.list(layout.INDEX)}
    code, text = invoke(*roots.command("rollback"))
    assert code == 0, text
    restored, v1 = roots.live().manifest, Catalog.open(roots.store, version=1).manifest
    assert restored.named_files == v1.named_files and restored.files == v1.files
    assert (restored.version, restored.rolled_back_from, restored.categorizer) == (4, 1, v1.categorizer)
    assert {o.key for o in roots.store.list("tables/")} | {o.key for o in roots.store.list(layout.INDEX)} == \
        tables_before  # a rollback writes only its manifest


# The layout names every key


def test_every_key_the_catalogue_writes_is_named_by_the_layout(roots):
    for writer in WRITERS:
        code, text = invoke(*roots.command(writer))
        assert code == 0, text
    for args in (["duplicates", "--catalog", str(roots.out), "--threshold", "0.99"],
                 ["categories", "suggest", "--catalog", str(roots.out), "--k", "2"]):
        code, text = invoke(*args)
        assert code == 0, text
    live = roots.live()
    row = live.images.iloc[0]
    save_labels(roots.store, [Label(int(row["image_id"]), row["key"], 1, "left")], labeller="t",
                catalog_version=live.manifest.version)
    cached_thumbnail(roots.store, lambda: LocalStore(roots.src), row)

    keys = [o.key for o in roots.store.list()]
    assert not [k for k in keys if layout.gc_policy(k) is None], "keys outside the layout"
    policies = {layout.gc_policy(k) for k in keys}
    assert policies == {layout.Gc.VERSION_FILE, layout.Gc.VERSION_REPORT, layout.Gc.NEVER}, policies
    for m in list_versions(roots.store):  # a version only names files gc knows to keep with it
        assert {layout.gc_policy(k) for k in m.named_files} == {layout.Gc.VERSION_FILE}
    assert collect_garbage(roots.store, min_age_s=0).deleted == []  # everything is live or kept
    assert_whole(roots.live())
