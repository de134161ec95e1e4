"""Small real catalogues for the web page tests (API and browser), each built once
per test session. The page's catalogue: product photos (one with a re-encoded
copy, a duplicate pair), documents of three kinds, a broken file; a categoriser
fitted on labelled documents whose threshold is raised so about half the rows
are `uncertain`. The hostile one: keys an attacker would pick (spreadsheet
formulas, HTML), a duplicate pair among them, made without thumbnails."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flows.categorize import apply_categories, fit_categories
from models.categorizer import UNCERTAIN
from tasks.catalog.reader import open_catalog
from tasks.categories.store import save_categorizer
from tasks.sample_data import encode, make_document, make_product_photo
from tasks.storage import LocalStore
from tests.helpers import run_flow, run_small

KINDS = ("invoice", "receipt", "form")
_built: dict[str, UiCatalog] = {}
_lock = threading.Lock()


@dataclass
class UiCatalog:
    root: Path
    source: Path
    output: str
    labels_csv: Path
    weights: Path
    copy_key: str  # a product photo whose re-encoded copy is catalogued too
    copy_of: str


@dataclass
class HostileCatalog:
    source: Path
    output: str
    formula_keys: tuple[str, str]  # a duplicate pair: the same photo, re-encoded
    plain_key: str


def build_ui_catalog(tmp_path_factory, weights: Path) -> UiCatalog:
    with _lock:
        if "cat" not in _built:
            _built["cat"] = _build(tmp_path_factory.mktemp("ui"), weights)
        return _built["cat"]


def build_hostile_catalog(tmp_path_factory, weights: Path) -> HostileCatalog:
    with _lock:
        if "hostile" not in _built:
            _built["hostile"] = _build_hostile(tmp_path_factory.mktemp("ui-hostile"), weights)
        return _built["hostile"]


def _build_hostile(root: Path, weights: Path) -> HostileCatalog:
    store = LocalStore(root / "src", create=True)
    rng = np.random.default_rng(29)
    photo = make_product_photo(rng, (320, 240))
    formula_keys = ("=1+2.png", "@SUM(A1).jpg")
    store.put(formula_keys[0], encode(photo, "PNG"))
    store.put(formula_keys[1], encode(photo, "JPEG", quality=95))
    store.put("<img src=x onerror=alert(1)>.jpg", encode(make_product_photo(rng, (320, 240)), "JPEG"))
    store.put("item-001-blue.jpg", encode(make_product_photo(rng, (320, 240)), "JPEG"))
    out = str(root / "out")
    run_small(str(root / "src"), out, weights, thumbnails=False)
    return HostileCatalog(source=root / "src", output=out, formula_keys=formula_keys, plain_key="item-001-blue.jpg")


def _build(root: Path, weights: Path) -> UiCatalog:
    store = LocalStore(root / "src", create=True)
    rng = np.random.default_rng(17)
    for i in range(6):
        photo = make_product_photo(rng, (400, 300))
        store.put(f"photos/item-{i:02d}.jpg", encode(photo, "JPEG"))
        if i == 0:
            store.put("photos/item-00-copy.jpg", encode(photo, "JPEG", quality=70))
    for kind in KINDS:
        for i in range(8):
            store.put(f"docs/{kind}/{kind}-{i:02d}.jpg", encode(make_document(rng, kind), "JPEG"))
    store.put("broken/truncated.jpg", encode(make_product_photo(rng, (300, 200)), "JPEG")[:400])
    out = str(root / "out")
    run_flow(source=str(root / "src"), output=out, model="resnet18", weights=str(weights))
    labels = root / "labels.csv"
    labels.write_text("key,label\n" + "".join(f"docs/{k}/{k}-{i:02d}.jpg,{k}\n" for k in KINDS for i in range(5)))
    categorizer, _, _ = fit_categories(out, labels_csv=str(labels))
    # random weights make a confident probe; raise its threshold so the review page has work
    _, confidence = categorizer.predict(open_catalog(out).embeddings()[1])
    categorizer.threshold = float(np.quantile(confidence, 0.5))
    save_categorizer(LocalStore(out), categorizer)
    apply_categories(out)
    images = open_catalog(out).images
    assert (images["category"] == UNCERTAIN).sum() >= 4, images["category"].value_counts()
    return UiCatalog(root=root, source=root / "src", output=out, labels_csv=labels, weights=weights,
                     copy_key="photos/item-00-copy.jpg", copy_of="photos/item-00.jpg")
