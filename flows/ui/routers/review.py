"""Categories, the review queue (images the categoriser is unsure of) and the
labels people give there, appended to the catalogue's label log."""

from __future__ import annotations

from typing import Annotated

import pandas as pd
from fastapi import APIRouter, Query

from flows.ui.context import Page
from flows.ui.live import CatalogView
from flows.ui.responses import records, user_call
from flows.ui.schemas import LabelsIn
from models.categorizer import UNCERTAIN
from tasks.categories.labels import Label, is_reserved, save_labels
from tasks.categories.store import active_categorizer

router = APIRouter(prefix="/api")


def label_choices(view: CatalogView, latest: pd.DataFrame | None = None) -> list[str]:
    """Labels a reviewer can pick: the active categoriser's, then any given before."""
    active = active_categorizer(view.cat.store)
    names = list(active[0].labels) if active else []
    known = view.images["category"].dropna().unique().tolist()
    given = latest["label"].tolist() if latest is not None else []
    for name in [*known, *given]:
        if not is_reserved(str(name)) and name not in names:
            names.append(str(name))
    return names


def _text(value) -> str | None:
    return None if value is None or pd.isna(value) else str(value)


@router.get("/categories", summary="Categories of the live version and the active categoriser's labels")
def api_categories(page: Page) -> dict:
    view = page.live.view()
    counts = view.images["category"].value_counts().to_dict()
    return {"version": view.version, "counts": {str(k): int(v) for k, v in counts.items()},
            "choices": label_choices(view), "categorizer": view.cat.manifest.categorizer}


@router.get("/review", summary=f"Images whose category is '{UNCERTAIN}', not labelled yet")
def api_review(page: Page, limit: Annotated[int, Query(ge=1, le=500)] = 100, include_labelled: bool = False) -> dict:
    view = page.live.view()
    images = view.images
    todo = images[images["category"] == UNCERTAIN]
    latest = page.live.labels.latest()
    if not include_labelled:
        todo = todo[~todo["image_id"].isin(latest["image_id"])]
    todo = todo.sort_values("category_confidence", kind="stable")
    return {"version": view.version, "total": len(todo), "choices": label_choices(view, latest),
            "images": records(todo.head(limit)[["image_id", "key", "page", "top_class", "category",
                                                "category_confidence"]])}


@router.get("/labels", summary="The standing label of each labelled image (history=true: every label saved)")
def api_labels(page: Page, history: bool = False) -> dict:
    frame = page.live.labels.history() if history else page.live.labels.latest().drop(columns=["file"])
    return {"labels": records(frame)}


@router.post("/labels", summary="Save labels for images (appended to the catalogue's label log)",
             description=f"'{UNCERTAIN}' is refused: it is the categoriser's mark for the review queue. Once the "
                         "log holds many files, a save folds them into one (the history reads the same).")
def api_save_labels(body: LabelsIn, page: Page) -> dict:
    view = page.live.view()
    labels = []
    for item in body.labels:
        row = user_call(view.row, int(item.image_id))
        labels.append(Label(image_id=int(row["image_id"]), key=str(row["key"]), page=int(row["page"]),
                            label=item.label, previous_category=_text(row["category"])))
    key = user_call(save_labels, page.store, labels, labeller=body.labeller, catalog_version=view.version)
    page.live.labels.compact()
    return {"saved": len(labels), "file": key}
