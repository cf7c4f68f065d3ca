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
# what dagster_home/dagster.yaml holds: Dagster's SQLite storage, one pool per table, no compute-log
# files (runs started here print to this terminal; their events and logs are recorded as usual),
# run monitoring (a run whose process died is ended and its pool slots freed)
INSTANCE_YAML = """\
storage:
  sqlite:
    base_dir:
      env: DAGSTER_HOME
concurrency:
  pools:
    default_limit: 1
compute_logs:
  module: dagster.core.storage.noop_compute_log_manager
  class: NoOpComputeLogManager
telemetry:
  enabled: false
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
        yaml_file.write_text(INSTANCE_YAML)
    # Dagster's notices on the beta and preview APIs the project uses knowingly (dg.BetaWarning,
    # dg.PreviewWarning), told by their message so that commands which do not load Dagster need not
    # import it (about 1.3 s); its deprecation warnings are shown
    warnings.filterwarnings("ignore", message=r".* is currently in (beta|preview)\b")


def _instance():
    """The instance of ``$DAGSTER_HOME``, as its dagster.yaml configures it."""
    import dagster as dg

    return dg.DagsterInstance.get()


class _Project:
    """The loaded configuration, definitions, instance and per-table pieces."""

    def __init__(self, only: list[str] | None):
        from .defs.landing import landing_tables
        from .definitions import load_project

        self.config, self.defs = load_project()
        self.instance = _instance()
        tables = landing_tables(self.config)
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

    def source(self, table):
        return self.resources[table.source_key].get()

    def job(self, asset):
        """The asset's job, built once per sync (not once per run)."""
        import dagster as dg

        key = asset.key
        if key not in self._jobs:
            defs = dg.Definitions(assets=[asset], resources=self.resources)
            self._jobs[key] = defs.resolve_implicit_global_asset_job_def()
        return self._jobs[key]

    def asset(self, table):
        from .defs.landing import build_landing_asset

        return build_landing_asset(table, self.config)

    def replica_asset(self, table):
        """The replica asset of a table, or None when it is not replicated."""
        from .defs.replica import build_replica_asset, replica_tables

        for rt in replica_tables(self.config, [table]):
            return rt, build_replica_asset(rt, self.config)
        return None


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


def _materialize(project, asset, partition_key, tags, log_level):
    from .defs.liveness import process_tags

    return project.job(asset).execute_in_process(
        instance=project.instance,
        partition_key=partition_key,
        tags={**tags, **process_tags()},  # which process runs it: a run left behind when it dies is told
        raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
    )


def _merge(project, table, replica, partition_key, tags, log_level) -> bool:
    """Run one replica merge (one window, or a range run); print what it did."""
    rt, asset = replica
    result = _materialize(project, asset, partition_key, tags, log_level)
    name = table.config.name
    if not result.success:
        print(f"{name}: FAILED replica merge, run {result.run_id}: {_failure_message(result)}", file=sys.stderr)
        return False
    # one materialization per window, each with its own figures
    metas = [{k: v.value for k, v in e.materialization.metadata.items()} for e in result.get_asset_materialization_events()]

    def total(key):
        return sum(m.get(key, 0) for m in metas)

    checks = result.get_asset_check_evaluations()
    check = "" if not checks else (" reconciles with the source" if checks[-1].passed else " differs from the source")
    print(
        f"{name}: merged {total('files_merged')} file(s) of {len(metas)} window(s) into replica {rt.target!r}: "
        f"{total('rows_inserted')} inserted, {total('rows_updated')} updated, "
        f"{total('rows_deleted')} deleted, {total('rows_skipped_older')} older skipped;{check}"
    )
    return True


def _pending_merges(project, replica) -> dict[str, str]:
    from .defs.replica import pending_windows

    return pending_windows(project.instance, project.resources["landing"].get(), replica[0])


def _catch_up(project, table, replica, pending: dict[str, str], log_level, *, announce: bool = True) -> bool:
    """Merge every pending window of a replicated table, whoever landed it and whatever stopped
    its last merge; False when a merge failed. ``announce``: say first that the replica is behind
    (not after this sync's own copy, whose merge is expected)."""
    from .defs.replica import merge_requests, replica_tag
    from .defs.sensors import CopyRequest

    rt = replica[0]
    first = next(iter(pending))
    if announce:
        print(f"{table.config.name}: replica behind: {len(pending)} window(s) pending merge ({first}: {pending[first]})")
    for lo, hi in merge_requests(rt, list(pending)):
        request = CopyRequest(replica_tag(rt), lo, hi, "replica")
        if not _merge(project, table, replica, request.partition_key, request.tags, log_level):
            return False
    return True


def _clear_the_way(project, name: str, timeout: float) -> bool:
    """End the runs of table ``name`` whose process died (a killed sync or run worker), free their
    pool slots, and wait for live ones to end: at most ``timeout`` seconds, saying on what.
    False (said on stderr) when a run is still in flight then."""
    from .defs.liveness import end_dead_runs

    deadline = time.monotonic() + timeout
    said = ""
    while True:
        clearance = end_dead_runs(project.instance, name)
        for message in clearance.ended:
            print(f"{name}: {message.removeprefix(name + ': ')}", file=sys.stderr)
        if not clearance.live:
            # a killed copy's temporary files go now, even when the table turns out to be up to date
            if clearance.ended and (removed := project.resources["landing"].get().remove_dead_temps(name)):
                print(f"{name}: removed {removed} temporary file(s) left by a copy whose process died", file=sys.stderr)
            return True
        waiting_on = clearance.waiting_on()
        left = deadline - time.monotonic()
        if left <= 0:
            print(
                f"{name}: FAILED: not copied, a copy is still in flight after {timeout:g} s: {waiting_on}; "
                "wait for it, end it in the Dagster UI, or give more time with --wait-timeout",
                file=sys.stderr,
            )
            return False
        if waiting_on != said:
            print(f"{name}: waiting for {waiting_on} to end (at most {left:.0f} s more, --wait-timeout)", file=sys.stderr)
            said = waiting_on
        time.sleep(min(WAIT_POLL_SECONDS, left))


#: how often ``sync`` looks again at a run it waits for
WAIT_POLL_SECONDS = 1.0


def cmd_sync(args: argparse.Namespace) -> int:
    from .defs.sensors import plan_copy

    project = _Project(args.table)
    failed = False
    log_level = "INFO" if args.verbose else "ERROR"
    for table in project.tables:
        name = table.config.name
        source = project.source(table)
        asset = project.asset(table)
        replica = project.replica_asset(table)
        runs = 0
        landing_current = False
        caught_up: bool | None = None  # the replica's merges in this sync: none yet
        while runs < args.max_runs:
            if not _clear_the_way(project, name, args.wait_timeout):
                failed = True
                break
            try:
                plan = plan_copy(table, source, project.instance)
            except Exception as exc:  # noqa: BLE001 - reported per table, the others go on
                print(f"{name}: FAILED to plan: {exc}", file=sys.stderr)
                failed = True
                break
            if runs == 0:
                for warning in (plan.warning, plan.request and table.index_note(source)):
                    if warning:
                        print(f"{name}: WARNING: {warning}", file=sys.stderr)
            request = plan.request
            if request is None:
                if plan.waiting:
                    print(f"{name}: not copied yet: {plan.skip_reason}")
                landing_current = runs == 0 and not plan.waiting
                break
            runs += 1
            result = _materialize(project, asset, request.partition_key, request.tags, log_level)
            if not result.success:
                message = _failure_message(result)
                print(f"{name}: FAILED run {result.run_id}: {message}", file=sys.stderr)
                failed = True
                break
            # one materialization per window: the watermarks are the run's, rows and files each window's
            metas = [{k: v.value for k, v in e.materialization.metadata.items()} for e in result.get_asset_materialization_events()]
            meta = metas[-1] if metas else {}
            rows = sum(m.get("dagster/row_count", 0) for m in metas)
            print(
                f"{name}: [{request.describe()}] {rows} row(s), "
                f"watermark {_fmt(meta.get('previous_watermark'))} -> {_fmt(meta.get('new_watermark'))}, "
                f"frontier {_fmt(meta.get('frontier'))}, {sum(m.get('file_count', 0) for m in metas)} file(s), run {result.run_id}"
            )
            if replica and rows:  # what this run landed is merged before the next copy
                caught_up = _merge_pending(project, table, replica, log_level, announce=False)
                if caught_up is False:
                    failed = True
                    break
            if not rows and meta.get("held_back"):
                print(f"{name}: stopping: {meta['horizon_note']}")
                break
        if replica and caught_up is not False:
            # whatever landed is merged, by this sync or not (a failed merge, a window landed from
            # the UI, a replica configured after landing), even when a copy failed
            caught_up = _merge_pending(project, table, replica, log_level, announce=True)
            if caught_up is False:
                failed = True
            elif caught_up is None and landing_current:
                print(f"{name}: up to date")
        elif landing_current and not replica:
            print(f"{name}: up to date")
    return 1 if failed else 0


def _merge_pending(project, table, replica, log_level, *, announce: bool) -> bool | None:
    """Merge the pending windows of a replicated table: None when there were none, else whether
    every merge succeeded."""
    try:
        pending = _pending_merges(project, replica)
    except Exception as exc:  # noqa: BLE001
        print(f"{table.config.name}: FAILED to read what the replica merged: {exc}", file=sys.stderr)
        return False
    if not pending:
        return None
    return _catch_up(project, table, replica, pending, log_level, announce=announce)


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
    """The latest merge run of a replicated table, when it failed: when, and why."""
    import datetime as dt

    import dagster as dg

    from .defs.landing import TABLE_TAG
    from .defs.replica import replica_tag

    records = project.instance.get_run_records(dg.RunsFilter(tags={TABLE_TAG: replica_tag(rt)}), limit=1)
    if not records or records[0].dagster_run.status != dg.DagsterRunStatus.FAILURE:
        return ""
    record = records[0]
    when = record.end_time or record.update_timestamp.timestamp()
    entries = project.instance.all_logs(record.dagster_run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    why = _step_failure(e.dagster_event for e in entries if e.dagster_event is not None)
    stamp = dt.datetime.fromtimestamp(when, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"last merge FAILED at {stamp}, run {record.dagster_run.run_id}: {why}"


def _status_replica(project, table) -> bool:
    """The replica's lines of a replicated table: windows pending merge and, while some are, the
    last merge's failure if it failed."""
    replica = project.replica_asset(table)
    if not replica:
        return True
    rt = replica[0]
    try:
        pending = _pending_merges(project, replica)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="incremental-assets", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help=f"configuration file (default: ${CONFIG_ENV}, else the embedded demo)")
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="copy what is new now, as the sensors would, and record it in Dagster")
    sync.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)
    sync.add_argument("--table", action="append", help="only this table (repeatable)")
    sync.add_argument("--max-runs", type=int, default=100, help="at most this many runs per table (default 100)")
    sync.add_argument("--wait-timeout", type=float, default=300, metavar="SECONDS",
                      help="wait at most this long for a table's copy already in flight (default 300)")
    sync.add_argument("-v", "--verbose", action="store_true", help="show the runs' logs")
    sync.set_defaults(func=cmd_sync)
    status = sub.add_parser("status", help="per table, the recorded watermark, how far the source is ahead, and the replica's windows pending merge")
    status.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)
    status.add_argument("--table", action="append", help="only this table (repeatable)")
    status.set_defaults(func=cmd_status)
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
