"""What every route of one app reads: the live catalogue, the store, the upload
limits and budgets, the templates. Built once by `create_app`, handed to routes
as the `Page` dependency."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates

from flows.ui.live import LiveCatalog
from flows.ui.uploads import InFlightBudget
from tasks.storage import ObjectStore, cached_store, is_s3_url

STATIC_DIR = Path(__file__).resolve().parents[1] / "ui_static"
PAGES = ("search", "duplicates", "review", "runs")


@dataclass(frozen=True)
class PageContext:
    live: LiveCatalog
    store: ObjectStore  # the catalogue's
    endpoint_url: str | None
    max_upload_bytes: int
    upload_bytes: InFlightBudget  # bodies of uploads being read and decoded
    decode_pixels: InFlightBudget  # pixels of uploads being decoded
    templates: Jinja2Templates

    def source_store(self) -> ObjectStore:
        """The live version's source (opened only when a thumbnail must be made from an original)."""
        return cached_store(self.live.view().cat.manifest.source, self.endpoint_url)

    def server_roots(self) -> list[str]:
        """Where the catalogue and the served version's source are, as a message may name them."""
        roots = [self.store.url]
        view = self.live.served()
        if view is not None:
            source = view.cat.manifest.source
            roots.append(source)
            if not is_s3_url(source):
                roots.append(str(Path(source).expanduser().resolve()))
        return roots


async def page_context(request: Request) -> PageContext:
    # async: FastAPI runs a plain function dependency in a worker thread, a hop that doubled a key search's cost
    return request.app.state.page


Page = Annotated[PageContext, Depends(page_context)]
