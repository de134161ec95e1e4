"""The search service and review page: `batchsight ui --catalog OUT`.

`create_app(catalog, token=...)` builds a FastAPI app: HTML pages (Search,
Duplicates, Review, Runs) and the JSON API under `/api/` they call. Modules:

- `app`: `create_app`, the routers and the guard put together;
- `routers/`: the routes, one module a concern (pages, search, images and
  duplicates, review and labels, runs and status);
- `live`: the live version, following `CURRENT` (loaded whole in the background,
  swapped in at once; a version that fails to load is reported, not retried
  every poll);
- `security`: the request guard (Host, Origin, body limits, token, headers) and
  `check_bind`;
- `uploads`: query images (image types only, byte and pixel budgets);
- `responses`, `schemas`, `context`: how answers are written, what requests
  hold, what the routes share;
- `serving`: uvicorn (`serve`, what `batchsight ui` runs).

Search, duplicates, thumbnails and labels are the plain functions of
`tasks/search/query.py`, `flows/search.py`, `tasks/search/thumbnails.py` and
`tasks/categories/labels.py`; the page keeps per version only what makes them
cheap to call again (`SearchLookups`, filters, duplicate reports).
"""

from flows.ui.app import create_app
from flows.ui.security import CONTENT_SECURITY_POLICY, check_bind
from flows.ui.serving import serve

__all__ = ["CONTENT_SECURITY_POLICY", "check_bind", "create_app", "serve"]
