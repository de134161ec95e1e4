"""What a run must do, decided before any model work: which listed objects are
images, what changed since the live version, and whether the plan is safe to
commit. Plain functions: the flow runs them as a task, and the CLI runs them
first so a night with nothing to do never starts Prefect."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from tasks import catalog as cat
from tasks import tables
from tasks.options import RUN_DEFAULTS
from tasks.storage import ObjectInfo, ObjectStore

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


@dataclass
class RunPlan:
    """The live version a run builds on, and what it must change."""

    listing: Listing
    previous: cat.Catalog | None
    pointer_etag: str | None
    plan: cat.ChangePlan
    reembed_all: bool


# A plan handed from the CLI to the flow it starts next in this process: the
# CLI plans first (so a quiet night never starts Prefect), and the flow takes
# that plan instead of listing the bucket again (at 10M objects, hours of LIST).
_handed_over: tuple[tuple, RunPlan] | None = None


def drop_handed_over() -> None:
    """Forget a plan not taken (the flow failed before planning)."""
    global _handed_over
    _handed_over = None


def plan_run(source: ObjectStore, output: ObjectStore, fingerprint: str, *,
             max_attempts: int = RUN_DEFAULTS.max_attempts, limit: int | None = None,
             max_delete_share: float = RUN_DEFAULTS.max_delete_share, allow_mass_delete: bool = False,
             hand_over: bool = False, take_handed_over: bool = False) -> RunPlan:
    """List `source`, open the live version of `output`, refuse to build on a
    damaged one, and diff the two. A plan that deletes too much is refused
    (`MassDeleteRefused`) unless `allow_mass_delete`.

    `hand_over` keeps a plan with work in it for the next call in this process
    with `take_handed_over` and the same arguments, which takes it (once) while
    `CURRENT` has not moved, instead of listing again. A listing is a snapshot
    either way, and a commit on a stale plan is refused by the conditional put."""
    global _handed_over
    key = (source.url, output.url, fingerprint, max_attempts, limit, max_delete_share, allow_mass_delete)
    handed, _handed_over = (_handed_over, None) if take_handed_over else (None, _handed_over)
    if handed is not None and handed[0] == key and cat.read_pointer(output)[1] == handed[1].pointer_etag:
        return handed[1]
    planned = _plan_run(source, output, fingerprint, max_attempts=max_attempts, limit=limit,
                        max_delete_share=max_delete_share, allow_mass_delete=allow_mass_delete)
    if hand_over and not planned.plan.is_empty:
        _handed_over = (key, planned)
    return planned


def _plan_run(source: ObjectStore, output: ObjectStore, fingerprint: str, *, max_attempts: int,
              limit: int | None, max_delete_share: float, allow_mass_delete: bool) -> RunPlan:
    listing = select_images(list(source.list()))
    pointer, pointer_etag = cat.read_pointer(output)
    previous = cat.Catalog.open(output) if pointer else None
    if previous is not None and (problems := previous.check_sizes()):
        raise cat.CatalogCorrupt(
            f"version {previous.manifest.version} of {output.url} is damaged ({'; '.join(problems[:3])}"
            f"{f' and {len(problems) - 3} more' if len(problems) > 3 else ''}); this run changed nothing. "
            f"Restore the files, or {cat.ROLLBACK_HINT}")
    reembed_all = previous is not None and previous.manifest.fingerprint != fingerprint
    catalogued = previous.live_table("images", ["key", "etag", "size"]) if previous \
        else tables.IMAGES_SCHEMA.empty_table()
    plan = cat.plan_changes(
        listing.images,
        catalogued,
        previous.failures if previous else tables.empty_frame(tables.FAILURES_SCHEMA),
        reembed_all=reembed_all, max_attempts=max_attempts, limit=limit)
    if previous is not None and not allow_mass_delete:
        cat.check_deletions(plan, plan.catalogued, source=source.url, max_share=max_delete_share,
                            listed=len(listing.images))
    return RunPlan(listing, previous, pointer_etag, plan, reembed_all)
