"""`create_app`: the page's FastAPI app over one catalogue, its routers, the
guard around them, and the state they share (`PageContext`)."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from flows.ui.context import STATIC_DIR, PageContext
from flows.ui.live import LiveCatalog
from flows.ui.responses import install_error_responses
from flows.ui.routers import images, pages, review, runs, search
from flows.ui.security import DEFAULT_MAX_JSON_BYTES, RequestGuard
from flows.ui.uploads import DEFAULT_DECODE_BUDGET_PIXELS, DEFAULT_MAX_UPLOAD_BYTES, UPLOADS_IN_FLIGHT, InFlightBudget
from tasks.storage import ObjectStore, cached_store


def create_app(catalog: str | ObjectStore, *, token: str | None = None, token_everywhere: bool | None = None,
               endpoint_url: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               decode_budget_pixels: int = DEFAULT_DECODE_BUDGET_PIXELS, max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
               poll_s: float = 2.0, allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The web app over the catalogue at `catalog` (a folder or s3:// URL, or a store).

    `token`: when set, label writes need it; with `token_everywhere` (default: when
    a token is given) every request does. `allowed_hosts`: Host header names
    accepted (None: any; `batchsight ui` passes the loopback names, its bind
    address and its `--allow-host` names). `max_upload_bytes` caps a query
    image, `max_json_bytes` any other body; `decode_budget_pixels` is what all
    uploads in flight may decode at once."""
    store = catalog if isinstance(catalog, ObjectStore) else cached_store(catalog, endpoint_url)
    app = FastAPI(title="batchsight", version="1", docs_url=None, redoc_url=None,
                  description="Search a batchsight catalogue, review its categories, follow its runs.")
    app.state.page = PageContext(
        live=LiveCatalog(store, poll_s=poll_s), store=store, endpoint_url=endpoint_url,
        max_upload_bytes=max_upload_bytes,
        upload_bytes=InFlightBudget(UPLOADS_IN_FLIGHT * max_upload_bytes, "bytes"),
        decode_pixels=InFlightBudget(decode_budget_pixels, "pixels"),
        templates=Jinja2Templates(directory=str(STATIC_DIR / "templates")))
    app.state.live = app.state.page.live
    app.add_middleware(RequestGuard, token=token,
                       token_everywhere=bool(token) if token_everywhere is None else token_everywhere,
                       allowed_hosts=allowed_hosts, body_limits={search.UPLOAD_PATH: max_upload_bytes},
                       max_json_bytes=max_json_bytes)
    install_error_responses(app, app.state.page.server_roots)
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR / "static")), name="static")
    for router in (pages.router, search.router, images.router, review.router, runs.router):
        app.include_router(router)
    return app
