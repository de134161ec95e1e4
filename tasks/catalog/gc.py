"""Garbage collection: delete the catalogue's own files no retained version names,
by `layout.GC_POLICY` only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from models.errors import UserError
from tasks.catalog import layout
from tasks.catalog.history import list_versions
from tasks.catalog.layout import manifest_key
from tasks.catalog.leases import LEASE_PREFIX, live_leases
from tasks.catalog.manifest import POINTER_KEY
from tasks.catalog.reader import VERIFIED_DIR
from tasks.storage import LocalStore, ObjectStore

# gc looks under these prefixes only (`layout.GC_POLICY`): anything else under the root is not its to delete.
VERSION_FILE_PREFIXES = layout.VERSION_FILE_PREFIXES

VERSION_REPORT_PREFIXES = layout.VERSION_REPORT_PREFIXES


@dataclass
class GcReport:
    kept_versions: list[int]
    deleted: list[str]
    bytes_freed: int
    skipped_recent: int  # unreferenced but younger than the grace period
    skipped_running: int = 0  # files of runs whose lease is fresh


def collect_garbage(store: ObjectStore, *, keep_versions: int | None = None, min_age_s: float = 3600,
                    dry_run: bool = False, now: float | None = None) -> GcReport:
    """Delete the catalogue's own files that no retained version references: parts
    of crashed or losing runs, and (with `keep_versions`) the files and reports of
    versions older than the newest N.

    Only keys whose `layout.GC_POLICY` allows it are considered (version files,
    version reports, expired leases); nothing else under the root is touched:
    never the runs log, the categorisers or the labels (the audit trail of what
    made which rows). Files of a run whose lease is fresh are kept, however old;
    `min_age_s` is a last guard for writers without a lease.
    """
    retained = list_versions(store)
    if keep_versions is not None:
        if keep_versions < 1:
            raise UserError(f"keep_versions must be at least 1, not {keep_versions}")
        retained = retained[:keep_versions]
    referenced = {POINTER_KEY}
    kept_prefixes = []
    for m in retained:
        referenced |= {manifest_key(m.version, m.run_id), *m.named_files}
        kept_prefixes += layout.version_report_prefixes(m.version, m.run_id)
    now = time.time() if now is None else now
    running, expired = live_leases(store, now)
    report = GcReport(kept_versions=[m.version for m in retained], deleted=[], bytes_freed=0, skipped_recent=0)
    candidates = [o for prefix in VERSION_FILE_PREFIXES + VERSION_REPORT_PREFIXES for o in store.list(prefix)]
    for obj in candidates + expired:
        if obj.key in referenced or obj.key.startswith(tuple(kept_prefixes)):
            continue
        if any(run_id in obj.key for run_id in running):
            report.skipped_running += 1
            continue
        if now - obj.modified < min_age_s and not obj.key.startswith(LEASE_PREFIX):
            report.skipped_recent += 1
            continue
        if not dry_run:
            store.delete(obj.key)
        report.deleted.append(obj.key)
        report.bytes_freed += obj.size
    if isinstance(store, LocalStore) and not dry_run:  # stamps of files no retained version names
        named = {record.sha256 for m in retained for record in m.files.values()}
        for stamp in (store.root / VERIFIED_DIR).glob("*"):
            if stamp.name not in named:
                stamp.unlink(missing_ok=True)
    return report
