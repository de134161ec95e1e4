"""The runs log: one row per run, committed or not (`tables/runs/<run_id>.parquet`).
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from tasks.catalog import layout, tables
from tasks.storage import ObjectStore


def read_runs(store: ObjectStore) -> pd.DataFrame:
    """The runs log: one row per run, committed or not, oldest first."""
    parts = [tables.read_parquet_bytes(store.get(o.key)) for o in store.list(layout.RUNS)]
    if not parts:
        return tables.empty_frame(tables.RUNS_SCHEMA)
    return tables.table_to_frame(pa.concat_tables(parts)).sort_values("started_at").reset_index(drop=True)


def write_run_row(store: ObjectStore, row: dict) -> str:
    key = layout.run_row_key(row["run_id"])
    store.put(key, tables.to_parquet_bytes(tables.frame_to_table(pd.DataFrame([row]), tables.RUNS_SCHEMA)))
    return key
