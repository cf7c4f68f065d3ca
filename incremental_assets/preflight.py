"""The preflight check: does the whole setup work, before anything is copied? (no Dagster here)

:func:`check_project` looks at each configured source, the landing store, each table and the
replica, and yields a :class:`Verdict` per thing checked: ``ok``, ``warn`` (it works, but not as it
should: no index on the watermark) or ``fail`` (a copy or a merge would fail, or never make
progress). Nothing is copied and nothing is created; the landing store gets a probe file that is
deleted at once. Each source and the replica are tried once, without the configured retries, so a
server that is down is reported in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa

from .config import ConfigError, ProjectConfig, TableConfig, TableReplicaConfig, expand, resolve_local
from .landing import LandingError, open_landing_store
from .replica import Replica, ReplicaError
from .sources import Source, SourceError, TableInfo
from .sources.base import SourceAuthenticationFailed, SourceUnavailable

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Verdict:
    """One thing checked: its level, what it is about (``source erp``, ``table customers``...),
    which check, and what was found, with the statement that fixes it where there is one."""

    level: str
    subject: str
    check: str
    message: str

    def line(self) -> str:
        return f"{self.level.upper():<4}  {self.subject}: {self.check}: {self.message}"


def exit_code(verdicts: list[Verdict]) -> int:
    """0: every check passed; 1: something would fail; 3: only warnings."""
    levels = {v.level for v in verdicts}
    return 1 if FAIL in levels else (3 if WARN in levels else 0)


def _source(name: str, config: ProjectConfig) -> Source:
    src = config.sources[name]
    url = expand(src.url, where=f"source {name!r}: key 'url'")
    # tried once: the check says what is true now, and says it at once
    return Source(name, url, retries=0, retry_delay=0.0, horizon_wait=src.horizon_wait_seconds)


def _connection_failure(exc: Exception) -> str:
    if isinstance(exc, SourceAuthenticationFailed) or "authentication failed" in str(exc):
        return f"authentication failed: {exc}"
    if isinstance(exc, SourceUnavailable) or "unreachable" in str(exc):
        return f"unreachable: {exc}"
    return str(exc)


def check_source(name: str, config: ProjectConfig, tables: list[TableConfig]) -> tuple[Source | None, list[Verdict]]:
    """Reachable (authentication refusals named as such), and allowed to see what the safe
    horizon needs (other sessions' transactions) when a table is copied by watermark."""
    subject = f"source {name}"
    try:
        source = _source(name, config)
    except (ConfigError, SourceError) as exc:
        return None, [Verdict(FAIL, subject, "configuration", str(exc))]
    database = source.engine.url.database if source.engine.url.get_backend_name() == "sqlite" else None
    if database and database != ":memory:" and not database.startswith("file:") and not Path(database).is_file():
        source.dispose()  # connecting would create an empty database
        return None, [Verdict(FAIL, subject, "connection", f"SQLite database file {database} does not exist")]
    try:
        with source.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            missing = source.dialect.missing_privileges(conn)
    except SourceError as exc:
        source.dispose()
        return None, [Verdict(FAIL, subject, "connection", _connection_failure(exc))]
    except sa.exc.DBAPIError as exc:
        source.dispose()
        return None, [Verdict(FAIL, subject, "connection", f"failed: {type(exc.orig).__name__}")]
    verdicts = [Verdict(OK, subject, "connection", f"reachable ({source.redacted_url})")]
    if missing:
        watermarked = [t.name for t in tables if t.mode == "watermark"]
        level = FAIL if watermarked else WARN
        verdicts.append(Verdict(level, subject, "privileges", missing))
    else:
        verdicts.append(Verdict(OK, subject, "privileges", "what the safe horizon needs (other sessions' transactions)"))
    return source, verdicts


def check_landing(config: ProjectConfig, env: dict[str, str] | None = None) -> Verdict:
    """The landing store exists and takes writes: a probe file written and deleted."""
    landing = config.landing
    try:
        url = resolve_local(expand(landing.url, where="landing: key 'url'"), config.path.parent if config.path else None)
        store = open_landing_store(url, landing.format, env=env)
        store.check_writable()
    except (ConfigError, LandingError, ValueError, OSError) as exc:
        return Verdict(FAIL, "landing", "writable", str(exc))
    except Exception as exc:  # noqa: BLE001 - e.g. an Azure client that cannot be built from the environment
        return Verdict(FAIL, "landing", "writable", f"{type(exc).__name__}: {exc}")
    return Verdict(OK, "landing", "writable", f"{store.describe()} (a probe file written and deleted)")


def _describe(source: Source, tc: TableConfig, *, watermark: bool) -> TableInfo:
    return source.describe_table(
        tc.table,
        watermark_column=tc.watermark_column if watermark else None,
        columns=tc.columns,
        column_timezone=tc.watermark_timezone,
        primary_key=tc.primary_key or None,
    )


def check_table(source: Source, tc: TableConfig) -> tuple[TableInfo | None, list[Verdict]]:
    """The table and its columns exist and can be read; its watermark column exists with a type
    that can be one, and has an index (else the statement that creates one); or, with change
    tracking, that it is installed."""
    subject = f"table {tc.name}"
    try:
        info = _describe(source, tc, watermark=False)
        with source.connect() as conn:
            conn.execute(source.select_rows(info).limit(0))  # SELECT privilege
    except SourceError as exc:
        return None, [Verdict(FAIL, subject, "table", str(exc))]
    except sa.exc.DBAPIError as exc:
        return None, [Verdict(FAIL, subject, "table", f"cannot read {tc.table!r}: {str(exc.orig).strip().splitlines()[0]}")]
    verdicts = [Verdict(OK, subject, "table", f"{tc.table} ({len(info.columns)} column(s)) on source {tc.source}")]
    if tc.mode == "change_tracking":
        verdicts.append(_check_tracking(source, tc))
        return info, verdicts
    try:
        info = _describe(source, tc, watermark=True)
    except SourceError as exc:
        verdicts.append(Verdict(FAIL, subject, "watermark", str(exc)))
        return None, verdicts
    verdicts.append(Verdict(OK, subject, "watermark", f"{info.watermark_column} ({type(info.kind).__name__.replace('Kind', '').lower()})"))
    note = source.missing_index_note(info, table=tc.table, column=tc.watermark_column)
    verdicts.append(Verdict(WARN, subject, "index", note) if note else
                    Verdict(OK, subject, "index", f"an index leads with {info.watermark_column}"))
    return info, verdicts


def _check_tracking(source: Source, tc: TableConfig) -> Verdict:
    from .tracking import change_tracking_status

    subject = f"table {tc.name}"
    try:
        status = change_tracking_status(source, tc.table)
    except SourceError as exc:
        return Verdict(FAIL, subject, "change tracking", str(exc))
    problems = "; ".join(str(p) for p in status.get("problems") or [])
    if status.get("native") and problems:  # SQL Server: the problem says which statements fix it
        return Verdict(FAIL, subject, "change tracking", problems)
    if not status.get("enabled"):
        return Verdict(FAIL, subject, "change tracking",
                       f"not enabled{' (' + problems + ')' if problems else ''}; run: incremental-assets "
                       f"enable-change-tracking --table {tc.name}")
    return Verdict(OK, subject, "change tracking", f"enabled (version {status.get('current_version')})")


def check_replica_reachable(config: ProjectConfig) -> tuple[Replica | None, Verdict]:
    rc = config.replica
    try:
        replica = Replica(expand(rc.url, where="replica: key 'url'"), schema=rc.schema_name, retries=0, retry_delay=0.0)
        replica.ping()
    except ConfigError as exc:
        return None, Verdict(FAIL, "replica", "configuration", str(exc))
    except ReplicaError as exc:
        return None, Verdict(FAIL, "replica", "connection", str(exc))
    return replica, Verdict(OK, "replica", "connection", f"reachable ({replica.redacted_url})")


def check_replica_table(replica: Replica, config: ProjectConfig, tc: TableConfig, info: TableInfo) -> Verdict:
    """The replica table matches the source's: each column can hold the data, the key is unique
    (or the table is missing and will be created)."""
    target = config.replica_target(tc)
    subject = f"replica {target}"
    key = list(tc.primary_key or info.primary_key)
    if not key:
        return Verdict(FAIL, subject, "merge key",
                       f"table {tc.name!r}: neither primary_key in the configuration nor a primary key in the source; "
                       "set primary_key for the table")
    schema: Any = info.schema
    version, operation = tc.watermark_column, None
    if tc.mode == "change_tracking":
        from .tracking import SYS_CHANGE_OPERATION, SYS_CHANGE_VERSION
        from .tracking.base import change_schema

        schema, version, operation = change_schema(info.schema), SYS_CHANGE_VERSION, SYS_CHANGE_OPERATION
    own = tc.replica.on_schema_change if isinstance(tc.replica, TableReplicaConfig) else None
    on_change: Literal["fail", "add_columns"] = "fail" if (own or config.replica.on_schema_change) == "fail" else "add_columns"
    try:
        found = replica.check_table(target, schema, key, version_column=version, on_schema_change=on_change,
                                    operation_column=operation)
    except ReplicaError as exc:
        return Verdict(FAIL, subject, "schema", str(exc))
    return Verdict(OK, subject, "schema", found)


def check_project(config: ProjectConfig, *, env: dict[str, str] | None = None) -> Iterator[Verdict]:
    """Every check of the setup, source by source, then the landing store and the replica."""
    by_source: dict[str, list[TableConfig]] = {}
    for tc in config.tables:
        by_source.setdefault(tc.source, []).append(tc)
    replica: Replica | None = None
    if config.replica is not None:
        replica, verdict = check_replica_reachable(config)
        yield verdict
    yield check_landing(config, env)
    for name in config.sources:
        tables = by_source.get(name, [])
        source, verdicts = check_source(name, config, tables)
        yield from verdicts
        try:
            for tc in tables:
                if source is None:
                    yield Verdict(FAIL, f"table {tc.name}", "table", f"not checked: source {name!r} is not reachable")
                    continue
                info, table_verdicts = check_table(source, tc)
                yield from table_verdicts
                if replica is not None and info is not None and config.replica_target(tc):
                    yield check_replica_table(replica, config, tc, info)
        finally:
            if source is not None:
                source.dispose()
    if replica is not None:
        replica.dispose()
