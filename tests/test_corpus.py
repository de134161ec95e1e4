"""A corpus of odd, broken and hostile files, every one through `batchsight run`
with several decode threads: the run commits, and every file is either rows in
`images` or a failure with a reason (issue 10). Everything is generated here, in
the spirit of Pillow's own `Tests/images`; nothing is downloaded."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from tasks.catalog.reader import Catalog
from tasks.catalog.tables import image_id_for
from tasks.sample_data import (
    encode,
    header_bomb_tiff,
    make_document,
    make_product_photo,
    malformed_tiff,
    patch_tiff,
    pdf_document,
    tiff_document,
    unimplemented_dds,
)
from tasks.shard.decode import MAX_RENDER_PIXELS
from tasks.storage import LocalStore, StorageError, key_for_local_name, local_name_for_key

pytestmark = pytest.mark.usefixtures("prefect_harness")


@dataclass(frozen=True)
class OddFile:
    name: str  # a relative file name; a lone surrogate stands for a byte that is not UTF-8
    data: bytes
    expect: str  # "rows:N" (N pages), or the failure reason


def _save(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def _photo(size=(320, 240), seed=0) -> Image.Image:
    return make_product_photo(np.random.default_rng(seed), size)


def png_header_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def gif_header_bomb() -> bytes:
    data = bytearray(_save(Image.new("P", (8, 8), 1), "GIF"))
    struct.pack_into("<HH", data, 6, 65535, 65535)  # logical screen
    return bytes(data)


def jpeg_header_bomb() -> bytes:
    data = bytearray(encode(_photo((64, 48)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 60000, 60000)
    return bytes(data)


def bmp_bogus_header() -> bytes:
    data = bytearray(_save(_photo((40, 30)), "BMP"))
    struct.pack_into("<H", data, 28, 7)  # 7 bits per pixel
    return bytes(data)


def encrypted_pdf() -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf_document([(300, 400)]))))
    writer.encrypt("secret")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(_photo((120, 60)), "JPEG", exif=exif.tobytes())


def odd_corpus() -> list[OddFile]:
    rng = np.random.default_rng(7)
    photo = _photo()
    jpeg = encode(photo, "JPEG")
    png = encode(photo, "PNG")
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    palette = photo.convert("P", palette=Image.ADAPTIVE, colors=16)
    gif_frames = [_photo((64, 64), seed=i).convert("P", palette=Image.ADAPTIVE) for i in range(3)]
    gray16 = Image.fromarray((np.arange(320 * 240, dtype=np.uint16).reshape(240, 320) * 3).astype(np.uint16))
    return [
        # ordinary images in unusual shapes and modes: each is a row
        OddFile("modes/cmyk.jpg", _save(photo.convert("CMYK"), "JPEG"), "rows:1"),
        OddFile("modes/progressive.jpg", _save(photo, "JPEG", progressive=True), "rows:1"),
        OddFile("modes/exif-rotated.jpg", exif_rotated_jpeg(), "rows:1"),
        OddFile("modes/gray16.png", _save(gray16, "PNG"), "rows:1"),
        OddFile("modes/gray16.tif", _save(gray16, "TIFF"), "rows:1"),
        OddFile("modes/palette-transparent.png", _save(palette, "PNG", transparency=0), "rows:1"),
        OddFile("modes/la.png", _save(rgba.convert("LA"), "PNG"), "rows:1"),
        OddFile("modes/rgba.webp", _save(rgba, "WEBP", lossless=True), "rows:1"),
        OddFile("modes/photo.webp", _save(photo, "WEBP", quality=80), "rows:1"),
        OddFile("modes/bilevel.png", _save(photo.convert("1"), "PNG"), "rows:1"),
        OddFile("modes/bilevel-g4.tif", _save(photo.convert("1"), "TIFF", compression="group4"), "rows:1"),
        OddFile("modes/float.tif", _save(photo.convert("F"), "TIFF"), "rows:1"),
        OddFile("modes/int32.tif", _save(photo.convert("I"), "TIFF"), "rows:1"),
        OddFile("modes/cmyk.tif", _save(photo.convert("CMYK"), "TIFF"), "rows:1"),
        OddFile("modes/image.bmp", _save(photo, "BMP"), "rows:1"),
        OddFile("modes/tiny-1x1.png", _save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "rows:1"),
        OddFile("modes/sliver-4000x2.png", _save(Image.new("L", (4000, 2), 128), "PNG"), "rows:1"),
        OddFile("animated/three-frames.gif", _save(gif_frames[0], "GIF", save_all=True,
                                                   append_images=gif_frames[1:], loop=0), "rows:1"),
        OddFile("animated/apng.png", _save(_photo((64, 64)), "PNG", save_all=True,
                                           append_images=[_photo((64, 64), seed=2)]), "rows:1"),
        OddFile("wrong-extension/jpeg-named.png", jpeg, "rows:1"),
        OddFile("wrong-extension/png-named.jpg", png, "rows:1"),
        OddFile("wrong-extension/pdf-named.jpg", pdf_document([(300, 400)]), "rows:1"),
        # documents: one row a page, bombs rendered within the pixel cap
        OddFile("documents/three-pages.pdf", pdf_document([(612, 792), (792, 612), (300, 300)]), "rows:3"),
        OddFile("documents/rotated.pdf", pdf_document([(612, 792)], rotate=90), "rows:1"),
        OddFile("documents/huge-page-14400pt.pdf", pdf_document([(14400, 14400)]), "rows:1"),
        OddFile("documents/four-huge-pages.pdf", pdf_document([(14400, 14400)] * 4), "rows:4"),
        OddFile("documents/strip-14400x3pt.pdf", pdf_document([(14400, 3)]), "rows:1"),
        OddFile("documents/frames-4x6000px.tif", tiff_document(4, (6000, 6000)), "rows:4"),
        OddFile("documents/scan.tif", _save(make_document(rng, "form").convert("1"), "TIFF", save_all=True,
                                            compression="group4",
                                            append_images=[make_document(rng, "invoice").convert("1")]), "rows:2"),
        # broken and hostile: each is a failure with this reason
        OddFile("broken/empty.jpg", b"", "empty"),
        OddFile("broken/notes.jpg", b"this is a text file, not a JPEG\n" * 20, "not_an_image"),
        OddFile("broken/truncated.jpg", jpeg[: len(jpeg) // 3], "truncated"),
        OddFile("broken/truncated.png", png[: len(png) // 2], "truncated"),
        OddFile("broken/only-soi.jpg", b"\xff\xd8\xff", "not_an_image"),
        OddFile("broken/bogus-header.bmp", bmp_bogus_header(), "corrupt"),
        OddFile("broken/malformed-frame.tif", malformed_tiff(), "corrupt"),
        OddFile("broken/unimplemented-dds.png", unimplemented_dds(), "unsupported"),
        OddFile("broken/encrypted.pdf", encrypted_pdf(), "encrypted"),
        OddFile("broken/cut.pdf", pdf_document([(612, 792)] * 2)[:200], "corrupt"),
        OddFile("bombs/225-megapixel.tif", header_bomb_tiff(15000, 15000), "too_large"),
        OddFile("bombs/second-frame-30000px.tif", patch_tiff(patch_tiff(
            _save(Image.new("L", (16, 16)), "TIFF", save_all=True, append_images=[Image.new("L", (16, 16))]),
            1, 256, value=30000), 1, 257, value=30000), "too_large"),
        OddFile("bombs/png-100000px.png", png_header_bomb(100000, 100000), "too_large"),
        OddFile("bombs/png-14000px.png", png_header_bomb(14000, 14000), "too_large"),
        OddFile("bombs/gif-65535px.gif", gif_header_bomb(), "too_large"),
        OddFile("bombs/jpeg-60000px.jpg", jpeg_header_bomb(), "too_large"),
        # names: a byte that is not UTF-8, and a backslash
        OddFile("names/bad\udcffutf8.png", png, "rows:1"),
        OddFile("names/truncated-\udce9t\udce9.jpg", jpeg[:500], "truncated"),
        OddFile("names/back\\slash.png", png, "rows:1"),
    ]


def write_corpus(root: Path, corpus: list[OddFile]) -> None:
    for f in corpus:
        path = root / f.name  # a lone surrogate is written back as its byte (surrogateescape)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f.data)


def test_the_corpus_is_what_it_says():
    """The hostile files are hostile for the reason named (checked on Pillow itself)."""
    corpus = {f.name: f for f in odd_corpus()}
    with pytest.raises(TypeError, match="Missing dimensions"):
        Image.open(io.BytesIO(corpus["broken/malformed-frame.tif"].data)).seek(1)
    with pytest.raises(NotImplementedError):
        Image.open(io.BytesIO(corpus["broken/unimplemented-dds.png"].data))
    assert len(corpus["bombs/225-megapixel.tif"].data) < 1000
    assert len(corpus["documents/four-huge-pages.pdf"].data) < 1500
    assert os.fsencode("bad\udcffutf8.png") == b"bad\xffutf8.png"


def test_every_file_of_the_corpus_is_a_row_or_a_failure_with_a_reason(tmp_path, resnet18_weights):
    corpus = odd_corpus()
    src, out = tmp_path / "src", tmp_path / "out"
    write_corpus(src, corpus)
    result = CliRunner().invoke(app, ["run", "--source", str(src), "--output", str(out), "--model", "resnet18",
                                      "--weights", str(resnet18_weights), "--io-workers", "6", "--batch-size", "8",
                                      "--shard-size", "20"])
    assert result.exit_code == 0, result.output
    assert "committed version 1" in result.output

    cat = Catalog.open(LocalStore(out))
    pages = cat.images.groupby("key")["page"].apply(sorted).to_dict()
    failures = cat.failures.set_index("key")
    outcome = {}
    for f in corpus:
        key = key_for_local_name(f.name)
        assert (key in pages) != (key in failures.index), f"{key}: must be rows or a failure, exactly one"
        if key in pages:
            outcome[key] = f"rows:{len(pages[key])}"
            assert pages[key] == list(range(1, len(pages[key]) + 1))
        else:
            assert failures.loc[key, "error_type"] and failures.loc[key, "message"], key
            outcome[key] = failures.loc[key, "error_type"]
    assert outcome == {key_for_local_name(f.name): f.expect for f in corpus}
    assert "TypeError" in failures.loc["broken/malformed-frame.tif", "message"]
    assert "NotImplementedError" in failures.loc["broken/unimplemented-dds.png", "message"]
    assert cat.index.ntotal == len(cat.images)

    # documents were rendered within the cap; a name with a byte that is not UTF-8
    # is listed, fetched, embedded and stored by its escaped key
    rows = cat.images.set_index(["key", "page"])
    huge = rows.loc[("documents/huge-page-14400pt.pdf", 1)]
    assert huge["width"] * huge["height"] <= MAX_RENDER_PIXELS and huge["width"] >= 4000
    assert rows.loc[("names/bad\\xffutf8.png", 1), "image_id"] == image_id_for("names/bad\\xffutf8.png")
    assert rows.loc[("names/back\\\\slash.png", 1), "width"] == 320
    assert failures.loc["names/truncated-\\xe9t\\xe9.jpg", "error_type"] == "truncated"


def test_a_name_that_is_not_utf8_survives_runs_search_and_a_change(tmp_path, resnet18_weights):
    """bad\\xffutf8.png once stopped every run in image_id_for; now it is a row under
    its escaped key, a rerun sees nothing new, search takes and returns that key,
    and a change to its bytes re-embeds it."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    name = os.fsdecode(b"bad\xffutf8.png")
    (src / name).write_bytes(encode(_photo(seed=3), "PNG"))
    (src / "good.png").write_bytes(encode(_photo(seed=4), "PNG"))
    args = ["run", "--source", str(src), "--output", str(out), "--model", "resnet18",
            "--weights", str(resnet18_weights), "--io-workers", "4", "--json"]

    def run() -> dict:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    first = run()
    assert (first["status"], first["version"], first["processed"], first["failed"]) == ("committed", 1, 2, 0)
    key = "bad\\xffutf8.png"
    assert sorted(Catalog.open(LocalStore(out)).images["key"]) == [key, "good.png"]
    assert run()["status"] == "no_changes"

    for query, neighbour in ((key, "good.png"), ("good.png", key)):  # a key's own rows are left out
        found = CliRunner().invoke(app, ["search", "--catalog", str(out), "--key", query, "-k", "1", "--json"])
        assert found.exit_code == 0 and json.loads(found.output)[0]["key"] == neighbour, found.output

    (src / name).write_bytes(encode(_photo(seed=5), "JPEG"))
    changed = run()
    assert (changed["status"], changed["version"], changed["processed"]) == ("committed", 2, 1)
    assert LocalStore(src).get(key)[:3] == b"\xff\xd8\xff"


def test_local_keys_are_text_and_each_names_exactly_one_file(tmp_path):
    names = {b"bad\xffutf8.png": b"1", b"bad\\xffutf8.png": b"2", b"back\\slash.png": b"3",
             "caf\u00e9.png".encode(): b"4", b"dir\xe9/inner.png": b"5"}
    for name, data in names.items():
        path = os.path.join(os.fsencode(tmp_path), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
    store = LocalStore(tmp_path)
    listed = {o.key: store.get(o.key) for o in store.list()}
    assert listed == {"bad\\xffutf8.png": b"1", "bad\\\\xffutf8.png": b"2", "back\\\\slash.png": b"3",
                      "caf\u00e9.png": b"4", "dir\\xe9/inner.png": b"5"}
    for key in listed:
        key.encode("utf-8")  # every key is text: Parquet, JSON and terminals take it
        assert key_for_local_name(local_name_for_key(key)) == key
    with pytest.raises(StorageError, match="backslash that is not an escape"):
        store.get("bad\\yutf8.png")
