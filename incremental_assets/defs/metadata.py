"""Metadata Dagster shows for a table (docs/metadata.md): its name and columns, each window's row
count, how far the copy is behind the source, and the windows recorded as empty.

The watermark keys themselves (text, the system of record) belong to state.py.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import pyarrow as pa

from ..state import EMPTY_WINDOW, ROWS_AHEAD, ROWS_PER_SECOND, SOURCE_NEWEST, WATERMARK_LAG, lag

PARTITION_ROW_COUNT = "dagster/partition_row_count"
ROW_COUNT = "dagster/row_count"
TABLE_NAME = "dagster/table_name"
COLUMN_SCHEMA = "dagster/column_schema"


def column_schema(schema: pa.Schema) -> dg.TableSchema:
    """The columns as they land (Arrow types) or replicate."""
    return dg.TableSchema(columns=[
        dg.TableColumn(name=field.name, type=str(field.type),
                       constraints=dg.TableColumnConstraints(nullable=field.nullable))
        for field in schema
    ])


def table_metadata(table_name: str, schema: pa.Schema) -> dict[str, Any]:
    return {TABLE_NAME: table_name, COLUMN_SCHEMA: dg.MetadataValue.table_schema(column_schema(schema))}


def progress_metadata(source, info, frontier: Any, highest: Any, rows: int, copy_seconds: float) -> dict[str, Any]:
    """After a watermark copy: the copy's rows per second; and, where an index leads with the
    watermark column (without one the statement would scan the table, as the copy did), rows
    at or above the frontier and the lag of the highest value copied behind the source's newest."""
    out: dict[str, Any] = {}
    if copy_seconds > 0:
        out[ROWS_PER_SECOND] = dg.MetadataValue.float(round(rows / copy_seconds, 1))
    if not info.watermark_indexed:
        return out
    ahead, _, newest = source.slice_stats(info, frontier, None)
    newest = newest if highest is None or (newest is not None and newest > highest) else highest
    out[ROWS_AHEAD] = dg.MetadataValue.int(ahead)
    out.update({k: dg.MetadataValue.float(v) for k, v in lag(info.kind, newest, highest).items()})
    if newest is not None:
        out[SOURCE_NEWEST] = info.kind.to_text(newest)
    return out


def _metadata(record) -> dict[str, Any]:
    return {k: v.value for k, v in record.asset_materialization.metadata.items()}


def window_row_counts(instance: dg.DagsterInstance, key: dg.AssetKey, added: dict[str, int], *,
                      replaced: bool) -> dict[str, int]:
    """Each window's rows after a run that added ``added[window]`` rows to it: the window's
    recorded count plus those, or those alone when the run replaced the window's files."""
    if replaced:
        return dict(added)
    latest = instance.get_latest_storage_id_by_partition(key, dg.DagsterEventType.ASSET_MATERIALIZATION, set(added))
    before: dict[str, int] = {}
    ids = sorted(latest.values())
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        for record in instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, storage_ids=chunk),
                                                      limit=len(chunk)).records:
            # records made before partition counts were kept hold the slice's rows only
            before[record.partition_key] = int(_metadata(record).get(PARTITION_ROW_COUNT) or 0)
    return {window: before.get(window, 0) + rows for window, rows in added.items()}


#: at most this many empty windows are recorded by one run (two runless events each with a
#: replica): a table whose ``partitions.start`` lies hundreds of windows before its first row
#: would cost an initial load of hundreds of tables minutes of Dagster storage writes; beyond it
#: the windows stay unmaterialized and the run says how to avoid them (``partitions.start``)
MAX_EMPTY_WINDOWS = 120


def record_empty_windows(instance: dg.DagsterInstance, key: dg.AssetKey, windows: list[str],
                         metadata: dict[str, Any], replica_key: dg.AssetKey | None = None) -> None:
    """Record ``windows``, proven to hold no row, as materialized with no row and no file, with
    the watermark ``metadata`` of the table's state before the run; and, for a replicated table,
    as merged (no file to merge), so the replica's sensor and ``sync`` do not see them pending.
    Runless events: a few milliseconds each, no step."""
    for window in windows:
        instance.report_runless_asset_event(dg.AssetMaterialization(
            asset_key=key, partition=window,
            metadata={**metadata, PARTITION_ROW_COUNT: dg.MetadataValue.int(0), "file_count": 0, EMPTY_WINDOW: True},
        ))
    if replica_key is None:
        return
    from .replica import LANDING_EVENT, MERGED_FILES

    landed = instance.get_latest_storage_id_by_partition(key, dg.DagsterEventType.ASSET_MATERIALIZATION, set(windows))
    for window in windows:
        instance.report_runless_asset_event(dg.AssetMaterialization(
            asset_key=replica_key, partition=window,
            metadata={MERGED_FILES: dg.MetadataValue.json({}), LANDING_EVENT: dg.MetadataValue.int(landed[window]),
                      "files_merged": 0, EMPTY_WINDOW: True},
        ))


def version_lag(source, table: str, copied: int) -> dict[str, Any]:
    """Change tracking: how many change versions the source has made since the version copied."""
    from ..tracking import change_tracking_status

    current = change_tracking_status(source, table).get("current_version")
    if current is None:
        return {}
    return {WATERMARK_LAG: dg.MetadataValue.float(float(max(0, current - copied)))}
