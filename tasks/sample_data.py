"""Generated sample data: product-style photos and scanned-looking documents,
JPEG and PNG at several sizes, plus a few broken files. Used by `make demo`, the
tests and the benchmarks, so nothing has to be downloaded.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tasks.storage import ObjectStore

DOCUMENT_KINDS = ("invoice", "receipt", "form")
PHOTO_SIZES = ((500, 375), (640, 480), (375, 500), (1024, 768))
LARGE_PHOTO_SIZE = (4000, 3000)


@dataclass(frozen=True)
class SampleObject:
    key: str
    kind: str  # product | invoice | receipt | form | broken
    data: bytes


def _rng_colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def make_product_photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A product shot: a shaded object of random shape and colour on a soft backdrop."""
    w, h = size
    top, bottom = np.array(_rng_colour(rng, 150, 256)), np.array(_rng_colour(rng, 90, 200))
    ramp = np.linspace(0, 1, h)[:, None, None]
    backdrop = (top * (1 - ramp) + bottom * ramp).astype(np.uint8)
    im = Image.fromarray(np.repeat(backdrop, w, axis=1))
    draw = ImageDraw.Draw(im)
    colour = _rng_colour(rng, 0, 230)
    cx, cy = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.4, 0.6)
    rx, ry = w * rng.uniform(0.15, 0.3), h * rng.uniform(0.15, 0.3)
    shape = rng.integers(0, 3)
    box = (cx - rx, cy - ry, cx + rx, cy + ry)
    if shape == 0:
        draw.ellipse(box, fill=colour)
    elif shape == 1:
        draw.rounded_rectangle(box, radius=int(min(rx, ry) * 0.3), fill=colour)
    else:
        pts = [(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in np.linspace(0, 2 * np.pi, int(rng.integers(3, 8)),
                                                                              endpoint=False)]
        draw.polygon(pts, fill=colour)
    # a highlight and a label, so objects of one colour still differ
    draw.ellipse((cx - rx * 0.5, cy - ry * 0.7, cx - rx * 0.1, cy - ry * 0.3),
                 fill=tuple(min(255, c + 60) for c in colour))
    draw.rectangle((cx - rx * 0.4, cy + ry * 0.1, cx + rx * 0.4, cy + ry * 0.35), fill=_rng_colour(rng))
    im = im.filter(ImageFilter.GaussianBlur(radius=max(1, w // 400)))
    noise = rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def make_document(rng: np.random.Generator, kind: str) -> Image.Image:
    """A scanned-looking page: invoices have a header and a ruled table, receipts
    are narrow slips of short lines, forms are grids of labelled boxes."""
    if kind == "receipt":
        w, h = int(rng.integers(260, 340)), int(rng.integers(800, 1100))
    else:
        w, h = int(rng.integers(800, 880)), int(rng.integers(1050, 1150))
    paper = int(rng.integers(235, 256))
    im = Image.new("L", (w, h), paper)
    draw = ImageDraw.Draw(im)
    ink = int(rng.integers(20, 70))

    def text_line(x: float, y: float, width: float, height: int = 8) -> None:
        cursor = x
        while cursor < x + width:
            word = float(rng.uniform(15, 60))
            draw.rectangle((cursor, y, min(cursor + word, x + width), y + height), fill=ink)
            cursor += word + float(rng.uniform(6, 12))

    if kind == "invoice":
        draw.rectangle((50, 50, 50 + w * 0.35, 110), fill=ink)  # letterhead
        for i in range(4):
            text_line(w * 0.6, 60 + i * 18, w * 0.3)
        top, rows, cols = 300, int(rng.integers(8, 16)), 4
        row_h = 28
        for r in range(rows + 1):
            draw.line((50, top + r * row_h, w - 50, top + r * row_h), fill=ink, width=2)
        for c in range(cols + 1):
            x = 50 + c * (w - 100) / cols
            draw.line((x, top, x, top + rows * row_h), fill=ink, width=2)
        for r in range(rows):
            for c in range(cols):
                text_line(60 + c * (w - 100) / cols, top + r * row_h + 10, (w - 100) / cols * 0.6)
        text_line(w * 0.55, top + rows * row_h + 40, w * 0.35, 12)
    elif kind == "receipt":
        y = 40
        draw.rectangle((w * 0.25, y, w * 0.75, y + 20), fill=ink)
        y += 60
        while y < h - 120:
            text_line(20, y, w * 0.5)
            text_line(w * 0.72, y, w * 0.2)
            y += int(rng.integers(18, 26))
        draw.line((20, y, w - 20, y), fill=ink, width=2)
        text_line(20, y + 20, w - 40, 12)
    elif kind == "form":
        text_line(50, 50, w * 0.5, 14)
        y = 120
        while y < h - 100:
            for x0, x1 in ((50, w * 0.48), (w * 0.52, w - 50)):
                text_line(x0, y, (x1 - x0) * 0.4, 6)
                draw.rectangle((x0, y + 14, x1, y + 50), outline=ink, width=2)
            y += int(rng.integers(80, 100))
    else:
        raise ValueError(f"unknown document kind {kind!r}; use one of {', '.join(DOCUMENT_KINDS)}")
    angle = float(rng.uniform(-1.5, 1.5))  # a scan is never quite straight
    im = im.rotate(angle, fillcolor=paper, resample=Image.BILINEAR)
    noise = rng.normal(0, 6, (h, w))
    arr = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def encode(im: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, "JPEG", quality=quality)
    else:
        im.save(buf, fmt)
    return buf.getvalue()


def broken_files(rng: np.random.Generator) -> list[SampleObject]:
    """A truncated JPEG, a zero-byte file and a text file named .jpg."""
    good = encode(make_product_photo(rng, (500, 375)), "JPEG")
    return [
        SampleObject("broken/truncated.jpg", "broken", good[: len(good) // 3]),
        SampleObject("broken/empty.jpg", "broken", b""),
        SampleObject("broken/notes.jpg", "broken", b"this is a text file, not a JPEG\n" * 20),
    ]


def generate_samples(n_images: int, *, seed: int = 0, document_fraction: float = 0.4, png_fraction: float = 0.2,
                     large_photos: int = 0, broken: bool = True) -> list[SampleObject]:
    """`n_images` good images (products and documents) plus, with `broken`, three bad files."""
    rng = np.random.default_rng(seed)
    out: list[SampleObject] = []
    for i in range(n_images):
        is_doc = rng.random() < document_fraction
        fmt = "PNG" if rng.random() < png_fraction else "JPEG"
        ext = "png" if fmt == "PNG" else "jpg"
        if is_doc:
            kind = DOCUMENT_KINDS[int(rng.integers(0, len(DOCUMENT_KINDS)))]
            im = make_document(rng, kind)
            key = f"documents/{kind}/{kind}-{i:05d}.{ext}"
        else:
            kind = "product"
            size = LARGE_PHOTO_SIZE if i < large_photos else PHOTO_SIZES[int(rng.integers(0, len(PHOTO_SIZES)))]
            im = make_product_photo(rng, size)
            key = f"photos/item-{i:05d}.{ext}"
        out.append(SampleObject(key, kind, encode(im, fmt)))
    if broken:
        out.extend(broken_files(rng))
    return out


def write_samples(store: ObjectStore, samples: list[SampleObject],
                  on_progress: Callable[[int], None] | None = None) -> list[str]:
    for s in samples:
        store.put(s.key, s.data)
        if on_progress:
            on_progress(1)
    return [s.key for s in samples]


def reencoded_copy(data: bytes, *, scale: float = 0.8, quality: int = 70, crop: float = 0.0) -> bytes:
    """A near-duplicate: resized, optionally cropped by `crop` of each side, re-encoded as JPEG."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    if crop:
        w, h = im.size
        im = im.crop((int(w * crop), int(h * crop), int(w * (1 - crop)), int(h * (1 - crop))))
    w, h = im.size
    im = im.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.BILINEAR)
    return encode(im, "JPEG", quality=quality)
