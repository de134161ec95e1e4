"""The search service's JSON API on a real catalogue (Prefect run, resnet18 with
seeded random weights, real FAISS): the same answers as the Python functions,
labels that survive concurrent writers and feed `categories fit`, the live
version followed without a restart, and the safety rules."""

from __future__ import annotations

import io
import json
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from flows.categorize import apply_categories, fit_categories
from flows.cli import app as cli_app
from flows.search import find_duplicates, search_queries, similar_images
from flows.ui import CONTENT_SECURITY_POLICY, check_bind, create_app
from models.categorizer import UNCERTAIN
from tasks.catalog.reader import open_catalog
from tasks.catalog.runs_log import read_runs
from tasks.categories.labels import Label, LabelLog, review_labels, save_labels
from tasks.categories.store import active_categorizer, save_categorizer
from tasks.search.thumbnails import THUMBNAIL_PREFIX
from tasks.storage import LocalStore
from tests.ui_catalog import build_ui_catalog

pytestmark = pytest.mark.usefixtures("prefect_harness")
COMPARED = ["rank", "key", "page", "image_id"]


@pytest.fixture(scope="module")
def ui_cat(tmp_path_factory, resnet18_weights):
    return build_ui_catalog(tmp_path_factory, resnet18_weights)


@pytest.fixture
def client(ui_cat):
    return TestClient(create_app(ui_cat.output, poll_s=0))


def api_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    return frame.assign(image_id=frame["image_id"].astype("int64"))


def same_results(api_rows: list[dict], expected: pd.DataFrame, columns=COMPARED) -> None:
    got = api_frame(api_rows)
    pd.testing.assert_frame_equal(got[columns].reset_index(drop=True), expected[columns].reset_index(drop=True),
                                  check_dtype=False)
    assert (got["score"] - expected["score"].to_numpy()).abs().max() < 1e-6


def test_search_api_gives_the_python_functions_results(client, ui_cat, tmp_path):
    out = ui_cat.output
    for params in ({}, {"prefix": "docs/"}, {"category": "form"}, {"include_self": True}):
        body = client.get("/api/search", params={"key": ui_cat.copy_of, "k": 5, **params}).json()
        same_results(body["results"], similar_images(out, key=ui_cat.copy_of, k=5, **params))
    assert client.get("/api/search", params={"key": ui_cat.copy_of, "k": 1}).json()["results"][0]["key"] \
        == ui_cat.copy_key

    keys = [ui_cat.copy_of, "docs/form/form-01.jpg", "docs/invoice/invoice-02.jpg"]
    body = client.post("/api/search/keys", json={"keys": keys, "k": 4}).json()
    (tmp_path / "q.csv").write_text("key\n" + "\n".join(keys) + "\n")
    expected = search_queries(out, tmp_path / "q.csv", k=4)
    same_results(body["results"], expected, ["query", *COMPARED])

    photo = ui_cat.source / ui_cat.copy_of
    body = client.post("/api/search/image", params={"k": 5}, content=photo.read_bytes()).json()
    same_results(body["results"], similar_images(out, image=photo, k=5))
    assert body["results"][0]["key"] == ui_cat.copy_of and body["results"][0]["score"] > 0.999


def test_search_mistakes_are_clear_4xx(client):
    r = client.get("/api/search", params={"key": "no/such.jpg"})
    assert r.status_code == 404 and "not in the catalogue" in r.json()["detail"]
    r = client.get("/api/search", params={"key": "photos/item-01.jpg", "category": "nope"})
    assert r.status_code == 400 and "categories are" in r.json()["detail"]
    r = client.post("/api/search/image", content=b"this is not an image")
    assert r.status_code == 400 and "not_an_image" in r.json()["detail"]


def test_duplicates_api_and_csv_match_find_duplicates(client, ui_cat):
    body = client.get("/api/duplicates", params={"threshold": 0.9999}).json()
    expected = find_duplicates(ui_cat.output, threshold=0.9999, write=False).groups
    got = api_frame(body["members"])
    assert got[["image_id", "key", "group_size"]].values.tolist() == \
        expected[["image_id", "key", "group_size"]].values.tolist()
    assert {ui_cat.copy_key, ui_cat.copy_of} <= set(got["key"])
    csv = client.get("/api/duplicates.csv", params={"threshold": 0.9999})
    assert csv.headers["content-type"].startswith("text/csv") and "attachment" in csv.headers["content-disposition"]
    assert pd.read_csv(io.StringIO(csv.text))["key"].tolist() == expected["key"].tolist()


def test_thumbnails_are_small_webp_from_the_run_and_never_read_the_originals(client, ui_cat):
    store = LocalStore(ui_cat.output)
    image_id = client.get("/api/search", params={"key": ui_cat.copy_key, "k": 1}).json()["results"][0]["image_id"]
    original = ui_cat.source / ui_cat.copy_of
    saved = original.read_bytes()
    original.unlink()  # the run made the thumbnail: the original is not needed
    try:
        first = client.get(f"/api/images/{image_id}/thumbnail")
    finally:
        original.write_bytes(saved)
    assert first.status_code == 200 and first.headers["content-type"] == "image/webp"
    assert first.content[:4] == b"RIFF" and first.content[8:12] == b"WEBP" and len(first.content) < 10_000
    assert not [o.key for o in store.list(THUMBNAIL_PREFIX)]  # nothing made on demand


def test_review_lists_uncertain_images_and_labels_are_kept(client, ui_cat):
    review = client.get("/api/review").json()
    assert review["total"] >= 4 and set(review["choices"]) >= {"invoice", "receipt", "form"}
    assert {i["category"] for i in review["images"]} == {UNCERTAIN}
    picked = review["images"][:2]
    r = client.post("/api/labels", json={"labeller": "ann", "labels": [
        {"image_id": picked[0]["image_id"], "label": "invoice"}, {"image_id": picked[1]["image_id"], "label": "form"}]})
    assert r.status_code == 200 and r.json()["saved"] == 2 and r.json()["file"].startswith("labels/")
    after = client.get("/api/review").json()
    assert after["total"] == review["total"] - 2
    stored = {str(i): lb for i, lb in zip(*(LabelLog(LocalStore(ui_cat.output)).latest()[c]
                                             for c in ("image_id", "label")), strict=True)}
    assert stored[picked[0]["image_id"]] == "invoice" and stored[picked[1]["image_id"]] == "form"
    r = client.post("/api/labels", json={"labels": [{"image_id": "123", "label": "invoice"}]})
    assert r.status_code == 404
    r = client.post("/api/labels", json={"labels": [{"image_id": picked[0]["image_id"], "label": "../x"}]})
    assert r.status_code == 400


def test_two_people_labelling_at_once_lose_nothing(tmp_path):
    store = LocalStore(tmp_path / "cat", create=True)

    def person(name: str) -> None:
        for i in range(15):
            save_labels(store, [Label(image_id=i, key=f"k{i}", page=1, label=f"{name}-{i}")], labeller=name,
                        catalog_version=1)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(person, ["ann", "bob"]))
    history = LabelLog(store).history()
    assert len(history) == 30 and history["file"].nunique() == 30
    assert sorted(history["labeller"].value_counts().tolist()) == [15, 15]
    latest = LabelLog(store).latest()
    assert len(latest) == 15  # one standing label per image: the later of the two
    later = history.sort_values(["labelled_at", "file"]).drop_duplicates("image_id", keep="last")
    assert latest.set_index("image_id")["label"].to_dict() == later.set_index("image_id")["label"].to_dict()


def test_categories_fit_uses_the_review_labels(ui_cat, tmp_path):
    out = tmp_path / "copy"
    import shutil
    shutil.copytree(ui_cat.output, out)
    store = LocalStore(out)
    images = open_catalog(str(out)).images
    unlabelled = images[images["key"].str.startswith("docs/") & ~images["key"].str.match(r".*-0[0-4]\.jpg$")]
    rows = unlabelled.head(3)
    save_labels(store, [Label(int(r.image_id), r.key, 1, r.key.split("/")[1]) for r in rows.itertuples()],
                labeller="ann", catalog_version=2)
    reviewed = review_labels(store)  # with those the review test may have given before this copy
    assert set(rows["key"]) <= set(reviewed["key"])
    in_csv = set(pd.read_csv(ui_cat.labels_csv)["key"])
    with_review, _, _ = fit_categories(str(out), labels_csv=str(ui_cat.labels_csv))
    without, _, _ = fit_categories(str(out), labels_csv=str(ui_cat.labels_csv), review_labels=False)
    assert with_review.report.n_train + with_review.report.n_val == \
        without.report.n_train + without.report.n_val + len(set(reviewed["key"]) - in_csv)


def test_the_page_follows_current_and_never_mixes_versions(ui_cat, tmp_path):
    import shutil
    out = tmp_path / "live"
    shutil.copytree(ui_cat.output, out)
    client = TestClient(create_app(str(out), poll_s=0))
    before = open_catalog(str(out)).images.set_index("key")["category"].to_dict()
    assert client.get("/api/version").json()["version"] == 2
    # a new categoriser that calls every document certain: a visibly different version
    categorizer, _ = active_categorizer(LocalStore(out))
    categorizer.threshold = 0.0
    save_categorizer(LocalStore(out), categorizer)
    seen: list[dict] = []
    stop = threading.Event()

    def browse() -> None:
        while not stop.is_set():
            seen.append(client.get("/api/images", params={"limit": 500}).json())

    reader = threading.Thread(target=browse)
    reader.start()
    try:
        apply_categories(str(out))
        after = open_catalog(str(out)).images.set_index("key")["category"].to_dict()
        for _ in range(200):
            if client.get("/api/version").json()["version"] == 3:
                break
            threading.Event().wait(0.05)
        else:
            pytest.fail("the page never moved to version 3")
        threading.Event().wait(0.2)
    finally:
        stop.set()
        reader.join()
    assert before != after and {b["version"] for b in seen} <= {2, 3}
    for body in seen:
        expected = before if body["version"] == 2 else after
        assert {i["key"]: i["category"] for i in body["images"]} == expected, "a response mixed two versions"
    assert seen[-1]["version"] == 3


def test_runs_api_shows_history_and_live_failures(client, ui_cat):
    body = client.get("/api/runs").json()
    runs = read_runs(LocalStore(ui_cat.output))
    assert [r["run_id"] for r in body["runs"]] == runs["run_id"].tolist()
    assert body["runs"][0]["images_per_s"] > 0 and body["runs"][0]["processed"] == 31
    assert body["failures_total"] == 1 and body["failures"][0]["key"] == "broken/truncated.jpg"
    assert body["failures"][0]["error_type"] and body["failures"][0]["message"]


def test_openapi_documents_every_api_route(client):
    spec = client.get("/openapi.json").json()
    for path in ("/api/search", "/api/search/keys", "/api/search/image", "/api/duplicates", "/api/duplicates.csv",
                 "/api/categories", "/api/review", "/api/labels", "/api/runs", "/api/images/{image_id}/thumbnail"):
        assert path in spec["paths"], path
    assert "/api/search/keys" in client.get("/docs").text


# ---- safety

def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A 1.6-gigapixel PNG in a few hundred bytes: the header declares it, the data is zeros."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = zlib.compress(b"\x00" * (width // 8 + 1) * 64)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def test_path_traversal_reads_nothing_outside_the_catalogue(client):
    for path in ("/api/images/..%2F..%2F..%2Fetc%2Fpasswd/thumbnail", "/api/images/../../etc/passwd",
                 "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/static/../../ui.py", "/api/images/-1/thumbnail",
                 "/static/%2e%2e/ui.py"):
        r = client.get(path)
        assert r.status_code in (404, 422), (path, r.status_code)
        assert "root:" not in r.text and "create_app" not in r.text


def test_uploads_are_capped_and_bombs_refused(ui_cat):
    client = TestClient(create_app(ui_cat.output, max_upload_bytes=100_000))
    r = client.post("/api/search/image", content=b"\xff" * 200_000)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    r = client.post("/api/search/image", content=bomb_png())
    assert r.status_code == 400 and "too_large" in r.json()["detail"]


def test_a_token_guards_every_request_or_label_writes(ui_cat):
    everywhere = TestClient(create_app(ui_cat.output, token="s3cret"))
    r = everywhere.get("/api/version")
    assert r.status_code == 401 and "token" in r.json()["detail"]
    assert everywhere.get("/api/version", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert everywhere.get("/api/version", headers={"authorization": "Bearer s3cret"}).status_code == 200
    page = everywhere.get("/search?token=s3cret")
    assert page.status_code == 200 and "HttpOnly" in page.headers["set-cookie"]
    assert everywhere.get("/api/version").status_code == 200  # the cookie the page got

    writes_only = TestClient(create_app(ui_cat.output, token="s3cret", token_everywhere=False))
    assert writes_only.get("/api/review").status_code == 200
    image_id = writes_only.get("/api/review").json()["images"][0]["image_id"]
    body = {"labels": [{"image_id": image_id, "label": "form"}]}
    assert writes_only.post("/api/labels", json=body).status_code == 401
    assert writes_only.post("/api/labels", json=body, headers={"x-batchsight-token": "s3cret"}).status_code == 200


def test_responses_carry_a_strict_csp_and_hosts_are_checked(ui_cat):
    client = TestClient(create_app(ui_cat.output, allowed_hosts=["testserver"]))
    for path in ("/search", "/api/version", "/static/ui.js", "/api/search?key=nope"):
        assert client.get(path).headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'self'" in CONTENT_SECURITY_POLICY
    assert client.get("/api/version", headers={"host": "evil.example"}).status_code == 421


def test_binding_beyond_loopback_needs_a_token(ui_cat, monkeypatch):
    with pytest.raises(ValueError, match="--token"):
        check_bind("0.0.0.0", None)
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "s3cret")
    monkeypatch.delenv("BATCHSIGHT_UI_TOKEN", raising=False)
    result = CliRunner().invoke(cli_app, ["ui", "--catalog", ui_cat.output, "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--token" in result.output


@pytest.mark.parametrize("workers", [1, 2])
def test_the_ui_command_serves_the_live_catalogue_on_loopback(ui_cat, workers):
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request
    from urllib.parse import quote

    from tests.test_nightly import subprocess_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--catalog", ui_cat.output, "--port", str(port),
                             "--workers", str(workers)],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=5) as r:
                    body = r.read().decode()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.3)
        assert '"version"' in body
        search = f"http://127.0.0.1:{port}/api/search?key={quote(ui_cat.copy_of)}&k=1"
        with urllib.request.urlopen(search, timeout=5) as r:
            assert json.loads(r.read())["results"][0]["key"] == ui_cat.copy_key
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/version", headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 421
    finally:
        proc.terminate()
        proc.wait(10)
