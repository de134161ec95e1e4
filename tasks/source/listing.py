"""What a listing holds to read: every extension Pillow opens, PDFs, and keys
with no extension (their content decides); the rest is counted by extension.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from tasks.records import ObjectInfo

# Pillow's registered stubs and write-only formats cannot be read without extra software.
_UNREADABLE_FORMATS = {"BUFR", "GRIB", "HDF5", "EPS", "MPEG", "WMF", "PALM", "PDF"}


def readable_extensions() -> frozenset[str]:
    """Every extension Pillow can open here, plus PDF (rendered by pypdfium2)."""
    Image.init()
    return frozenset({ext for ext, fmt in Image.registered_extensions().items()
                      if fmt in Image.OPEN and fmt not in _UNREADABLE_FORMATS} | {".pdf"})


READABLE_EXTENSIONS = readable_extensions()

SKIPPED_EXAMPLES = 3


def extension_of(key: str) -> str:
    """`.jpg` for `a/b.JPG`; '' for a key whose last segment has no dot."""
    name = key.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


@dataclass
class Listing:
    """A source listing split into what a run reads and what it skips."""

    images: list[ObjectInfo]
    skipped: dict[str, int] = field(default_factory=dict)  # extension -> count
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def skipped_line(self) -> str:
        """`12 .txt (e.g. a.txt, b.txt), 1 .mp4 (e.g. v.mp4)`, most frequent first."""
        return ", ".join(f"{n} {ext} (e.g. {', '.join(self.skipped_examples[ext])})"
                         for ext, n in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])))


def select_images(listed: list[ObjectInfo]) -> Listing:
    """Objects with an extension Pillow (or pypdfium2) reads, and objects with no
    extension at all (S3 keys often have none: their content decides, and one that
    is no image becomes a `not_an_image` failure once). Others are skipped and
    counted by extension, with a few examples."""
    readable = _readable([obj.key for obj in listed])
    images = [listed[i] for i in np.flatnonzero(readable)] if not readable.all() else list(listed)
    skipped, examples = Counter(), {}
    for i in np.flatnonzero(~readable):
        ext = extension_of(listed[i].key)
        skipped[ext] += 1
        if len(seen := examples.setdefault(ext, [])) < SKIPPED_EXAMPLES:
            seen.append(listed[i].key)
    return Listing(images, dict(skipped), examples)


_READ = READABLE_EXTENSIONS | {""}  # "": no extension, the content decides

_READ_ARRAY = pa.array(sorted(_READ))


def _readable(keys: list[str]) -> np.ndarray:
    """Whether each key's `extension_of` is one this run reads, in Arrow's C loops
    (10M keys in seconds, not a minute)."""
    try:
        array = pa.array(keys, pa.string())
    except (pa.ArrowException, UnicodeEncodeError):  # a key with a byte that is not UTF-8
        return np.array([extension_of(key) in _READ for key in keys], bool)
    found = pc.struct_field(pc.extract_regex(array, r"[^/](?P<ext>\.[^./]*)$"), [0])
    return pc.is_in(pc.utf8_lower(pc.fill_null(found, "")), value_set=_READ_ARRAY).to_numpy(zero_copy_only=False)
