"""How the page's API answers: JSON-ready rows (63-bit ids as strings), orjson
for the hot routes, a request's mistakes as 4xx with the message the CLI would
print, error bodies that nothing a client sent can break, and CSV cells that no
spreadsheet runs as a formula."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import orjson
import pandas as pd
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pandas.api.types import is_integer_dtype
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import UserError
from tasks.search.query import RESULT_COLUMNS
from tasks.shard.decode import DecodeError

T = TypeVar("T")

# A cell starting with one of these is a formula to Excel, LibreOffice and Sheets
# (OWASP's list): a key such as `=HYPERLINK(...)` must reach the sheet as text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def records(frame: pd.DataFrame) -> list[dict]:
    """JSON-ready rows: NaN as null, times as ISO text, ids (`image_id`, any
    integer `..._id`) as strings (a 63-bit id does not survive a JavaScript number)."""
    frame = frame.copy()
    for col in frame.columns:
        if (col == "image_id" or str(col).endswith("_id")) and is_integer_dtype(frame[col]):
            frame[col] = [None if pd.isna(v) else str(int(v)) for v in frame[col].tolist()]
    return json.loads(frame.to_json(orient="records", date_format="iso", double_precision=15))


def result_records(found: dict[str, np.ndarray], queries: Sequence[str] | None = None) -> list[dict]:
    """The rows of `tasks.search.query.neighbour_columns` as JSON-ready records
    (missing text is NaN, which orjson writes as null); `queries[i]` is query
    i's `query` field."""
    out = []
    for qi, *values in zip(*(found[c].tolist() for c in ("query_index", *RESULT_COLUMNS)), strict=True):
        record = dict(zip(RESULT_COLUMNS, values, strict=True))
        record["image_id"] = str(record["image_id"])
        out.append(record if queries is None else {"query": queries[qi], **record})
    return out


def json_response(body: dict) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def ascii_json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON with every non-ASCII character escaped: an error may quote what a
    client sent, a lone surrogate too, which no UTF-8 encoder takes."""
    return Response(json.dumps(jsonable_encoder(body), ensure_ascii=True), status_code=status, headers=headers,
                    media_type="application/json")


def install_error_responses(app: FastAPI, server_roots: Callable[[], list[str]]) -> None:
    """Errors as ASCII JSON, and a message that names a file under one of
    `server_roots()` (the catalogue's, its source's) names it by its key there:
    where the server keeps its files is not the client's business."""
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail
        if isinstance(detail, str):
            for root in server_roots():
                detail = detail.replace(root.rstrip("/") + "/", "")
        return ascii_json({"detail": detail}, exc.status_code, exc.headers)

    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return ascii_json({"detail": exc.errors()}, 422)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)


def user_call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn`; a mistake in the request (unknown key or image, bad filter,
    unreadable upload) is a 404 or 400 with the message the CLI would print."""
    try:
        return fn(*args, **kwargs)
    except KeyError as exc:
        raise HTTPException(404, str(exc.args[0]) if exc.args else "not found") from None
    except (UserError, DecodeError) as exc:  # anything else is a bug: a 500, with its traceback in the log
        raise HTTPException(400, str(exc)) from None


def spreadsheet_csv(frame: pd.DataFrame) -> str:
    """`frame` as CSV with every text cell that a spreadsheet would run as a
    formula written as text (a leading `'`), whatever columns the frame has."""
    safe = frame.copy()
    for col in safe.columns:
        if not (pd.api.types.is_object_dtype(safe[col]) or pd.api.types.is_string_dtype(safe[col])):
            continue
        safe[col] = [f"'{v}" if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v
                     for v in safe[col].tolist()]
    return safe.to_csv(index=False)
