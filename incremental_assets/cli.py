"""``incremental-assets``: headless commands over the same definitions the UI shows.

``sync`` does now what the sensors would do, as real Dagster runs recorded in ``$DAGSTER_HOME``
(so the UI shows them); ``status`` tells how far each table's recorded watermark is behind.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import warnings
from pathlib import Path

from . import use_system_memory_pool
from .config import CONFIG_ENV, PROJECT_DIR, ConfigError

DEFAULT_DAGSTER_HOME = PROJECT_DIR / "dagster_home"
# what dagster_home/dagster.yaml holds: Dagster's SQLite storage, one pool per table, no compute-log
# files (runs started here print to this terminal; their events and logs are recorded as usual)
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
    for event in result.all_events:
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
    return project.job(asset).execute_in_process(
        instance=project.instance,
        partition_key=partition_key,
        tags=tags,
        raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
    )


def _merge(project, table, replica, partition_key, tags, log_level) -> bool:
    """Run the replica merge for the windows a landing run touched; print what it did."""
    rt, asset = replica
    result = _materialize(project, asset, partition_key, tags, log_level)
    name = table.config.name
    if not result.success:
        print(f"{name}: FAILED replica merge, run {result.run_id}: {_failure_message(result)}", file=sys.stderr)
        return False
    events = result.get_asset_materialization_events()
    meta = {k: v.value for k, v in events[-1].materialization.metadata.items()} if events else {}
    checks = result.get_asset_check_evaluations()
    check = "" if not checks else (" reconciles with the source" if checks[-1].passed else " differs from the source")
    print(
        f"{name}: merged {meta.get('files_merged', 0)} file(s) into replica {rt.target!r}: "
        f"{meta.get('rows_inserted', 0)} inserted, {meta.get('rows_updated', 0)} updated, "
        f"{meta.get('rows_deleted', 0)} deleted, {meta.get('rows_skipped_older', 0)} older skipped;{check}"
    )
    return True


def cmd_sync(args: argparse.Namespace) -> int:
    from .defs.landing import latest_metadata
    from .defs.sensors import CopyRequest, plan_copy

    project = _Project(args.table)
    failed = False
    log_level = "INFO" if args.verbose else "ERROR"
    for table in project.tables:
        name = table.config.name
        source = project.source(table)
        asset = project.asset(table)
        replica = project.replica_asset(table)
        runs = 0
        while runs < args.max_runs:
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
                if runs == 0:
                    print(f"{name}: up to date")
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
            if replica and rows and not _merge(project, table, replica, request.partition_key, request.tags, log_level):
                failed = True
                break
            if not rows and meta.get("horizon_note", "").startswith("held back"):
                print(f"{name}: stopping: {meta['horizon_note']}")
                break
        if (
            replica and not failed and latest_metadata(project.instance, table.key) is not None
            and latest_metadata(project.instance, replica[0].key) is None
        ):
            # landed before the replica was configured: merge every landed window once (the range
            # from the first to the last, not every window since the configured start)
            landed = sorted(project.instance.get_materialized_partitions(table.key))  # time keys sort in time order
            everything = CopyRequest(name, landed[0], landed[-1], "replica")
            failed |= not _merge(project, table, replica, everything.partition_key, everything.tags, log_level)
    return 1 if failed else 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="incremental-assets", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help=f"configuration file (default: ${CONFIG_ENV}, else the embedded demo)")
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="copy what is new now, as the sensors would, and record it in Dagster")
    sync.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)
    sync.add_argument("--table", action="append", help="only this table (repeatable)")
    sync.add_argument("--max-runs", type=int, default=100, help="at most this many runs per table (default 100)")
    sync.add_argument("-v", "--verbose", action="store_true", help="show the runs' logs")
    sync.set_defaults(func=cmd_sync)
    status = sub.add_parser("status", help="per table, the recorded watermark and how far the source is ahead")
    status.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)
    status.add_argument("--table", action="append", help="only this table (repeatable)")
    status.set_defaults(func=cmd_status)
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
