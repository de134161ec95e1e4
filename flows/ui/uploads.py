"""Query images uploaded to the page: only image bodies are taken (so a page on
another site cannot send one without a preflight, which the server refuses),
and what all uploads in flight may hold together is budgeted: bytes while the
bodies are read, pixels while they are decoded. A request that would go past a
budget is refused at once (429, or 413 when it alone is larger than the budget)
rather than queued; memory then stays bounded whatever arrives at once."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
from fastapi import HTTPException, Request
from PIL import Image

from tasks.shard.decode import MAX_RENDER_PIXELS

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# Pixels of uploads decoded at once in one server process. Decoding costs up to
# ~13 bytes a pixel at its peak (an RGBA PNG: the image, its RGB copy, the alpha
# channel), so 48 MP stays within ~0.6 GB. A JPEG counts at its draft scale: a
# 48 MP phone photo decodes at 1/8 a side, under 1 MP.
DEFAULT_DECODE_BUDGET_PIXELS = 48_000_000
UPLOADS_IN_FLIGHT = 4  # bodies of `max_upload_bytes` read at once; smaller ones share the same bytes
UPLOAD_READ_TIMEOUT_S = 60.0  # a body trickled in slower than this is dropped
RETRY_AFTER_S = 1
UPLOAD_TYPES = ("image/", "application/octet-stream")


class InFlightBudget:
    """An amount (pixels, bytes) that the requests in flight hold together, at
    most `capacity`. `hold` refuses at once what does not fit: 413 when the one
    request is over the whole budget, 429 (with Retry-After) while others hold it."""

    def __init__(self, capacity: int, unit: str) -> None:
        if capacity < 1:
            raise ValueError(f"a budget of {capacity} {unit} admits nothing")
        self.capacity = capacity
        self.unit = unit
        self.held = 0
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, amount: int, what: str) -> Iterator[None]:
        if amount > self.capacity:
            raise HTTPException(413, f"{what} is {_amount(amount, self.unit)}; this server takes at most "
                                     f"{_amount(self.capacity, self.unit)} of uploads at once: send a smaller image")
        with self._lock:
            if self.held + amount > self.capacity:
                raise HTTPException(429, f"the server is busy with other uploads ({_amount(self.held, self.unit)} of "
                                         f"{_amount(self.capacity, self.unit)}); try again in a moment",
                                    headers={"retry-after": str(RETRY_AFTER_S)})
            self.held += amount
        try:
            yield
        finally:
            with self._lock:
                self.held -= amount


def _amount(value: int, unit: str) -> str:
    if unit == "pixels":
        return f"{value / 1e6:,.1f} MP"
    return f"{value:,} {unit}"


def check_upload_type(request: Request) -> None:
    """Only image bodies (`image/*`, or `application/octet-stream` for any file, a
    PDF too): other types (a browser's `text/plain`, forms) are what a page on
    another site may send without asking first."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not kind.startswith(UPLOAD_TYPES):
        raise HTTPException(415, f"send the image file as the request body with its image type (image/jpeg, "
                                 f"image/png, ...) or as application/octet-stream (a PDF too), not "
                                 f"{kind or 'no content type'}")


def declared_length(request: Request, limit: int) -> int:
    """The bytes a body will take: its Content-Length, or `limit` when it sends none."""
    declared = request.headers.get("content-length")
    return min(int(declared), limit) if declared is not None and declared.isdigit() else limit


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes without reading the
    rest, and (408) when it takes longer than `UPLOAD_READ_TIMEOUT_S` to arrive."""
    buf = io.BytesIO()
    try:
        with anyio.fail_after(UPLOAD_READ_TIMEOUT_S):
            async for chunk in request.stream():
                buf.write(chunk)
                if buf.tell() > limit:
                    raise HTTPException(413, f"upload is over the limit of {limit:,} bytes")
    except TimeoutError:
        raise HTTPException(408, f"the upload took over {UPLOAD_READ_TIMEOUT_S:.0f} s to arrive") from None
    data = buf.getvalue()
    if not data:
        raise HTTPException(400, "send the image file as the request body")
    return data


def pixels_to_decode(data: bytes, min_side: int | None) -> int:
    """The pixels decoding `data` as a query allocates at full size, read from its
    header (Pillow reads no pixel data on open): a JPEG's at the draft scale the
    decoder picks for `min_side` (`tasks.shard.decode.decode_image`), a PDF page's
    at most `MAX_RENDER_PIXELS`, a TIFF's first page. 0 for bytes Pillow cannot
    read the size of: the decoder refuses those before allocating anything."""
    if data[:5] == b"%PDF-":
        return MAX_RENDER_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if min_side and im.format in ("JPEG", "MPO") and min(width, height) > min_side:
                scale = min_side / min(width, height)
                im.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
                width, height = im.size
    except Exception:  # whatever a malformed header raises, the decoder raises and reports it too
        return 0
    return max(0, width) * max(0, height)
