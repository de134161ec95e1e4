"""The storage layout: every key the catalogue writes under its output root, and
which of them gc may delete. No other module spells a key or a prefix.

```
CURRENT                                           the live pointer: {"version": N, "manifest": "manifests/..."}
manifests/v000042-<run_id>.json                   one version: the files it reads, their sha256, provenance
tables/images/v000042-<run_id>.parquet            a part of rows written by version 42 (the new and changed)
tables/images/v000042-<run_id>.deletes.parquet    (image_id, run_id) of rows in earlier parts that left since
tables/failures/v000042-<run_id>.parquet          ... the same for failures: a part of new ones
tables/failures/v000042-<run_id>.deletes.parquet  (key, run_id) of failures re-decided since
tables/embeddings/<run_id>/shard-00000-<attempt>.parquet  immutable vectors of one shard attempt of one run
tables/thumbnails/<run_id>/shard-00000-<attempt>.parquet  ... and the WebP thumbnails of its rows
index/v000042-<run_id>.faiss                      the main FAISS index (as trained at the last compaction)
index/v000042-<run_id>.delta.faiss                ... the exact segment of vectors added since (IDMap2,Flat)
index/v000042-<run_id>.removed.npy                ... the ids removed from the main index since
index/v000042-<run_id>.truth.npz                  ... the held-out queries and their exact neighbours (recall)
index/v000042-<run_id>.rerank-ids.npy             ... and its exact re-rank vectors, when it has them
index/v000042-<run_id>.rerank-f16.npy
tables/duplicates/v000042-<run_id>/threshold-0.9500.parquet      a report computed from version 42
tables/category_suggestions/v000042-<run_id>/k8.parquet          a report computed from version 42
leases/<run_id>.json                              a writer at work (a run, an apply, a rollback)
tables/runs/<run_id>.parquet                      the runs log: one row per run, committed or not
categorizers/<time>-<id>.json                     a fitted categoriser (immutable)
categorizers/ACTIVE                               {"categorizer": "categorizers/..."}: the one runs apply
labels/<time>-<id>.parquet                        labels given on the review page (an append-only log)
thumbnails/cache/<image_id>-<etag hash>.webp      thumbnails for the web page (a cache)
```

What gc does with each area is `GC_POLICY`: the files of a version go with the
last retained version that names them, a report with the version it was
computed from, a lease when it expires; the log, the categorisers, the labels
and the thumbnail cache are never collected, and nothing outside these
prefixes is the catalogue's.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from enum import Enum

POINTER_KEY = "CURRENT"
MANIFESTS = "manifests/"
IMAGES = "tables/images/"
FAILURES = "tables/failures/"
EMBEDDINGS = "tables/embeddings/"
THUMBNAIL_PARTS = "tables/thumbnails/"
INDEX = "index/"
DUPLICATES = "tables/duplicates/"
CATEGORY_SUGGESTIONS = "tables/category_suggestions/"
LEASES = "leases/"
RUNS = "tables/runs/"
CATEGORIZERS = "categorizers/"
ACTIVE_CATEGORIZER_KEY = f"{CATEGORIZERS}ACTIVE"
LABELS = "labels/"
THUMBNAILS = "thumbnails/cache/"


class Gc(Enum):
    """What gc may do with the files under one prefix."""

    VERSION_FILE = "deleted when no retained version names it"
    VERSION_REPORT = "deleted with the version it was computed from"
    LEASE = "deleted when it expires"
    NEVER = "never deleted"


GC_POLICY: dict[str, Gc] = {
    POINTER_KEY: Gc.NEVER,
    MANIFESTS: Gc.VERSION_FILE,
    IMAGES: Gc.VERSION_FILE,
    FAILURES: Gc.VERSION_FILE,
    EMBEDDINGS: Gc.VERSION_FILE,
    THUMBNAIL_PARTS: Gc.VERSION_FILE,
    INDEX: Gc.VERSION_FILE,
    DUPLICATES: Gc.VERSION_REPORT,
    CATEGORY_SUGGESTIONS: Gc.VERSION_REPORT,
    LEASES: Gc.LEASE,
    RUNS: Gc.NEVER,
    CATEGORIZERS: Gc.NEVER,
    LABELS: Gc.NEVER,
    THUMBNAILS: Gc.NEVER,
}
VERSION_FILE_PREFIXES = tuple(p for p, policy in GC_POLICY.items() if policy is Gc.VERSION_FILE)
VERSION_REPORT_PREFIXES = tuple(p for p, policy in GC_POLICY.items() if policy is Gc.VERSION_REPORT)


def gc_policy(key: str) -> Gc | None:
    """What gc may do with `key`; None for a key that is not the catalogue's."""
    for prefix, policy in GC_POLICY.items():
        if key == prefix or (prefix.endswith("/") and key.startswith(prefix)):
            return policy
    return None


def version_stem(version: int, run_id: str) -> str:
    """What every file of one version is named by: `v000042-<run_id>`. The run id
    keeps two writers racing to the same version number from ever sharing a key."""
    return f"v{version:06d}-{run_id}"


def manifest_key(version: int, run_id: str) -> str:
    return f"{MANIFESTS}{version_stem(version, run_id)}.json"


def manifests_of_version(version: int) -> str:
    """The prefix of every manifest written for `version` (the winner's and any loser's)."""
    return f"{MANIFESTS}v{version:06d}-"


def manifest_version(key: str) -> int | None:
    """The version number a manifest key names, or None for a key that is not one."""
    digits = key.removeprefix(MANIFESTS + "v")[:6] if key.startswith(MANIFESTS + "v") else ""
    return int(digits) if digits.isdigit() else None


def images_table_key(version: int, run_id: str) -> str:
    return f"{IMAGES}{version_stem(version, run_id)}.parquet"


def failures_table_key(version: int, run_id: str) -> str:
    return f"{FAILURES}{version_stem(version, run_id)}.parquet"


def deletes_key(table_key: str) -> str:
    """The deletes a version records beside the part it writes (`tables/images/v...deletes.parquet`)."""
    assert table_key.endswith(".parquet"), table_key
    return table_key.removesuffix(".parquet") + ".deletes.parquet"


def index_segment_keys(version: int, run_id: str) -> tuple[str, str, str]:
    """(the delta segment, the ids removed from the main index, the recall truth) of a version."""
    stem = f"{INDEX}{version_stem(version, run_id)}"
    return f"{stem}.delta.faiss", f"{stem}.removed.npy", f"{stem}.truth.npz"


def index_key(version: int, run_id: str) -> str:
    return f"{INDEX}{version_stem(version, run_id)}.faiss"


def rerank_keys(version: int, run_id: str) -> tuple[str, str]:
    """(the ids file, the float16 vectors file) of a version's exact re-rank."""
    stem = f"{INDEX}{version_stem(version, run_id)}"
    return f"{stem}.rerank-ids.npy", f"{stem}.rerank-f16.npy"


def embeddings_part_key(run_id: str, shard: int, attempt: str = "") -> str:
    """A shard's part. Runs name each attempt of a shard (a random token), so an
    attempt that was given up for dead and wakes later (a cut-off Dask worker)
    writes a key of its own, never over the part a version lists."""
    return f"{EMBEDDINGS}{run_id}/shard-{shard:05d}{f'-{attempt}' if attempt else ''}.parquet"


def thumbnails_part_key(embeddings_part: str) -> str:
    """The thumbnails part a shard attempt writes beside its embeddings part."""
    assert embeddings_part.startswith(EMBEDDINGS), embeddings_part
    return THUMBNAIL_PARTS + embeddings_part.removeprefix(EMBEDDINGS)


def duplicates_key(version: int, run_id: str, threshold: float) -> str:
    """Named by the version it was computed from (and the threshold), so a report
    always says which images it describes and a rerun rewrites the same key."""
    return f"{DUPLICATES}{version_stem(version, run_id)}/threshold-{threshold:.4f}.parquet"


def category_suggestions_key(version: int, run_id: str, k: int) -> str:
    return f"{CATEGORY_SUGGESTIONS}{version_stem(version, run_id)}/k{k}.parquet"


def version_report_prefixes(version: int, run_id: str) -> list[str]:
    """The folders of the reports computed from one version (gc keeps them with it)."""
    return [f"{prefix}{version_stem(version, run_id)}/" for prefix in VERSION_REPORT_PREFIXES]


def lease_key(run_id: str) -> str:
    return f"{LEASES}{run_id}.json"


def lease_run_id(key: str) -> str:
    return key.removeprefix(LEASES).removesuffix(".json")


def run_row_key(run_id: str) -> str:
    return f"{RUNS}{run_id}.parquet"


def categorizer_key(created: datetime, suffix: str) -> str:
    # microseconds in the name: `categories list` orders by it, and two fits can share a second
    return f"{CATEGORIZERS}{created:%Y%m%dT%H%M%S%fZ}-{suffix}.json"


def is_categorizer_key(key: str) -> bool:
    return key.startswith(CATEGORIZERS) and key.endswith(".json")


def categorizer_name(key: str) -> str:
    """A categoriser's name as `categories list` shows it: its file name without `.json`."""
    return key.removeprefix(CATEGORIZERS).removesuffix(".json")


def labels_file_key(now: datetime, token: str) -> str:
    return f"{LABELS}{now:%Y%m%dT%H%M%S.%f}Z-{token}.parquet"


def thumbnail_key(image_id: int, etag: str) -> str:
    """Where the cached thumbnail of one version of one page lives; immutable."""
    tag = hashlib.sha256(str(etag).encode()).hexdigest()[:12]
    return f"{THUMBNAILS}{int(image_id)}-{tag}.webp"
