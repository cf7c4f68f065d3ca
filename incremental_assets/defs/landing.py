"""``landing/<table>``: one partitioned asset per configured table.

The materialization metadata is the system of record: ``frontier`` says that every row whose
watermark is below it has been landed, ``previous_watermark``/``new_watermark`` bound what one run
copied. The next run starts where the latest materialization's ``frontier`` ends.
"""


import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from ..config import ConfigError, ProjectConfig, TableConfig
from ..landing import LandingError, LandingStore
from ..progress import Progress, Throttled, interval_seconds
from ..copying import (
    PlannedSlice,
    SliceCopy,
    Window,
    check_null_watermarks,
    copy_slice,
    copy_window_slices,
    plan_window_slices,
    remove_orphans,
    slice_stem,
)
from ..sources import (
    Horizon, IntegerKind, Source, SourceError, SourceUnavailable, TableInfo, TimestampKind, WatermarkKind,
)
from ..state import NEW, OPEN, PREVIOUS, WatermarkState, next_frontier
from .schema import columns_metadata
from .metadata import (
    MAX_EMPTY_WINDOWS, PARTITION_ROW_COUNT, progress_metadata, record_empty_windows, table_metadata, version_lag, window_row_counts,
)
from .partitions import key_for_time, partitions_def_for, window
from .io import io_manager_key
from .resources import source_resource_key

TABLE_TAG = "incremental_assets/table"
#: runs requested by a source's sensor or by sync (see defs/automation.py)
SOURCE_TAG = "incremental_assets/source"
BACKFILL_TAG = "dagster/backfill"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
MAX_FILES_SHOWN = 50


DESCRIBE_TTL_SECONDS = 10.0
#: how long a sensor's planning reuses a reflection (the runs reflect again before they copy)
PLAN_TTL_SECONDS = 600.0
_DESCRIBED: dict[tuple, tuple[float, TableInfo]] = {}


class CopyConfig(dg.Config):
    """Run configuration of a landing copy."""

    refresh: bool = False  # re-copy whole windows and replace their files (backfills always do)


@dataclass(frozen=True)
class LandingTable:
    """Everything the Dagster layer knows about one configured table."""

    config: TableConfig
    partitions_def: dg.TimeWindowPartitionsDefinition
    source_key: str
    #: the tables of the same source by name, this one included (shared by all of them)
    peers: dict[str, "LandingTable"] = field(default_factory=dict, compare=False, hash=False, repr=False)
    #: the asset's key and attributes when a component's translation set them (defs/specs.py)
    spec: dg.AssetSpec | None = None
    #: the key of the table's replica asset when a translation set it
    replica_asset_key: dg.AssetKey | None = None
    #: the landing store's resource key (one per component instance)
    landing_key: str = "landing"

    @property
    def key(self) -> dg.AssetKey:
        return self.spec.key if self.spec is not None else dg.AssetKey(["landing", self.config.name])

    @property
    def replica_key(self) -> dg.AssetKey:
        return self.replica_asset_key or dg.AssetKey(["replica", self.config.name])

    @property
    def pool(self) -> str:
        return f"incremental_assets/{self.config.name}"

    def describe(self, source: Source, *, max_age: float = DESCRIBE_TTL_SECONDS,
                 along: Sequence["LandingTable"] = ()) -> TableInfo:
        """The table as reflected at most ``max_age`` seconds ago: a sync that plans and then
        copies reflects once, and a copy sees a schema change within seconds. Sensors, which only
        probe the watermark column, pass a longer age (:data:`PLAN_TTL_SECONDS`). When it must
        reflect, the tables ``along`` (a run's other tables of the same source) whose reflection
        is due too are reflected with it, in one batch (:func:`describe_tables`)."""
        found = describe_tables([self, *along], source, max_age=max_age)[self.config.name]
        if isinstance(found, SourceError):
            raise found
        return found

    def run_peers(self, context: dg.AssetExecutionContext) -> list["LandingTable"]:
        """The other tables of this source that the step's run copies or merges: reflected
        together with this one when its reflection is due."""
        selection = set(context.run.asset_selection or ())
        return [t for t in self.peers.values() if t is not self and (
            t.key in selection or (t.replica_asset_key or dg.AssetKey(["replica", t.config.name])) in selection)]

    def _cache_key(self, source: Source) -> tuple:
        tc = self.config
        return (source.url, tc.table, tc.watermark_column, tuple(tc.columns or ()), tc.watermark_timezone, tuple(tc.primary_key))

    def _describe_spec(self) -> dict[str, Any]:
        tc = self.config
        return {
            "table": tc.table,
            "watermark_column": tc.watermark_column,  # None with change tracking
            "columns": tc.columns,
            "column_timezone": tc.watermark_timezone,
            "primary_key": tc.primary_key or None,
        }

    def index_note(self, source: Source) -> str:
        """What to tell the user when no index leads with the watermark column ("" when one does,
        or the table is copied by change tracking)."""
        tc = self.config
        if self.tracks_changes:
            return ""
        return source.missing_index_note(self.describe(source), table=tc.table, column=tc.watermark_column)

    @property
    def tracks_changes(self) -> bool:
        return self.config.mode == "change_tracking"

    @property
    def version_kind(self) -> WatermarkKind:
        """How the frontier is read and written: change versions are integers."""
        return IntegerKind()

    def windows(self, keys: list[str]) -> list[Window]:
        first = self.partitions_def.get_first_partition_key()
        out = []
        for k in keys:
            start, end = window(self.partitions_def, k)
            out.append(Window(k, start, end, open_start=(k == first)))
        return out


def describe_tables(tables: Sequence[LandingTable], source: Source, *,
                    max_age: float = DESCRIBE_TTL_SECONDS) -> dict[str, TableInfo | SourceError]:
    """Each table (of one source) as reflected at most ``max_age`` seconds ago, or the error
    describing it raised; those due are reflected together (:meth:`Source.describe_tables`), and
    the batch takes along every due table of the same source in ``tables``: hundreds of tables
    cost a few catalog statements, not a reflection each."""
    now = time.monotonic()
    out: dict[str, TableInfo | SourceError] = {}
    due: dict[str, LandingTable] = {}
    for table in tables:
        cached = _DESCRIBED.get(table._cache_key(source))
        if cached and now - cached[0] < max_age:
            out[table.config.name] = cached[1]
        else:
            due[table.config.name] = table
    if due:
        found = source.describe_tables({name: t._describe_spec() for name, t in due.items()})
        stamp = time.monotonic()
        for name, info in found.items():
            if isinstance(info, TableInfo):
                _DESCRIBED[due[name]._cache_key(source)] = (stamp, info)
            out[name] = info
    return out


def latest_metadata(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None) -> dict[str, Any] | None:
    filt = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None)
    records = instance.fetch_materializations(filt, limit=1).records
    if not records:
        return None
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def recorded_state(instance: dg.DagsterInstance, key: dg.AssetKey, kind: WatermarkKind) -> WatermarkState:
    """The table's latest recorded watermark state (empty when nothing was copied yet)."""
    return WatermarkState.from_metadata(latest_metadata(instance, key), kind)


def recorded_ranges(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str, kind: WatermarkKind) -> tuple[Any, Any] | None:
    """The union ``[lo, hi)`` of the slices recorded for one capture-time window (for a replay):
    from the lowest bound read to the highest frontier recorded."""
    lows, highs, cursor, open_low = [], [], None, False
    while True:
        result = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1000, cursor=cursor
        )
        for record in result.records:
            meta = {k: v.value for k, v in record.asset_materialization.metadata.items()}
            state = WatermarkState.from_metadata(meta, kind)
            if state.run_mode == "replay" or state.new is None:
                continue
            if state.previous is None:
                open_low = True
            else:
                lows.append(state.previous)
            # up to the frontier it left, not the bound it read to: rows above the frontier were
            # copied by later slices (in later windows, perhaps), and must not land twice
            highs.append(state.new if state.frontier is None else min(state.new, state.frontier))
        if not result.has_more:
            break
        cursor = result.cursor
    if not highs:
        return None
    return (None if open_low else min(lows)), max(highs)


def _text(kind: WatermarkKind, value: Any) -> str:
    return OPEN if value is None else kind.to_text(value)


def _is_refresh(context: dg.AssetExecutionContext, config: CopyConfig) -> bool:
    return config.refresh or BACKFILL_TAG in context.run.tags


@dataclass(frozen=True)
class CopyRun:
    """One run of ``landing/<table>``: what each of its steps needs."""

    context: dg.AssetExecutionContext
    table: LandingTable
    source: Source
    info: TableInfo
    store: LandingStore
    refresh: bool
    horizon: Horizon
    frontier: Any  # where the table's latest record says the next copy starts
    progress: Progress | None = None

    @property
    def name(self) -> str:
        return self.table.config.name

    def land(self, planned: PlannedSlice, *, replace: bool) -> SliceCopy:
        copy = copy_slice(
            self.source, self.info, self.store, table=self.name, slice_=planned,
            batch_size=self.table.config.batch_size, max_rows_per_file=_max_rows(self.context, self.table), replace=replace,
            progress=self.progress,
        )
        _log_copy(self.context, self.table, self.info, copy)
        return copy


@dataclass(frozen=True)
class Copied:
    """What a run copied: its slices, the range ``[low, high)`` it read, where the next starts."""

    copies: list[SliceCopy]
    low: Any
    high: Any
    frontier: Any
    mode: str
    #: windows proven to hold no row, between the old frontier and the run's first window
    empty: tuple[str, ...] = ()


def _copy_windows(run: CopyRun, keys: list[str]) -> Copied:
    """Timestamp watermark: windows over the watermark's own time."""
    windows = run.table.windows(keys)
    frontier, horizon = run.frontier, run.horizon.value
    planned = plan_window_slices(windows, frontier, horizon, refresh=run.refresh)
    if planned and run.progress is not None:
        run.progress.set_total(run.source.estimate_rows(run.info, planned[0].lo, planned[-1].hi))
    progress = _CopyProgress(run.context, run.table, run.info)
    try:
        copies = copy_window_slices(
            run.source, run.info, run.store, planned, table=run.name, batch_size=run.table.config.batch_size,
            max_rows_per_file=_max_rows(run.context, run.table), replace=run.refresh, landed=progress.landed,
            progress=run.progress,
        )
    finally:
        progress.flush()  # after a failure too: what was landed before it
    # the frontier moves only past rows this run copied (state.next_frontier), and only if the
    # run's windows join it: the first one starts at or below it, or no row lies between it and
    # the first window (a run planned from the oldest row to copy)
    top = _top(copies)
    new_frontier, low = frontier, (planned[0].lo if planned else frontier)
    empty: tuple[str, ...] = ()
    if top is not None and horizon is not None:
        first = windows[0]
        joined = first.open_start or (frontier is not None and first.start <= frontier)
        if joined or not run.source.has_rows(run.info, frontier, first.start):
            new_frontier = next_frontier(run.info.kind, frontier, top, horizon)
            if not run.refresh:
                low = frontier
            if not joined:  # no row lies between the frontier and the first window
                empty = _windows_within(run.table, frontier, first.start)
    high = max((c.hi for c in copies), default=None)
    return Copied(copies, low, high, new_frontier, "refresh" if run.refresh else "incremental", empty)


def _windows_within(table: LandingTable, lo: Any, hi: Any) -> tuple[str, ...]:
    """The windows wholly inside ``[lo, hi)`` (``lo`` None: from the first window)."""
    pdef = table.partitions_def
    first = pdef.get_first_partition_key() if lo is None else key_for_time(pdef, lo)
    last = key_for_time(pdef, hi)
    if first is None or last is None or first >= last:
        return ()
    keys = pdef.get_partition_keys_in_range(dg.PartitionKeyRange(first, last))[:-1]  # the last holds hi
    return tuple(k for k in keys if (lo is None or window(pdef, k)[0] >= lo) and window(pdef, k)[1] <= hi)


def _copy_capture_windows(run: CopyRun, keys: list[str]) -> Copied:
    """Integer / rowversion watermark: windows over capture time; new slices go to the current one."""
    current = _current_window(run.context, run.table)
    frontier = run.frontier
    copies: list[SliceCopy] = []
    low, high, new_frontier, mode = frontier, frontier, frontier, "incremental"
    for key in keys:
        if key == current and not run.refresh:
            hi = run.horizon.value
            if hi is None or (frontier is not None and hi <= frontier):
                continue
            if run.progress is not None:
                run.progress.set_total(run.source.estimate_rows(run.info, frontier, hi))
            copy = run.land(PlannedSlice(key, frontier, hi), replace=False)
            copies.append(copy)
            low, high = frontier, hi
            new_frontier = next_frontier(run.info.kind, frontier, copy.max_watermark, hi)
        else:
            mode = "replay"
            recorded = recorded_ranges(run.context.instance, run.table.key, key, run.info.kind)
            if recorded is None:
                run.context.log.warning(f"{run.name}: window {key} has no recorded slices to replay")
                continue
            copies.append(run.land(PlannedSlice(key, *recorded), replace=True))
            low, high = recorded
    return Copied(copies, low, high, new_frontier, mode)


def _top(copies: list[SliceCopy]) -> Any:
    """The highest watermark value the copies hold (None: no row)."""
    return max((c.max_watermark for c in copies if c.max_watermark is not None), default=None)


def _current_window(context, table: LandingTable) -> str:
    """The capture-time window new slices go to: the latest one, or the one a sensor (or sync)
    requested, so a run requested just before midnight and started after it still appends."""
    if (TABLE_TAG in context.run.tags or SOURCE_TAG in context.run.tags) and len(context.partition_keys) == 1:
        return context.partition_keys[0]
    return table.partitions_def.get_last_partition_key()


def _log_copy(context, table: LandingTable, info, copy: SliceCopy) -> None:
    kind = info.kind
    context.log.info(
        f"{table.config.name} [{copy.partition}]: copied {copy.rows} row(s) with "
        f"{info.watermark_column} in [{_text(kind, copy.lo)}, {kind.to_text(copy.hi)}) "
        f"into {len(copy.files)} file(s) in {copy.seconds:.2f}s"
    )


def log_progress(context) -> Throttled:
    """A progress listener writing a line to the run's log every ``$INCREMENTAL_ASSETS_PROGRESS_SECONDS``
    (10 by default) during a copy or merge that lasts longer than that; nothing for a shorter one."""
    return Throttled(lambda update: context.log.info(update.describe()), interval_seconds())


class _CopyProgress:
    """The run's log of landed windows: a line once :attr:`EVERY_SECONDS` have passed since the
    line before, for the windows landed since (one window that takes that long has a line of its
    own), and a last line at the end. Each line is an event in the run's storage: an initial load
    of a year of daily windows logs a few lines, not 365."""

    EVERY_SECONDS = 5.0

    def __init__(self, context, table: LandingTable, info: TableInfo):
        self.context, self.table, self.info = context, table, info
        self.pending: list[SliceCopy] = []
        self.last = time.perf_counter()

    def landed(self, copy: SliceCopy) -> None:
        self.pending.append(copy)
        if time.perf_counter() - self.last >= self.EVERY_SECONDS:
            self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        self.last = time.perf_counter()
        if len(pending) == 1:
            _log_copy(self.context, self.table, self.info, pending[0])
        elif pending:
            kind, first, last = self.info.kind, pending[0], pending[-1]
            self.context.log.info(
                f"{self.table.config.name} [{first.partition} ... {last.partition}]: copied "
                f"{sum(c.rows for c in pending)} row(s) in {len(pending)} windows with {self.info.watermark_column} "
                f"in [{_text(kind, first.lo)}, {kind.to_text(last.hi)}) into {sum(len(c.files) for c in pending)} "
                f"file(s) in {sum(c.seconds for c in pending):.2f}s"
            )


def _after_crash(context, table: LandingTable) -> None:
    """Record which process executes this run (so that its death can be told), and remove the
    temporary files that a killed copy of the table left in the landing store."""
    from .liveness import record_process

    record_process(context)
    name = table.config.name
    if removed := getattr(context.resources, table.landing_key).get().remove_dead_temps(name):
        context.log.warning(f"{name}: removed {removed} temporary file(s) left by a copy whose process died")


def _max_rows(context, table: LandingTable) -> int | None:
    return getattr(context.resources, table.landing_key).max_rows_per_file


def build_landing_asset(table: LandingTable, config: ProjectConfig) -> dg.AssetsDefinition:
    from .specs import asset_attributes, landing_spec

    tc = table.config
    replicated = config.replica_target(tc) is not None

    @dg.asset(
        **asset_attributes(table.spec or landing_spec(table, config)),
        partitions_def=table.partitions_def,
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool=table.pool,
        retry_policy=config.run_retries.policy(),
        required_resource_keys={table.source_key, table.landing_key},
        io_manager_key=io_manager_key(table.landing_key),  # downstream inputs read the landed files (defs/io.py)
    )
    def _asset(context: dg.AssetExecutionContext, config: CopyConfig) -> dg.MaterializeResult:
        try:
            _after_crash(context, table)
            return _materialize(context, config)
        except SourceUnavailable:
            raise  # transient: the retry policy tries again later
        except (SourceError, LandingError, ConfigError) as exc:
            # bad input: retrying cannot help; say what is wrong once, plainly
            raise dg.Failure(description=f"{tc.name}: {exc}", allow_retries=False) from None

    def _materialize(context: dg.AssetExecutionContext, config: CopyConfig) -> dg.MaterializeResult:
        if table.tracks_changes:
            return _materialize_changes(context, table, _is_refresh(context, config))
        started = time.perf_counter()
        source: Source = getattr(context.resources, table.source_key).get()
        store = getattr(context.resources, table.landing_key).get()
        info = table.describe(source, along=table.run_peers(context))
        kind = info.kind
        if note := table.index_note(source):
            context.log.warning(f"{tc.name}: {note}")
        nulls = check_null_watermarks(source, info, tc.null_watermark, tc.name)
        refresh = _is_refresh(context, config)
        previous = latest_metadata(context.instance, table.key)
        recorded = WatermarkState.from_metadata(previous, kind)
        frontier = recorded.frontier
        t0 = time.perf_counter()
        horizon = source.safe_horizon(info, lag=tc.lag)
        horizon_seconds = time.perf_counter() - t0
        if horizon.value is None:
            context.log.warning(f"{tc.name}: no safe upper bound yet ({horizon.note}); nothing copied this time")
        copier = _copy_windows if isinstance(kind, TimestampKind) else _copy_capture_windows
        keys = list(context.partition_keys)
        progress = Progress(tc.name, [log_progress(context)])
        run = CopyRun(context, table, source, info, store, refresh, horizon, frontier, progress)
        try:
            copied = copier(run, keys)
        finally:
            progress.finish()
        copies, mode = copied.copies, copied.mode
        if frontier is None and mode == "incremental" and copies:
            mode = "initial"
        files = [f.uri for c in copies for f in c.files]
        rows = sum(c.rows for c in copies)
        top = _top(copies)
        highest = max((v for v in (top, recorded.highest) if v is not None), default=None)
        state = WatermarkState(
            kind=kind, frontier=copied.frontier, previous=copied.low, new=copied.high, max_copied=top, highest=highest,
            horizon=horizon.value, horizon_note=horizon.note, held_back=horizon.held_back, run_mode=mode,
        )
        copy_seconds = float(sum(c.seconds for c in copies))
        counts = _window_counts(context, table, keys, copies, replaced=refresh or mode == "replay")
        metadata = {
            **state.to_metadata(),
            PARTITION_ROW_COUNT: dg.MetadataValue.int(counts[keys[0]] if len(keys) == 1 else rows),
            "rows_copied": dg.MetadataValue.int(rows),
            "file_count": len(files),
            "files": dg.MetadataValue.json(files[:MAX_FILES_SHOWN]),
            "landing": store.describe(),
            **table_metadata(f"{store.describe()}/{tc.name}", info.schema),
            **progress_metadata(source, info, copied.frontier, highest, rows, copy_seconds),
            "null_watermark_rows": nulls,
            "copy_seconds": dg.MetadataValue.float(round(copy_seconds, 3)),
            "horizon_seconds": dg.MetadataValue.float(round(horizon_seconds, 3)),
            "total_seconds": dg.MetadataValue.float(round(time.perf_counter() - started, 3)),
            **columns_metadata(context, tc.name, info.schema, previous),
        }
        if len(files) > MAX_FILES_SHOWN:
            metadata["files_truncated"] = True
        if len(keys) > 1:
            _add_partition_metadata(context, keys, copies, counts)
        if len(copied.empty) > MAX_EMPTY_WINDOWS:
            context.log.info(
                f"{tc.name}: {len(copied.empty)} window(s) between the frontier and the first one copied hold no "
                f"row ({copied.empty[0]} ... {copied.empty[-1]}): left unmaterialized, more than {MAX_EMPTY_WINDOWS} "
                f"to record; a partitions.start nearer the first row keeps them out of the catalog")
        elif copied.empty:
            # before this run's own records, so the latest record stays the run's; with the state
            # as it was before the run, so that were the run's records lost, the next run would
            # start where this one did, as after a crash
            before = {k: v for k, v in recorded.to_metadata().items() if k not in (PREVIOUS, NEW)}
            record_empty_windows(context.instance, table.key, list(copied.empty), before,
                                 table.replica_key if replicated else None)
            context.log.info(f"{tc.name}: {len(copied.empty)} window(s) between the frontier and the first one "
                             f"copied hold no row: recorded as empty ({copied.empty[0]} ... {copied.empty[-1]})")
        return dg.MaterializeResult(metadata=metadata)

    return _asset


def _window_counts(context, table: LandingTable, keys: list[str], copies: list[SliceCopy], *,
                   replaced: bool) -> dict[str, int]:
    """Each window's rows once this run's slices are in (see metadata.window_row_counts)."""
    added = dict.fromkeys(keys, 0)
    for copy in copies:
        added[copy.partition] = added.get(copy.partition, 0) + copy.rows
    return window_row_counts(context.instance, table.key, added, replaced=replaced)


def _add_partition_metadata(context, keys: list[str], copies: list[SliceCopy], counts: dict[str, int]) -> None:
    """A run of several windows: each window's materialization shows its own rows and files (the
    watermarks and the frontier are the run's, the same on each)."""
    by_key: dict[str, list[SliceCopy]] = {k: [] for k in keys}
    for copy in copies:
        by_key[copy.partition].append(copy)
    for key, mine in by_key.items():
        files = [f.uri for c in mine for f in c.files]
        metadata = {
            PARTITION_ROW_COUNT: dg.MetadataValue.int(counts[key]),
            "rows_copied": dg.MetadataValue.int(sum(c.rows for c in mine)),
            "file_count": len(files),
            "files": dg.MetadataValue.json(files[:MAX_FILES_SHOWN]),
            "files_truncated": len(files) > MAX_FILES_SHOWN,
        }
        context.add_asset_metadata(metadata, partition_key=key)


def _materialize_changes(context: dg.AssetExecutionContext, table: LandingTable, refresh: bool) -> dg.MaterializeResult:
    """Change tracking: the net changes since the recorded version, into the current window.

    A refresh (backfill) of the current window re-initialises with a full copy; a past window
    cannot be re-read (change tracking serves changes since a version, up to now), so replaying
    one fails clearly."""
    from ..tracking import ChangeReader

    tc = table.config
    started = time.perf_counter()
    source: Source = getattr(context.resources, table.source_key).get()
    store = getattr(context.resources, table.landing_key).get()
    kind = table.version_kind
    current = _current_window(context, table)
    past = [k for k in context.partition_keys if k != current]
    if past:
        raise SourceError(
            f"{tc.name}: change tracking cannot re-read past window(s) {past[:3]}: it serves the changes since a "
            f"version up to now. Backfill the current window ({current}) to re-initialise with a full copy"
        )
    previous = latest_metadata(context.instance, table.key)
    recorded = WatermarkState.from_metadata(previous, kind)
    last = None if refresh else recorded.frontier
    reader = ChangeReader(source, tc.table, primary_key=tc.primary_key or None, columns=tc.columns)
    progress = Progress(tc.name, [log_progress(context)])
    with _finishing(progress), reader.read(last, on_expired=tc.on_expired, batch_size=tc.batch_size) as changes:
        if changes.reinitialized:
            context.log.warning(f"{tc.name}: full copy at version {changes.new_version}: {changes.reason}")
            progress.set_total(source.estimate_rows(table.describe(source)))
        moved = changes.reinitialized or last is None or changes.new_version != last
        files = []
        if moved:
            remove_orphans(store, tc.name, current, kind, last)
            stem = slice_stem(kind, None if changes.reinitialized else last, changes.new_version)
            if changes.reinitialized:
                stem += FULL_SUFFIX
            files = store.write_slice(tc.name, current, stem, changes.schema, progress.count(changes.batches),
                                      max_rows_per_file=_max_rows(context, table))
        counts = dict(changes.counts)
        new_version = changes.new_version
        schema = changes.schema
    rows = sum(counts.values())
    window_rows = window_row_counts(context.instance, table.key, {current: rows}, replaced=False)[current]
    context.log.info(
        f"{tc.name} [{current}]: versions ({_text(kind, last)}, {new_version}]: "
        f"{counts.get('I', 0)} insert(s), {counts.get('U', 0)} update(s), {counts.get('D', 0)} delete(s)"
    )
    return dg.MaterializeResult(
        metadata={
            "previous_watermark": _text(kind, last),
            "new_watermark": kind.to_text(new_version),
            "frontier": kind.to_text(new_version),
            "highest_watermark": kind.to_text(new_version),
            PARTITION_ROW_COUNT: dg.MetadataValue.int(window_rows),
            "rows_copied": dg.MetadataValue.int(rows),
            **table_metadata(f"{store.describe()}/{tc.name}", schema),
            **version_lag(source, tc.table, new_version),
            "rows_inserted": counts.get("I", 0),
            "rows_updated": counts.get("U", 0),
            "rows_deleted": counts.get("D", 0),
            "min_valid_version": changes.min_valid_version,
            "reinitialized": changes.reinitialized,
            "reinitialize_reason": changes.reason,
            "run_mode": "initial" if last is None and not refresh else ("refresh" if refresh else "incremental"),
            "watermark_kind": "change_version",
            # the change log's key, for downstream readers of its latest state (defs/io.py)
            "primary_key": dg.MetadataValue.json(list(reader.info.primary_key)),
            "file_count": len(files),
            "files": dg.MetadataValue.json([f.uri for f in files][:MAX_FILES_SHOWN]),
            "landing": store.describe(),
            "total_seconds": dg.MetadataValue.float(round(time.perf_counter() - started, 3)),
            **columns_metadata(context, tc.name, changes.schema, previous),
        }
    )


@contextmanager
def _finishing(progress: Progress):
    try:
        yield progress
    finally:
        progress.finish()


#: a file holding a full snapshot (change tracking's initial or re-initialising copy)
FULL_SUFFIX = "__full"


def landing_tables(config: ProjectConfig) -> list[LandingTable]:
    peers: dict[str, dict[str, LandingTable]] = {}
    out = []
    for t in config.tables:
        mine = peers.setdefault(t.source, {})
        table = LandingTable(t, partitions_def_for(t), source_resource_key(t.source), mine)
        mine[t.name] = table
        out.append(table)
    return out
