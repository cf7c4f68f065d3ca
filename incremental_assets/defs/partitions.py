"""Time-window partitions: over the watermark's own time (timestamps) or over capture time."""

from __future__ import annotations

import datetime as dt

import dagster as dg

from ..config import TableConfig

_PARTITIONS = {
    "hourly": dg.HourlyPartitionsDefinition,
    "daily": dg.DailyPartitionsDefinition,
    "weekly": dg.WeeklyPartitionsDefinition,
    "monthly": dg.MonthlyPartitionsDefinition,
}


def partitions_def_for(table: TableConfig) -> dg.TimeWindowPartitionsDefinition:
    """UTC windows from the configured start, the current (open) window included."""
    start = table.partitions.start
    if not isinstance(start, dt.datetime):
        start = dt.datetime(start.year, start.month, start.day)
    fmt = "%Y-%m-%d-%H:%M" if table.partitions.granularity == "hourly" else "%Y-%m-%d"
    return _PARTITIONS[table.partitions.granularity](start_date=start.strftime(fmt), timezone="UTC", end_offset=1)


def window(partitions_def: dg.TimeWindowPartitionsDefinition, key: str) -> tuple[dt.datetime, dt.datetime]:
    w = partitions_def.time_window_for_partition_key(key)
    return w.start.astimezone(dt.timezone.utc), w.end.astimezone(dt.timezone.utc)


def key_for_time(partitions_def: dg.TimeWindowPartitionsDefinition, when: dt.datetime) -> str | None:
    """The partition whose window holds ``when`` (the first one for earlier times, None past the last)."""
    keys_first = partitions_def.get_first_partition_key()
    if keys_first is None:
        return None
    first_start, _ = window(partitions_def, keys_first)
    if when < first_start:
        return keys_first
    w = partitions_def.get_partition_key_for_timestamp(when.timestamp())
    last = partitions_def.get_last_partition_key()
    if last is not None and w > last:
        return last
    return w
