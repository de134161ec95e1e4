"""Decoding: good images in every supported shape, bad ones refused with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tasks.decode import DecodeError, decode_image, decode_pages
from tasks.sample_data import broken_files, encode, make_product_photo


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
