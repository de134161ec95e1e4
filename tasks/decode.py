"""Bytes -> RGB image, safely: every refusal is a `DecodeError` with a reason
that lands in the `failures` table, never an exception that stops a run."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

# Refuse images above ~180 MP (a 4000x3000 photo is 12 MP) instead of letting one
# file exhaust memory; Pillow raises DecompressionBombError past this.
Image.MAX_IMAGE_PIXELS = 180_000_000

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".pdf"})
DEFAULT_PDF_DPI = 150
DEFAULT_MAX_PAGES = 50


class DecodeError(ValueError):
    """An object that cannot be turned into an image; `reason` is a short code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied, possibly draft-reduced
    width: int  # original pixel size, before draft reduction (a PDF page: as rendered)
    height: int
    format: str
    page: int = 1  # 1-based; documents (PDF, multi-page TIFF) have one per page


def has_image_extension(key: str) -> bool:
    dot = key.rfind(".")
    return dot != -1 and key[dot:].lower() in IMAGE_EXTENSIONS


def decode_image(data: bytes, *, min_side: int | None = None) -> DecodedImage:
    """Decode `data` to RGB.

    With `min_side`, JPEGs are decoded in draft mode at the smallest DCT scale
    whose shorter side is still at least `min_side` (a 4000x3000 photo needed at
    232 px decodes at 1/8 scale, about 30x less work).
    """
    if not data:
        raise DecodeError("empty", "the object has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            fmt = im.format or "unknown"
            if min_side and fmt == "JPEG":
                # draft() picks a scale >= the requested size; ask for the box that
                # keeps the shorter side at min_side.
                scale = min_side / min(width, height)
                if scale < 1:
                    im.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # no copy when there is nothing to turn
            if im.mode != "RGB":
                im = _to_rgb(im)
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", "the bytes are not an image format Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("too_large", str(exc)) from None
    except OSError as exc:
        text = str(exc)
        reason = "truncated" if "truncated" in text.lower() or "premature" in text.lower() else "corrupt"
        raise DecodeError(reason, text) from None
    except (ValueError, SyntaxError, EOFError) as exc:
        raise DecodeError("corrupt", f"{type(exc).__name__}: {exc}") from None
    return DecodedImage(im, width, height, fmt)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Flatten alpha onto white (documents and product shots have white paper)."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        canvas = Image.new("RGB", im.size, (255, 255, 255))
        canvas.paste(im, mask=im.getchannel("A"))
        return canvas
    if im.mode == "I;16" or im.mode == "I":
        im = im.point(lambda v: v / 256).convert("L")
    return im.convert("RGB")


def decode_pages(data: bytes, *, min_side: int | None = None, dpi: int = DEFAULT_PDF_DPI,
                 max_pages: int = DEFAULT_MAX_PAGES) -> list[DecodedImage]:
    """Every page of a document (PDF rendered at `dpi`, multi-page TIFF frames), up
    to `max_pages`; any other image is one page. Refusals are `DecodeError`s."""
    if data[:5] == b"%PDF-":
        return _pdf_pages(data, dpi=dpi, max_pages=max_pages)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        pages = _tiff_pages(data, max_pages=max_pages)
        if pages is not None:
            return pages
    return [decode_image(data, min_side=min_side)]


def _pdf_pages(data: bytes, *, dpi: int, max_pages: int) -> list[DecodedImage]:
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        if "password" in str(exc).lower():
            raise DecodeError("encrypted", "the PDF is password-protected; decrypt it upstream") from None
        raise DecodeError("corrupt", f"the PDF cannot be opened: {exc}") from None
    try:
        pages = []
        for index in range(min(len(pdf), max_pages)):
            try:
                image = pdf[index].render(scale=dpi / 72).to_pil().convert("RGB")
            except pdfium.PdfiumError as exc:
                raise DecodeError("corrupt", f"page {index + 1} of the PDF cannot be rendered: {exc}") from None
            pages.append(DecodedImage(image, image.width, image.height, "PDF", page=index + 1))
        if not pages:
            raise DecodeError("empty", "the PDF has no pages")
        return pages
    finally:
        pdf.close()


def _tiff_pages(data: bytes, *, max_pages: int) -> list[DecodedImage] | None:
    """Frames of a multi-page TIFF, or None for a single-page one (decoded as an image)."""
    try:
        im = Image.open(io.BytesIO(data))
        n = getattr(im, "n_frames", 1)
        if n <= 1:
            return None
        pages = []
        for index in range(min(n, max_pages)):
            im.seek(index)
            frame = im.convert("RGB") if im.mode != "RGB" else im.copy()
            pages.append(DecodedImage(frame, frame.width, frame.height, "TIFF", page=index + 1))
        return pages
    except (OSError, ValueError, EOFError) as exc:
        raise DecodeError("corrupt", f"the TIFF cannot be read: {exc}") from None
