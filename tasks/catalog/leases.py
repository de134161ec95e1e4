"""Leases: a writer at work says so under `leases/`, renewed while it writes, so gc
leaves its files alone however long it takes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from datetime import UTC, datetime

from tasks.catalog import layout
from tasks.records import ObjectInfo
from tasks.storage import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)


LEASE_PREFIX = layout.LEASES

LEASE_TTL_S = 15 * 60  # a lease not renewed for this long belongs to a run that died


class RunLease:
    """`leases/<run_id>.json` (`layout.lease_key`), renewed every `ttl_s / 15` while a run writes: gc
    leaves every file named by a run with a fresh lease alone, however long the
    run takes, so no grace period has to outlast a night."""

    def __init__(self, store: ObjectStore, run_id: str, *, ttl_s: float = LEASE_TTL_S) -> None:
        self.store = store
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.key = layout.lease_key(run_id)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="batchsight-lease", daemon=True)

    def _write(self) -> None:
        self.store.put(self.key, json.dumps({
            "run_id": self.run_id, "holder": f"{socket.gethostname()}:{os.getpid()}", "ttl_s": self.ttl_s,
            "renewed_at": datetime.now(UTC).isoformat(timespec="seconds")}).encode())

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 15):
            try:
                self._write()
            except Exception:  # a missed renewal is retried; the lease has 15 renewals of slack
                log.warning("could not renew the lease %s", self.key, exc_info=True)

    def __enter__(self) -> RunLease:
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self.store.delete(self.key)
        except Exception:  # it expires on its own
            log.warning("could not remove the lease %s", self.key, exc_info=True)


def live_leases(store: ObjectStore, now: float) -> tuple[set[str], list[ObjectInfo]]:
    """(run ids whose lease is fresh, lease files that expired)."""
    live, expired = set(), []
    for obj in store.list(LEASE_PREFIX):
        try:
            ttl = float(json.loads(store.get(obj.key)).get("ttl_s", LEASE_TTL_S))
        except (ValueError, AttributeError, ObjectNotFound):
            ttl = LEASE_TTL_S
        if now - obj.modified < ttl:
            live.add(layout.lease_run_id(obj.key))
        else:
            expired.append(obj)
    return live, expired
