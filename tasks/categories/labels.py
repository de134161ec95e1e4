"""Labels: the labelled examples a categoriser is fitted on, from a CSV or one
folder per category, and the labels people give on the review page, an
append-only log in the catalogue.

Every review save is a new immutable Parquet file `labels/<UTC time>-<random id>.parquet`
(written with if-none-match, so no save can overwrite another): two people
labelling at once both land, and nothing is ever rewritten or collected by gc.
The latest label of an image wins (by time, then file name); the whole history
stays readable. `categories fit` reads them (`review_labels`).
"""

from __future__ import annotations

import csv
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa

from models.errors import UserError
from tasks.catalog import layout, tables
from tasks.storage import ObjectStore


class LabelsError(UserError):
    """Labelled examples that cannot be used; the message says what to fix."""


def read_labels_csv(path: str | Path) -> pd.DataFrame:
    """`key,label` rows (a header line is required), blanks dropped."""
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"labels file {path} does not exist")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"key", "label"} <= set(reader.fieldnames):
            raise LabelsError(f"{path} must have a header with columns key,label (found {reader.fieldnames})")
        rows = [(r["key"].strip(), r["label"].strip()) for r in reader if r["key"] and r["label"]]
    if not rows:
        raise LabelsError(f"{path} has no labelled rows")
    return pd.DataFrame(rows, columns=["key", "label"]).drop_duplicates("key", keep="last")


def labels_from_prefix(store: ObjectStore, prefix: str) -> pd.DataFrame:
    """One folder per category under `prefix`: `prefix/invoice/a.jpg` is labelled invoice."""
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    rows = []
    for obj in store.list(prefix):
        label, _, name = obj.key[len(prefix):].partition("/")
        if name:
            rows.append((obj.key, label))
    if not rows:
        raise LabelsError(f"no labelled images under {store.describe(prefix)}; expected one folder per category")
    return pd.DataFrame(rows, columns=["key", "label"])


LABELS_PREFIX = layout.LABELS

MAX_LABEL_LENGTH = 100

LABELS_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("key", pa.string()),
    ("page", pa.int32()),
    ("label", pa.string()),
    ("previous_category", pa.string()),  # what the categoriser said (usually `uncertain`)
    ("labeller", pa.string()),
    ("labelled_at", pa.timestamp("us", tz="UTC")),
    ("catalog_version", pa.int64()),  # the version the person was looking at
])


@dataclass(frozen=True)
class Label:
    image_id: int
    key: str
    page: int
    label: str
    previous_category: str | None = None


def check_label(label: str) -> str:
    """A label is a short, printable category name."""
    text = label.strip()
    if not text or len(text) > MAX_LABEL_LENGTH or not text.isprintable() or "/" in text:
        raise UserError(f"label {label!r} must be 1-{MAX_LABEL_LENGTH} printable characters without '/'")
    return text


def save_labels(store: ObjectStore, labels: list[Label], *, labeller: str, catalog_version: int,
                now: datetime | None = None) -> str:
    """Append `labels` to the log as one new file; returns its key."""
    if not labels:
        raise UserError("no labels to save")
    now = now or datetime.now(UTC)
    frame = pd.DataFrame({
        "image_id": [lb.image_id for lb in labels], "key": [lb.key for lb in labels],
        "page": [lb.page for lb in labels], "label": [check_label(lb.label) for lb in labels],
        "previous_category": [lb.previous_category for lb in labels], "labeller": labeller[:100],
        "labelled_at": now, "catalog_version": catalog_version})
    key = layout.labels_file_key(now, secrets.token_hex(8))
    store.put(key, tables.to_parquet_bytes(tables.frame_to_table(frame, LABELS_SCHEMA)), if_none_match=True)
    return key


class LabelLog:
    """Reads the log; files are immutable, so each is read once per process."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._parts: dict[str, pd.DataFrame] = {}
        self._lock = threading.Lock()

    def history(self) -> pd.DataFrame:
        """Every label ever saved, oldest first, with the file it is in (`file`)."""
        keys = sorted(o.key for o in self.store.list(LABELS_PREFIX) if o.key.endswith(".parquet"))
        with self._lock:
            for key in keys:
                if key not in self._parts:
                    frame = tables.table_to_frame(tables.read_parquet_bytes(self.store.get(key)))
                    self._parts[key] = frame.assign(file=key)
            parts = [self._parts[k] for k in keys]
        if not parts:
            return tables.empty_frame(LABELS_SCHEMA).assign(file=pd.Series(dtype=str))
        return pd.concat(parts, ignore_index=True).sort_values(["labelled_at", "file"], kind="stable") \
            .reset_index(drop=True)

    def latest(self) -> pd.DataFrame:
        """The label that stands for each image (the latest saved)."""
        return self.history().drop_duplicates("image_id", keep="last").reset_index(drop=True)


def review_labels(store: ObjectStore) -> pd.DataFrame:
    """`key,label` rows for `categories fit`: the latest label of each object (a
    document labelled page by page takes its latest page label), by key."""
    latest = LabelLog(store).latest()
    return (latest.drop_duplicates("key", keep="last")[["key", "label"]].sort_values("key")
            .reset_index(drop=True))


def with_review_labels(labels: pd.DataFrame, reviewed: pd.DataFrame, catalogued_keys: pd.Series) -> pd.DataFrame:
    """`labels` (key,label) plus the review page's labels of objects still in the
    catalogue; where both label a key, the review page's wins (a person looked
    at that image after the labels file was written)."""
    reviewed = reviewed[reviewed["key"].isin(catalogued_keys)]
    merged = pd.concat([labels[["key", "label"]], reviewed[["key", "label"]]], ignore_index=True)
    return merged.drop_duplicates("key", keep="last").reset_index(drop=True)
