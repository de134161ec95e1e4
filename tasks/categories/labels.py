"""Labels: the labelled examples a categoriser is fitted on, from a CSV or one
folder per category, and the labels people give on the review page, an
append-only log in the catalogue.

Every review save is a new immutable Parquet file `labels/<UTC time>-<random id>.parquet`
(written with if-none-match, so no save can overwrite another): two people
labelling at once both land, and gc never collects them. Once the log holds more
than `COMPACT_AT` files, the page folds them into one (`LabelLog.compact`): each
row keeps the name of the file it was saved in (`file`), so the history reads
the same; the folded files are deleted only after the new one is written, and a
save made meanwhile is not among them. The latest label of an image wins (by
time, then file name); the whole history stays readable. `categories fit` reads
them (`review_labels`). `uncertain`, the categoriser's mark for the review queue,
is never a label.
"""

from __future__ import annotations

import csv
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from models.categorizer import UNCERTAIN
from models.errors import UserError
from tasks.catalog import layout, tables
from tasks.storage import ObjectNotFound, ObjectStore, StorageError


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
    return _without_reserved(pd.DataFrame(rows, columns=["key", "label"]).drop_duplicates("key", keep="last"),
                             str(path))


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
    return _without_reserved(pd.DataFrame(rows, columns=["key", "label"]), store.describe(prefix))


def _without_reserved(labels: pd.DataFrame, where: str) -> pd.DataFrame:
    """`labels`, refused if any is a reserved name (a class named `uncertain`
    would collide with the categoriser's own mark)."""
    reserved = labels[_reserved(labels)]
    if len(reserved):
        raise LabelsError(f"{where} labels {len(reserved)} image(s) {reserved['label'].iloc[0]!r} (first: "
                          f"{reserved['key'].iloc[0]}); '{UNCERTAIN}' is the categoriser's mark for images it is "
                          "unsure of, not a category: give those images their category or leave them out")
    return labels


LABELS_PREFIX = layout.LABELS

MAX_LABEL_LENGTH = 100

# A category the review queue uses for itself: a label of that name would train a
# class that collides with the categoriser's own mark for low confidence.
RESERVED_LABELS = frozenset({UNCERTAIN})

COMPACT_AT = 50  # files in the log past which a save on the page folds them into one

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

# A folded file: the rows of many saves, each with the name of the file it was saved in.
FOLDED_SCHEMA = LABELS_SCHEMA.append(pa.field("file", pa.string()))


@dataclass(frozen=True)
class Label:
    image_id: int
    key: str
    page: int
    label: str
    previous_category: str | None = None


def check_label(label: str) -> str:
    """A label is a short, printable category name, and not one the review queue reserves."""
    text = label.strip()
    if not text or len(text) > MAX_LABEL_LENGTH or not text.isprintable() or "/" in text:
        raise UserError(f"label {label!r} must be 1-{MAX_LABEL_LENGTH} printable characters without '/'")
    if is_reserved(text):
        raise UserError(f"label {label!r} is reserved: '{UNCERTAIN}' is what the categoriser calls an image it is "
                        "unsure of, the review queue's own mark; label the image with its category, or leave it")
    return text


def is_reserved(label: str) -> bool:
    return label.strip().casefold() in RESERVED_LABELS


def _reserved(labels: pd.DataFrame) -> np.ndarray:
    return np.array([is_reserved(str(label)) for label in labels["label"].tolist()], dtype=bool)


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
    """Reads the log. Files are immutable, so each is read once per process, and
    the history is put together again only when the listing changes."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._parts: dict[str, pd.DataFrame] = {}
        self._listed: tuple[str, ...] | None = None
        self._history: pd.DataFrame | None = None
        self._latest: pd.DataFrame | None = None
        self._lock = threading.Lock()

    def files(self) -> list[str]:
        return sorted(o.key for o in self.store.list(LABELS_PREFIX) if o.key.endswith(".parquet"))

    def history(self) -> pd.DataFrame:
        """Every label ever saved, oldest first, with the file it was saved in
        (`file`). Shared between callers: do not modify it."""
        for _ in range(5):
            keys = tuple(self.files())
            with self._lock:
                if keys == self._listed:
                    return self._history
                try:
                    parts = {key: self._part(key) for key in keys}
                except ObjectNotFound:  # folded into a new file since the listing: list again
                    continue
                self._parts, self._listed, self._latest = parts, keys, None
                self._history = _one_history(list(parts.values()))
                return self._history
        raise StorageError(f"the label log under {self.store.describe(LABELS_PREFIX)} kept changing while it was "
                           "read (files folded away between listing and reading); try again")

    def _part(self, key: str) -> pd.DataFrame:
        if key not in self._parts:
            frame = tables.table_to_frame(tables.read_parquet_bytes(self.store.get(key)))
            self._parts[key] = frame if "file" in frame else frame.assign(file=key)
        return self._parts[key]

    def latest(self) -> pd.DataFrame:
        """The label that stands for each image (the latest saved). Shared: do not modify it."""
        history = self.history()
        with self._lock:
            if self._latest is None or self._history is not history:
                self._latest = history.drop_duplicates("image_id", keep="last").reset_index(drop=True)
            return self._latest

    def compact(self, *, more_than: int = COMPACT_AT, now: datetime | None = None) -> str | None:
        """Fold the log into one file when it holds more than `more_than` files;
        returns the new file's key (None: nothing to do). Safe beside saves and
        other compactions: the new file is written before the old ones are
        deleted, and a row saved in a file that two folded files both hold is read once."""
        keys = self.files()
        if len(keys) <= more_than:
            return None
        try:
            with self._lock:
                rows = _one_history([self._part(key) for key in keys])
        except ObjectNotFound:  # another compaction is folding them now
            return None
        now = now or datetime.now(UTC)
        key = layout.labels_file_key(now, f"folded-{secrets.token_hex(8)}")
        self.store.put(key, tables.to_parquet_bytes(tables.frame_to_table(rows, FOLDED_SCHEMA)), if_none_match=True)
        for old in keys:
            self.store.delete(old)
        return key


def _one_history(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """The rows of every part, each save's rows once (a folded file repeats the
    saves it folded until they are deleted), oldest first."""
    seen: set[str] = set()
    kept = []
    for part in parts:
        origins = part["file"]
        new = ~origins.isin(seen)
        seen.update(origins.unique().tolist())
        kept.append(part[new.to_numpy()])
    if not kept:
        return tables.empty_frame(LABELS_SCHEMA).assign(file=pd.Series(dtype=str))
    return pd.concat(kept, ignore_index=True).sort_values(["labelled_at", "file"], kind="stable") \
        .reset_index(drop=True)


def review_labels(store: ObjectStore) -> pd.DataFrame:
    """`key,label` rows for `categories fit`: the latest label of each object (a
    document labelled page by page takes its latest page label), by key."""
    latest = LabelLog(store).latest()
    latest = latest[~_reserved(latest)]  # saved before `uncertain` was refused
    return (latest.drop_duplicates("key", keep="last")[["key", "label"]].sort_values("key")
            .reset_index(drop=True))


def with_review_labels(labels: pd.DataFrame, reviewed: pd.DataFrame, catalogued_keys: pd.Series) -> pd.DataFrame:
    """`labels` (key,label) plus the review page's labels of objects still in the
    catalogue; where both label a key, the review page's wins (a person looked
    at that image after the labels file was written)."""
    reviewed = reviewed[reviewed["key"].isin(catalogued_keys)]
    merged = pd.concat([labels[["key", "label"]], reviewed[["key", "label"]]], ignore_index=True)
    return merged.drop_duplicates("key", keep="last").reset_index(drop=True)
