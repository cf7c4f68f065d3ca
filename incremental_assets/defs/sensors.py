"""Planning one table's copy: what a sensor tick would request for it (see automation.py, which
plans all of a source's tables at once, and the source's sensor), the backwards-watermark and
change-tracking retention warnings, and the cut of a run before a gap of empty windows."""


import datetime as dt
from dataclasses import dataclass

import dagster as dg

from ..sources import Source
from ..state import WatermarkState
from .landing import RANGE_END_TAG, RANGE_START_TAG, TABLE_TAG, LandingTable, recorded_state
from .partitions import window


class WindowRange:
    """The windows ``first_key`` to ``last_key`` of a run: one partition, or a range run (one run,
    many windows), as a run request says it."""

    first_key: str
    last_key: str

    @property
    def partition_key(self) -> str | None:
        return self.first_key if self.first_key == self.last_key else None

    def range_tags(self) -> dict[str, str]:
        """The tags of a range run (none for one partition)."""
        if self.partition_key is None:
            return {RANGE_START_TAG: self.first_key, RANGE_END_TAG: self.last_key}
        return {}

    def describe(self) -> str:
        return self.first_key if self.partition_key else f"{self.first_key}...{self.last_key}"


@dataclass(frozen=True)
class CopyRequest(WindowRange):
    """One run of ``landing/<table>``."""

    table: str
    first_key: str
    last_key: str
    reason: str

    @property
    def tags(self) -> dict[str, str]:
        return {TABLE_TAG: self.table, **self.range_tags()}


@dataclass(frozen=True)
class Plan:
    request: CopyRequest | None
    skip_reason: str = ""  # why nothing is requested
    warning: str = ""  # something the user must hear about, request or not
    waiting: bool = False  # rows are there, but held back (skip_reason says by what)


def backwards_note(table: LandingTable, source: Source, info, recorded: WatermarkState) -> str:
    """A watermark that went backwards: said out loud, since rows written below the frontier are
    not copied by a watermark copy (a table restored, ids restarted, values rewritten lower)."""
    if recorded.highest is None:
        return ""
    return backwards_message(table, info, recorded, source.max_watermark(info))


def backwards_message(table: LandingTable, info, recorded: WatermarkState, top) -> str:
    """:func:`backwards_note` given the source's highest watermark ``top`` ("" when it is not
    below the highest one copied)."""
    if recorded.highest is None or (top is not None and top >= recorded.highest):
        return ""
    kind = info.kind
    seen = "no rows" if top is None else f"MAX({info.watermark_column}) = {kind.to_text(top)}"
    return (
        f"watermark went backwards on {table.config.table!r}: the source has {seen}, below "
        f"{kind.to_text(recorded.highest)} already copied; rows written below the recorded frontier "
        f"{kind.to_text(recorded.frontier)} are not copied. If the table was reset, reset landing/{table.config.name} "
        "(wipe its materializations) to copy it again"
    )


def plan_copy(table: LandingTable, source: Source, instance: dg.DagsterInstance) -> Plan:
    """The run a sensor tick would request now for one table (``request`` None when the source has
    nothing new): :func:`automation.plan_tables` of that table alone."""
    from .automation import plan_tables

    return plan_tables([table], source, instance)[table.config.name]


def plan_changes(table: LandingTable, source: Source, instance: dg.DagsterInstance) -> Plan:
    from ..tracking import ChangeTrackingError, change_tracking_status

    status = change_tracking_status(source, table.config.table)
    if not status.get("enabled", True):
        raise ChangeTrackingError(
            f"change tracking is not enabled on table {table.config.table!r} of source {table.config.source!r}: "
            f"run `incremental-assets enable-change-tracking --table {table.config.name}`"
            + (" (or enable it in SQL Server: ALTER TABLE ... ENABLE CHANGE_TRACKING)" if status.get("native") else "")
        )
    frontier = recorded_state(instance, table.key, table.version_kind).frontier
    current_version, min_valid = status.get("current_version"), status.get("min_valid_version")
    name, key = table.config.name, table.partitions_def.get_last_partition_key()
    warning = ""
    if frontier is not None and min_valid is not None and frontier < min_valid:
        warning = (f"last synced version {frontier} is below the minimum valid version {min_valid}: "
                   f"the next copy re-initialises with a full copy (on_expired: {table.config.on_expired})")
    else:
        warning = retention_warning(instance, table, status.get("retention"))
    if frontier is None:
        return Plan(CopyRequest(name, key, key, "initial full copy"), "", warning)
    if current_version is not None and current_version > frontier or warning:
        return Plan(CopyRequest(name, key, key, f"changes after version {frontier}"), "", warning)
    return Plan(None, f"no changes in {table.config.table} after version {frontier}", warning)


def retention_warning(instance: dg.DagsterInstance, table: LandingTable, retention) -> str:
    """Warn when the last sync is older than 80% of the change retention the engine exposes."""
    if not retention:
        return ""
    records = instance.fetch_materializations(table.key, limit=1).records
    if not records:
        return ""
    age = dt.datetime.now(dt.timezone.utc) - dt.datetime.fromtimestamp(records[0].timestamp, dt.timezone.utc)
    if age < 0.8 * retention:
        return ""
    return (f"the last copy of {table.config.table} was {age} ago, close to the change retention of {retention}: "
            "past it the next copy must re-initialise with a full copy")


#: empty windows in a row after which a run stops: each window of a run costs Dagster a planned
#: event and a materialization (20-35 ms on SQLite storage), a run of its own about half a second
GAP_WINDOWS = 30


def stretch_end(pdef, source: Source, info, first: str, last: str, hi) -> str:
    """The last window with rows before the first run of :data:`GAP_WINDOWS` empty windows from
    ``first`` (``last`` when there is none): rows from 2017 and from today make two runs, not one
    over every window between. The next run starts at the first row after the gap."""
    keys = pdef.get_partition_keys_in_range(dg.PartitionKeyRange(first, last))
    if len(keys) <= GAP_WINDOWS:
        return last
    # any GAP_WINDOWS empty windows in a row hold a whole block of half as many (blocks counted
    # from the first window): when every block holds rows there is no such gap, and a run over
    # two years of daily windows asks about 49 blocks, not 731 windows
    size = GAP_WINDOWS // 2
    blocks = [(window(pdef, keys[i])[0], min(window(pdef, keys[min(i + size, len(keys)) - 1])[1], hi))
              for i in range(0, len(keys), size)]
    if all(source.windows_with_rows(info, blocks)):
        return last
    end, empty = first, 0
    step = source.WINDOWS_PER_PROBE
    for start in range(0, len(keys), step):
        chunk = keys[start:start + step]
        bounds = [window(pdef, k) for k in chunk]
        for key, has_rows in zip(chunk, source.windows_with_rows(info, [(lo, min(up, hi)) for lo, up in bounds])):
            if has_rows:
                end, empty = key, 0
            elif key != first:  # the first window may hold rows from before the configured start
                empty += 1
                if empty >= GAP_WINDOWS:
                    return end
    return end
