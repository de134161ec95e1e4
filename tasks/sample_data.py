"""Generated sample data: product-style photos and scanned-looking documents,
JPEG and PNG at several sizes, plus a few broken files, and hostile ones (tiny
files that declare huge images or documents, malformed TIFFs). Used by `make
demo`, the tests and the benchmarks, so nothing has to be downloaded.
"""

from __future__ import annotations

import io
import struct
import zlib
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


def distinct_bytes(data: bytes, i: int) -> bytes:
    """`data` made a different file with the same pixels: a JPEG comment segment or a
    PNG text chunk naming `i`. batchsight embeds identical bytes once (issue 27), so
    a set of repeated bytes would measure or test copies, not the model."""
    note = f"batchsight benchmark object {i}".encode()
    if data[:2] == b"\xff\xd8":
        return data[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + data[2:]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        body = b"tEXt" + b"Comment\x00" + note
        chunk = len(body[4:]).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
        end = data.rindex(b"IEND") - 4
        return data[:end] + chunk + data[end:]
    raise ValueError("distinct_bytes() makes JPEG and PNG files only")


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


def pdf_document(page_sizes_pt: list[tuple[float, float]], *, rotate: int = 0) -> bytes:
    """A minimal hand-written PDF: one page of each (width, height) in points, each
    with a filled square. A 14,400 pt page (200 inches, the largest PDF allows) is
    a 333-byte file that renders at 30,001 px square at 150 dpi."""
    n = len(page_sizes_pt)
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n))
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {n} >>"]
    for i, (w, h) in enumerate(page_sizes_pt):
        content = f"0.{i % 10} 0.3 0.6 rg {w / 4:g} {h / 4:g} {w / 2:g} {h / 2:g} re f".encode()
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {w:g} {h:g}] /Rotate {rotate} "
                       f"/Contents {4 + 2 * i} 0 R >>")
        objects.append(f"<< /Length {len(content)} >>\nstream\n{content.decode()}\nendstream")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def tiff_document(frames: int, size: tuple[int, int], *, mode: str = "L", colour: int | tuple[int, ...] = 200,
                  compression: str = "tiff_deflate") -> bytes:
    """A multi-page TIFF of `frames` flat frames: 20 grey frames of 8000x8000
    deflate to 1.9 MB and hold 1.3 GB of pixels (3.8 GB as RGB). One frame object
    is saved `frames` times, so building it costs one frame of memory."""
    frame = Image.new(mode, size, colour)
    buf = io.BytesIO()
    frame.save(buf, "TIFF", save_all=True, append_images=[frame] * (frames - 1), compression=compression)
    return buf.getvalue()


def document_bombs() -> dict[str, bytes]:
    """Small files that decode to huge documents (issue 10): a PDF with one
    14,400 pt page, a PDF with four, and a TIFF of 20 frames of 8000x8000."""
    return {
        "pdf-1-page-14400pt.pdf": pdf_document([(14400, 14400)]),
        "pdf-4-pages-14400pt.pdf": pdf_document([(14400, 14400)] * 4),
        "tiff-20-frames-8000px.tif": tiff_document(20, (8000, 8000)),
    }


def tiff_ifd_entries(data: bytes, ifd: int) -> list[tuple[int, int]]:
    """(tag, offset of the entry) of the `ifd`-th IFD of a little-endian TIFF."""
    assert data[:4] == b"II*\x00", "only little-endian classic TIFFs are patched here"
    (offset,) = struct.unpack_from("<I", data, 4)
    for _ in range(ifd):
        (count,) = struct.unpack_from("<H", data, offset)
        (offset,) = struct.unpack_from("<I", data, offset + 2 + 12 * count)
    (count,) = struct.unpack_from("<H", data, offset)
    return [(struct.unpack_from("<H", data, offset + 2 + 12 * i)[0], offset + 2 + 12 * i) for i in range(count)]


def patch_tiff(data: bytes, ifd: int, tag: int, *, value: int | None = None, new_tag: int | None = None) -> bytes:
    """Set a SHORT/LONG tag's value (dimensions a header declares) or renumber a tag."""
    out = bytearray(data)
    entry = dict(tiff_ifd_entries(data, ifd))[tag]
    if new_tag is not None:
        struct.pack_into("<H", out, entry, new_tag)
    if value is not None:
        (kind,) = struct.unpack_from("<H", out, entry + 2)
        struct.pack_into("<H" if kind == 3 else "<I", out, entry + 8, value)
    return bytes(out)


def header_bomb_tiff(width: int, height: int) -> bytes:
    """A 16x16 TIFF whose header declares `width` x `height`: a few hundred bytes."""
    small = encode(Image.new("L", (16, 16), 90), "TIFF")
    return patch_tiff(patch_tiff(small, 0, 256, value=width), 0, 257, value=height)


def malformed_tiff() -> bytes:
    """Two frames, the second without ImageWidth: Pillow raises TypeError("Missing
    dimensions") when it reaches it (as for Pillow's crash-2020-10-test.tif)."""
    buf = io.BytesIO()
    Image.new("L", (32, 32), 10).save(buf, "TIFF", save_all=True, append_images=[Image.new("L", (32, 32), 200)])
    return patch_tiff(buf.getvalue(), 1, 256, new_tag=0xFDE8)


def unimplemented_dds() -> bytes:
    """A DDS header with pixel-format flags Pillow does not implement (NotImplementedError)."""
    header = struct.pack("<3I", 0x1007, 64, 64) + bytes(120 - 12)
    return b"DDS " + struct.pack("<I", 124) + header
