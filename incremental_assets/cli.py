"""``incremental-assets``: headless commands over the same definitions the UI shows.

``sync`` does now what the sensors would do, as real Dagster runs recorded in ``$DAGSTER_HOME``
(so the UI shows them), then merges into the replica every window it has not merged as landed;
``status`` tells how far each table's recorded watermark is behind, and the replica's windows
pending merge.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from . import use_system_memory_pool
from .config import CONFIG_ENV, PROJECT_DIR, ConfigError

DEFAULT_DAGSTER_HOME = PROJECT_DIR / "dagster_home"
# what dagster_home/dagster.yaml holds (see its comments; a test keeps the two equal)
INSTANCE_YAML = """\
storage:
  sqlite:
    base_dir:
      env: DAGSTER_HOME
concurrency:
  pools:
    default_limit: 1
  runs:
    max_concurrent_runs: 4
sensors:
  use_threads: true
  num_workers: 4
auto_materialize:
  enabled: false
  use_sensors: false
freshness:
  enabled: false
telemetry:
  enabled: false
python_logs:
  python_log_level: INFO
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  poll_interval_seconds: 30
  free_slots_after_run_end_seconds: 30
"""


def _prepare_environment(config: str | None) -> None:
    if config:
        os.environ[CONFIG_ENV] = str(Path(config).expanduser().resolve())
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(DEFAULT_DAGSTER_HOME)))
    home.mkdir(parents=True, exist_ok=True)
    yaml_file = home / "dagster.yaml"
    if not yaml_file.exists():  # one copy of a table at a time: every table has a pool of its own
        # whole or not at all: another command starting now reads it
        temp = home / f".dagster.yaml.{os.getpid()}.tmp"
        temp.write_text(INSTANCE_YAML)
        os.replace(temp, yaml_file)
    # Dagster's notices on the beta and preview APIs the project uses knowingly (dg.BetaWarning,
    # dg.PreviewWarning), told by their message so that commands which do not load Dagster need not
    # import it (about 1.3 s); its deprecation warnings are shown
    warnings.filterwarnings("ignore", message=r".* is currently in (beta|preview)\b")


#: taken while the instance is opened: the first command on a new ``DAGSTER_HOME`` creates its
#: storage (SQLite databases and their schema version), which two commands starting at once
#: would both do, leaving "table runs already exists" or two rows in ``alembic_version``
INSTANCE_LOCK = ".incremental_assets.lock"


def _instance():
    """The instance of ``$DAGSTER_HOME``, as its dagster.yaml configures it; opened by one
    command at a time (see :data:`INSTANCE_LOCK`)."""
    import dagster as dg

    home = os.environ.get("DAGSTER_HOME")
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        fcntl = None
    if fcntl is None or not home:
        return dg.DagsterInstance.get()
    with open(Path(home) / INSTANCE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        return dg.DagsterInstance.get()


class _Project:
    """The loaded configuration, definitions, instance and per-table pieces."""

    def __init__(self, only: list[str] | None):
        from .defs.landing import landing_tables
        from .definitions import load_project

        self.config, self.defs = load_project()
        self.instance = _instance()
        tables = self._all_tables = landing_tables(self.config)
        if only:
            known = {t.config.name for t in tables}
            unknown = [n for n in only if n not in known]
            if unknown:
                raise ConfigError(f"{self.config.path}: no table named {unknown}; configured tables: {sorted(known)}")
            tables = [t for t in tables if t.config.name in only]
        self.tables = tables
        self.resources = self.defs.resources or {}
        self._jobs: dict = {}
        # what loading built lives until the process ends: neither later collections nor the one
        # at exit need scan it (that one alone costs about 0.3 s)
        gc.freeze()
        gc.enable()

    def resource(self, key: str):
        """An initialized resource of the definitions (``EnvVar`` fields resolved, as in a run),
        kept until the process ends."""
        if not hasattr(self, "_initialized"):
            import contextlib

            import dagster as dg

            self._stack = contextlib.ExitStack()
            self._initialized = self._stack.enter_context(dg.build_resources(self.resources))
        return getattr(self._initialized, key)

    def source(self, table):
        return self.resource(table.source_key).get()

    @property
    def store(self):
        """The landing store."""
        return self.resource("landing").get()

    def replicas(self, tables) -> dict:
        """The replica tables (``ReplicaTable``) of the replicated ones among ``tables``, by name."""
        from .defs.replica import replica_tables

        return {rt.landing.config.name: rt for rt in replica_tables(self.config, list(tables))}

    @property
    def job_names(self) -> dict[str, str]:
        """Each table's copy job (see defs/automation.py), by table name."""
        if not hasattr(self, "_job_names"):
            from .defs.automation import copy_jobs

            names: dict[str, str] = {}
            for source, tables in _by_source(self._all_tables).items():
                replicated = {n: rt.key for n, rt in self.replicas(tables).items()}
                names.update({n: job.name for n, job in copy_jobs(source, tables, replicated).items()})
            self._job_names = names
        return self._job_names



def _fmt(value) -> str:
    return value if value not in (None, "") else "-"


def _failure_message(result) -> str:
    """The step's own failure description, or the innermost error of its chain."""
    return _step_failure(result.all_events)


def _step_failure(events) -> str:
    """:func:`_failure_message` from a run's events (``DagsterEvent``)."""
    for event in events:
        if not event.is_step_failure:
            continue
        data = event.step_failure_data
        if data.user_failure_data is not None and data.user_failure_data.description:
            return data.user_failure_data.description
        error = data.error
        while error is not None and error.cause is not None:
            error = error.cause
        if error is not None:
            return error.message.strip()
    return "see the run in the Dagster UI"


#: how often ``sync`` looks again at a run it waits for
WAIT_POLL_SECONDS = 1.0


def _by_source(tables) -> dict[str, list]:
    out: dict[str, list] = {}
    for table in tables:
        out.setdefault(table.config.source, []).append(table)
    return out


def _wait_for_runs_in_flight(project, source: str, tables, timeout: float) -> set[str]:
    """End the runs of ``source`` whose process died (their pool slots freed, their temporary
    files removed) and wait, at most ``timeout`` seconds and saying on what, for live ones that
    copy or merge ``tables``; the names of the tables still busy then."""
    from .defs.automation import tables_in_flight

    deadline = time.monotonic() + timeout
    said = ""
    store = project.store
    while True:
        flight = tables_in_flight(project.instance, source, tables)
        for message in flight.ended:
            print(f"source {source}: {message}", file=sys.stderr)
        if flight.ended:
            for table in tables:
                if removed := store.remove_dead_temps(table.config.name):
                    print(f"{table.config.name}: removed {removed} temporary file(s) left by a copy whose process "
                          "died", file=sys.stderr)
        busy = flight.busy & {t.config.name for t in tables}
        left = deadline - time.monotonic()
        if not busy or left <= 0:
            return busy
        waiting = "\n".join(f"{line} to end (at most {left:.0f} s more, --wait-timeout)" for line in flight.waiting_on(busy))
        if waiting.split(" (at most")[0] != said:
            print(waiting, file=sys.stderr)
            said = waiting.split(" (at most")[0]
        time.sleep(min(WAIT_POLL_SECONDS, left))


class _Outcome:
    """What a batched run did, table by table (plain values: it crosses from a worker process)."""

    def __init__(self, result, project, keys):
        self.run_id = result.run_id
        self.metas: dict = {}
        for event in result.get_asset_materialization_events():
            meta = {k: v.value for k, v in event.materialization.metadata.items()}
            self.metas.setdefault(event.asset_key, []).append(meta)
        by_step = {e.step_key: _step_failure([e]) for e in result.all_events if e.is_step_failure}
        self.failures = {key: by_step.get(project.defs.resolve_assets_def(key).op.name) for key in keys}
        self.checks = {c.asset_key: c.passed for c in result.get_asset_check_evaluations()}

    def failure(self, key) -> str | None:
        return self.failures.get(key)


def _print_landing(name: str, batch, outcome: _Outcome, key) -> int | None:
    """The table's line for a batched run's copy: rows copied, or None when it failed."""
    failure = outcome.failure(key)
    if failure is not None:
        print(f"{name}: FAILED run {outcome.run_id}: {failure}", file=sys.stderr)
        return None
    metas = outcome.metas.get(key, [])
    meta = metas[-1] if metas else {}
    rows = sum(m.get("rows_copied", 0) for m in metas)
    print(
        f"{name}: [{batch.describe()}] {rows} row(s), "
        f"watermark {_fmt(meta.get('previous_watermark'))} -> {_fmt(meta.get('new_watermark'))}, "
        f"frontier {_fmt(meta.get('frontier'))}, {sum(m.get('file_count', 0) for m in metas)} file(s), "
        f"run {outcome.run_id}"
    )
    if not rows and meta.get("held_back"):
        print(f"{name}: stopping: {meta['horizon_note']}")
    return rows


def _print_merge(name: str, rt, outcome: _Outcome) -> bool | None:
    """The table's line for a batched run's merge: whether it succeeded (None: nothing merged)."""
    failure = outcome.failure(rt.key)
    if failure is not None:
        print(f"{name}: FAILED replica merge, run {outcome.run_id}: {failure}", file=sys.stderr)
        return False
    metas = outcome.metas.get(rt.key, [])
    files = sum(m.get("files_merged", 0) for m in metas)
    if not metas or not files:
        return None

    def total(figure):
        return sum(m.get(figure, 0) for m in metas)

    check = outcome.checks.get(rt.key)
    said = "" if check is None else (" reconciles with the source" if check else " differs from the source")
    print(
        f"{name}: merged {files} file(s) of {len(metas)} window(s) into replica {rt.target!r}: "
        f"{total('rows_inserted')} inserted, {total('rows_updated')} updated, {total('rows_unchanged')} unchanged, "
        f"{total('rows_deleted')} deleted, {total('rows_skipped_older')} older skipped;{said}"
    )
    return True


def _run_batch(project, batch, replicas, log_level) -> _Outcome:
    from .defs.automation import run_request
    from .defs.liveness import process_tags

    request = run_request(batch, {n: rt.key for n, rt in replicas.items()}, project.job_names)
    job = project.defs.resolve_job_def(request.job_name)
    result = job.execute_in_process(
        instance=project.instance,
        asset_selection=list(request.asset_selection),
        partition_key=request.partition_key,
        tags={**request.tags, **process_tags()},  # which process runs it: a run left behind when it dies is told
        raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
    )
    return _Outcome(result, project, request.asset_selection)


#: the worker processes' own project (``--jobs``), loaded once per process
_WORKER: dict = {}


def _worker_start(only: list[str] | None, updates=None) -> None:
    _prepare_environment(None)  # the configuration and DAGSTER_HOME come in the environment
    use_system_memory_pool()
    if updates is not None:  # the copies' progress goes to the parent, which shows it
        from .progress import forward

        forward(updates.put)
    _WORKER["project"] = _Project(only)


def _worker_run(source: str, names: list[str], first_key: str, last_key: str, replica_only: bool,
                log_level: str) -> _Outcome:
    from .defs.automation import Batch

    project = _WORKER["project"]
    by_name = {t.config.name: t for t in project.tables}
    tables = [by_name[n] for n in names]
    batch = Batch(source, first_key, last_key, tables, replica_only=replica_only)
    return _run_batch(project, batch, project.replicas(tables), log_level)


class _Runner:
    """Runs a sync's batches: in this process, or (``--jobs`` above 1, and more than one batch at
    hand) in worker processes, each loading the definitions once and running a batch at a time,
    as the daemon's run queue runs several runs at once. Outcomes come back in batch order."""

    def __init__(self, project, only: list[str] | None, jobs: int, log_level: str):
        self.project, self.only, self.jobs, self.log_level = project, only, jobs, log_level
        self._pool = None
        self._updates = None
        self._relay = None

    def run(self, batches, replicas):
        if self.jobs <= 1 or len(batches) < 2:
            for batch in batches:
                yield batch, _run_batch(self.project, batch, replicas, self.log_level)
            return
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            import threading

            # spawned, not forked: the parent holds connections and threads a fork would share
            context = multiprocessing.get_context("spawn")
            self._updates = context.Queue()  # the workers' progress, shown here (see progress.py)
            self._relay = threading.Thread(target=_relay, args=(self._updates,), name="incremental_assets-relay",
                                           daemon=True)
            self._relay.start()
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=context, initializer=_worker_start,
                                             initargs=(self.only, self._updates))
        futures = [self._pool.submit(_worker_run, b.source, [t.config.name for t in b.tables], b.first_key,
                                     b.last_key, b.replica_only, self.log_level) for b in batches]
        for batch, future in zip(batches, futures):
            yield batch, future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        if self._relay is not None:
            self._updates.put(None)
            self._relay.join()


def _relay(updates) -> None:
    """Hand the workers' progress updates to this process's display, until None comes."""
    from .progress import publish

    while (update := updates.get()) is not None:
        publish(update)


def cmd_sync(args: argparse.Namespace) -> int:
    """Copy (and merge) what is new, source by source: the tables of a source are planned
    together and copied by batched runs, as the source's sensor would request them. Their
    progress is shown meanwhile (see display.py)."""
    from .display import progress_display
    from .progress import interval_seconds

    summary = sys.stdout if args.quiet else None  # --quiet: the summary alone, where it would have gone
    interval = args.progress_interval if args.progress_interval is not None else interval_seconds()
    with progress_display("off" if args.quiet else args.progress, interval=interval, quiet=args.quiet):
        project = _Project(args.table)
        log_level = "INFO" if args.verbose else "ERROR"
        runner = _Runner(project, args.table, args.jobs, log_level)
        try:
            return _sync(args, project, runner, summary)
        finally:
            runner.close()


def _sync(args: argparse.Namespace, project, runner: _Runner, summary=None) -> int:
    from .defs.automation import batches, plan_tables, replica_batches

    max_tables = project.config.sensors.max_tables_per_run
    counts = {"copied": 0, "merged": 0, "up to date": 0, "waiting": 0, "failed": 0}
    store = project.store
    for source_name, tables in _by_source(project.tables).items():
        source = project.source(tables[0])
        replicas = project.replicas(tables)
        busy = _wait_for_runs_in_flight(project, source_name, tables, args.wait_timeout)
        failed = {}
        for name in sorted(busy):
            failed[name] = "a copy is still in flight"
            print(f"{name}: FAILED: not copied, a copy is still in flight after {args.wait_timeout:g} s; wait for it, "
                  "end it in the Dagster UI, or give more time with --wait-timeout", file=sys.stderr)
        remaining = [t for t in tables if t.config.name not in busy]
        copied: dict[str, int] = {}
        waiting: set[str] = set()
        merged: set[str] = set()
        for round_ in range(args.max_runs):
            if not remaining:
                break
            plans = plan_tables(remaining, source, project.instance)
            for table in remaining:
                plan, name = plans[table.config.name], table.config.name
                if plan.warning and (round_ == 0 or plan.request is None and not plan.waiting):
                    print(f"{name}: WARNING: {plan.warning}", file=sys.stderr)
                    if plan.request is None and plan.skip_reason.startswith("cannot plan"):
                        failed[name] = plan.warning
                if round_ == 0 and plan.request is not None and (note := table.index_note(source)):
                    print(f"{name}: WARNING: {note}", file=sys.stderr)
                if plan.waiting:
                    waiting.add(name)
                    print(f"{name}: not copied yet: {plan.skip_reason}")
            runs = batches(source_name, remaining, plans, max_tables=max_tables)
            if not runs:
                break
            again = []
            for batch, outcome in runner.run(runs, replicas):
                for table in batch.tables:
                    name = table.config.name
                    rows = _print_landing(name, batch, outcome, table.key)
                    if rows is None:
                        failed[name] = "copy failed"
                        continue
                    copied[name] = copied.get(name, 0) + rows
                    if name in replicas:
                        ok = _print_merge(name, replicas[name], outcome)
                        if ok is False:
                            failed[name] = "merge failed"
                            continue
                        if ok:
                            merged.add(name)
                    held = any(m.get("held_back") for m in outcome.metas.get(table.key, []))
                    if rows and not held:
                        again.append(table)  # more may have come: planned again
            remaining = again
        # whatever landed is merged, by this sync or not (a failed merge, a window landed from the
        # UI, a replica configured after landing), even when a copy failed
        merges, behind = replica_batches(source_name, [t for t in tables if t.config.name not in busy], replicas,
                                         project.instance, store, {}, max_tables=max_tables)
        for name, why in behind.items():
            print(f"{name}: replica behind: {why}")
        for batch, outcome in runner.run(merges, replicas):
            for table in batch.tables:
                name = table.config.name
                ok = _print_merge(name, replicas[name], outcome)
                if ok is False:
                    failed[name] = "merge failed"
                elif ok:
                    merged.add(name)
        for table in tables:
            name = table.config.name
            if name in failed:
                counts["failed"] += 1
            elif copied.get(name):
                counts["copied"] += 1
            elif name in merged:
                counts["merged"] += 1
            elif name in waiting:
                counts["waiting"] += 1
            else:
                counts["up to date"] += 1
                print(f"{name}: up to date")
    if len(project.tables) > 1 or summary is not None:
        print(f"{len(project.tables)} table(s): " + ", ".join(f"{v} {k}" for k, v in counts.items() if v), file=summary)
    return 1 if counts["failed"] else 0


def _status_changes(project, table) -> bool:
    from .defs.landing import recorded_state
    from .defs.sensors import retention_warning
    from .tracking import change_tracking_status

    name = table.config.name
    try:
        status = change_tracking_status(project.source(table), table.config.table)
        frontier = recorded_state(project.instance, table.key, table.version_kind).frontier
    except Exception as exc:  # noqa: BLE001
        print(f"{name:<24} FAILED: {exc}")
        return False
    if not status.get("enabled"):
        print(f"{name:<24} change tracking NOT enabled: incremental-assets enable-change-tracking --table {name}")
        return False
    current, min_valid = status.get("current_version"), status.get("min_valid_version")
    behind = "changes pending" if frontier is None or (current is not None and current > frontier) else "0"
    print(f"{name:<24} {'(change tracking)':<20} {_fmt(frontier):<34} {_fmt(current):<34} {behind}")
    if frontier is not None and min_valid is not None and frontier < min_valid:
        print(f"  WARNING: version {frontier} is below the minimum valid version {min_valid}: the next copy is a full copy")
    elif warning := retention_warning(project.instance, table, status.get("retention")):
        print(f"  WARNING: {warning}")
    return True


def _last_merge_failure(project, rt) -> str:
    """The latest merge of a replicated table (a step of a run of its source's sensor or of
    ``sync``, or a run started from the UI), when it failed: when, and why."""
    import datetime as dt

    import dagster as dg

    op = project.defs.resolve_assets_def(rt.key).op.name
    for record in project.instance.get_run_records(dg.RunsFilter(statuses=[
        dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED,
    ]), limit=200):
        run = record.dagster_run
        if run.asset_selection is not None and rt.key not in run.asset_selection:
            continue
        if run.status == dg.DagsterRunStatus.SUCCESS:
            return ""
        entries = project.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
        failures = [e.dagster_event for e in entries if e.dagster_event is not None and e.step_key == op]
        if not failures:
            continue  # another table's step failed in that run
        when = record.end_time or record.update_timestamp.timestamp()
        stamp = dt.datetime.fromtimestamp(when, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"last merge FAILED at {stamp}, run {run.run_id}: {_step_failure(failures)}"
    return ""


def _status_replica(project, table) -> bool:
    """The replica's lines of a replicated table: windows pending merge and, while some are, the
    last merge's failure if it failed."""
    from .defs.replica import pending_windows

    rt = project.replicas([table]).get(table.config.name)
    if rt is None:
        return True
    try:
        pending = pending_windows(project.instance, project.store, rt)
        failure = _last_merge_failure(project, rt) if pending else ""  # moot once nothing is pending
    except Exception as exc:  # noqa: BLE001
        print(f"  replica {rt.target!r}: FAILED to read what it merged: {exc}")
        return False
    if pending:
        first = next(iter(pending))
        print(f"  replica {rt.target!r}: {len(pending)} window(s) pending merge (first {first}: {pending[first]})")
    else:
        print(f"  replica {rt.target!r}: 0 windows pending merge")
    if failure:
        print(f"  {failure}")
    return True


def cmd_status(args: argparse.Namespace) -> int:
    from .defs.landing import recorded_state
    from .defs.sensors import backwards_note

    project = _Project(args.table)
    failed = False
    print(f"{'table':<24} {'watermark column':<20} {'recorded frontier':<34} {'source max':<34} rows ahead")
    for table in project.tables:
        name = table.config.name
        if table.tracks_changes:
            failed |= not _status_changes(project, table)
            failed |= not _status_replica(project, table)
            continue
        try:
            source = project.source(table)
            info = table.describe(source)
            recorded = recorded_state(project.instance, table.key, info.kind)
            frontier = recorded.frontier
            ahead = source.slice_stats(info, frontier, None)[0]
            top = source.max_watermark(info)
            warning = backwards_note(table, source, info, recorded)
        except Exception as exc:  # noqa: BLE001
            print(f"{name:<24} FAILED: {exc}")
            failed = True
            continue
        kind = info.kind
        print(
            f"{name:<24} {info.watermark_column:<20} {_fmt(frontier and kind.to_text(frontier)):<34} "
            f"{_fmt(top and kind.to_text(top)):<34} {ahead}"
        )
        if warning:
            print(f"  WARNING: {warning}")
        failed |= not _status_replica(project, table)
    return 1 if failed else 0


def _tracked_table(args: argparse.Namespace):
    from .config import load_config
    from .sources import Source

    config = load_config()
    table = config.table(args.table)
    if table.mode != "change_tracking":
        raise ConfigError(f"{config.path}: table {table.name!r}: key 'mode' is {table.mode!r}; set mode: change_tracking")
    src = config.sources[table.source]
    from .config import expand

    source = Source(table.source, expand(src.url, where=f"source {table.source!r}: key 'url'"),
                    retries=src.retries, retry_delay=src.retry_delay_seconds)
    return table, source


def cmd_enable_tracking(args: argparse.Namespace) -> int:
    from .tracking import enable_change_tracking

    table, source = _tracked_table(args)
    print(enable_change_tracking(source, table.table, primary_key=table.primary_key or None))
    return 0


def cmd_disable_tracking(args: argparse.Namespace) -> int:
    from .tracking import disable_change_tracking

    table, source = _tracked_table(args)
    print(disable_change_tracking(source, table.table))
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    from .config import config_path, parse_config
    from .discovery import state_path, with_discovered_tables

    path = config_path()
    if not path.exists():
        raise ConfigError(f"configuration file {path} does not exist (set --config or {CONFIG_ENV})")
    config = parse_config(path.read_text(), path)
    if not any(src.discover for src in config.sources.values()):
        print(f"{path}: no source has a 'discover' key: nothing to discover")
        return 0
    skipped: list[tuple[str, str, str]] = []
    merged = with_discovered_tables(config, refresh=True, skipped=skipped)
    explicit = {t.name for t in config.tables}
    for source_name in sorted(n for n, src in config.sources.items() if src.discover):
        found = [t for t in merged.tables if t.source == source_name and t.name not in explicit]
        mine = [(table, reason) for source, table, reason in skipped if source == source_name]
        print(f"source {source_name}: {len(found)} table(s) found, {len(mine)} skipped")
        for t in found:
            how = f"watermark {t.watermark_column}" if t.mode == "watermark" else "change tracking"
            key = f", key {list(t.primary_key)}" if t.primary_key else ""
            print(f"  {t.table:<40} -> landing/{t.name} ({how}{key})")
        for table, reason in mine:
            print(f"  {table:<40} SKIPPED: {reason}")
    print(f"written to {state_path(path)}; reload the definitions to see new tables as assets "
          "(the UI's Reload, or restart dagster dev and the code server)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Check the whole setup without copying: a line per source, landing, table and replica
    check (see preflight.py); exit 0 when all pass, 1 when something would fail, 3 on warnings only."""
    from .config import DEMO_CONFIG, config_path, load_config
    from .preflight import FAIL, OK, Verdict, check_project, exit_code

    try:
        config = load_config()
    except ConfigError as exc:
        print(Verdict(FAIL, "configuration", "load", str(exc)).line())
        return 2
    if config.path == DEMO_CONFIG:
        from .demo import ensure_demo_database

        ensure_demo_database()  # as loading the definitions does
    if args.table:
        known = {t.name for t in config.tables}
        if unknown := [n for n in args.table if n not in known]:
            raise ConfigError(f"{config.path}: no table named {unknown}; configured tables: {sorted(known)}")
        config = config.model_copy(update={"tables": [t for t in config.tables if t.name in args.table]})
    verdicts = [Verdict(OK, "configuration", "load", f"{config_path()}: {len(config.tables)} table(s), "
                        f"{len(config.sources)} source(s){', a replica' if config.replica else ''}")]
    print(verdicts[0].line(), flush=True)
    for verdict in check_project(config):
        verdicts.append(verdict)
        print(verdict.line(), flush=True)
    failed = sum(v.level == FAIL for v in verdicts)
    warned = sum(v.level == "warn" for v in verdicts)
    print(f"{len(verdicts)} check(s): {len(verdicts) - failed - warned} ok, {warned} warning(s), {failed} failed")
    return exit_code(verdicts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="incremental-assets", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help=f"configuration file (default: ${CONFIG_ENV}, else the embedded demo)")
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="copy what is new now, as the sensors would, and record it in Dagster")
    sync.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)
    sync.add_argument("--table", action="append", help="only this table (repeatable)")
    sync.add_argument("--max-runs", type=int, default=100,
                      help="at most this many rounds of runs per source (default 100)")
    sync.add_argument("--wait-timeout", type=float, default=300, metavar="SECONDS",
                      help="wait at most this long for a table's copy already in flight (default 300)")
    sync.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                      help="run at most N batches of tables at once, each in a process of its own "
                           "(default: the cores, at most 4; 1 runs every batch in this process)")
    sync.add_argument("-v", "--verbose", action="store_true", help="show the runs' logs")
    sync.add_argument("-q", "--quiet", action="store_true", help="print only the summary (and errors)")
    sync.add_argument("--progress", choices=["auto", "live", "plain", "off"], default="auto",
                      help="progress of long copies: a live display on a terminal, plain lines otherwise (default auto)")
    sync.add_argument("--progress-interval", type=float, default=None, metavar="SECONDS",
                      help="seconds between two plain progress lines (default $INCREMENTAL_ASSETS_PROGRESS_SECONDS, else 10)")
    sync.set_defaults(func=cmd_sync)
    status = sub.add_parser("status", help="per table, the recorded watermark, how far the source is ahead, and the replica's windows pending merge")
    status.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)
    status.add_argument("--table", action="append", help="only this table (repeatable)")
    status.set_defaults(func=cmd_status)
    check = sub.add_parser("check", help="check the setup without copying: configuration, sources, privileges, "
                                         "tables, watermark indexes, change tracking, landing, replica")
    check.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)
    check.add_argument("--table", action="append", help="only this table (repeatable)")
    check.set_defaults(func=cmd_check)
    discover = sub.add_parser("discover", help="find the tables of sources configured with 'discover' and list them")
    discover.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)
    discover.set_defaults(func=cmd_discover)
    for name, func, text in (
        ("enable-change-tracking", cmd_enable_tracking,
         "install change tracking (change table + triggers) for a table with mode: change_tracking"),
        ("disable-change-tracking", cmd_disable_tracking, "remove what enable-change-tracking installed"),
    ):
        sub_parser = sub.add_parser(name, help=text)
        sub_parser.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)
        sub_parser.add_argument("--table", required=True, help="the table's name in the configuration")
        sub_parser.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Loading Dagster and the definitions allocates a great deal and frees almost nothing, so
    # collecting during it is wasted work; _Project turns collection back on once loading is done.
    # With the freeze there, this takes about 0.4 s off every command.
    gc.disable()
    use_system_memory_pool()
    try:
        return _main(argv)
    finally:
        gc.enable()


def run() -> None:
    """The ``incremental-assets`` command: :func:`main`, then the sources' connections are closed
    (the server sees a clean goodbye) and the process exits with its code."""
    code = main()
    resources = sys.modules.get(f"{__package__}.defs.resources")  # loaded by commands that connect
    if resources is not None:
        resources.dispose_sources()
    sys.exit(code)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    _prepare_environment(getattr(args, "sub_config", None) or args.config)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from .sources import SourceError

    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
