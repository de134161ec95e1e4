"""Search by catalogued key(s) and by an uploaded image, through
`tasks.search.query` (what `batchsight search` runs), with the version's
lookups and filters kept per version (`CatalogView`)."""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from flows.ui.context import Page
from flows.ui.live import CatalogView
from flows.ui.responses import json_response, result_records, user_call
from flows.ui.schemas import KeyQuery, KeysQuery
from flows.ui.uploads import check_upload_type, declared_length, pixels_to_decode, read_body
from models.errors import UserError
from models.registry import model_family
from tasks.search import query as image_search

router = APIRouter(prefix="/api")

UPLOAD_PATH = "/api/search/image"  # its body is the image: capped at the upload limit, not the JSON one


def search_keys(view: CatalogView, keys: list[str], k: int, *, prefix: str | None, category: str | None,
                include_self: bool) -> list[dict]:
    allowed = view.allowed_ids(prefix, category)
    vectors = image_search.vectors_for_keys(view.cat, keys, lookups=view.lookups)
    found = image_search.neighbour_columns(view.cat, vectors, k, allowed_ids=allowed,
                                           exclude_keys=None if include_self else keys, lookups=view.lookups)
    return result_records(found, keys if len(keys) > 1 else None)


def search_image(view: CatalogView, data: bytes, k: int, *, prefix: str | None, category: str | None) -> list[dict]:
    allowed = view.allowed_ids(prefix, category)
    found = image_search.neighbour_columns(view.cat, image_search.embed_images(view.cat, [data]), k,
                                           allowed_ids=allowed, lookups=view.lookups)
    return result_records(found)


def decode_side(view: CatalogView) -> int | None:
    """The shorter side the version's model resizes to: a JPEG upload decodes at the draft scale that keeps it."""
    def side() -> int | None:
        try:
            return model_family(view.cat.manifest.model).preprocessing.resize_size
        except UserError:  # a model this process does not know: counted at full size
            return None
    return view.cached(("decode_side",), side)


# Key searches run on the event loop: about a millisecond of FAISS and lookups
# costs less than the hop to a worker thread.
@router.get("/search", summary="Images similar to a catalogued key")
async def api_search(query: Annotated[KeyQuery, Query()], page: Page) -> Response:
    view = page.live.view()
    found = user_call(search_keys, view, [query.key], query.k, prefix=query.prefix, category=query.category,
                      include_self=query.include_self)
    return json_response({"version": view.version, "query": query.key, "results": found})


@router.post("/search/keys", summary="Images similar to each of several catalogued keys")
async def api_search_keys(query: KeysQuery, page: Page) -> Response:
    view = page.live.view()
    found = user_call(search_keys, view, query.keys, query.k, prefix=query.prefix, category=query.category,
                      include_self=query.include_self)
    if len(query.keys) == 1:
        found = [{"query": query.keys[0], **r} for r in found]
    return json_response({"version": view.version, "results": found})


@router.post(UPLOAD_PATH.removeprefix(router.prefix),
             summary="Images similar to an uploaded image (the request body is the file)",
             description="The body is the image file, sent as its image type (image/jpeg, image/png, ...) or as "
                         "application/octet-stream (a PDF too). An image that alone is larger than the server's decode "
                         "budget is refused (413); while other uploads hold the budget, 429 with Retry-After.",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "image/*": {"schema": {"type": "string", "format": "binary"}},
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def api_search_image(request: Request, page: Page, k: Annotated[int, Query(ge=1, le=1000)] = 10,
                           prefix: str | None = None, category: str | None = None) -> Response:
    check_upload_type(request)
    with page.upload_bytes.hold(declared_length(request, page.max_upload_bytes), "the upload"):
        data = await read_body(request, page.max_upload_bytes)
        view = page.live.view()
        with page.decode_pixels.hold(pixels_to_decode(data, decode_side(view)), "the image to decode"):
            found = await anyio.to_thread.run_sync(
                lambda: user_call(search_image, view, data, k, prefix=prefix, category=category))
    return json_response({"version": view.version, "results": found})
