"""The chain of committed versions: find one by number, list them newest first.
"""

from __future__ import annotations

import logging

from tasks.catalog import layout
from tasks.catalog.errors import CatalogCorrupt, CatalogError
from tasks.catalog.manifest import Manifest, read_manifest, read_pointer
from tasks.storage import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)


def find_version(store: ObjectStore, version: int, *, start: str | None) -> str:
    """Follow parent links from `start` back to `version`'s manifest key. Where the
    chain is broken (a damaged CURRENT or manifest), the manifests are listed
    instead: of several for one version (runs that lost a race wrote theirs too),
    the one a later manifest names as its parent."""
    key: str | None = start
    try:
        while key is not None:
            manifest = read_manifest(store, key)
            if manifest.version == version:
                return key
            if manifest.version < version:
                raise CatalogError(f"version {version} is not in the history of {store.url}; "
                                   "`batchsight status --catalog OUT` lists the versions")
            key = manifest.parent
    except CatalogCorrupt as exc:
        log.warning("history is broken (%s); looking for version %s among the manifests", exc, version)
    candidates = [o.key for o in store.list(layout.manifests_of_version(version))]
    if len(candidates) > 1:
        parents = set()
        for o in store.list(layout.MANIFESTS):
            try:
                parents.add(read_manifest(store, o.key).parent)
            except CatalogCorrupt:
                continue
        candidates = [k for k in candidates if k in parents] or candidates
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CatalogError(f"version {version} is not in the history of {store.url}; "
                           "`batchsight status --catalog OUT` lists the versions")
    raise CatalogError(f"version {version} has several manifests at {store.url} ({', '.join(candidates)}) and "
                       "no later version says which was committed; restore CURRENT by hand to one of them")


def list_versions(store: ObjectStore) -> list[Manifest]:
    """Committed versions, newest first (the parent chain from CURRENT)."""
    pointer, _ = read_pointer(store)
    out: list[Manifest] = []
    key = pointer.manifest if pointer else None
    while key is not None:
        try:
            manifest = Manifest.from_json(store.get(key), store.describe(key))
        except ObjectNotFound:
            break  # history older than a gc'd manifest
        out.append(manifest)
        key = manifest.parent
    return out
