"""The HTML pages (Search, Duplicates, Review, Runs) and `/docs`, our own list of
the OpenAPI document (FastAPI's loads Swagger UI from a CDN, which neither the
CSP nor an offline machine allows)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from flows.ui.context import PAGES, Page

router = APIRouter(include_in_schema=False)


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/search", status_code=303)


def _render(request: Request, page: Page, name: str, **extra) -> HTMLResponse:
    return page.templates.TemplateResponse(request, f"{name}.html", {
        "page": name, "pages": PAGES, "version": page.live.view().version, "catalog": page.store.url, **extra})


@router.get("/docs", response_class=HTMLResponse)
def docs(request: Request, page: Page) -> HTMLResponse:
    spec = request.app.openapi()
    ops = [(method.upper(), path, op.get("summary", ""), op.get("description", ""),
            [p["name"] for p in op.get("parameters", [])])
           for path, methods in spec["paths"].items() for method, op in methods.items()]
    return _render(request, page, "docs", ops=ops)


def _page_route(name: str):
    def render(request: Request, page: Page) -> HTMLResponse:
        return _render(request, page, name)
    render.__name__ = f"page_{name}"
    return render


for _name in PAGES:
    router.get(f"/{_name}", response_class=HTMLResponse)(_page_route(_name))
