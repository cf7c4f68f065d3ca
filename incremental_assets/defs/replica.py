"""``replica/<table>``: merges the landed files of a partition into a SQL replica table.

Merges are upserts where the last writer wins by the watermark, so merging a file twice, or an
old file after a newer one, changes nothing: the replica converges whatever the order. A run
merges the files of its windows written since the previous merge of that window began (with a
margin for clock differences between the landing store and this machine); a window whose files
a landing backfill replaced is merged again from its new files.
"""

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg

from ..config import ProjectConfig
from ..landing import LandingError
from ..replica import ReplicaError, ReplicaUnavailable
from ..sources import SourceError, SourceUnavailable
from .landing import FULL_SUFFIX, RANGE_END_TAG, RANGE_START_TAG, TABLE_TAG, LandingTable, latest_metadata

#: files written up to this long before the previous merge began are merged again, in case the
#: landing store's clock is behind this machine's
CLOCK_MARGIN = dt.timedelta(minutes=10)

@dataclass(frozen=True)
class ReplicaTable:
    landing: LandingTable
    target: str
    soft_delete: bool
    on_schema_change: str

    @property
    def key(self) -> dg.AssetKey:
        return dg.AssetKey(["replica", self.landing.config.name])

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
    tc = table.landing.config
    source_key = table.landing.source_key

    @dg.asset(
        key=table.key,
        deps=[table.landing.key],
        partitions_def=table.landing.partitions_def,
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool=f"incremental_assets/replica/{tc.name}",
        retry_policy=config.run_retries.policy(),
        required_resource_keys={source_key, "landing", "replica"},
        group_name="replica",
        kinds={"sql"},
        description=f"`{tc.table}` kept equal to the source in replica table `{table.target}`: landed slices "
        f"merged by key, last writer wins by `{tc.watermark_column}`.",
        metadata={"replica_table": table.target},
        check_specs=[dg.AssetCheckSpec(table.check_name, asset=table.key, blocking=False,
                                       description="Row count and key/version checksum equal the source's.")],
    )
    def _asset(context: dg.AssetExecutionContext):
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
        store = context.resources.landing.get()
        replica = context.resources.replica.get()
        info = table.landing.describe(source)
        key = merge_key(table, info)
        version, operation, schema = tc.watermark_column, None, info.schema
        if table.landing.tracks_changes:
            from ..tracking import SYS_CHANGE_OPERATION, SYS_CHANGE_VERSION
            from ..tracking.base import change_schema

            version, operation, schema = SYS_CHANGE_VERSION, SYS_CHANGE_OPERATION, change_schema(info.schema)
        added = replica.ensure_table(
            table.target, schema, key, version_column=version, on_schema_change=table.on_schema_change,
            operation_column=operation,
        )
        if added:
            context.log.warning(f"replica table {table.target!r}: added column(s) {added} (schema drift)")
        totals = {"inserted": 0, "updated": 0, "deleted": 0, "skipped_older": 0}
        files_merged = 0
        for partition in context.partition_keys:
            previous = latest_metadata(context.instance, table.key, partition)
            since = None
            if previous and previous.get("merge_started"):
                since = dt.datetime.fromisoformat(previous["merge_started"]) - CLOCK_MARGIN
            for path in store.list_files(tc.name, partition, modified_after=since):
                data = store.read_arrow(path, schema=schema)
                result = replica.merge(table.target, data, key, version_column=version, operation_column=operation,
                                       soft_delete=table.soft_delete, on_schema_change=table.on_schema_change)
                files_merged += 1
                for name in totals:
                    totals[name] += getattr(result, name)
                if operation and is_full_snapshot(path) and data.num_rows:
                    # rows the snapshot no longer holds were deleted at the source meanwhile
                    snapshot_version = max(data.column(version).to_pylist())
                    totals["deleted"] += replica.delete_older_than(
                        table.target, key, version_column=version, version=snapshot_version, soft_delete=table.soft_delete
                    )
        context.log.info(
            f"{tc.name}: merged {files_merged} file(s) into {table.target!r}: "
            + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in totals.items())
        )
        yield dg.MaterializeResult(
            metadata={
                "merge_started": started_at.isoformat(),
                "files_merged": files_merged,
                "rows_inserted": totals["inserted"],
                "rows_updated": totals["updated"],
                "rows_deleted": totals["deleted"],
                "rows_skipped_older": totals["skipped_older"],
                "added_columns": dg.MetadataValue.json(added),
                "replica_table": table.target,
                "replica": replica.redacted_url,
                "merge_seconds": dg.MetadataValue.float(round(time.perf_counter() - t0, 3)),
            }
        )
        yield reconcile(table, source, info, replica, key)

    return _asset


def is_full_snapshot(path: str) -> bool:
    return path.rsplit("/", 1)[-1].split(".", 1)[0].endswith(FULL_SUFFIX)


def reconcile(table: ReplicaTable, source, info, replica, key: list[str]) -> dg.AssetCheckResult:
    """Source and replica agree on row count and on an order-independent checksum of keys and
    watermarks. Rows landing has not copied yet (above the frontier) show as a difference."""
    from ..replica import reconcile_source

    version = None if table.landing.tracks_changes else table.landing.config.watermark_column
    with source.connect() as conn:
        src_count, src_sum = reconcile_source(
            conn, info.table, key, version, column_timezone=table.landing.config.watermark_timezone
        )
    rep_count, rep_sum = replica.reconcile(table.target, key, version)
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


def build_replica_sensor(table: ReplicaTable, asset: dg.AssetsDefinition, config: ProjectConfig) -> dg.SensorDefinition:
    """Requests a merge of every window landing materializes — new slices and backfilled windows
    alike. The cursor is the landing event last seen, so no event is missed or raced."""

    @dg.sensor(
        name=f"replica_{table.landing.config.name.replace('-', '_')}_sensor",
        target=[asset],
        minimum_interval_seconds=config.sensors.interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING if config.sensors.enabled else dg.DefaultSensorStatus.STOPPED,
        description=f"Merges into replica table `{table.target}` every window that landing/{table.landing.config.name} materializes.",
    )
    def _sensor(context: dg.SensorEvaluationContext):
        seen = int(context.cursor) if context.cursor else 0
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=table.landing.key, after_storage_id=seen), limit=10_000, ascending=True
        ).records
        if not records:
            return dg.SkipReason(f"no new landing/{table.landing.config.name} materializations")
        keys = {r.partition_key for r in records if r.partition_key}
        groups = _groups(list(keys), table.landing.partitions_def.get_partition_keys())
        if len(groups) > MAX_RUNS_PER_TICK:
            groups = [(groups[0][0], groups[-1][1])]
        requests = []
        for first, last in groups:
            tags = {TABLE_TAG: f"replica/{table.landing.config.name}"}
            if first != last:
                tags.update({RANGE_START_TAG: first, RANGE_END_TAG: last})
            requests.append(dg.RunRequest(asset_selection=[table.key], partition_key=first if first == last else None, tags=tags))
        return dg.SensorResult(run_requests=requests, cursor=str(max(r.storage_id for r in records)))

    return _sensor
