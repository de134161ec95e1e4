"""Bytes -> RGB images, safely: whatever is wrong with an object (and whatever
exception the decoder raises for it), the caller gets a `DecodeError` with a
reason that lands in the `failures` table, never an exception that stops a run.

Memory is bounded before pixels are allocated: the pixel count is read from the
header of every image, TIFF frame and PDF page, and a document's pages are
decoded and prepared (reduced to model input) one at a time.

"""

from __future__ import annotations

import io
import logging  # noqa: F401  (before the at-fork hook below)
import math
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pypdfium2 as pdfium
from PIL import Image, ImageOps, UnidentifiedImageError

from tasks.shard.thumbnails import THUMBNAIL_SIDE

# An image or TIFF frame above ~180 MP (a 4000x3000 photo is 12 MP) is refused
# from its header. Pillow's own check is set to the same limit as a backstop for
# images its plugins open internally (an ICO's PNG); its warning is never turned
# into an error here: warning filters are process-wide and not thread-safe.
MAX_IMAGE_PIXELS = 180_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

# A PDF page is rendered at `dpi` or, for a page that would exceed this, at the
# scale that keeps it within: 4096x4096 still covers any model's input (232-600
# px) many times over, and an A4 page at 150 dpi is 2.2 MP.
MAX_RENDER_PIXELS = 4096 * 4096

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".pdf"})

DEFAULT_PDF_DPI = 150

DEFAULT_MAX_PAGES = 50

DECODE_IN = ("auto", "processes", "threads")

# JPEGs up to this size decode on the GPU with --gpu-decode; larger ones decode on
# a CPU core in draft mode (a 12 MP photo at 1/8 DCT scale: ~16 ms of one core,
# against nvJPEG's full-size decode and a 13x downscale on the device).
DEVICE_JPEG_MAX_PIXELS = 16_000_000


@dataclass(frozen=True)
class DecodeOptions:
    on_device: bool = False  # JPEGs decoded on the model's device (nvJPEG), routed by size
    pdf_dpi: int = DEFAULT_PDF_DPI
    max_pages: int = DEFAULT_MAX_PAGES
    decode_in: str = "auto"  # where CPU decoding runs: worker processes, threads, or auto (`decodes_in_processes`)
    device_max_pixels: int = DEVICE_JPEG_MAX_PIXELS  # larger JPEGs decode on a CPU core in draft mode
    thumbnail_side: int = THUMBNAIL_SIDE  # thumbnails made while decoding, this many pixels a side (0: none)

    def __post_init__(self) -> None:
        if self.decode_in not in DECODE_IN:
            raise ValueError(f"unknown decode_in {self.decode_in!r}: use one of {', '.join(DECODE_IN)}")


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})

_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})

# PDFium may not be called from two threads at once, not even on different
# documents (pypdfium2 does not lock; ctypes releases the GIL during each call).
# A fork (decode worker processes) waits for the page being rendered, so no child
# starts with the lock held or PDFium halfway through a call. At-fork hooks run
# newest first: registered after `logging`'s (imported above), this one runs
# before logging takes its lock, which the rendering thread may still need.
# pypdfium2 and Pillow's plugins are imported here, not in decode threads: a fork
# while a thread imports a module leaves that module's import lock held in the
# child forever.
_PDFIUM_LOCK = threading.Lock()
os.register_at_fork(before=_PDFIUM_LOCK.acquire, after_in_parent=_PDFIUM_LOCK.release,
                    after_in_child=_PDFIUM_LOCK.release)
Image.init()

P = TypeVar("P")


class DecodeError(ValueError):
    """An object that cannot be turned into an image; `reason` is a short code:
    empty, not_an_image, too_large, truncated, corrupt, encrypted, unsupported."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class DecodedImage(Generic[P]):
    image: P  # RGB PIL image (EXIF orientation applied, possibly draft-reduced), or what `prepare` made of it
    width: int  # original pixel size, before draft reduction (a PDF page: as rendered)
    height: int
    format: str
    page: int = 1  # 1-based; documents (PDF, multi-page TIFF) have one per page


def has_image_extension(key: str) -> bool:
    dot = key.rfind(".")
    return dot != -1 and key[dot:].lower() in IMAGE_EXTENSIONS


@contextmanager
def _refusals() -> Iterator[None]:
    """Turn anything raised while decoding into a `DecodeError`: malformed files
    make Pillow and PDFium raise TypeError, NotImplementedError, struct.error,
    MemoryError... and one object must never stop a run."""
    try:
        yield
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", "the bytes are not an image format Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError) as exc:
        raise DecodeError("too_large", f"{type(exc).__name__}: {exc}") from None
    except NotImplementedError as exc:
        raise DecodeError("unsupported", f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:
        text = str(exc)
        reason = "truncated" if "truncated" in text.lower() or "premature" in text.lower() else "corrupt"
        raise DecodeError(reason, f"{type(exc).__name__}: {text}") from None
    except Exception as exc:
        raise DecodeError("corrupt", f"{type(exc).__name__}: {exc}") from None


def check_pixels(size: tuple[int, int], what: str, limit: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse a declared size before any pixel is allocated."""
    width, height = size
    if width <= 0 or height <= 0:
        raise DecodeError("corrupt", f"{what} declares {width}x{height} pixels")
    if width * height > limit:
        raise DecodeError("too_large", f"{what} is {width}x{height} ({width * height / 1e6:.0f} MP); "
                                       f"images over {limit / 1e6:.0f} MP are refused")


def decode_image(data: bytes, *, min_side: int | None = None) -> DecodedImage[Image.Image]:
    """Decode `data` to RGB.

    With `min_side`, JPEGs are decoded in draft mode at the smallest DCT scale
    whose shorter side is still at least `min_side` (a 4000x3000 photo needed at
    232 px decodes at 1/8 scale, about 30x less work).
    """
    if not data:
        raise DecodeError("empty", "the object has zero bytes")
    with _refusals():
        im = Image.open(io.BytesIO(data))
        width, height = im.size
        check_pixels((width, height), "the image")
        fmt = im.format or "unknown"
        if min_side and fmt in ("JPEG", "MPO"):
            # draft() picks a scale >= the requested size; ask for the box that
            # keeps the shorter side at min_side.
            scale = min_side / min(width, height)
            if scale < 1:
                im.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
        im.load()
        check_pixels(im.size, "the decoded image")  # plugins that pick a size at load (ICO, ICNS)
        ImageOps.exif_transpose(im, in_place=True)  # no copy when there is nothing to turn
        if im.mode != "RGB":
            im = _to_rgb(im)
        return DecodedImage(im, width, height, fmt)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Flatten alpha onto white (documents and product shots have white paper)."""
    if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        canvas = Image.new("RGB", im.size, (255, 255, 255))
        canvas.paste(im, mask=im.getchannel("A"))
        return canvas
    if im.mode in _WIDE_GREY_MODES:
        im = im.convert("I").point(lambda v: v / 256).convert("L")
    return im.convert("RGB")


def _identity(image: Image.Image) -> Any:
    return image


def decode_pages(data: bytes, *, prepare: Callable[[Image.Image], P] = _identity, min_side: int | None = None,
                 dpi: int = DEFAULT_PDF_DPI, max_pages: int = DEFAULT_MAX_PAGES) -> list[DecodedImage[P]]:
    """Every page of a document (PDF rendered at `dpi`, multi-page TIFF frames), up
    to `max_pages`; any other image is one page. Refusals are `DecodeError`s.

    `prepare` (the model's resize and crop) is applied to each page as soon as it
    is decoded, and the full-size page dropped before the next one is decoded, so
    a document holds one page at full size and the rest at model size."""
    if not data:
        raise DecodeError("empty", "the object has zero bytes")
    with _refusals():
        if data[:5] == b"%PDF-":
            return _pdf_pages(data, prepare, dpi=dpi, max_pages=max_pages)
        if data[:4] in _TIFF_MAGIC:
            pages = _tiff_pages(data, prepare, min_side=min_side, max_pages=max_pages)
            if pages is not None:
                return pages
        decoded = decode_image(data, min_side=min_side)
        return [_prepared(decoded.image, prepare, decoded.format, 1, size=(decoded.width, decoded.height))]


def _prepared(image: Image.Image, prepare: Callable[[Image.Image], P], fmt: str, page: int,
              size: tuple[int, int] | None = None) -> DecodedImage[P]:
    """One page after `prepare`; the caller passes the page as a temporary, so the
    full-size image is freed when this returns."""
    width, height = size or image.size
    return DecodedImage(prepare(image), width, height, fmt, page=page)


def pdf_render_scale(width_pt: float, height_pt: float, dpi: int) -> float:
    """`dpi / 72`, or less where the page would exceed `MAX_RENDER_PIXELS` (a
    14,400 pt page at 150 dpi would be 30,000 px square: 3.6 GB)."""
    if not (width_pt > 0 and height_pt > 0):
        raise DecodeError("corrupt", f"a PDF page of {width_pt}x{height_pt} pt has no area")
    scale = min(dpi / 72, math.sqrt(MAX_RENDER_PIXELS / (width_pt * height_pt)))
    while math.ceil(width_pt * scale) * math.ceil(height_pt * scale) > MAX_RENDER_PIXELS:  # PDFium rounds up
        scale *= 0.999
    return scale


def _pdf_pages(data: bytes, prepare: Callable[[Image.Image], P], *, dpi: int, max_pages: int) -> list[DecodedImage[P]]:
    with _PDFIUM_LOCK:
        try:
            pdf = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as exc:
            if "password" in str(exc).lower():
                raise DecodeError("encrypted", "the PDF is password-protected; decrypt it upstream") from None
            raise DecodeError("corrupt", f"the PDF cannot be opened: {exc}") from None
        n = len(pdf)
    try:
        if n == 0:
            raise DecodeError("empty", "the PDF has no pages")
        return [_prepared(_render_pdf_page(pdf, index, dpi), prepare, "PDF", index + 1)
                for index in range(min(n, max_pages))]
    finally:
        with _PDFIUM_LOCK:
            pdf.close()


def _render_pdf_page(pdf: Any, index: int, dpi: int) -> Image.Image:
    with _PDFIUM_LOCK:
        page = pdf[index]
        try:
            scale = pdf_render_scale(*page.get_size(), dpi)
            bitmap = page.render(scale=scale, rev_byteorder=True)
            try:
                return bitmap.to_pil().convert("RGB")
            finally:
                bitmap.close()
        except pdfium.PdfiumError as exc:
            raise DecodeError("corrupt", f"page {index + 1} of the PDF cannot be rendered: {exc}") from None
        finally:
            page.close()


def _tiff_pages(data: bytes, prepare: Callable[[Image.Image], P], *, min_side: int | None,
                max_pages: int) -> list[DecodedImage[P]] | None:
    """Frames of a multi-page TIFF, or None for a single-page one (decoded as an
    image). Each frame's size is checked after `seek` (which reads only its
    header) and before it is loaded; with `min_side` a large frame is box-reduced
    before conversion (a 600 dpi scan needed at 232 px is reduced 10x)."""
    im = Image.open(io.BytesIO(data))
    n = getattr(im, "n_frames", 1)
    if n <= 1:
        return None
    pages = []
    for index in range(min(n, max_pages)):
        im.seek(index)
        check_pixels(im.size, f"page {index + 1} of the TIFF")
        pages.append(_prepared(_to_rgb(_reduced(im, min_side)), prepare, "TIFF", index + 1, size=im.size))
    return pages


_REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "I", "F"})


def _reduced(im: Image.Image, min_side: int | None) -> Image.Image:
    """`im` box-reduced by the largest whole factor that keeps its shorter side at
    least `min_side` (like JPEG draft mode), or `im` itself."""
    factor = min(im.size) // min_side if min_side else 1
    if factor < 2:
        return im
    if im.mode == "1":  # averaging needs grey levels
        im = im.convert("L")
    return im.reduce(factor) if im.mode in _REDUCIBLE_MODES else im
