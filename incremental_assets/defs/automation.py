"""One sensor per source: every table of a source probed in one evaluation, copies batched into runs.

A tick reads the tables' recorded states from the instance in one call, takes the source's safe
horizon once (it depends on the database, not on the table), and asks the source about every
table's rows ahead of its frontier over one connection, fifty tables per statement
(:meth:`Source.ranges`). Tables with rows to copy are grouped by the windows their runs span, and
each group is requested as runs of at most ``sensors.max_tables_per_run`` tables that land and
merge them (``landing/<table>`` then ``replica/<table>``, one step each, in the run's own process):
a run per table and per change would cost a process each, which does not reach a database's
hundreds of tables. A table with a copy in flight is left for a later tick. The same planning
serves ``incremental-assets sync``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import dagster as dg

from ..config import ProjectConfig
from ..sources import Horizon, Source, SourceError, TimestampKind
from ..state import WatermarkState
from .landing import PLAN_TTL_SECONDS, SOURCE_TAG, LandingTable, describe_tables
from .partitions import key_for_time, window
from .liveness import IN_FLIGHT
from .sensors import CopyRequest, Plan, WindowRange, backwards_message, plan_changes, stretch_end


def _recorded(instance: dg.DagsterInstance, tables: Sequence[LandingTable]) -> dict[str, dict | None]:
    """Each table's latest landing metadata, in one read of the instance."""
    out: dict[str, dict | None] = {t.config.name: None for t in tables}
    by_key = {t.key: t.config.name for t in tables}
    for record in instance.get_asset_records(list(by_key)):
        entry = record.asset_entry
        event = entry.last_materialization
        if event is None or event.asset_materialization is None or entry.asset_key not in by_key:
            continue
        out[by_key[entry.asset_key]] = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    return out


def plan_tables(tables: Sequence[LandingTable], source: Source, instance: dg.DagsterInstance) -> dict[str, Plan]:
    """The plan of each table of one source (as :func:`sensors.plan_copy` makes it for one),
    with a few statements for all of them."""
    plans: dict[str, Plan] = {}
    metadata = _recorded(instance, tables)
    watermarked = [t for t in tables if not t.tracks_changes]
    for table in tables:
        if table.tracks_changes:
            try:
                plans[table.config.name] = plan_changes(table, source, instance)
            except SourceError as exc:
                plans[table.config.name] = Plan(None, f"cannot plan {table.config.table}: {exc}", str(exc))
    if not watermarked:
        return plans
    infos = {}
    described = describe_tables(watermarked, source, max_age=PLAN_TTL_SECONDS)
    for table in list(watermarked):
        found = described[table.config.name]
        if isinstance(found, SourceError):  # this table's problem: the others go on
            plans[table.config.name] = Plan(None, f"cannot plan {table.config.table}: {found}", str(found))
            watermarked.remove(table)
        else:
            infos[table.config.name] = found
    if not watermarked:
        return plans
    states = {t.config.name: WatermarkState.from_metadata(metadata[t.config.name], infos[t.config.name].kind)
              for t in watermarked}
    base: Horizon | None = None
    if any(isinstance(i.kind, TimestampKind) for i in infos.values()):
        base = source.timestamp_horizon()
    probes, asks = [], []  # what to ask the source, and for which table and purpose
    horizons: dict[str, Horizon] = {}
    upper: dict[str, object] = {}  # each timestamp table's bound: min(its horizon, the current window's end)
    for table in watermarked:
        name = table.config.name
        info, state = infos[name], states[name]
        if state.highest is not None:  # a watermark that went backwards is said out loud
            probes.append((info, None, None))
            asks.append((name, "max"))
        if isinstance(info.kind, TimestampKind):
            horizon = horizons[name] = base.minus(table.config.lag)
            if horizon.held_back:  # rows above it wait behind open transactions: to be said
                probes.append((info, state.frontier, None))
                asks.append((name, "any"))
            if horizon.value is None:
                continue
            _, current_end = window(table.partitions_def, table.partitions_def.get_last_partition_key())
            hi = upper[name] = min(horizon.value, current_end)
            if state.frontier is not None and state.frontier >= hi:
                continue
            probes.append((info, state.frontier, hi))
        else:
            probes.append((info, state.frontier, None))
        asks.append((name, "ahead"))
    answers: dict[tuple[str, str], tuple] = dict(zip(asks, source.ranges(probes)))
    for table in watermarked:
        name = table.config.name
        info, state = infos[name], states[name]
        top = answers.get((name, "max"), (None, None))[1]
        warning = backwards_message(table, info, state, top) if (name, "max") in answers else ""
        lowest, highest = answers.get((name, "ahead"), (None, None))
        if lowest is None:
            horizon = horizons.get(name)
            if horizon is not None and answers.get((name, "any"), (None, None))[0] is not None:
                plans[name] = Plan(None, f"rows of {table.config.table} wait behind the safe horizon: "
                                         f"{horizon.note}", warning, waiting=True)
                continue
            plans[name] = Plan(None, f"no new rows in {table.config.table}", warning)
            continue
        reason = "initial load" if state.frontier is None else f"new rows at or after {info.kind.to_text(state.frontier)}"
        pdef = table.partitions_def
        if isinstance(info.kind, TimestampKind):
            first, last = key_for_time(pdef, lowest), key_for_time(pdef, highest)
            if info.watermark_indexed and first != last:
                last = stretch_end(pdef, source, info, first, last, upper[name])
        else:
            first = last = pdef.get_last_partition_key()
        plans[name] = Plan(CopyRequest(name, first, last, reason), "", warning)
    return plans


@dataclass
class Batch(WindowRange):
    """One run: the tables of a source whose copies span the same windows."""

    source: str
    first_key: str
    last_key: str
    tables: list[LandingTable] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    #: merges of windows landed already (no landing step)
    replica_only: bool = False

    @property
    def tags(self) -> dict[str, str]:
        return {SOURCE_TAG: self.source, **self.range_tags()}


def batches(source: str, tables: Sequence[LandingTable], plans: dict[str, Plan], *, max_tables: int) -> list[Batch]:
    """The runs for the tables with a request: tables that share partitions and windows go
    together, at most ``max_tables`` a run."""
    groups: dict[tuple, Batch] = {}
    out: list[Batch] = []
    for table in tables:
        plan = plans.get(table.config.name)
        if plan is None or plan.request is None:
            continue
        request = plan.request
        group = (table.partitions_def, request.first_key, request.last_key)
        batch = groups.get(group)
        if batch is None or len(batch.tables) >= max_tables:
            batch = groups[group] = Batch(source, request.first_key, request.last_key)
            out.append(batch)
        batch.tables.append(table)
        batch.reasons.append(request.reason)
    return out



@dataclass
class InFlight:
    """The tables of a source that a queued or running run copies or merges, and what was done
    about runs whose process had died."""

    busy: set[str] = field(default_factory=set)
    ended: list[str] = field(default_factory=list)
    #: the live runs, each with the tables it holds
    runs: list[tuple[dg.DagsterRun, set[str]]] = field(default_factory=list)

    def waiting_on(self, tables: set[str]) -> list[str]:
        """For each live run holding some of ``tables``: the tables, the run, its process."""
        from ..processes import describe_owner
        from .liveness import PROCESS_TAG

        out = []
        for run, held in self.runs:
            mine = sorted(held & tables)
            if mine:
                names = ", ".join(mine[:10]) + (" ..." if len(mine) > 10 else "")
                out.append(f"{names}: waiting for run {run.run_id} ({run.status.value}, "
                           f"{describe_owner(run.tags.get(PROCESS_TAG))})")
        return out


def tables_in_flight(instance: dg.DagsterInstance, source: str, tables: Sequence[LandingTable]) -> InFlight:
    """The tables of ``source`` that a queued or running run (of this source's sensor or of
    ``sync``) copies or merges. A run whose process died (SIGKILL, out of memory, a lost node) is
    ended as failed and its pool slots freed instead: nothing else would end it, and its tables
    would wait behind it forever."""
    from .liveness import end_if_dead

    names = {t.key: t.config.name for t in tables}
    names.update({t.replica_key: t.config.name for t in tables})
    found = InFlight()
    for record in instance.get_run_records(dg.RunsFilter(statuses=IN_FLIGHT, tags={SOURCE_TAG: source})):
        run = record.dagster_run
        if run.status != dg.DagsterRunStatus.QUEUED and (message := end_if_dead(instance, run, f"source {source}")):
            found.ended.append(message)
            continue
        held = {names[k] for k in (run.asset_selection or ()) if k in names}
        found.busy |= held
        found.runs.append((run, held))
    return found


def replica_batches(source: str, tables: Sequence[LandingTable], replicas: dict, instance: dg.DagsterInstance,
                    store, verified: dict[str, int], *, max_tables: int) -> tuple[list[Batch], dict[str, str]]:
    """Merges of the windows the replica has not merged as landed (a failed merge, a backfill, a
    window landed from the UI: see :func:`replica.pending_windows`), batched like copies; and, per
    table, why it is behind. ``verified`` (updated): per table, the landing event up to which
    everything is known merged; a table with no landing event after it is not looked at again."""
    from .replica import MERGED_THROUGH, check_windows, merge_requests

    mine = [t for t in tables if t.config.name in replicas]
    if not mine:
        return [], {}
    latest = {}
    replica_names = {replicas[t.config.name].key: t.config.name for t in mine}
    for record in instance.get_asset_records([t.key for t in mine] + list(replica_names)):
        entry = record.asset_entry
        if entry.asset_key in replica_names:  # what its latest merge found merged
            event = entry.last_materialization
            meta = event.asset_materialization.metadata if event and event.asset_materialization else {}
            through = meta.get(MERGED_THROUGH)
            name = replica_names[entry.asset_key]
            if through is not None and isinstance(through.value, int):
                verified[name] = max(verified.get(name, 0), through.value)
        else:
            latest[entry.asset_key] = entry.last_materialization_storage_id or 0
    groups: dict[tuple, Batch] = {}
    out: list[Batch] = []
    behind: dict[str, str] = {}
    for table in mine:
        name = table.config.name
        if latest.get(table.key, 0) <= verified.get(name, 0):
            continue  # nothing landed since everything was found merged
        pending, verified[name] = check_windows(instance, store, replicas[name], verified.get(name, 0))
        if not pending:
            continue
        first_pending = next(iter(pending))
        behind[name] = f"{len(pending)} window(s) pending merge ({first_pending}: {pending[first_pending]})"
        for first, last in merge_requests(replicas[name], list(pending)):
            group = (table.partitions_def, first, last)
            batch = groups.get(group)
            if batch is None or len(batch.tables) >= max_tables:
                batch = groups[group] = Batch(source, first, last, replica_only=True)
                out.append(batch)
            batch.tables.append(table)
            batch.reasons.append(behind[name])
    return out, behind


def run_request(batch: Batch, replicated: dict[str, dg.AssetKey], jobs: dict[str, str]) -> dg.RunRequest:
    """The run of ``batch``: its job (one per source and partitions), landing and replica keys."""
    keys = [] if batch.replica_only else [t.key for t in batch.tables]
    keys += [replicated[t.config.name] for t in batch.tables if t.config.name in replicated]
    return dg.RunRequest(job_name=jobs[batch.tables[0].config.name], asset_selection=keys,
                         partition_key=batch.partition_key, tags=batch.tags)


def copy_jobs(source: str, tables: Sequence[LandingTable], replicated: dict[str, dg.AssetKey]) -> dict[str, dg.UnresolvedAssetJobDefinition]:
    """The jobs that copy a source's tables: one per partitions definition its tables use (a run
    spans one set of windows), named ``copy_<source>`` (with the granularity and start when the
    tables use several). Each runs its steps in the run's own process."""
    groups: dict[object, list[LandingTable]] = {}
    for table in tables:
        groups.setdefault(table.partitions_def, []).append(table)
    jobs: dict[str, dg.UnresolvedAssetJobDefinition] = {}
    base = "copy_" + "".join(ch if ch.isalnum() else "_" for ch in source)
    for mine in groups.values():
        name = base
        if len(groups) > 1:
            p = mine[0].config.partitions
            name += f"_{p.granularity}_{str(p.start)[:10].replace('-', '')}"
        keys = [t.key for t in mine] + [replicated[t.config.name] for t in mine if t.config.name in replicated]
        job = dg.define_asset_job(
            name, selection=keys, executor_def=dg.in_process_executor,
            description=f"Copies tables of source `{source}` (and merges them into the replica), a step per table.",
        )
        for table in mine:
            jobs[table.config.name] = job
    return jobs


def sensor_name(source: str) -> str:
    return "incremental_copy_" + "".join(ch if ch.isalnum() else "_" for ch in source) + "_sensor"


def build_source_sensor(source: str, tables: list[LandingTable], jobs: dict[str, dg.UnresolvedAssetJobDefinition],
                        replicas: dict, config: ProjectConfig) -> dg.SensorDefinition:
    """The sensor of one source (see the module's docstring); ``jobs``: each table's job;
    ``replicas``: each replicated table's :class:`replica.ReplicaTable`."""
    source_key = tables[0].source_key
    job_names = {name: job.name for name, job in jobs.items()}
    replicated = {name: rt.key for name, rt in replicas.items()}
    max_tables = config.sensors.max_tables_per_run

    @dg.sensor(
        name=sensor_name(source),
        jobs=list({job.name: job for job in jobs.values()}.values()),
        minimum_interval_seconds=config.sensors.interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING if config.sensors.enabled else dg.DefaultSensorStatus.STOPPED,
        required_resource_keys={source_key, tables[0].landing_key},
        description=f"Probes the {len(tables)} table(s) of source `{source}` and requests runs that copy the ones "
                    "with new rows and merge them into the replica, a batch of tables per run; and merges of "
                    "windows the replica has not merged as landed (failed merges, backfills).",
    )
    def _sensor(context: dg.SensorEvaluationContext):
        cursor = json.loads(context.cursor) if context.cursor else {}
        verified: dict[str, int] = cursor.get("verified", {})
        flight = tables_in_flight(context.instance, source, tables)
        for message in flight.ended:
            context.log.warning(message)
        if flight.ended:  # the next copy of those tables may be far off: their temporary files go now
            store = getattr(context.resources, tables[0].landing_key).get()
            for table in tables:
                if removed := store.remove_dead_temps(table.config.name):
                    context.log.warning(f"{table.config.name}: removed {removed} temporary file(s) left by a copy "
                                        "whose process died")
        todo = [t for t in tables if t.config.name not in flight.busy]
        plans = plan_tables(todo, getattr(context.resources, source_key).get(), context.instance)
        for name, plan in plans.items():
            if plan.warning:
                context.log.warning(f"{name}: {plan.warning}")
        runs = batches(source, todo, plans, max_tables=max_tables)
        copying = {t.config.name for b in runs for t in b.tables}
        merges, behind = replica_batches(
            source, [t for t in todo if t.config.name not in copying], replicas, context.instance,
            getattr(context.resources, tables[0].landing_key).get(), verified, max_tables=max_tables,
        )
        for batch in runs + merges:
            what = "merging" if batch.replica_only else "copying"
            context.log.info(f"{what} [{batch.describe()}] for {len(batch.tables)} table(s): "
                             + ", ".join(t.config.name for t in batch.tables[:20])
                             + (" ..." if len(batch.tables) > 20 else ""))
        new_cursor = json.dumps({"verified": verified}, sort_keys=True)
        if not runs and not merges:
            waiting = [f"{n}: {p.skip_reason}" for n, p in plans.items() if p.waiting]
            reason = "; ".join(waiting[:5]) or f"no new rows in the {len(todo)} table(s) of source {source!r}"
            if flight.busy:
                reason += f" ({len(flight.busy)} table(s) with a copy in flight)"
            return dg.SensorResult(skip_reason=reason, cursor=new_cursor)
        return dg.SensorResult(run_requests=[run_request(b, replicated, job_names) for b in runs + merges],
                               cursor=new_cursor)

    return _sensor
