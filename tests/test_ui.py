"""The search service's JSON API on a real catalogue (Prefect run, resnet18 with
seeded random weights, real FAISS): the same answers as the Python functions,
labels that survive concurrent writers and feed `categories fit`, the live
version followed without a restart, and the safety rules, hostile use included
(issue 29): bounded uploads, no writes from other sites, labels that cannot
break the review loop, tokens of any characters, bounded bodies and label log,
no server paths in errors, a damaged version reported."""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from flows.categorize import apply_categories, fit_categories
from flows.cli import app as cli_app
from flows.search import find_duplicates, search_queries, similar_images
from flows.ui import CONTENT_SECURITY_POLICY, check_bind, create_app
from models.categorizer import UNCERTAIN
from tasks.catalog import tables
from tasks.catalog.manifest import read_pointer
from tasks.catalog.reader import open_catalog
from tasks.catalog.runs_log import read_runs
from tasks.catalog.versions import rollback
from tasks.categories.labels import (
    LABELS_SCHEMA,
    Label,
    LabelLog,
    LabelsError,
    read_labels_csv,
    review_labels,
    save_labels,
)
from tasks.categories.store import active_categorizer, save_categorizer
from tasks.sample_data import encode, make_product_photo
from tasks.search.thumbnails import THUMBNAIL_PREFIX
from tasks.storage import LocalStore
from tests.helpers import free_port, subprocess_env
from tests.ui_catalog import build_hostile_catalog, build_ui_catalog

pytestmark = pytest.mark.usefixtures("prefect_harness")
COMPARED = ["rank", "key", "page", "image_id"]
JPEG = {"content-type": "image/jpeg"}


@pytest.fixture(scope="module")
def ui_cat(tmp_path_factory, resnet18_weights):
    return build_ui_catalog(tmp_path_factory, resnet18_weights)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, resnet18_weights):
    return build_hostile_catalog(tmp_path_factory, resnet18_weights)


@pytest.fixture
def client(ui_cat):
    return TestClient(create_app(ui_cat.output, poll_s=0))


def copy_of(ui_cat, tmp_path, name: str = "copy") -> str:
    out = tmp_path / name
    shutil.copytree(ui_cat.output, out)
    return str(out)


def api_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    return frame.assign(image_id=frame["image_id"].astype("int64"))


def same_results(api_rows: list[dict], expected: pd.DataFrame, columns=COMPARED) -> None:
    got = api_frame(api_rows)
    pd.testing.assert_frame_equal(got[columns].reset_index(drop=True), expected[columns].reset_index(drop=True),
                                  check_dtype=False)
    assert (got["score"] - expected["score"].to_numpy()).abs().max() < 1e-6


def png_bytes(width: int, height: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), 200).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


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
    for kind in ("image/jpeg", "application/octet-stream"):
        body = client.post("/api/search/image", params={"k": 5}, content=photo.read_bytes(),
                           headers={"content-type": kind}).json()
        same_results(body["results"], similar_images(out, image=photo, k=5))
    assert body["results"][0]["key"] == ui_cat.copy_of and body["results"][0]["score"] > 0.999


def test_search_mistakes_are_clear_4xx(client):
    r = client.get("/api/search", params={"key": "no/such.jpg"})
    assert r.status_code == 404 and "not in the catalogue" in r.json()["detail"]
    r = client.get("/api/search", params={"key": "photos/item-01.jpg", "category": "nope"})
    assert r.status_code == 400 and "categories are" in r.json()["detail"]
    r = client.post("/api/search/image", content=b"this is not an image", headers=JPEG)
    assert r.status_code == 400 and "not_an_image" in r.json()["detail"]


def test_duplicates_api_and_csv_give_every_column_of_find_duplicates(client, ui_cat):
    body = client.get("/api/duplicates", params={"threshold": 0.9999}).json()
    expected = find_duplicates(ui_cat.output, threshold=0.9999, write=False).groups
    assert body["columns"] == list(expected.columns)  # whatever the table holds, not a fixed list
    got = pd.DataFrame(body["members"], columns=body["columns"])
    for col in expected.columns:
        values = (got[col].astype("int64") if col.endswith("_id") else got[col]).tolist()
        if expected[col].dtype.kind == "f":
            assert values == pytest.approx(expected[col].tolist()), col
        else:
            assert values == expected[col].tolist(), col
    assert {ui_cat.copy_key, ui_cat.copy_of} <= set(got["key"])
    csv_response = client.get("/api/duplicates.csv", params={"threshold": 0.9999})
    assert csv_response.headers["content-type"].startswith("text/csv")
    assert "attachment" in csv_response.headers["content-disposition"]
    from_csv = pd.read_csv(io.StringIO(csv_response.text))
    assert list(from_csv.columns) == list(expected.columns)
    assert from_csv["key"].tolist() == expected["key"].tolist()


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
    out = copy_of(ui_cat, tmp_path)
    store = LocalStore(out)
    images = open_catalog(out).images
    unlabelled = images[images["key"].str.startswith("docs/") & ~images["key"].str.match(r".*-0[0-4]\.jpg$")]
    rows = unlabelled.head(3)
    save_labels(store, [Label(int(r.image_id), r.key, 1, r.key.split("/")[1]) for r in rows.itertuples()],
                labeller="ann", catalog_version=2)
    reviewed = review_labels(store)  # with those the review test may have given before this copy
    assert set(rows["key"]) <= set(reviewed["key"])
    in_csv = set(pd.read_csv(ui_cat.labels_csv)["key"])
    with_review, _, _ = fit_categories(out, labels_csv=str(ui_cat.labels_csv))
    without, _, _ = fit_categories(out, labels_csv=str(ui_cat.labels_csv), review_labels=False)
    assert with_review.report.n_train + with_review.report.n_val == \
        without.report.n_train + without.report.n_val + len(set(reviewed["key"]) - in_csv)


def test_the_page_follows_current_and_never_mixes_versions(ui_cat, tmp_path):
    out = copy_of(ui_cat, tmp_path, "live")
    client = TestClient(create_app(out, poll_s=0))
    before = open_catalog(out).images.set_index("key")["category"].to_dict()
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
        apply_categories(out)
        after = open_catalog(out).images.set_index("key")["category"].to_dict()
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
    assert body["status"]["version"] == 2 and body["status"]["failed"] is None


def test_openapi_documents_every_api_route(client):
    spec = client.get("/openapi.json").json()
    for path in ("/api/search", "/api/search/keys", "/api/search/image", "/api/duplicates", "/api/duplicates.csv",
                 "/api/categories", "/api/review", "/api/labels", "/api/runs", "/api/images/{image_id}/thumbnail",
                 "/api/status", "/api/version"):
        assert path in spec["paths"], path
    assert "/api/search/keys" in client.get("/docs").text


# ---- safety

def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A PNG whose header declares `width` x `height` (1.6 gigapixels by default) in a
    few hundred bytes: the data is a little run of zeros."""
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
    r = client.post("/api/search/image", content=b"\xff" * 200_000, headers=JPEG)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    r = client.post("/api/search/image", content=bomb_png(), headers={"content-type": "image/png"})
    assert r.status_code == 400 and "too_large" in r.json()["detail"]


def test_uploads_are_images_and_writes_from_other_sites_are_refused(client, ui_cat):
    """Issue 29, item 1: any website could make a visitor's browser upload to the
    server (`fetch(..., {mode: "no-cors"})` sends text/plain and no preflight)."""
    photo = (ui_cat.source / ui_cat.copy_of).read_bytes()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        r = client.post("/api/search/image", content=photo, headers={"content-type": kind} if kind else {})
        assert r.status_code == 415 and "image/jpeg" in r.json()["detail"], kind
    evil = {"origin": "https://evil.example"}
    r = client.post("/api/search/image", content=photo, headers={**JPEG, **evil})
    assert r.status_code == 403 and "another site" in r.json()["detail"]
    r = client.options("/api/search/image", headers={**evil, "access-control-request-method": "POST"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = client.post("/api/labels", json={"labels": [{"image_id": "1", "label": "form"}]},
                    headers={"origin": "null"})
    assert r.status_code == 403
    r = client.post("/api/search/image", content=photo, headers={**JPEG, "sec-fetch-site": "cross-site"})
    assert r.status_code == 403
    same_site = client.post("/api/search/image", content=photo, headers={**JPEG, "origin": "http://testserver"})
    assert same_site.status_code == 200 and same_site.json()["results"][0]["key"] == ui_cat.copy_of


def test_upload_pixels_are_budgeted_across_requests(ui_cat):
    """Issue 29, item 1: a 685 KB PNG of 13000x13000 took ~2 GB to decode, and
    nothing bounded how many decoded at once."""
    app = create_app(ui_cat.output, decode_budget_pixels=3_000_000)
    client = TestClient(app)
    r = client.post("/api/search/image", content=bomb_png(13_000, 13_000), headers={"content-type": "image/png"})
    assert r.status_code == 413 and "169.0 MP" in r.json()["detail"]  # from its header: nothing was decoded
    budget = app.state.page.decode_pixels
    assert budget.held == 0
    picture = png_bytes(1500, 1000)
    with budget.hold(2_000_000, "another upload"):  # another request decoding 2 MP
        r = client.post("/api/search/image", content=picture, headers={"content-type": "image/png"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
    r = client.post("/api/search/image", content=picture, headers={"content-type": "image/png"})
    assert r.status_code == 200 and len(r.json()["results"]) == 10 and budget.held == 0
    # a JPEG counts at the size it decodes at: 4000x3000 for a 256 px model decodes at 1/8, 500x375
    big_jpeg = encode(make_product_photo(np.random.default_rng(1), (4000, 3000)), "JPEG")
    with budget.hold(2_500_000, "another upload"):
        assert client.post("/api/search/image", content=big_jpeg, headers=JPEG).status_code == 200


def test_a_token_guards_every_request_or_label_writes(ui_cat):
    everywhere = TestClient(create_app(ui_cat.output, token="s3cret"))
    r = everywhere.get("/api/version")
    assert r.status_code == 401 and "token" in r.json()["detail"]
    assert everywhere.get("/api/version", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert everywhere.get("/api/version", headers={"authorization": "Bearer s3cret"}).status_code == 200
    page = everywhere.get("/search?token=s3cret")
    assert page.status_code == 200 and "HttpOnly" in page.headers["set-cookie"]
    assert "s3cret" not in page.headers["set-cookie"]  # the cookie holds a keyed hash, never the token
    assert everywhere.get("/api/version").status_code == 200  # the cookie the page got

    writes_only = TestClient(create_app(ui_cat.output, token="s3cret", token_everywhere=False))
    assert writes_only.get("/api/review").status_code == 200
    image_id = writes_only.get("/api/review").json()["images"][0]["image_id"]
    body = {"labels": [{"image_id": image_id, "label": "form"}]}
    assert writes_only.post("/api/labels", json=body).status_code == 401
    assert writes_only.post("/api/labels", json=body, headers={"x-batchsight-token": "s3cret"}).status_code == 200


@pytest.mark.parametrize("token", ["pässwört-ünïcode", "semi;colon=token", "s p a c e"])
def test_tokens_of_any_characters_work_in_every_place(ui_cat, token):
    """Issue 29, item 6: a non-ASCII token worked only in the query, a `;` broke the cookie."""
    client = TestClient(create_app(ui_cat.output, token=token))
    assert client.get("/api/version", headers={"authorization": b"Bearer " + token.encode()}).status_code == 200
    assert client.get("/api/version", headers={"x-batchsight-token": token.encode()}).status_code == 200
    page = client.get(f"/search?token={quote(token)}")
    assert page.status_code == 200
    assert page.headers["set-cookie"].count(";") == 3  # name=value; Path; HttpOnly; SameSite: one cookie, whole
    assert client.get("/api/version").status_code == 200  # from the cookie alone
    assert TestClient(create_app(ui_cat.output, token=token)).get("/api/version").status_code == 401


def test_a_correct_token_in_the_query_beats_an_old_cookie(ui_cat):
    """Issue 29, item 6: after the token changed, the browser's old cookie was
    checked first and `?token=NEW` was refused."""
    old = TestClient(create_app(ui_cat.output, token="old-secret"))
    old.get("/search?token=old-secret")
    cookie = old.cookies.get("batchsight_token")
    client = TestClient(create_app(ui_cat.output, token="new-secret"))
    client.cookies.set("batchsight_token", cookie)
    assert client.get("/api/version").status_code == 401
    assert client.get("/search?token=new-secret").status_code == 200
    assert client.get("/api/version").status_code == 200  # the new cookie replaced the old


def test_responses_carry_a_strict_csp_and_hosts_are_checked(ui_cat):
    client = TestClient(create_app(ui_cat.output, allowed_hosts=["testserver"]))
    for path in ("/search", "/api/version", "/static/ui.js", "/api/search?key=nope"):
        assert client.get(path).headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'self'" in CONTENT_SECURITY_POLICY
    assert client.get("/api/version", headers={"host": "evil.example"}).status_code == 421


def test_binding_beyond_loopback_needs_a_token(ui_cat, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--token"):
        check_bind("0.0.0.0", None)
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "s3cret")
    with pytest.raises(ValueError, match="--allow-host search.example"):  # a proxy forwards other machines
        check_bind("127.0.0.1", None, ["search.example"])
    monkeypatch.delenv("BATCHSIGHT_UI_TOKEN", raising=False)
    result = CliRunner().invoke(cli_app, ["ui", "--catalog", ui_cat.output, "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--token" in result.output
    empty = tmp_path / "token"
    empty.write_text("\n")
    result = CliRunner().invoke(cli_app, ["ui", "--catalog", ui_cat.output, "--token-file", str(empty)])
    assert result.exit_code == 2 and "is empty" in result.output
    result = CliRunner().invoke(cli_app, ["ui", "--catalog", str(tmp_path / "none"), "--token", "on-the-line"])
    assert result.exit_code == 2 and "shown to every user of this machine by `ps`" in result.output
    monkeypatch.setenv("BATCHSIGHT_UI_TOKEN", "from-the-environment")
    result = CliRunner().invoke(cli_app, ["ui", "--catalog", str(tmp_path / "none")])
    assert result.exit_code == 2 and "`ps`" not in result.output


def stalled_connections(port: int, n: int) -> list[socket.socket]:
    """`n` connections that send the start of a request and never finish its headers."""
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Never-Ends: ")
        socks.append(sock)
    return socks


def closed_by_the_server(sock: socket.socket, deadline: float) -> bool:
    sock.settimeout(max(0.05, deadline - time.monotonic()))
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("workers", [1, 2])
def test_the_ui_command_serves_the_live_catalogue_on_loopback(ui_cat, tmp_path, workers):
    """The real `batchsight ui` process (and its uvicorn worker processes): the
    token from a file (item 6: `--token` shows in `ps`), and connections that
    never finish their headers closed within 10 s (item 2: they were held forever)."""
    token_file = tmp_path / "token"
    token_file.write_text("fïle-secret\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--catalog", ui_cat.output, "--port", str(port),
                             "--workers", str(workers), "--token-file", str(token_file)],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/version", timeout=5) as r:
                    body = r.read().decode()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.3)
        assert '"version"' in body
        with urllib.request.urlopen(f"{base}/api/search?key={quote(ui_cat.copy_of)}&k=1", timeout=5) as r:
            assert json.loads(r.read())["results"][0]["key"] == ui_cat.copy_key
        request = urllib.request.Request(f"{base}/api/version", headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 421
        label = json.dumps({"labels": [{"image_id": "1", "label": "form"}]}).encode()
        with pytest.raises(urllib.error.HTTPError) as unauthorised:
            urllib.request.urlopen(urllib.request.Request(f"{base}/api/labels", data=label, headers={
                "content-type": "application/json"}), timeout=5)
        assert unauthorised.value.code == 401  # a token set on loopback guards label writes
        with pytest.raises(urllib.error.HTTPError) as unknown_image:
            urllib.request.urlopen(urllib.request.Request(f"{base}/api/labels", data=label, headers={
                "content-type": "application/json", "x-batchsight-token": "fïle-secret".encode().decode("latin-1")}),
                timeout=5)
        assert unknown_image.value.code == 404  # the file's token let it through to the route

        opened = time.monotonic()
        stalled = stalled_connections(port, 200)
        with urllib.request.urlopen(f"{base}/api/version", timeout=5) as r:  # served meanwhile
            assert r.status == 200
        open_after = [s for s in stalled if not closed_by_the_server(s, opened + 10)]
        assert not open_after, f"{len(open_after)} of 200 connections without complete headers still open after 10 s"
        for s in stalled:
            s.close()
    finally:
        proc.terminate()
        proc.wait(10)


# ---- hostile use (issue 29)

def test_a_reviewer_cannot_label_an_image_uncertain(client, ui_cat, tmp_path):
    """Item 3: `uncertain` became a trained class, colliding with the review queue's own mark."""
    image_id = client.get("/api/review").json()["images"][0]["image_id"]
    for label in (UNCERTAIN, " Uncertain ", "UNCERTAIN"):
        r = client.post("/api/labels", json={"labels": [{"image_id": image_id, "label": label}]})
        assert r.status_code == 400 and "reserved" in r.json()["detail"], label
    assert UNCERTAIN not in client.get("/api/review").json()["choices"]
    # a label saved before the check is not fitted on
    store = LocalStore(copy_of(ui_cat, tmp_path))
    old = pd.DataFrame({"image_id": [int(image_id)], "key": ["docs/form/form-07.jpg"], "page": [1],
                        "label": [UNCERTAIN], "previous_category": [UNCERTAIN], "labeller": ["old"],
                        "labelled_at": [pd.Timestamp("2030-01-01", tz="UTC")], "catalog_version": [2]})
    store.put("labels/20300101T000000.000000Z-0123456789abcdef.parquet",
              tables.to_parquet_bytes(tables.frame_to_table(old, LABELS_SCHEMA)))
    assert UNCERTAIN not in set(review_labels(store)["label"])
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("key,label\nphotos/item-01.jpg,product\ndocs/form/form-07.jpg,Uncertain\n")
    with pytest.raises(LabelsError, match="not a category"):
        read_labels_csv(labels_csv)


def test_duplicates_csv_cells_are_never_formulas(hostile):
    """Item 4: keys like `=1+2.png` came out unescaped at the start of a CSV cell."""
    client = TestClient(create_app(hostile.output))
    members = client.get("/api/duplicates", params={"threshold": 0.98}).json()["members"]
    assert set(hostile.formula_keys) <= {m["key"] for m in members}  # the JSON keeps keys as they are
    text = client.get("/api/duplicates.csv", params={"threshold": 0.98}).text
    rows = list(csv.DictReader(io.StringIO(text)))
    keys = {row["key"] for row in rows}
    assert {"'=1+2.png", "'@SUM(A1).jpg"} <= keys
    cells = [cell for row in rows for cell in row.values()]
    assert not [c for c in cells if c[:1] in ("=", "+", "@", "\t", "\r") or (c[:1] == "-" and not _number(c))]


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def test_a_lone_surrogate_in_a_body_is_a_4xx_not_a_500(client, caplog):
    """Item 5: `"\\ud800"` in a JSON body gave a 500 and a traceback in the log."""
    image_id = client.get("/api/review").json()["images"][0]["image_id"]
    bodies = {"/api/search/keys": '{"keys": ["\\ud800"]}',
              "/api/labels": '{"labels": [{"image_id": "%s", "label": "a\\ud800"}], "labeller": "\\ud800"}' % image_id}
    with caplog.at_level(logging.ERROR):
        for path, body in bodies.items():
            r = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
            assert r.status_code == 422, (path, r.status_code, r.text)
            assert json.loads(r.content)["detail"][0]["input"].endswith("\ud800")  # quoted back escaped: ASCII
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


def test_bodies_are_capped_and_the_label_log_is_folded(ui_cat, tmp_path):
    """Item 7: a 200 MB JSON body was accepted; 3,000 label saves made 3,000
    files that every review call read again."""
    out = copy_of(ui_cat, tmp_path)
    client = TestClient(create_app(out, max_json_bytes=100_000))
    big = json.dumps({"labels": [{"image_id": "1", "label": "form"}], "labeller": "x" * 200_000}).encode()
    r = client.post("/api/labels", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    r = client.post("/api/labels", content=iter([big[:50_000], big[50_000:]]),  # no length: sent chunked
                    headers={"content-type": "application/json"})
    assert r.status_code == 413

    review = client.get("/api/review").json()["images"]
    before = len(client.get("/api/labels", params={"history": "true"}).json()["labels"])  # other tests' labels
    saves = 120
    for i in range(saves):
        item = review[i % len(review)]
        r = client.post("/api/labels", json={"labeller": f"p{i}", "labels": [
            {"image_id": item["image_id"], "label": ("invoice", "form", "receipt")[i % 3]}]})
        assert r.status_code == 200
    files = LabelLog(LocalStore(out)).files()
    assert len(files) <= 51, len(files)  # folded past 50 files
    history = client.get("/api/labels", params={"history": "true"}).json()["labels"]
    assert len(history) == before + saves and len({h["file"] for h in history[before:]}) == saves  # as saved
    assert [h["labeller"] for h in history[before:]] == [f"p{i}" for i in range(saves)]
    assert client.get("/api/review").json()["total"] == 0  # every image listed was labelled


def test_a_thumbnail_404_names_no_server_path(hostile, tmp_path):
    """Item 8: a `--no-thumbnails` catalogue with a missing original answered
    `<source folder>/item-001-blue.jpg does not exist`."""
    out = tmp_path / "out"
    shutil.copytree(hostile.output, out)
    manifest_source = open_catalog(str(out)).manifest.source
    client = TestClient(create_app(str(out)))
    image_id = client.get("/api/search", params={"key": hostile.plain_key, "k": 1, "include_self": True}) \
        .json()["results"][0]["image_id"]
    original = hostile.source / hostile.plain_key
    saved = original.read_bytes()
    original.unlink()
    try:
        r = client.get(f"/api/images/{image_id}/thumbnail")
    finally:
        original.write_bytes(saved)
    assert r.status_code == 404 and hostile.plain_key in r.json()["detail"]
    assert manifest_source not in r.text and str(hostile.source) not in r.text and "/tmp" not in r.text


def test_a_rollback_is_served_within_the_poll_without_a_request_to_start_it(ui_cat, tmp_path):
    """Item 9: 6 s after a rollback the first request still answered from the old version."""
    out = copy_of(ui_cat, tmp_path)
    client = TestClient(create_app(out, poll_s=0.2))
    assert client.get("/api/version").json()["version"] == 2
    restored = rollback(LocalStore(out), 1)
    time.sleep(2.0)  # no request in between: the server follows CURRENT on its own
    assert client.get("/api/version").json()["version"] == restored.version == 3


def test_a_version_that_cannot_be_loaded_is_reported_and_logged_once(ui_cat, tmp_path, caplog):
    """Item 9: a damaged new version left the old one serving with nothing in the
    API to say so, and a full traceback in the log every 2 s."""
    out = copy_of(ui_cat, tmp_path)
    store = LocalStore(out)
    client = TestClient(create_app(out, poll_s=0.05))
    assert client.get("/api/status").json()["failed"] is None
    live, first = open_catalog(out).manifest, open_catalog(out, version=1).manifest
    only_in_first = sorted(set(first.images) - set(live.images))
    assert only_in_first, "version 1 must have a file version 2 does not share"
    part = tmp_path / "copy" / only_in_first[0]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: rollback's size check passes, the sha256 check on load does not
    part.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="flows.ui"):
        damaged = rollback(store, 1)
        damaged_key = read_pointer(store)[0].manifest
        deadline = time.monotonic() + 10
        while (status := client.get("/api/status").json())["failed"] is None:
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        time.sleep(1.0)  # several polls: retried less and less often, logged once
        status = client.get("/api/status").json()
    assert status["version"] == 2 and status["failed"]["version"] == damaged.version == 3
    assert status["failed"]["manifest"] == damaged_key and "sha256" in status["failed"]["reason"]
    assert str(tmp_path) not in json.dumps(status)  # files named by their keys in the catalogue
    assert client.get("/api/version").json()["version"] == 2
    warnings = [r for r in caplog.records if "could not load catalogue version 3" in r.getMessage()]
    assert len(warnings) == 1 and not warnings[0].exc_info, [r.getMessage() for r in warnings]
    assert status["failed"]["attempts"] < 10  # 1 s at a 0.05 s poll: not retried every poll
    assert client.get("/api/runs").json()["status"]["failed"]["version"] == 3
