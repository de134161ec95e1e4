"""Categorisers in the catalogue: saved under `categorizers/`, listed, switched;
`categorizers/ACTIVE` names the one nightly runs apply (a plain overwrite: the
last fit or `use` wins).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from models.categorizer import Categorizer
from tasks.catalog import layout
from tasks.catalog.manifest import new_run_id
from tasks.categories.labels import LabelsError
from tasks.storage import ObjectNotFound, ObjectStore

ACTIVE_KEY = layout.ACTIVE_CATEGORIZER_KEY


def save_categorizer(store: ObjectStore, categorizer: Categorizer) -> str:
    """Write a new categoriser version and make it the active one."""
    created = datetime.now(UTC)
    categorizer.created_at = created.isoformat(timespec="seconds")
    key = layout.categorizer_key(created, new_run_id(created).rsplit("-", 1)[1])
    store.put(key, categorizer.to_json(), if_none_match=True)
    # Nothing here depends on which categoriser was active before, so the pointer is
    # simply overwritten: of two fits finishing together, the later one is active.
    store.put(ACTIVE_KEY, json.dumps({"categorizer": key}).encode())
    return key


def list_categorizers(store: ObjectStore) -> list[tuple[str, Categorizer, bool]]:
    """(key, categoriser, is active) for every saved categoriser, oldest first."""
    active = active_categorizer(store)
    keys = sorted(o.key for o in store.list(layout.CATEGORIZERS) if layout.is_categorizer_key(o.key))
    return [(key, load_categorizer(store, key), bool(active) and active[1] == key) for key in keys]


def use_categorizer(store: ObjectStore, which: str) -> str:
    """Make a saved categoriser active: `which` is its key, its file name or its
    1-based number in `list_categorizers`. Returns its key."""
    keys = [key for key, _, _ in list_categorizers(store)]
    if which.isdigit() and 1 <= int(which) <= len(keys):
        key = keys[int(which) - 1]
    else:
        matches = [k for k in keys if which in (k, layout.categorizer_name(k), layout.categorizer_name(k) + ".json")]
        if len(matches) != 1:
            raise LabelsError(f"no categoriser {which!r} in {store.url}; `batchsight categories list` shows "
                              f"{len(keys)} (pass a number or a name)")
        key = matches[0]
    store.put(ACTIVE_KEY, json.dumps({"categorizer": key}).encode())
    return key


def active_categorizer(store: ObjectStore) -> tuple[Categorizer, str] | None:
    try:
        key = json.loads(store.get(ACTIVE_KEY))["categorizer"]
    except ObjectNotFound:
        return None
    return load_categorizer(store, key), key


_loaded: dict[tuple[str, str], Categorizer] = {}


def load_categorizer(store: ObjectStore, key: str) -> Categorizer:
    """Categorisers are immutable, so each is read once per process."""
    cache_key = (store.url, key)
    if cache_key not in _loaded:
        _loaded[cache_key] = Categorizer.from_json(store.get(key))
    return _loaded[cache_key]
