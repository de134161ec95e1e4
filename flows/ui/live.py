"""The live catalogue behind the page: the version `CURRENT` names, loaded whole
(tables, index, search lookups) before it replaces the one in service, so that
no request sees half of a version; a background thread checks `CURRENT` every
`poll_s` whether requests come or not. A version that cannot be loaded is
reported (`LiveCatalog.status`, `/api/status`) and retried with a growing wait,
while the one in service keeps serving."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from models.errors import UserError
from tasks.catalog.errors import CatalogError
from tasks.catalog.manifest import Pointer, read_manifest, read_pointer
from tasks.catalog.reader import Catalog
from tasks.categories.labels import LabelLog
from tasks.search import query as image_search
from tasks.storage import ObjectStore, StorageError

log = logging.getLogger(__name__)

CACHE_ENTRIES = 32  # filters and duplicate reports kept per version
MIN_POLL_S = 0.05  # `poll_s=0` (tests) checks as often as this
MAX_RETRY_S = 60.0  # a version that failed to load is tried again after 2 x poll_s, 4 x, ... up to this

T = TypeVar("T")


class UnknownImage(UserError, KeyError):
    """An image id the version in service does not hold (a 404)."""


class CatalogView:
    """One committed version with what a request reads of it loaded before it
    goes live: its images and failures, its index, the lookups its searches
    need (`SearchLookups`), and the filters and duplicate reports asked of it
    (the last `CACHE_ENTRIES`)."""

    def __init__(self, cat: Catalog) -> None:
        self.cat = cat
        self.images = cat.images
        self.failures = cat.failures
        self.index = cat.index
        self.lookups = image_search.SearchLookups(cat).built()
        self._rows = self.images.set_index("image_id", drop=False)
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._cache_lock = threading.Lock()

    @property
    def version(self) -> int:
        return self.cat.manifest.version

    @property
    def manifest_key(self) -> str:
        return self.cat.manifest_key

    def cached(self, key: tuple, make: Callable[[], T]) -> T:
        """`make()`, kept for this version under `key` (two requests may both make it)."""
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = make()
        with self._cache_lock:
            self._cache[key] = value
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return value

    def allowed_ids(self, prefix: str | None, category: str | None) -> np.ndarray | None:
        """`tasks.search.query.allowed_ids` of this version, kept per filter."""
        if not prefix and not category:
            return None
        return self.cached(("allowed", prefix, category), lambda: image_search.allowed_ids(
            self.cat, prefix=prefix or None, category=category or None))

    def row(self, image_id: int) -> pd.Series:
        try:
            return self._rows.loc[image_id]
        except KeyError:
            raise UnknownImage(f"no image {image_id} in catalogue version {self.version}") from None


@dataclass(frozen=True)
class LoadFailure:
    """A version `CURRENT` names that could not be loaded: which, why, since when."""

    version: int
    manifest: str
    reason: str
    since: str  # ISO time of the first failure
    attempts: int
    retry_in_s: float


def live_pointer(store: ObjectStore) -> Pointer:
    """The `CURRENT` pointer, or a CatalogError saying there is no catalogue."""
    pointer, _ = read_pointer(store)
    if pointer is None:
        raise CatalogError(f"no catalogue at {store.url} (no CURRENT pointer); "
                           "run `batchsight run --source SRC --output OUT` first")
    return pointer


def load_view(store: ObjectStore, pointer: Pointer) -> CatalogView:
    return CatalogView(Catalog(store, read_manifest(store, pointer.manifest), pointer.manifest))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class LiveCatalog:
    """The live version of a catalogue, following `CURRENT`. The first `view()`
    loads it (or raises why it cannot); then a thread checks `CURRENT` every
    `poll_s` and swaps a new version in once it is loaded whole. The thread ends
    with `close()` or when the catalogue object is collected."""

    def __init__(self, store: ObjectStore, *, poll_s: float = 2.0,
                 load: Callable[[ObjectStore, Pointer], CatalogView] = load_view) -> None:
        self.store = store
        self.poll_s = poll_s
        self.labels = LabelLog(store)
        self._load = load
        self._view: CatalogView | None = None
        self._loaded_at: str | None = None
        self._checked_at: str | None = None
        self._failure: LoadFailure | None = None
        self._pointer_error: str | None = None
        self._retry_at = 0.0
        self._first_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def view(self) -> CatalogView:
        """The version in service; the first call loads it (a CatalogError when there is none)."""
        view = self._view
        if view is None:
            with self._first_lock:
                if self._view is None:
                    self._view = self._load(self.store, live_pointer(self.store))
                    self._loaded_at = self._checked_at = _now()
                    log.info("serving catalogue version %s", self._view.version)
                    self._start_polling()
            view = self._view
        return view

    def served(self) -> CatalogView | None:
        """The version in service, without loading one (None before the first `view()`)."""
        return self._view

    def status(self) -> dict:
        """What is served, when `CURRENT` was last read, and the newer version that
        failed to load (`failed`: its version, manifest, reason, since when), if one did."""
        view = self.view()
        failure = self._failure
        return {"version": view.version, "manifest": view.manifest_key, "loaded_at": self._loaded_at,
                "checked_at": self._checked_at, "poll_s": self.poll_s, "current_error": self._pointer_error,
                "failed": asdict(failure) if failure is not None else None}

    def close(self) -> None:
        self._stop.set()

    def _start_polling(self) -> None:
        # The thread holds the catalogue weakly, so an app that is dropped (tests) ends its thread.
        thread = threading.Thread(target=_poll, args=(weakref.ref(self), self._stop, max(self.poll_s, MIN_POLL_S)),
                                  name="batchsight-ui-poll", daemon=True)
        weakref.finalize(self, self._stop.set)
        thread.start()
        self._poller = thread

    def check(self) -> None:
        """Read `CURRENT`; load and swap in the version it names if that is not the
        one in service. Whatever stops it is kept for `status()` and logged once."""
        try:
            pointer = live_pointer(self.store)
        except (UserError, StorageError, OSError) as exc:  # the version in service stays
            reason = f"CURRENT cannot be read: {exc}"
            if self._pointer_error != reason:
                log.warning("%s; still serving version %s", reason, self._view.version if self._view else None)
            self._pointer_error = reason
            return
        self._checked_at, self._pointer_error = _now(), None
        if self._view is not None and pointer.manifest == self._view.manifest_key:
            self._failure = None  # e.g. rolled back to the version in service
            return
        failed = self._failure
        if failed is not None and failed.manifest == pointer.manifest and time.monotonic() < self._retry_at:
            return
        try:
            view = self._load(self.store, pointer)
        except Exception as exc:  # any reason at all: reported in status(), the version in service stays
            self._failed(pointer, exc)
            return
        self._view, self._loaded_at, self._failure = view, _now(), None
        log.info("serving catalogue version %s", view.version)

    def _failed(self, pointer: Pointer, exc: Exception) -> None:
        # files by their keys in the catalogue: the API shows the reason, and the server's paths are not its business
        text = str(exc).strip().replace(self.store.url.rstrip("/") + "/", "")
        reason = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
        before = self._failure if self._failure is not None and self._failure.manifest == pointer.manifest else None
        attempts = before.attempts + 1 if before else 1
        wait = min(MAX_RETRY_S, max(self.poll_s, MIN_POLL_S) * 2 ** attempts)
        self._retry_at = time.monotonic() + wait
        self._failure = LoadFailure(version=pointer.version, manifest=pointer.manifest, reason=reason,
                                    since=before.since if before else _now(), attempts=attempts, retry_in_s=wait)
        if before is None or before.reason != reason:  # once a version and reason, not every poll
            # a damaged or missing file is the catalogue's state; anything else may be a bug: its traceback, once
            expected = isinstance(exc, (UserError, StorageError, OSError))
            log.warning("could not load catalogue version %s (%s); still serving version %s, trying again in "
                        "%.3g s and less often after: %s", pointer.version, pointer.manifest,
                        self._view.version if self._view else None, wait, reason, exc_info=not expected)


def _poll(ref: weakref.ref[LiveCatalog], stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        live = ref()
        if live is None:
            return
        live.check()
        del live
