"""What a run must do, decided before any model work: which listed objects are
images, what changed since the live version, and whether the plan is safe to
commit. Plain functions: the flow runs them as a task, and the CLI runs them
first so a night with nothing to do never starts Prefect.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tasks.catalog import tables
from tasks.catalog.errors import ROLLBACK_HINT, CatalogCorrupt, CatalogError
from tasks.catalog.manifest import read_pointer
from tasks.catalog.reader import Catalog
from tasks.config import DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_DELETE_SHARE, RunConfig
from tasks.records import ChangePlan, ObjectInfo
from tasks.source.listing import Listing, select_images
from tasks.storage import ObjectStore, cached_store


def plan_changes(listing: Iterable[ObjectInfo], catalogued: pd.DataFrame | pa.Table, failed: pd.DataFrame, *,
                 reembed_all: bool = False, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 limit: int | None = None) -> ChangePlan:
    """Diff a listing against the live rows by (key, etag, size).

    `catalogued` has columns key, etag, size; `failed` has key, etag, size,
    attempts and optionally stage. A failure to fetch (or in the model) is retried
    up to `max_attempts`; a failure to decode is final while the bytes stay the
    same (decoding the same bytes again gives the same answer). `reembed_all`
    (the model or weights changed) makes every listed object new or changed.
    `limit` caps the images processed; changed images past it are still removed
    (no stale row survives), to be redone later.
    """
    objects = listing if isinstance(listing, list) else list(listing)
    listed = pa.table({"key": pa.array([o.key for o in objects], pa.string()),
                       "etag": pa.array([o.etag for o in objects], pa.string()),
                       "size": pa.array(np.fromiter((o.size for o in objects), np.int64, len(objects))),
                       "listed_at": pa.array(np.arange(len(objects), dtype=np.int64))})
    known = _key_columns(catalogued)  # a document's pages are rows of one key, etag and size: the join takes them all
    failures = _one_row_a_key(failed, ["attempts", "stage"])
    prior, same, known_listed = _same_bytes(listed, known)
    changed = prior & (~same | reembed_all)
    was_failed, failed_same, failure_listed = _same_bytes(listed, failures, ["attempts", "stage"])
    failed_same &= ~prior & (not reembed_all)
    attempts = np.where(was_failed["stage"] == "decode", max_attempts, was_failed["attempts"])
    retry = failed_same & (attempts < max_attempts)
    plan = ChangePlan(new=[objects[i] for i in np.flatnonzero(~prior & ~failed_same)],
                      changed=[objects[i] for i in np.flatnonzero(changed)],
                      retry=[objects[i] for i in np.flatnonzero(retry)],
                      unchanged=int((same & ~changed).sum()), given_up=int((failed_same & ~retry).sum()))
    gone_known = set(known["key"].filter(pa.array(~known_listed)).to_pylist())
    plan.deleted = sorted(gone_known | set(failures["key"].filter(pa.array(~failure_listed)).to_pylist()))
    plan.catalogued = int(prior.sum()) + len(gone_known) + len(failures)  # listed keys are unique
    if limit is not None and len(plan.to_process) > limit:
        keep = plan.to_process[:limit]
        kept = {o.key for o in keep}
        plan.deferred = [o for o in plan.to_process if o.key not in kept]
        plan.new = [o for o in plan.new if o.key in kept]
        plan.changed = [o for o in plan.changed if o.key in kept]
        plan.retry = [o for o in plan.retry if o.key in kept]
    return plan


def _key_columns(rows: pd.DataFrame | pa.Table, extra: Sequence[str] = ()) -> pa.Table:
    """key, etag, size (and `extra`) of `rows`, as Arrow."""
    columns = ["key", "etag", "size", *[c for c in extra if c in rows.columns]]
    table = rows.select(columns) if isinstance(rows, pa.Table) \
        else pa.Table.from_pandas(rows[columns], preserve_index=False)
    return table.cast(pa.schema([(c, pa.string() if c in ("key", "etag", "stage") else pa.int64())
                                 for c in columns]))


def _one_row_a_key(rows: pd.DataFrame | pa.Table, extra: Sequence[str] = ()) -> pa.Table:
    """`_key_columns` of the last row of each key."""
    table = _key_columns(rows, extra)
    keys = table["key"]
    if len(pc.unique(keys)) == len(keys):
        return table
    last = pd.Series(np.arange(len(table))).groupby(keys.to_numpy(zero_copy_only=False)).last().to_numpy()
    return table.take(np.sort(last))


def _same_bytes(listed: pa.Table, rows: pa.Table, extra: Sequence[str] = ()) -> tuple:
    """(listed key has a row in `rows`, and that row has the listed etag and size), in
    listing order, and whether each of `rows` was listed, in its order: one hash join
    in Arrow. With `extra`, the first item is instead a dict of those columns of the
    matched rows (None where unmatched)."""
    n = len(listed)
    if not len(rows):  # nothing to match (a first run, a catalogue without failures)
        nothing = np.zeros(n, bool)
        return ({c: np.full(n, None, object) if c == "stage" else np.zeros(n, np.int64) for c in extra}
                if extra else nothing), nothing.copy(), np.zeros(0, bool)
    right = rows.rename_columns([c if c == "key" else f"row_{c}" for c in rows.column_names]) \
        .append_column("row_at", pa.array(np.arange(len(rows), dtype=np.int64)))
    joined = listed.join(right, "key", join_type="inner")
    at = joined["listed_at"].to_numpy()
    found = np.zeros(n, bool)
    found[at] = True
    row_listed = np.zeros(len(rows), bool)
    row_listed[joined["row_at"].to_numpy()] = True
    same = np.zeros(n, bool)
    same[at] = pc.and_(pc.equal(joined["etag"], joined["row_etag"]),
                       pc.equal(joined["size"], joined["row_size"])).fill_null(False).to_numpy(zero_copy_only=False)
    if not extra:
        return found, same, row_listed
    matched = {}
    for column in extra:
        values = np.full(n, None, dtype=object) if column == "stage" else np.zeros(n, np.int64)
        if f"row_{column}" in joined.column_names:
            values[at] = joined[f"row_{column}"].to_numpy(zero_copy_only=False)
        matched[column] = values
    return matched, same, row_listed


class MassDeleteRefused(CatalogError):
    """A plan would delete more of the catalogue than the run is allowed to."""



def check_deletions(plan: ChangePlan, catalogued: int, *, source: str, max_share: float = DEFAULT_MAX_DELETE_SHARE,
                    listed: int) -> None:
    """Refuse a plan that deletes more than `max_share` of the `catalogued` objects
    (any deletion at all when the listing came back empty): a typo in a prefix, an
    expired credential or a bucket emptied by mistake must not empty a catalogue."""
    if not catalogued or not plan.deleted:
        return
    share = len(plan.deleted) / catalogued
    if share <= max_share and listed:
        return
    raise MassDeleteRefused(
        f"this run would delete {len(plan.deleted)} of the {catalogued} catalogued objects ({share:.0%}; the limit "
        f"is --max-delete-share {max_share:.0%}) because the listing of {source} returned {listed} objects. Likely "
        "causes: a typo in the source prefix, credentials that can list nothing, or objects moved or deleted by "
        "mistake. Nothing was committed. If the deletions are meant, rerun with --allow-mass-delete.")


@dataclass
class RunPlan:
    """The live version a run builds on, and what it must change."""

    listing: Listing
    previous: Catalog | None
    pointer_etag: str | None
    plan: ChangePlan
    reembed_all: bool

    def still_current(self, output: ObjectStore) -> bool:
        """Whether the version this plan was made against is still the live one (a
        commit on a stale plan would be refused by the conditional put anyway)."""
        return read_pointer(output)[1] == self.pointer_etag


def plan_run(config: RunConfig, fingerprint: str) -> RunPlan:
    """List the source, open the live version of the output, refuse to build on a
    damaged one, and diff the two. A plan that deletes too much is refused
    (`MassDeleteRefused`) unless `allow_mass_delete`."""
    source = cached_store(config.source, config.endpoint_url)
    output = cached_store(config.output, config.endpoint_url, create=True)
    safety = config.safety
    return _plan_run(source, output, fingerprint, max_attempts=safety.max_attempts, limit=config.shards.limit,
                     max_delete_share=safety.max_delete_share, allow_mass_delete=safety.allow_mass_delete)


def _plan_run(source: ObjectStore, output: ObjectStore, fingerprint: str, *, max_attempts: int,
              limit: int | None, max_delete_share: float, allow_mass_delete: bool) -> RunPlan:
    listing = select_images(list(source.list()))
    pointer, pointer_etag = read_pointer(output)
    previous = Catalog.open(output) if pointer else None
    if previous is not None and (problems := previous.check_sizes()):
        raise CatalogCorrupt(
            f"version {previous.manifest.version} of {output.url} is damaged ({'; '.join(problems[:3])}"
            f"{f' and {len(problems) - 3} more' if len(problems) > 3 else ''}); this run changed nothing. "
            f"Restore the files, or {ROLLBACK_HINT}")
    reembed_all = previous is not None and previous.manifest.fingerprint != fingerprint
    catalogued = previous.live_table("images", ["key", "etag", "size"]) if previous \
        else tables.IMAGES_SCHEMA.empty_table()
    plan = plan_changes(
        listing.images,
        catalogued,
        previous.failures if previous else tables.empty_frame(tables.FAILURES_SCHEMA),
        reembed_all=reembed_all, max_attempts=max_attempts, limit=limit)
    if previous is not None and not allow_mass_delete:
        check_deletions(plan, plan.catalogued, source=source.url, max_share=max_delete_share,
                            listed=len(listing.images))
    return RunPlan(listing, previous, pointer_etag, plan, reembed_all)


class HandedPlans:
    """Plans handed from whoever made them to a flow run in the same process, by a
    short token: the CLI plans first (so a quiet night never starts Prefect) and
    passes the token as the flow's `plan_token`, so the bucket is not listed twice
    (at 10M objects, hours of LIST). A plan travels by token, never as a flow
    parameter: Prefect serializes parameters (and refuses them past 512 KB), and
    a listing is larger than that from a few thousand objects. A token from
    another process, or taken already, finds nothing: the flow then plans itself."""

    def __init__(self) -> None:
        self._plans: dict[str, RunPlan] = {}
        self._lock = threading.Lock()

    def hand_over(self, plan: RunPlan) -> str:
        token = secrets.token_hex(8)
        with self._lock:
            self._plans[token] = plan
        return token

    def take(self, token: str | None) -> RunPlan | None:
        with self._lock:
            return self._plans.pop(token, None) if token else None


HANDED_PLANS = HandedPlans()
