"""Document categorisation on generated documents of visibly different kinds,
with a real catalogue (Prefect flow, resnet18 with seeded random weights)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from flows.categorize import apply_categories, fit_categories, suggest_categories
from flows.search import similar_images
from models.categorizer import UNCERTAIN, CategorizerMismatch, fit_categorizer
from models.weights import save_random_weights
from tasks.catalog.reader import open_catalog
from tasks.categories.store import active_categorizer
from tasks.sample_data import encode, make_document, make_product_photo
from tasks.storage import LocalStore
from tests.helpers import run_flow

pytestmark = pytest.mark.usefixtures("prefect_harness")
KINDS = ("invoice", "receipt", "form", "product")


def make(kind: str, rng: np.random.Generator) -> bytes:
    if kind == "product":
        return encode(make_product_photo(rng, (500, 375)), "JPEG")
    return encode(make_document(rng, kind), "JPEG")


def three_page_pdf(rng: np.random.Generator) -> bytes:
    pages = [make_document(rng, k) for k in ("invoice", "form", "receipt")]
    buf = io.BytesIO()
    pages[0].save(buf, "PDF", save_all=True, append_images=pages[1:], resolution=100)
    return buf.getvalue()


@pytest.fixture(scope="module")
def labelled_catalog(tmp_path_factory, resnet18_weights):
    """16 labelled examples of each kind under labelled/<kind>/, 4 unlabelled ones
    of each kind under inbox/, and a 3-page PDF; catalogued once."""
    root = tmp_path_factory.mktemp("cats")
    store = LocalStore(root / "src", create=True)
    rng = np.random.default_rng(101)
    for kind in KINDS:
        for i in range(16):
            store.put(f"labelled/{kind}/{kind}-{i:02d}.jpg", make(kind, rng))
        for i in range(4):
            store.put(f"inbox/{kind}-{i:02d}.jpg", make(kind, rng))
    store.put("inbox/bundle.pdf", three_page_pdf(rng))
    out = str(root / "out")
    run_flow(source=str(root / "src"), output=out, model="resnet18", weights=str(resnet18_weights))
    labels = root / "labels.csv"
    labels.write_text("key,label\n" + "".join(f"labelled/{k}/{k}-{i:02d}.jpg,{k}\n" for k in KINDS for i in range(16)))
    return root, out, labels


def test_a_three_page_pdf_gives_three_rows(labelled_catalog):
    _, out, _ = labelled_catalog
    images = open_catalog(out).images
    pdf = images[images["key"] == "inbox/bundle.pdf"].sort_values("page")
    assert pdf["page"].tolist() == [1, 2, 3]
    assert pdf["image_id"].is_unique
    assert (pdf["height"] > pdf["width"]).all()  # rendered portrait pages


def test_a_pdf_query_finds_the_catalogued_pdf_by_its_first_page(labelled_catalog):
    root, out, _ = labelled_catalog
    query = (root / "src" / "inbox" / "bundle.pdf").read_bytes()
    best = similar_images(open_catalog(out), image=query, k=3).iloc[0]
    assert (best["key"], best["page"]) == ("inbox/bundle.pdf", 1)
    assert best["score"] == pytest.approx(1.0, abs=1e-4)


def test_probe_beats_the_majority_baseline_by_a_wide_margin(labelled_catalog):
    _, out, labels = labelled_catalog
    categorizer, key, embedded_now = fit_categories(out, labels_csv=str(labels))
    report = categorizer.report
    assert embedded_now == 0  # every labelled key was already catalogued: no CNN work
    assert report.n_val == 16 and report.n_train == 48
    assert report.majority_baseline <= 0.25
    assert report.accuracy >= report.majority_baseline + 0.5, report
    assert set(report.per_class) == set(KINDS)
    assert sum(map(sum, report.confusion)) == report.n_val
    assert 0.5 <= categorizer.threshold <= 1.0
    assert active_categorizer(open_catalog(out).store)[1] == key


def test_labels_from_a_prefix_of_folders(labelled_catalog):
    root, out, _ = labelled_catalog
    categorizer, _, embedded_now = fit_categories(out, labels_prefix=str(root / "src" / "labelled"))
    assert embedded_now == 0 and categorizer.labels == sorted(KINDS)


def test_labelled_images_outside_the_catalogue_are_embedded(labelled_catalog, tmp_path):
    _, out, _ = labelled_catalog
    other = LocalStore(tmp_path / "more", create=True)
    rng = np.random.default_rng(7)
    for kind in ("invoice", "receipt"):
        for i in range(6):
            other.put(f"{kind}/{i}.jpg", make(kind, rng))
    categorizer, _, embedded_now = fit_categories(out, labels_prefix=str(tmp_path / "more"))
    assert embedded_now == 12 and categorizer.labels == ["invoice", "receipt"]


def test_ambiguous_inputs_are_uncertain():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32))
    x = np.concatenate([c + 0.3 * rng.normal(size=(20, 32)) for c in centres])
    y = [n for n in ("a", "b", "c") for _ in range(20)]
    probe = fit_categorizer(x, y, model="m", weights_sha256="s")
    names, confidence = probe.predict(centres)
    assert names.tolist() == ["a", "b", "c"] and (confidence >= probe.threshold).all()
    between, conf = probe.predict(np.stack([(centres[0] + centres[1]) / 2, (centres[1] + centres[2]) / 2]))
    assert between.tolist() == [UNCERTAIN, UNCERTAIN], conf


def test_apply_and_nightly_runs_fill_the_category_columns(labelled_catalog, resnet18_weights):
    root, out, labels = labelled_catalog
    fit_categories(out, labels_csv=str(labels))
    report = apply_categories(out)
    images = open_catalog(out).images
    assert report.rows == len(images) and report.rows_per_s > 0
    assert images["category"].notna().all() and images["category_confidence"].between(0, 1).all()
    inbox = images[images["key"].str.startswith("inbox/") & images["key"].str.endswith(".jpg")]
    truth = inbox["key"].str.extract(r"inbox/(\w+)-")[0]
    certain = inbox["category"] != UNCERTAIN
    assert (inbox.loc[certain, "category"] == truth[certain]).mean() >= 0.75

    rng = np.random.default_rng(55)
    LocalStore(root / "src").put("inbox/late-receipt.jpg", make("receipt", rng))
    summary = run_flow(source=str(root / "src"), output=out, model="resnet18", weights=str(resnet18_weights))
    assert summary.processed == 1
    live = open_catalog(out)
    assert live.manifest.categorizer == active_categorizer(live.store)[1]  # the version names its categoriser
    late = live.images.set_index("key").loc["inbox/late-receipt.jpg"]
    # the night categorised the new row with the active categoriser, from the vector it stored
    categorizer = active_categorizer(live.store)[0]
    ids, vectors = live.embeddings()
    name, confidence = categorizer.predict(vectors[ids == late["image_id"]])
    assert late["category"] == name[0] and late["category_confidence"] == pytest.approx(confidence[0], abs=1e-6)
    assert late["category"] in {*KINDS, UNCERTAIN}


def test_a_categoriser_of_other_embeddings_is_refused(labelled_catalog, tmp_path):
    root, out, labels = labelled_catalog
    fit_categories(out, labels_csv=str(labels))
    before = open_catalog(out).manifest
    parts_before = {o.key for o in open_catalog(out).store.list("tables/embeddings/")}
    other = tmp_path / "other.pth"
    save_random_weights("resnet18", 99, other)
    with pytest.raises(CategorizerMismatch, match="trained on embeddings of resnet18@.*Fit a new one"):
        run_flow(source=str(root / "src"), output=out, model="resnet18", weights=str(other))
    after = open_catalog(out).manifest  # refused before any work: no new version, same embeddings
    assert (after.version, after.weights_sha256) == (before.version, before.weights_sha256)
    assert {o.key for o in open_catalog(out).store.list("tables/embeddings/")} == parts_before  # nothing embedded


def test_suggest_clusters_writes_sample_keys_per_cluster(labelled_catalog):
    _, out, _ = labelled_catalog
    frame, key = suggest_categories(out, k=4, samples_per_cluster=3)
    assert sorted(frame["cluster"].unique()) == [0, 1, 2, 3]
    assert (frame.groupby("cluster").size() <= 3).all()
    assert frame["cluster_size"].groupby(frame["cluster"]).first().sum() == len(open_catalog(out).images)
    stored = pd.read_parquet(io.BytesIO(open_catalog(out).store.get(key)))
    pd.testing.assert_frame_equal(stored, frame.reset_index(drop=True), check_dtype=False)


def test_labels_need_two_examples_of_two_categories():
    with pytest.raises(ValueError, match="at least two categories"):
        fit_categorizer(np.zeros((4, 3)), ["a"] * 4, model="m", weights_sha256="s")
    with pytest.raises(ValueError, match="at least 2 labelled objects"):
        fit_categorizer(np.zeros((3, 3)), ["a", "a", "b"], model="m", weights_sha256="s")


def test_categories_commands(labelled_catalog):
    from typer.testing import CliRunner

    from flows.cli import app

    _, out, labels = labelled_catalog
    runner = CliRunner()
    fit = runner.invoke(app, ["categories", "fit", "--catalog", out, "--labels", str(labels), "--apply"])
    assert fit.exit_code == 0, fit.output
    assert "accuracy" in fit.output and "confusion matrix" in fit.output and "rows/s" in fit.output
    for kind in KINDS:
        assert kind in fit.output
    suggest = runner.invoke(app, ["categories", "suggest", "--catalog", out, "--k", "3"])
    assert suggest.exit_code == 0 and "3 clusters" in suggest.output
    bad = runner.invoke(app, ["categories", "fit", "--catalog", out])
    assert bad.exit_code == 2 and "exactly one of --labels FILE or --labels-prefix" in bad.output
