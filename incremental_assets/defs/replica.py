"""``replica/<table>``: merges the landed files of a partition into a SQL replica table.

Merges are upserts where the last writer wins by the watermark, so merging a file twice, or an
old file after a newer one, changes nothing: the replica converges whatever the order. Each
window's materialization records exactly which landed files it merged (name and version token)
and the latest landing materialization of the window it saw; a run merges the files of its
windows that are not in that record, new or rewritten. A window is *pending* while landing has
materialized it since and its files differ from the record: whatever landed it, and whatever
stopped the last merge, the sensor and ``sync`` merge it until it is not.
"""

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg

from ..config import ProjectConfig
from ..landing import LandingError
from ..progress import CHECKING, MERGING, Progress
from ..replica import ReplicaError, ReplicaUnavailable
from ..sources import SourceError, SourceUnavailable
from .landing import FULL_SUFFIX, LandingTable, latest_metadata, log_progress
from .schema import column_schema
from .liveness import record_process
from .metadata import COLUMN_SCHEMA, ROW_COUNT, table_metadata

#: metadata of each window's replica materialization: ``{file name: version token}`` of the
#: window's files it holds merged, and the storage id of the window's latest landing
#: materialization seen before they were listed. A window that gathers many files (a slice per
#: sensor tick) would repeat its whole list in each merge's record, so a record lists only the
#: files merged since a full list, ``merged_files_base`` (the storage id of the record holding
#: it), until they are :data:`FILES_SINCE_BASE`; then it lists every file again.
MERGED_FILES = "merged_files"
MERGED_BASE = "merged_files_base"
LANDING_EVENT = "landing_storage_id"
FILES_SINCE_BASE = 64
#: the replica table's columns that the source no longer has (dropped or renamed there): kept
NOT_IN_SOURCE = "columns_not_in_source"
#: metadata of every replica materialization: the storage id up to which every landing
#: materialization of the table (all windows) is known merged once this merge is done. The
#: source's sensor and ``sync`` read it, with the landing's latest, from the asset records of all
#: tables in one query: a table with nothing landed since is not looked at window by window.
MERGED_THROUGH = "landing_merged_through"

@dataclass(frozen=True)
class ReplicaTable:
    landing: LandingTable
    target: str
    soft_delete: bool
    on_schema_change: str
    #: the asset's key and attributes when a component's translation set them (defs/specs.py)
    spec: dg.AssetSpec | None = None
    #: the replica database's resource key (one per component instance)
    replica_key: str = "replica"

    @property
    def key(self) -> dg.AssetKey:
        return self.landing.replica_key

    @property
    def check_name(self) -> str:
        return "reconciles_with_source"


def replica_tables(config: ProjectConfig, tables: list[LandingTable]) -> list[ReplicaTable]:
    out = []
    for table in tables:
        target = config.replica_target(table.config)
        if target is None:
            continue
        opts = table.config.replica if not isinstance(table.config.replica, bool) else None
        out.append(
            ReplicaTable(
                landing=table,
                target=target,
                soft_delete=bool(opts and opts.soft_delete),
                on_schema_change=(opts and opts.on_schema_change) or config.replica.on_schema_change,
            )
        )
    return out


def merge_key(table: ReplicaTable, info) -> list[str]:
    key = list(table.landing.config.primary_key or info.primary_key)
    if not key:
        raise ReplicaError(
            f"table {table.landing.config.name!r}: no merge key for the replica: {table.landing.config.table!r} "
            "declares no primary key; set primary_key: [<column>, ...] in the table's configuration "
            "(or replica: false to keep it out of the replica)"
        )
    return key


def build_replica_asset(table: ReplicaTable, config: ProjectConfig) -> dg.AssetsDefinition:
    from .specs import asset_attributes, replica_spec

    tc = table.landing.config
    source_key = table.landing.source_key

    @dg.asset(
        **asset_attributes(table.spec or replica_spec(table, config)),
        partitions_def=table.landing.partitions_def,
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool=f"incremental_assets/replica/{tc.name}",
        retry_policy=config.run_retries.policy(),
        required_resource_keys={source_key, table.landing.landing_key, table.replica_key},
        check_specs=[dg.AssetCheckSpec(table.check_name, asset=table.key, blocking=False,
                                       description="Row count and key/version checksum equal the source's.")],
    )
    def _asset(context: dg.AssetExecutionContext):
        record_process(context)  # so that a run whose process died can be told and ended
        try:
            yield from _merge(context)
        except (SourceUnavailable, ReplicaUnavailable):
            raise  # transient: the retry policy tries again later
        except (ReplicaError, SourceError, LandingError) as exc:
            raise dg.Failure(description=f"replica/{tc.name}: {exc}", allow_retries=False) from None

    def _merge(context: dg.AssetExecutionContext):
        started_at = dt.datetime.now(dt.timezone.utc)
        t0 = time.perf_counter()
        source = getattr(context.resources, source_key).get()
        store = getattr(context.resources, table.landing.landing_key).get()
        replica = getattr(context.resources, table.replica_key).get()
        info = table.landing.describe(source, along=table.landing.run_peers(context))
        key = merge_key(table, info)
        version, operation, schema = tc.watermark_column, None, info.schema
        if table.landing.tracks_changes:
            from ..tracking import SYS_CHANGE_OPERATION, SYS_CHANGE_VERSION
            from ..tracking.base import change_schema

            version, operation, schema = SYS_CHANGE_VERSION, SYS_CHANGE_OPERATION, change_schema(info.schema)
        changes = replica.adapt_table(
            table.target, schema, key, version_column=version, on_schema_change=table.on_schema_change,
            operation_column=operation,
        )
        added, widened = changes.added, dict(changes.widened)
        if added:
            context.log.warning(f"replica table {table.target!r}: added column(s) {added} (schema drift)")
        if widened:
            context.log.warning(f"replica table {table.target!r}: widened column(s) "
                                + ", ".join(f"{c} ({w})" for c, w in widened.items()) + " (schema drift)")
        previous = latest_metadata(context.instance, table.key) or {}
        if changes.kept and changes.kept != previous.get(NOT_IN_SOURCE):
            context.log.warning(
                f"replica table {table.target!r}: column(s) {changes.kept} are no longer in the source (dropped or "
                "renamed there): kept in the replica, NULL in new rows, as they were in rows merged before"
            )
        keys = list(context.partition_keys)
        # the landing events first, then the files: a window landed meanwhile stays pending
        landed = landing_events(context.instance, table, keys)
        recorded = merged_state(context.instance, table, keys)
        totals = dict.fromkeys(FIGURES, 0)
        files_merged = 0
        progress = Progress(tc.name, [log_progress(context)], phase=MERGING)
        try:
            for partition in keys:
                before = recorded.get(partition)
                merged = before.files if before and before.files is not None else {}
                current = store.file_versions(tc.name, partition)
                figures = dict.fromkeys(FIGURES, 0)
                todo = unmerged(current, merged)
                for path in todo:
                    data = store.read_arrow(path, schema=schema)
                    result = replica.merge(table.target, data, key, version_column=version, operation_column=operation,
                                           soft_delete=table.soft_delete, on_schema_change=table.on_schema_change)
                    for name in FIGURES:
                        figures[name] += getattr(result, name)
                    widened.update(result.widened_columns)
                    if operation and is_full_snapshot(path) and data.num_rows:
                        # rows the snapshot no longer holds were deleted at the source meanwhile
                        snapshot_version = max(data.column(version).to_pylist())
                        figures["deleted"] += replica.delete_older_than(
                            table.target, key, version_column=version, version=snapshot_version, soft_delete=table.soft_delete
                        )
                    progress.add(data.num_rows)
                files_merged += len(todo)
                for name in FIGURES:
                    totals[name] += figures[name]
                # each window's materialization carries its own figures and the files it now holds merged
                context.add_asset_metadata(
                    {
                        "files_merged": len(todo),
                        **{f"rows_{name}": figures[name] for name in FIGURES},
                        **_files_record(before, current, todo),
                        LANDING_EVENT: dg.MetadataValue.int(landed.get(partition, 0)),
                    },
                    partition_key=partition,
                )
        finally:
            progress.finish()  # after a failure too: its display ends
        _, through = check_windows(context.instance, store, table, int(previous.get(MERGED_THROUGH) or 0),
                                   merged_now={p: landed.get(p, 0) for p in keys})
        context.log.info(
            f"{tc.name}: merged {files_merged} file(s) of {len(keys)} window(s) into {table.target!r}: "
            + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in totals.items())
        )
        qualified = f"{replica.schema}.{table.target}" if replica.schema else table.target
        metadata = {
            "merge_started": started_at.isoformat(),
            "added_columns": dg.MetadataValue.json(added),
            "replica_table": table.target,
            "replica": replica.redacted_url,
            "merge_seconds": dg.MetadataValue.float(round(time.perf_counter() - t0, 3)),
            **table_metadata(qualified, schema),
            MERGED_THROUGH: dg.MetadataValue.int(through),
            "widened_columns": dg.MetadataValue.json(widened),
            NOT_IN_SOURCE: dg.MetadataValue.json(changes.kept),
        }
        if changes.columns:  # the replica table's own columns, those kept from the source's past included
            metadata[COLUMN_SCHEMA] = dg.MetadataValue.table_schema(column_schema(changes.columns))
        try:
            check = reconcile(table, source, info, replica, key, [log_progress(context)])  # its count is the table's total
        except Exception:
            yield dg.MaterializeResult(metadata=metadata)  # the merge is recorded whatever the check
            raise
        total = check.metadata["replica_rows"].value
        if isinstance(total, int):
            metadata[ROW_COUNT] = dg.MetadataValue.int(total)
        yield dg.MaterializeResult(metadata=metadata)
        yield check

    return _asset


def is_full_snapshot(path: str) -> bool:
    return path.rsplit("/", 1)[-1].split(".", 1)[0].endswith(FULL_SUFFIX)


#: a merge's figures, each window's own in its materialization (``rows_<name>``)
FIGURES = ("inserted", "updated", "unchanged", "deleted", "skipped_older")


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def unmerged(current: dict[str, str], merged: dict[str, str]) -> list[str]:
    """The paths of ``current`` (path -> version token) that ``merged`` (file name -> version
    token, a window's record) does not hold as they are now: new files and rewritten ones."""
    return [path for path, version in current.items() if merged.get(_name(path)) != version]


def _latest_ids(instance: dg.DagsterInstance, key: dg.AssetKey, partitions: list[str] | None) -> dict[str, int]:
    if partitions is not None and not partitions:
        return {}
    return dict(instance.get_latest_storage_id_by_partition(
        key, dg.DagsterEventType.ASSET_MATERIALIZATION, set(partitions) if partitions else None
    ))


def landing_events(instance: dg.DagsterInstance, table: ReplicaTable, partitions: list[str] | None = None) -> dict[str, int]:
    """Per window (all, or ``partitions``), the storage id of its latest landing materialization."""
    return _latest_ids(instance, table.landing.key, partitions)


@dataclass(frozen=True)
class Merged:
    """What a window's latest replica materialization says it merged."""

    storage_id: int
    landing_event: int  # the window's latest landing materialization it saw
    files: dict[str, str] | None  # file name -> version token, all it holds merged (None: not recorded)
    base: int | None  # the storage id of the record with the full list (None: this one)
    since_base: dict[str, str]  # the files this record lists beside its base's


def _metadata_by_id(instance: dg.DagsterInstance, key: dg.AssetKey, ids) -> dict[int, tuple[str | None, dict]]:
    ids = sorted(set(ids))
    out = {}
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, storage_ids=chunk), limit=len(chunk)
        ).records
        for record in records:
            out[record.storage_id] = (record.partition_key, {k: v.value for k, v in record.asset_materialization.metadata.items()})
    return out


def merged_state(instance: dg.DagsterInstance, table: ReplicaTable, partitions: list[str] | None = None) -> dict[str, Merged]:
    """Per window (all, or ``partitions``), what its latest replica materialization says it merged."""
    latest = _metadata_by_id(instance, table.key, _latest_ids(instance, table.key, partitions).values())
    wanted = {meta.get(MERGED_BASE) for _, meta in latest.values()} - {None} - latest.keys()
    bases = {**_metadata_by_id(instance, table.key, wanted), **latest} if wanted else latest
    out = {}
    for storage_id, (partition, meta) in latest.items():
        files, base, since = meta.get(MERGED_FILES), meta.get(MERGED_BASE), {}
        if files is not None and base is not None:
            full = bases.get(base, (None, {}))[1].get(MERGED_FILES)
            # a base wiped meanwhile: nothing is known merged (merging again changes nothing)
            since, files = files, (None if full is None else {**full, **files})
        out[partition] = Merged(storage_id, int(meta.get(LANDING_EVENT) or 0), files, base, since)
    return out


def _files_record(before: Merged | None, current: dict[str, str], todo: list[str]) -> dict:
    """The files part of a window's new record: the files merged since the full list of a base
    record, or a full list of ``current`` when there is no base or too many have gathered."""
    if before is not None and before.files is not None:
        since = {**before.since_base, **{_name(p): current[p] for p in todo}}
        if len(since) <= FILES_SINCE_BASE:
            return {MERGED_FILES: dg.MetadataValue.json(since),
                    MERGED_BASE: dg.MetadataValue.int(before.base or before.storage_id)}
    return {MERGED_FILES: dg.MetadataValue.json({_name(p): v for p, v in current.items()})}


def pending_windows(instance: dg.DagsterInstance, store, table: ReplicaTable) -> dict[str, str]:
    """The windows the replica has not merged as they are landed now, each with why, in window
    order. A window never merged is pending without a look in the store (its merge records it);
    a merged one is looked at in the store only when landing materialized it after the replica's
    record."""
    return check_windows(instance, store, table)[0]


def check_windows(instance: dg.DagsterInstance, store, table: ReplicaTable, verified: int = 0, *,
                  merged_now: dict[str, int] | None = None) -> tuple[dict[str, str], int]:
    """:func:`pending_windows`, and the storage id up to which every landing materialization is
    now known merged (just below the latest landing event of the first pending window, so that a
    pending window is always read again). ``verified``: such an id from before; windows whose
    latest landing event is not after it are not read again. ``merged_now``: windows a merge
    step has just merged (not recorded yet), each with the landing event it merged."""
    landed = landing_events(instance, table)
    if not landed:
        return {}, verified
    merged_now = merged_now or {}
    merged_ids = _latest_ids(instance, table.key, list(landed))
    recent = [p for p, event in landed.items()
              if event > verified and p in merged_ids and not event <= merged_now.get(p, 0)]
    recorded = merged_state(instance, table, recent) if recent else {}
    out: dict[str, str] = {}
    for partition in sorted(landed):  # time window keys sort in time order
        if landed[partition] <= merged_now.get(partition, 0):
            continue  # merged by the step asking
        if partition not in merged_ids:
            out[partition] = "landed, never merged"
            continue
        merged = recorded.get(partition)
        if merged is None or merged.landing_event >= landed[partition]:
            continue  # verified before, or merged since its latest landing
        if merged.files is None:
            out[partition] = "the files it merged are not recorded"
            continue
        todo = unmerged(store.file_versions(table.landing.config.name, partition), merged.files)
        if todo:
            out[partition] = f"{len(todo)} landed file(s) not merged"
    waiting = [landed[p] for p in out]
    return out, (min(waiting) - 1 if waiting else max(landed.values()))


def reconcile(table: ReplicaTable, source, info, replica, key: list[str], listeners=()) -> dg.AssetCheckResult:
    """Source and replica agree on row count and on an order-independent checksum of keys and
    watermarks. Rows landing has not copied yet (above the frontier) show as a difference.
    ``listeners`` follow its progress: the source's rows read, then the replica's."""
    from ..replica import reconcile_source

    version = None if table.landing.tracks_changes else table.landing.config.watermark_column
    progress = Progress(table.landing.config.name, listeners, phase=CHECKING, total=source.estimate_rows(info))
    try:
        with source.connect() as conn:
            src_count, src_sum = reconcile_source(
                conn, info.table, key, version, column_timezone=table.landing.config.watermark_timezone, progress=progress
            )
        progress.start_phase(CHECKING, total=src_count)  # the replica's rows, as many when they agree
        rep_count, rep_sum = replica.reconcile(table.target, key, version, progress=progress)
    finally:
        progress.finish()
    passed = (src_count, src_sum) == (rep_count, rep_sum)
    return dg.AssetCheckResult(
        asset_key=table.key,
        check_name=table.check_name,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=None if passed else (
            f"replica has {rep_count} row(s), source {src_count}" if rep_count != src_count
            else "same row count, but keys or watermarks differ"
        ),
        metadata={
            "source_rows": src_count,
            "replica_rows": rep_count,
            "source_checksum": src_sum,
            "replica_checksum": rep_sum,
        },
    )


def _groups(keys: list[str], all_keys: Sequence[str]) -> list[tuple[str, str]]:
    """Contiguous runs of partition keys, as (first, last) pairs."""
    position = {k: i for i, k in enumerate(all_keys)}
    ordered = sorted((k for k in keys if k in position), key=position.__getitem__)
    groups: list[list[str]] = []
    for key in ordered:
        if groups and position[key] == position[groups[-1][-1]] + 1:
            groups[-1].append(key)
        else:
            groups.append([key])
    return [(g[0], g[-1]) for g in groups]


MAX_RUNS_PER_TICK = 20


def merge_requests(table: ReplicaTable, windows: list[str]) -> list[tuple[str, str]]:
    """The runs that merge ``windows``: one per run of adjacent windows, at most
    :data:`MAX_RUNS_PER_TICK` (else one run over the whole range: windows in it that are merged
    already cost a listing, not a merge)."""
    groups = _groups(windows, table.landing.partitions_def.get_partition_keys())
    if len(groups) > MAX_RUNS_PER_TICK:
        groups = [(groups[0][0], groups[-1][1])]
    return groups
