"""plan_changes is a pure decision: pinned by table-driven cases."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.records import ObjectInfo
from tasks.source.planning import plan_changes


def catalogued(*rows):
    return pd.DataFrame(rows, columns=["key", "etag", "size"])


def failed(*rows):
    """Failures as (key, etag, size, attempts[, stage]); the stage defaults to fetch."""
    return pd.DataFrame([row if len(row) == 5 else (*row, "fetch") for row in rows],
                        columns=["key", "etag", "size", "attempts", "stage"])


A, B, C = ObjectInfo("a.jpg", "e1", 10), ObjectInfo("b.jpg", "e2", 20), ObjectInfo("c.jpg", "e3", 30)


@pytest.mark.parametrize("listing,known,fails,kwargs,expect", [
    # first run: everything is new
    ([A, B], catalogued(), failed(), {}, dict(new=["a.jpg", "b.jpg"], changed=[], deleted=[], unchanged=0)),
    # nothing changed: nothing to do
    ([A, B], catalogued(("a.jpg", "e1", 10), ("b.jpg", "e2", 20)), failed(), {},
     dict(new=[], changed=[], deleted=[], unchanged=2, empty=True)),
    # bytes changed under the same key (etag differs), one deleted, one new
    ([ObjectInfo("a.jpg", "e9", 10), C], catalogued(("a.jpg", "e1", 10), ("b.jpg", "e2", 20)), failed(), {},
     dict(new=["c.jpg"], changed=["a.jpg"], deleted=["b.jpg"], unchanged=0)),
    # same etag but another size still counts as changed
    ([ObjectInfo("a.jpg", "e1", 11)], catalogued(("a.jpg", "e1", 10)), failed(), {},
     dict(changed=["a.jpg"], unchanged=0)),
    # model changed: every catalogued image is re-embedded
    ([A, B], catalogued(("a.jpg", "e1", 10), ("b.jpg", "e2", 20)), failed(), {"reembed_all": True},
     dict(new=[], changed=["a.jpg", "b.jpg"], unchanged=0)),
    # a failure with attempts left is retried; one out of attempts is left alone
    ([A, B], catalogued(), failed(("a.jpg", "e1", 10, 1), ("b.jpg", "e2", 20, 3)), {"max_attempts": 3},
     dict(new=[], retry=["a.jpg"], given_up=1)),
    # a failure to decode is final for the same bytes (the answer would not change); a fetch failure is retried
    ([A, B], catalogued(), failed(("a.jpg", "e1", 10, 1, "decode"), ("b.jpg", "e2", 20, 1, "fetch")), {},
     dict(new=[], retry=["b.jpg"], given_up=1, empty=False)),
    # a failed object whose bytes changed is tried afresh
    ([ObjectInfo("a.jpg", "e5", 10)], catalogued(), failed(("a.jpg", "e1", 10, 3)), {},
     dict(new=["a.jpg"], retry=[], given_up=0)),
    # a failed object deleted from the source leaves the failures table
    ([], catalogued(), failed(("a.jpg", "e1", 10, 1)), {}, dict(deleted=["a.jpg"])),
    # a document's pages are rows of one key: one object, unchanged; the mass-delete guard counts keys
    ([ObjectInfo("d.pdf", "e4", 40), A], catalogued(("d.pdf", "e4", 40), ("d.pdf", "e4", 40), ("b.jpg", "e2", 20)),
     failed(("a.jpg", "e1", 10, 1, "decode"), ("x.jpg", "e7", 70, 1)), {},
     dict(new=[], changed=[], deleted=["b.jpg", "x.jpg"], unchanged=1, given_up=1, catalogued=4)),
    # --limit caps the work; past it, changed images are removed now and redone later
    ([ObjectInfo("a.jpg", "e9", 10), B, C], catalogued(("a.jpg", "e1", 10)), failed(), {"limit": 1},
     dict(new=[], changed=["a.jpg"], deferred=["b.jpg", "c.jpg"])),
])
def test_plan_changes(listing, known, fails, kwargs, expect):
    plan = plan_changes(listing, known, fails, **kwargs)
    got = {
        "new": [o.key for o in plan.new], "changed": [o.key for o in plan.changed],
        "retry": [o.key for o in plan.retry], "deleted": plan.deleted, "unchanged": plan.unchanged,
        "given_up": plan.given_up, "deferred": [o.key for o in plan.deferred], "empty": plan.is_empty,
        "catalogued": plan.catalogued,
    }
    for field, value in expect.items():
        assert got[field] == value, f"{field}: {got[field]} != {value}"
