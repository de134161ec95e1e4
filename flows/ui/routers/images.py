"""Browsing the live version's images, their thumbnails, and its near-duplicate
groups (as JSON and as CSV), whatever columns the duplicates table has."""

from __future__ import annotations

from typing import Annotated

import pandas as pd
from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response

from flows.search import find_duplicates
from flows.ui.context import Page
from flows.ui.live import CatalogView
from flows.ui.responses import records, spreadsheet_csv, user_call
from tasks.search.thumbnails import THUMBNAIL_MEDIA_TYPE, thumbnail_of
from tasks.shard.decode import DecodeError
from tasks.storage import ObjectNotFound

router = APIRouter(prefix="/api")

Threshold = Annotated[float, Query(ge=0.5, le=0.9999)]


@router.get("/images", summary="Browse catalogued images (key order)")
def api_images(page: Page, prefix: str | None = None, category: str | None = None,
               offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 60) -> dict:
    view = page.live.view()
    images = view.images
    if prefix:
        images = images[images["key"].str.startswith(prefix)]
    if category:
        images = images[images["category"] == category]
    part = images.iloc[offset:offset + limit]
    return {"version": view.version, "total": len(images),
            "images": records(part[["image_id", "key", "page", "top_class", "category", "width", "height"]])}


@router.get("/images/{image_id}/thumbnail", summary="A small WebP thumbnail of one image, by id",
            response_class=Response)
def api_thumbnail(image_id: int, page: Page) -> Response:
    view = page.live.view()
    row = user_call(view.row, image_id)
    try:
        data = thumbnail_of(view.cat, row, page.source_store)
    except ObjectNotFound:  # its message names the source's path on this server: not for the page
        raise HTTPException(404, f"no thumbnail for image {image_id}: the run made none and its original "
                                 f"{row['key']!r} is no longer in the source") from None
    except DecodeError as exc:
        raise HTTPException(404, f"no thumbnail for image {image_id}: its original cannot be decoded "
                                 f"({exc.reason})") from None
    return Response(data, media_type=THUMBNAIL_MEDIA_TYPE,
                    headers={"cache-control": "private, max-age=86400, immutable"})


def duplicate_groups(view: CatalogView, threshold: float) -> pd.DataFrame:
    """`find_duplicates` of the version at `threshold`, kept per version."""
    return view.cached(("duplicates", round(threshold, 4)),
                       lambda: user_call(find_duplicates, view.cat, threshold=threshold, write=False).groups)


@router.get("/duplicates", summary="Near-duplicate groups at a threshold")
def api_duplicates(page: Page, threshold: Threshold = 0.95) -> dict:
    view = page.live.view()
    groups = duplicate_groups(view, threshold)
    return {"version": view.version, "threshold": threshold, "groups": int(groups["group_id"].nunique()),
            "columns": [str(c) for c in groups.columns], "members": records(groups)}


@router.get("/duplicates.csv", summary="Near-duplicate groups as CSV (text cells that start like a formula are "
                                       "written with a leading ')", response_class=Response)
def api_duplicates_csv(page: Page, threshold: Threshold = 0.95) -> Response:
    view = page.live.view()
    groups = duplicate_groups(view, threshold)
    name = f"duplicates-v{view.version}-{threshold:g}.csv"
    return Response(spreadsheet_csv(groups), media_type="text/csv",
                    headers={"content-disposition": f'attachment; filename="{name}"'})
