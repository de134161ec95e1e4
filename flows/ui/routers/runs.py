"""Run history and the live version's failures, the version served, and the
server's own state: which version it serves and whether a newer one failed to load."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from flows.ui.context import Page
from flows.ui.responses import records
from tasks.catalog.runs_log import read_runs

router = APIRouter(prefix="/api")


@router.get("/version", summary="The live catalogue version")
def api_version(page: Page) -> dict:
    view = page.live.view()
    m = view.cat.manifest
    return {"version": m.version, "manifest": view.manifest_key, "created_at": m.created_at,
            "images": m.counts.get("images"), "model": m.model, "index_type": m.index_type,
            "categorizer": m.categorizer}


@router.get("/status", summary="The version this server serves, when it last read CURRENT, and the newer version "
                               "that failed to load (failed: its version, reason, since when), if one did")
def api_status(page: Page) -> dict:
    return page.live.status()


@router.get("/runs", summary="Run history and the failures of the live version")
def api_runs(page: Page, failures_limit: Annotated[int, Query(ge=0, le=10_000)] = 500) -> dict:
    view = page.live.view()
    runs = read_runs(page.store)
    failures = view.failures
    reasons = failures["error_type"].value_counts().to_dict() if len(failures) else {}
    return {"version": view.version, "status": page.live.status(), "runs": records(runs),
            "failures_total": len(failures), "failures_by_reason": {str(k): int(v) for k, v in reasons.items()},
            "failures": records(failures.head(failures_limit))}
