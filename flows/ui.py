"""The search service and review page: `batchsight ui --catalog OUT`.

`create_app(catalog, token=...)` builds a FastAPI app: HTML pages (Search,
Duplicates, Review, Runs) and the JSON API under `/api/` they call. The app reads
the live version and follows `CURRENT`: a new version is loaded whole in the
background and swapped in at once, and each request keeps the one version it
started with, so no request ever sees half of a version. Search, duplicates,
thumbnails and labels are the plain functions of `tasks/search.py`,
`tasks/thumbnails.py` and `tasks/labels.py`, except one fast path of its own:
on an exact index (flat, IVF-Flat) `CatalogView.neighbours` searches the index
and reads result rows from per-version dicts, giving the rows
`tasks.search.neighbours` gives (tests/test_ui.py compares them).
"""

from __future__ import annotations

import gc
import hmac
import io
import ipaddress
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import orjson
import pandas as pd
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field

from flows.search import find_duplicates
from models.categorizer import UNCERTAIN
from models.errors import UserError
from tasks.catalog.errors import CatalogError
from tasks.catalog.manifest import read_manifest, read_pointer
from tasks.catalog.reader import Catalog
from tasks.catalog.runs_log import read_runs
from tasks.categories.labels import Label, LabelLog, save_labels
from tasks.categories.store import active_categorizer
from tasks.search import index as faiss_index
from tasks.search import index_choice
from tasks.search import query as image_search
from tasks.search.thumbnails import THUMBNAIL_MEDIA_TYPE, thumbnail_of
from tasks.shard.decode import DecodeError
from tasks.storage import ObjectNotFound, ObjectStore, cached_store

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("ui_static")
DEFAULT_PORT = 8765
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
TOKEN_COOKIE = "batchsight_token"
TOKEN_ENV = "BATCHSIGHT_UI_TOKEN"
WORKER_SETTINGS_ENV = "BATCHSIGHT_UI_WORKER_SETTINGS"  # serve -> uvicorn's worker processes
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
PAGES = ("search", "duplicates", "review", "runs")
CACHE_ENTRIES = 32  # filters and duplicate reports kept per version


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise UserError(f"--host {host} makes the page reachable from other machines; pass --token SECRET (or set "
                         f"{TOKEN_ENV}) so every request must carry it, or keep the default --host 127.0.0.1")


class CatalogView:
    """One committed version with the lookups a request needs precomputed, so a
    search costs the index search and not a pass over the images table."""

    def __init__(self, cat: Catalog) -> None:
        self.cat = cat
        images = cat.images
        self.images = images
        self.rows = images.set_index("image_id", drop=False)
        # what a result shows, by image id, in plain dicts: a search reads ten rows
        ids = images["image_id"].tolist()
        self.key_of = dict(zip(ids, images["key"].tolist(), strict=True))
        self.shown = dict(zip(ids, zip(images["page"].tolist(), map(_text, images["top_class"].tolist()),
                                       map(_text, images["category"].tolist()), strict=True), strict=True))
        first = images.sort_values(["key", "page"]).drop_duplicates("key")
        self.first_page = dict(zip(first["key"], first["image_id"].tolist(), strict=True))
        self.pages_of_key = images.groupby("key").size().to_dict()
        self.index = cat.index  # loaded before the view goes live
        # flat and IVF-Flat keep the stored vectors exactly; PQ codes are approximations
        self.exact_vectors = index_choice.index_kind(cat.manifest.index_type) in ("flat", "ivf-flat")
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._cache_lock = threading.Lock()

    @property
    def version(self) -> int:
        return self.cat.manifest.version

    def cached(self, key: tuple, make):
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = make()
        with self._cache_lock:
            self._cache[key] = value
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return value

    def allowed_ids(self, prefix: str | None, category: str | None) -> np.ndarray | None:
        if not prefix and not category:
            return None
        return self.cached(("allowed", prefix, category),
                           lambda: image_search.allowed_ids(self.cat, prefix=prefix or None, category=category or None))

    def vectors_for_keys(self, keys: Sequence[str]) -> np.ndarray:
        """Stored embeddings of `keys` (a document's first page), as `tasks.search` reads them."""
        ids = [self.first_page.get(k) for k in keys]
        if None in ids or not self.exact_vectors:
            return image_search.vectors_for_keys(self.cat, keys)  # names the missing key, or reads PQ parts
        return np.stack([self.index.reconstruct(int(i)) for i in ids])

    def neighbours(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None,
                   exclude_keys: Sequence[str | None] | None = None,
                   labels: Sequence[str] | None = None) -> list[dict]:
        """The rows `tasks.search.neighbours` gives (same ranks, order, scores), as
        JSON-ready records; `labels[i]` is query i's `query` field. On an exact
        index (flat, IVF-Flat) the rows are read from arrays here, since building
        a DataFrame costs ten times the search; IVF-PQ goes through tasks.search."""
        if not self.exact_vectors:
            found = image_search.neighbours(self.cat, queries, k, allowed_ids=allowed, exclude_keys=exclude_keys)
            hits = zip(*(found[c].tolist() for c in ("query_index", "rank", "key", "page", "score", "image_id")),
                       strict=True)
            return [self._record(qi, rank, key, score, image_id, labels) for qi, rank, key, _, score, image_id in hits]
        exclude = list(exclude_keys) if exclude_keys is not None else [None] * len(queries)
        extra = max((self.pages_of_key.get(key, 0) for key in exclude if key), default=0)
        scores, ids = faiss_index.search(self.index, queries, k + extra, nprobe=self.cat.manifest.index_nprobe or None,
                                         allowed_ids=allowed)
        out = []
        for qi in range(len(queries)):
            rank = 0
            for image_id, score in zip(ids[qi].tolist(), scores[qi].tolist(), strict=True):
                if image_id < 0 or self.key_of[image_id] == exclude[qi]:
                    continue
                rank += 1
                if rank > k:
                    break
                out.append(self._record(qi, rank, self.key_of[image_id], score, image_id, labels))
        return out

    def _record(self, qi: int, rank: int, key: str, score: float, image_id: int, labels) -> dict:
        page, top_class, category = self.shown[image_id]
        record = {"rank": rank, "key": key, "page": page, "score": score, "top_class": top_class,
                  "category": category, "image_id": str(image_id)}
        return record if labels is None else {"query": labels[qi], **record}

    def search_keys(self, keys: Sequence[str], k: int, *, prefix: str | None = None, category: str | None = None,
                    include_self: bool = False) -> list[dict]:
        allowed = self.allowed_ids(prefix, category)
        return self.neighbours(self.vectors_for_keys(keys), k, allowed=allowed,
                               exclude_keys=None if include_self else keys, labels=keys if len(keys) > 1 else None)

    def row(self, image_id: int) -> pd.Series:
        try:
            return self.rows.loc[image_id]
        except KeyError:
            raise HTTPException(404, f"no image {image_id} in catalogue version {self.version}") from None


def live_pointer(store: ObjectStore):
    """The `CURRENT` pointer, or a CatalogError saying there is no catalogue."""
    pointer, _ = read_pointer(store)
    if pointer is None:
        raise CatalogError(f"no catalogue at {store.url} (no CURRENT pointer); "
                           "run `batchsight run --source SRC --output OUT` first")
    return pointer


class LiveCatalog:
    """The live version of a catalogue, following `CURRENT`. A check runs at most
    every `poll_s`, in a background thread; a new version is loaded whole (tables
    and index) before it replaces the old one, and a version that cannot be
    loaded is logged and skipped while the old one keeps serving."""

    def __init__(self, store: ObjectStore, *, poll_s: float = 2.0) -> None:
        self.store = store
        self.poll_s = poll_s
        self._view: CatalogView | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self.labels = LabelLog(store)

    def view(self) -> CatalogView:
        if self._view is None:
            with self._lock:
                if self._view is None:
                    self.refresh()
        elif time.monotonic() - self._checked >= self.poll_s and self._lock.acquire(blocking=False):
            self._checked = time.monotonic()
            threading.Thread(target=self._refresh_in_background, name="batchsight-ui-refresh", daemon=True).start()
        assert self._view is not None
        return self._view

    def _refresh_in_background(self) -> None:
        try:
            self.refresh()
        except Exception:  # the version in service stays; the next check tries again
            log.warning("could not load the new catalogue version; still serving version %s",
                        self._view.version if self._view else None, exc_info=True)
        finally:
            self._lock.release()

    def refresh(self) -> None:
        """Load the version `CURRENT` names, if it is not the one in service."""
        self._checked = time.monotonic()
        pointer = live_pointer(self.store)
        if self._view is not None and self._view.cat.manifest_key == pointer.manifest:
            return
        view = CatalogView(Catalog(self.store, read_manifest(self.store, pointer.manifest), pointer.manifest))
        self._view = view
        log.info("serving catalogue version %s", view.version)


# ---- the request guard: token, host and security headers, as plain ASGI (no per-request task hop)


class RequestGuard:
    """Adds the security headers to every response; checks the token where one is
    needed (every request when `token_everywhere`, else label writes) and the Host
    header (a page on another site cannot reach a loopback server by DNS rebinding)."""

    def __init__(self, app, *, token: str | None, token_everywhere: bool,
                 allowed_hosts: Sequence[str] | None) -> None:
        self.app = app
        self.token = token
        self.token_everywhere = token_everywhere
        self.allowed_hosts = set(allowed_hosts) if allowed_hosts else None

    def _given_token(self, scope, headers: dict[bytes, bytes]) -> tuple[str | None, bool]:
        """(token sent, whether it came in the query string and so should become a cookie)."""
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        if b"x-batchsight-token" in headers:
            return headers[b"x-batchsight-token"].decode("latin-1"), False
        for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
            name, _, value = part.strip().partition("=")
            if name == TOKEN_COOKIE:
                return value, False
        for part in scope.get("query_string", b"").decode("latin-1").split("&"):
            name, _, value = part.partition("=")
            if name == "token":
                from urllib.parse import unquote
                return unquote(value), True
        return None, False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.allowed_hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.allowed_hosts:
                return await _plain(send, 421, {"detail": f"host {host!r} is not served here"})
        set_cookie = None
        if self.token:
            given, from_query = self._given_token(scope, headers)
            ok = given is not None and hmac.compare_digest(given.encode(), self.token.encode())
            writes_labels = scope["path"].startswith("/api/labels") and scope["method"] not in ("GET", "HEAD")
            if (self.token_everywhere or writes_labels) and not ok:
                return await _plain(send, 401, {"detail": "this server needs its token: send the header "
                                                          "'Authorization: Bearer TOKEN', or open the page once "
                                                          "as /?token=TOKEN"})
            if ok and from_query:
                set_cookie = (f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict").encode()

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS + (
                    [(b"set-cookie", set_cookie)] if set_cookie else [])
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _plain(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": data})


# ---- API models


class SearchOptions(BaseModel):
    k: int = Field(10, ge=1, le=1000, description="Neighbours per key.")
    prefix: str | None = Field(None, description="Only return images whose key starts with this.")
    category: str | None = Field(None, description="Only return images of this category.")
    include_self: bool = Field(False, description="Keep each key's own object in its results.")


class KeyQuery(SearchOptions):
    key: str = Field(description="A catalogued key to search from.")


class KeysQuery(SearchOptions):
    keys: list[str] = Field(min_length=1, max_length=1000, description="Catalogued keys to search from.")


class LabelIn(BaseModel):
    image_id: str = Field(description="The image's id (as a string: ids are 63-bit).", pattern=r"^\d{1,19}$")
    label: str = Field(min_length=1, max_length=100)


class LabelsIn(BaseModel):
    labels: list[LabelIn] = Field(min_length=1, max_length=500)
    labeller: str = Field("anonymous", max_length=100, description="Who labelled (shown in the history).")


def records(frame: pd.DataFrame) -> list[dict]:
    """JSON-ready rows: NaN as null, times as ISO text, image ids as strings (a
    63-bit id does not survive a JavaScript number)."""
    frame = frame.copy()
    for col in ("image_id", "group_id"):
        if col in frame:
            frame[col] = frame[col].astype("int64").astype(str)
    return json.loads(frame.to_json(orient="records", date_format="iso", double_precision=15))


def json_response(body: dict) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _text(value) -> str | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


# ---- the app


def create_app(catalog: str | ObjectStore, *, token: str | None = None, token_everywhere: bool | None = None,
               endpoint_url: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               poll_s: float = 2.0, allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The web app over the catalogue at `catalog` (a folder or s3:// URL, or a store).

    `token`: when set, label writes need it; with `token_everywhere` (default: when
    a token is given) every request does. `allowed_hosts`: Host header names
    accepted (None: any; `batchsight ui` on a loopback address passes the loopback names)."""
    store = catalog if isinstance(catalog, ObjectStore) else cached_store(catalog, endpoint_url)
    live = LiveCatalog(store, poll_s=poll_s)
    templates = Jinja2Templates(directory=str(STATIC_DIR / "templates"))
    app = FastAPI(title="batchsight", version="1", docs_url=None, redoc_url=None,
                  description="Search a batchsight catalogue, review its categories, follow its runs.")
    app.state.live = live
    app.add_middleware(RequestGuard, token=token,
                       token_everywhere=bool(token) if token_everywhere is None else token_everywhere,
                       allowed_hosts=allowed_hosts)
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR / "static")), name="static")

    def source_store() -> ObjectStore:
        return cached_store(live.view().cat.manifest.source, endpoint_url)

    # -- pages

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/search", status_code=303)

    def page(name: str):
        def render(request: Request) -> HTMLResponse:
            view = live.view()
            return templates.TemplateResponse(request, f"{name}.html",
                                              {"page": name, "pages": PAGES, "version": view.version,
                                               "catalog": store.url})
        render.__name__ = f"page_{name}"
        return render

    for name in PAGES:
        app.get(f"/{name}", include_in_schema=False, response_class=HTMLResponse)(page(name))

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    def docs(request: Request) -> HTMLResponse:
        # FastAPI's own docs page loads Swagger UI from a CDN, which neither the CSP
        # nor an offline machine allows; this lists the same OpenAPI document.
        spec = app.openapi()
        ops = [(method.upper(), path, op.get("summary", ""), op.get("description", ""),
                [p["name"] for p in op.get("parameters", [])])
               for path, methods in spec["paths"].items() for method, op in methods.items()]
        return templates.TemplateResponse(request, "docs.html", {"page": "docs", "pages": PAGES, "ops": ops,
                                                                  "version": live.view().version,
                                                                  "catalog": store.url})

    # -- API

    @app.get("/api/version", summary="The live catalogue version")
    def api_version() -> dict:
        m = live.view().cat.manifest
        return {"version": m.version, "manifest": live.view().cat.manifest_key, "created_at": m.created_at,
                "images": m.counts.get("images"), "model": m.model, "index_type": m.index_type,
                "categorizer": m.categorizer}

    @app.get("/api/images", summary="Browse catalogued images (key order)")
    def api_images(prefix: str | None = None, category: str | None = None,
                   offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 60) -> dict:
        view = live.view()
        images = view.images
        if prefix:
            images = images[images["key"].str.startswith(prefix)]
        if category:
            images = images[images["category"] == category]
        part = images.iloc[offset:offset + limit]
        return {"version": view.version, "total": len(images),
                "images": records(part[["image_id", "key", "page", "top_class", "category", "width", "height"]])}

    # Key searches run on the event loop: a few hundred microseconds of FAISS and
    # dict lookups cost less than the hop to a worker thread.
    @app.get("/api/search", summary="Images similar to a catalogued key")
    async def api_search(query: Annotated[KeyQuery, Query()]) -> Response:
        view = live.view()
        found = _user_call(view.search_keys, [query.key], query.k, prefix=query.prefix, category=query.category,
                           include_self=query.include_self)
        return json_response({"version": view.version, "query": query.key, "results": found})

    @app.post("/api/search/keys", summary="Images similar to each of several catalogued keys")
    async def api_search_keys(query: KeysQuery) -> Response:
        view = live.view()
        found = _user_call(view.search_keys, query.keys, query.k, prefix=query.prefix, category=query.category,
                           include_self=query.include_self)
        if len(query.keys) == 1:
            found = [{"query": query.keys[0], **r} for r in found]
        return json_response({"version": view.version, "results": found})

    @app.post("/api/search/image", summary="Images similar to an uploaded image (the request body is the file)",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/octet-stream": {"schema": {
                                                 "type": "string", "format": "binary"}}}}})
    async def api_search_image(request: Request, k: Annotated[int, Query(ge=1, le=1000)] = 10,
                               prefix: str | None = None, category: str | None = None) -> Response:
        data = await read_capped(request, max_upload_bytes)
        view = live.view()
        import anyio.to_thread

        def run() -> list[dict]:
            allowed = view.allowed_ids(prefix, category)
            return view.neighbours(image_search.embed_images(view.cat, [data]), k, allowed=allowed)

        found = await anyio.to_thread.run_sync(lambda: _user_call(run))
        return json_response({"version": view.version, "results": found})

    @app.get("/api/duplicates", summary="Near-duplicate groups at a threshold")
    def api_duplicates(threshold: Annotated[float, Query(ge=0.5, le=0.9999)] = 0.95) -> dict:
        view = live.view()
        groups = duplicate_groups(view, threshold)
        return {"version": view.version, "threshold": threshold, "groups": int(groups["group_id"].nunique()),
                "members": records(groups)}

    @app.get("/api/duplicates.csv", summary="Near-duplicate groups as CSV", response_class=Response)
    def api_duplicates_csv(threshold: Annotated[float, Query(ge=0.5, le=0.9999)] = 0.95) -> Response:
        view = live.view()
        groups = duplicate_groups(view, threshold)
        name = f"duplicates-v{view.version}-{threshold:g}.csv"
        return Response(groups.to_csv(index=False), media_type="text/csv",
                        headers={"content-disposition": f'attachment; filename="{name}"'})

    @app.get("/api/categories", summary="Categories of the live version and the active categoriser's labels")
    def api_categories() -> dict:
        view = live.view()
        counts = view.images["category"].value_counts().to_dict()
        return {"version": view.version, "counts": {str(k): int(v) for k, v in counts.items()},
                "choices": label_choices(view), "categorizer": view.cat.manifest.categorizer}

    @app.get("/api/review", summary=f"Images whose category is '{UNCERTAIN}', not labelled yet")
    def api_review(limit: Annotated[int, Query(ge=1, le=500)] = 100, include_labelled: bool = False) -> dict:
        view = live.view()
        images = view.images
        todo = images[images["category"] == UNCERTAIN]
        latest = live.labels.latest()
        if not include_labelled:
            todo = todo[~todo["image_id"].isin(latest["image_id"])]
        todo = todo.sort_values("category_confidence", kind="stable")
        return {"version": view.version, "total": len(todo), "choices": label_choices(view, latest),
                "images": records(todo.head(limit)[["image_id", "key", "page", "top_class", "category",
                                                    "category_confidence"]])}

    @app.get("/api/labels", summary="The standing label of each labelled image (history=true: every label saved)")
    def api_labels(history: bool = False) -> dict:
        frame = live.labels.history() if history else live.labels.latest()
        return {"labels": records(frame.drop(columns=["file"]) if not history else frame)}

    @app.post("/api/labels", summary="Save labels for images (appended to the catalogue's label log)")
    def api_save_labels(body: LabelsIn) -> dict:
        view = live.view()
        labels = []
        for item in body.labels:
            row = view.row(int(item.image_id))
            labels.append(Label(image_id=int(row["image_id"]), key=str(row["key"]), page=int(row["page"]),
                                label=item.label, previous_category=_text(row["category"])))
        key = _user_call(save_labels, store, labels, labeller=body.labeller, catalog_version=view.version)
        return {"saved": len(labels), "file": key}

    @app.get("/api/runs", summary="Run history and the failures of the live version")
    def api_runs(failures_limit: Annotated[int, Query(ge=0, le=10_000)] = 500) -> dict:
        view = live.view()
        runs = read_runs(store)
        failures = view.cat.failures
        reasons = failures["error_type"].value_counts().to_dict() if len(failures) else {}
        return {"version": view.version, "runs": records(runs), "failures_total": len(failures),
                "failures_by_reason": {str(k): int(v) for k, v in reasons.items()},
                "failures": records(failures.head(failures_limit))}

    @app.get("/api/images/{image_id}/thumbnail", summary="A small WebP thumbnail of one image, by id",
             response_class=Response)
    def api_thumbnail(image_id: int) -> Response:
        view = live.view()
        row = view.row(image_id)
        try:
            data = thumbnail_of(view.cat, row, source_store)
        except (DecodeError, ObjectNotFound) as exc:
            raise HTTPException(404, f"no thumbnail for image {image_id}: {exc}") from None
        return Response(data, media_type=THUMBNAIL_MEDIA_TYPE,
                        headers={"cache-control": "private, max-age=86400, immutable"})

    return app


def _user_call(fn, *args, **kwargs):
    """Run `fn`; a mistake in the request (unknown key, bad filter, unreadable
    upload) is a 400 with the message the CLI would print."""
    try:
        return fn(*args, **kwargs)
    except KeyError as exc:
        raise HTTPException(404, str(exc.args[0]) if exc.args else "not found") from None
    except (UserError, DecodeError) as exc:  # anything else is a bug: a 500, with its traceback in the log
        raise HTTPException(400, str(exc)) from None


async def read_capped(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload is {int(declared):,} bytes; the limit is {limit:,}")
    buf = io.BytesIO()
    async for chunk in request.stream():
        buf.write(chunk)
        if buf.tell() > limit:
            raise HTTPException(413, f"upload is over the limit of {limit:,} bytes")
    data = buf.getvalue()
    if not data:
        raise HTTPException(400, "send the image file as the request body")
    return data


def duplicate_groups(view: CatalogView, threshold: float) -> pd.DataFrame:
    def make() -> pd.DataFrame:
        return _user_call(find_duplicates, view.cat, threshold=threshold, write=False).groups
    return view.cached(("duplicates", round(threshold, 4)), make)


def label_choices(view: CatalogView, latest: pd.DataFrame | None = None) -> list[str]:
    """Labels a reviewer can pick: the active categoriser's, then any given before."""
    active = active_categorizer(view.cat.store)
    names = list(active[0].labels) if active else []
    known = view.images["category"].dropna().unique().tolist()
    given = latest["label"].tolist() if latest is not None else []
    for name in [*known, *given]:
        if name != UNCERTAIN and name not in names:
            names.append(str(name))
    return names


@dataclass(frozen=True)
class ServeSettings:
    """What a server process builds its app from: plain data, so that it can
    travel to uvicorn's worker processes."""

    catalog: str
    token: str | None
    token_everywhere: bool
    endpoint_url: str | None
    max_upload_bytes: int
    allowed_hosts: list[str] | None


def serving_app(settings: ServeSettings) -> FastAPI:
    """The app of one server process, its live version loaded (or its failure
    raised) before it listens."""
    import faiss

    faiss.omp_set_num_threads(1)  # one query a request: threads would only fight over the cores
    # What is imported by now (torch, prefect, pandas: ~430,000 objects) lives as long as the
    # process. Frozen, it is left out of the collector's full passes, which took ~0.4 s each, with
    # every request waiting; the catalogue versions loaded later stay collectable.
    gc.freeze()
    app = create_app(settings.catalog, token=settings.token, token_everywhere=settings.token_everywhere,
                     endpoint_url=settings.endpoint_url, max_upload_bytes=settings.max_upload_bytes,
                     allowed_hosts=settings.allowed_hosts)
    app.state.live.view()
    return app


def worker_app() -> FastAPI:
    """uvicorn's app factory in each `--workers` process; `serve` passes the settings in the environment."""
    return serving_app(ServeSettings(**json.loads(os.environ[WORKER_SETTINGS_ENV])))


def serve(catalog: str, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
          endpoint_url: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, workers: int = 1) -> None:
    """Run the app with uvicorn until interrupted (what `batchsight ui` does).

    With `workers` > 1, that many processes accept on the one socket, each
    holding its own copy of the live version (memory: `workers` x the index) and
    following `CURRENT` on its own; one Python process uses one core at most."""
    import uvicorn

    check_bind(host, token)
    settings = ServeSettings(catalog=catalog, token=token, token_everywhere=bool(token) and not is_loopback(host),
                             endpoint_url=endpoint_url, max_upload_bytes=max_upload_bytes,
                             allowed_hosts=["127.0.0.1", "localhost", "[::1]", host] if is_loopback(host) else None)
    options = {"host": host, "port": port, "log_level": "warning", "access_log": False}
    if workers == 1:
        uvicorn.run(serving_app(settings), **options)
        return
    store = cached_store(catalog, endpoint_url)
    read_manifest(store, live_pointer(store).manifest)  # a missing catalogue fails here once, not in each worker
    os.environ[WORKER_SETTINGS_ENV] = json.dumps(asdict(settings))
    uvicorn.run(f"{__name__}:worker_app", factory=True, workers=workers, **options)
