"""Decoding: good images in every supported shape, bad ones refused with a reason."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.catalog.tables import image_id_for
from tasks.sample_data import (
    broken_files,
    encode,
    header_bomb_tiff,
    make_product_photo,
    malformed_tiff,
    patch_tiff,
    pdf_document,
    tiff_document,
    unimplemented_dds,
)
from tasks.shard.decode import MAX_RENDER_PIXELS, DecodeError, decode_image, decode_pages, pdf_render_scale

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,reason", [("broken/truncated.jpg", "truncated"), ("broken/empty.jpg", "empty"),
                                         ("broken/notes.jpg", "not_an_image")])
def test_bad_files_are_refused_with_a_reason(name, reason):
    data = {b.key: b.data for b in broken_files(np.random.default_rng(0))}[name]
    with pytest.raises(DecodeError) as info:
        decode_image(data)
    assert info.value.reason == reason


def test_draft_mode_decodes_large_jpeg_at_reduced_scale_but_reports_full_size():
    photo = encode(make_product_photo(np.random.default_rng(1), (4000, 3000)), "JPEG")
    decoded = decode_image(photo, min_side=232)
    assert (decoded.width, decoded.height) == (4000, 3000)
    assert min(decoded.image.size) >= 232  # never below what the model needs
    assert decoded.image.size[0] <= 1000  # 1/4 or 1/8 DCT scale, not full size
    assert decode_image(photo).image.size == (4000, 3000)


def test_alpha_png_is_flattened_on_white_and_grayscale_becomes_rgb():
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    out = decode_image(encode(rgba, "PNG")).image
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (255, 255, 255)
    gray = Image.new("L", (40, 30), 17)
    assert decode_image(encode(gray, "PNG")).image.getpixel((0, 0)) == (17, 17, 17)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    decoded = decode_image(buf.getvalue())
    assert decoded.image.size == (20, 60)


def _pdf(pages: int) -> bytes:
    ims = [Image.new("RGB", (300, 400), (255, 255, 255 - 40 * i)) for i in range(pages)]
    buf = io.BytesIO()
    ims[0].save(buf, "PDF", save_all=True, append_images=ims[1:], resolution=72)
    return buf.getvalue()


def test_every_pdf_page_is_its_own_image_up_to_the_page_limit():
    pages = decode_pages(_pdf(3), dpi=100)
    assert [p.page for p in pages] == [1, 2, 3]
    assert pages[0].image.size == (417, 556)  # 300x400 pt at 100 dpi
    assert [p.page for p in decode_pages(_pdf(3), max_pages=2)] == [1, 2]


def test_encrypted_and_broken_pdfs_are_refused_with_a_reason():
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(_pdf(1))))
    writer.encrypt("secret")
    locked = io.BytesIO()
    writer.write(locked)
    with pytest.raises(DecodeError) as info:
        decode_pages(locked.getvalue())
    assert info.value.reason == "encrypted" and "password" in info.value.message
    with pytest.raises(DecodeError) as info:
        decode_pages(_pdf(2)[:300])
    assert info.value.reason == "corrupt"


def test_multipage_tiff_gives_one_image_per_frame():
    frames = [Image.new("L", (64, 80), 30 * i) for i in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    pages = decode_pages(buf.getvalue())
    assert [p.page for p in pages] == [1, 2, 3, 4]
    assert pages[2].image.mode == "RGB" and pages[2].image.getpixel((0, 0)) == (60, 60, 60)
    single = io.BytesIO()
    frames[0].save(single, "TIFF")
    assert [p.page for p in decode_pages(single.getvalue())] == [1]


@pytest.mark.parametrize("build,reason,raised", [
    (malformed_tiff, "corrupt", "TypeError: Missing dimensions"),  # like Pillow's crash-2020-10-test.tif
    (unimplemented_dds, "unsupported", "NotImplementedError"),  # like Pillow's unimplemented_*.dds
    (lambda: header_bomb_tiff(15000, 15000), "too_large", "15000x15000"),
])
def test_any_exception_while_decoding_becomes_a_decode_error_naming_it(build, reason, raised):
    with pytest.raises(DecodeError) as info:
        decode_pages(build(), min_side=232)
    assert info.value.reason == reason and raised in info.value.message


def test_an_exception_while_preparing_a_page_is_a_decode_error():
    def prepare(image):
        raise ZeroDivisionError("a page the model input cannot be made from")

    with pytest.raises(DecodeError) as info:
        decode_pages(_pdf(2), prepare=prepare)
    assert info.value.reason == "corrupt" and "ZeroDivisionError" in info.value.message


def test_the_bomb_limit_holds_with_many_decode_threads():
    """A 225-megapixel TIFF header among ordinary images on eight threads: always
    refused as too_large, never an exception of another type (the limit was a
    process-wide warning filter, which other threads' decodes switched on and off)."""
    bomb = header_bomb_tiff(15000, 15000)
    small = encode(make_product_photo(np.random.default_rng(2), (64, 48)), "PNG")

    def decode(i: int) -> str:
        try:
            decode_pages(bomb if i % 2 else small, min_side=32)
        except DecodeError as exc:
            return exc.reason
        return "ok"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(decode, range(800)))
    assert outcomes == ["ok", "too_large"] * 400


def test_pdf_pages_are_rendered_within_the_pixel_cap():
    pages = decode_pages(pdf_document([(14400, 14400), (612, 792), (14400, 3)]))
    sizes = [(p.width, p.height) for p in pages]
    assert sizes[1] == (1275, 1651)  # letter at 150 dpi: untouched
    assert 4090 <= sizes[0][0] == sizes[0][1] <= 4096  # 14,400 pt at 150 dpi would be 30,001 px square
    assert sizes[2] == (30001, 7)  # a strip within the cap keeps its dpi
    assert all(w * h <= MAX_RENDER_PIXELS for w, h in sizes)
    assert pdf_render_scale(14400, 14400, 150) == pytest.approx(4096 / 14400, rel=1e-3)


def test_a_document_holds_one_full_size_page_at_a_time():
    """`prepare` gets each page as it is decoded; the previous full-size page is
    gone by then, whatever the number of pages."""
    for document in (pdf_document([(1440, 1440)] * 5), tiff_document(5, (3000, 2000))):
        alive: list[weakref.ref] = []

        def prepare(image):
            assert all(ref() is None for ref in alive), "an earlier full-size page is still held"
            alive.append(weakref.ref(image))
            return image.resize((8, 8))

        pages = decode_pages(document, prepare=prepare, min_side=232)
        assert [p.page for p in pages] == [1, 2, 3, 4, 5] and all(p.image.size == (8, 8) for p in pages)


def test_large_tiff_frames_are_reduced_to_cover_the_model_input_and_report_their_size():
    pages = decode_pages(tiff_document(2, (2400, 1800), mode="1", colour=1, compression="group4"), min_side=232)
    assert [(p.width, p.height) for p in pages] == [(2400, 1800)] * 2
    assert pages[0].image.size == (343, 258)  # reduced 7x: the shorter side still covers 232
    assert pages[0].image.mode == "RGB" and pages[0].image.getpixel((5, 5)) == (255, 255, 255)


BOUNDED_DECODE = """
import json, resource, sys
from tasks.shard.decode import DecodeError, decode_pages
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB of address space, Python included
out = {}
for path in sys.argv[1:]:
    try:
        pages = decode_pages(open(path, "rb").read(), prepare=lambda im: im.resize((224, 224)), min_side=232)
        out[path] = f"rows:{len(pages)}"
    except DecodeError as exc:
        out[path] = exc.reason
    except MemoryError:
        out[path] = "MemoryError"
print(json.dumps(out))
"""


def test_bombs_decode_within_a_gigabyte(tmp_path):
    """Tiny files that declare huge images or documents, each decoded in a process
    whose address space is capped at 1 GiB: headers over the limit are refused
    before any pixel is allocated, documents render page by page within the cap."""
    files = {
        "tiff-225mp.tif": (header_bomb_tiff(15000, 15000), "too_large"),
        "tiff-frame-2-900mp.tif": (patch_tiff(patch_tiff(tiff_document(2, (16, 16)), 1, 256, value=30000),
                                              1, 257, value=30000), "too_large"),
        "pdf-4-pages-14400pt.pdf": (pdf_document([(14400, 14400)] * 4), "rows:4"),
        "tiff-8-frames-8000px.tif": (tiff_document(8, (8000, 8000)), "rows:8"),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    proc = subprocess.run([sys.executable, "-c", BOUNDED_DECODE, *files], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == {name: expect for name, (_, expect) in files.items()}


def test_image_ids_of_valid_keys_are_unchanged_and_any_key_has_one():
    assert image_id_for("photos/item-00001.jpg") == 439384871138227389
    assert image_id_for("documents/a.pdf", 3) == 4788027114692432271
    raw = hashlib.blake2b(b"bad\xffutf8.png", digest_size=8).digest()
    assert image_id_for("bad\udcffutf8.png") == int.from_bytes(raw, "big") & ((1 << 63) - 1)


def _pages_of(data: bytes) -> int:
    return len(decode_pages(data))


def test_pdfs_render_on_many_threads_and_in_processes_forked_meanwhile():
    """PDFium is not thread-safe: renders take turns; and a decode process forked
    while threads render (and once, while one imported pypdfium2) starts with PDFium
    idle and no lock held, instead of hanging on its first PDF."""
    import multiprocessing

    docs = [pdf_document([(1440 + 100 * i, 1440)] * 3) for i in range(8)]
    with ThreadPoolExecutor(4) as threads:
        rendering = [threads.submit(_pages_of, d) for d in docs]
        processes = multiprocessing.get_context("fork").Pool(2)
        try:
            forked = [processes.apply_async(_pages_of, (d,)) for d in docs[:4]]
            assert [f.get(timeout=60) for f in forked] == [3] * 4
        finally:
            processes.terminate()
        assert [f.result(timeout=60) for f in rendering] == [3] * 8
