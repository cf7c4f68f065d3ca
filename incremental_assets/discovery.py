"""Table discovery: the tables of a source that match a pattern, with their watermark and key.

A source configured with ``discover:`` (``include``/``exclude`` patterns, watermark column
candidates, defaults for every table it finds) gets a table entry for each match. Discovery
reads the catalog in a few statements per schema (SQLAlchemy's multi-table reflection), and its
result is kept in a file beside the configuration (``<config>.discovered.yaml``), which the
definitions read: loading the definitions never queries the catalog once that file exists. A
table added to the source appears as an asset after ``incremental-assets discover`` rewrites
the file and the definitions are reloaded (the UI's *Reload*, or a restart of the code server).
The file is plain YAML, fit to be reviewed and committed. No Dagster here.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

from .sources import Source, SourceError, TableRef

#: schemas that hold an engine's own catalog, never a user's tables
SYSTEM_SCHEMAS = {"information_schema", "pg_catalog", "pg_toast", "mysql", "performance_schema", "sys"}
#: tables the project installs itself (change tracking's change and metadata tables)
OWN_TABLES = ("ia_change_tracking", "*__ct")

log = logging.getLogger("incremental_assets")

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


@dataclass(frozen=True)
class Found:
    """One table of the source that matched, and how it can be copied (``problem``: why not)."""

    schema: str | None
    table: str
    watermark_column: str | None = None
    primary_key: tuple[str, ...] = ()
    problem: str = ""

    @property
    def qualified(self) -> str:
        """The configuration text of the table (``schema.table``; parts holding dots quoted)."""
        return str(TableRef(self.schema, self.table))

    @classmethod
    def parse(cls, text: str, **fields: Any) -> Found:
        ref = TableRef.parse(text)
        return cls(ref.schema, ref.name, **fields)


def _matches(found_schema: str | None, table: str, pattern: str) -> bool:
    """``pattern`` against ``schema.table`` when it names a schema, else against the table."""
    if "." in pattern:
        schema_pattern, table_pattern = pattern.split(".", 1)
        return fnmatch.fnmatchcase(found_schema or "", schema_pattern) and fnmatch.fnmatchcase(table, table_pattern)
    return fnmatch.fnmatchcase(table, pattern)


def _schemas(inspector, include: Sequence[str]) -> list[str | None]:
    """The schemas the patterns can match: named ones, all user schemas for a wildcard schema,
    and the default schema for patterns without one."""
    wanted: list[str | None] = []
    every: list[str] | None = None
    for pattern in include:
        if "." not in pattern:
            candidates: list[str | None] = [None]
        else:
            schema_pattern = pattern.split(".", 1)[0]
            if not any(ch in schema_pattern for ch in "*?["):
                candidates = [schema_pattern]
            else:
                if every is None:
                    every = [s for s in inspector.get_schema_names() if s.lower() not in SYSTEM_SCHEMAS]
                candidates = [s for s in every if fnmatch.fnmatchcase(s, schema_pattern)]
        wanted.extend(c for c in candidates if c not in wanted)
    return wanted


def discover(source: Source, *, include: Sequence[str], exclude: Sequence[str] = (), mode: str = "watermark",
             watermark_columns: Sequence[str] = (), watermark_timezone: str = "UTC") -> list[Found]:
    """The tables of ``source`` matching ``include`` and none of ``exclude``, sorted by name, each
    with its watermark column (the first of ``watermark_columns``, matched without regard to
    case, whose type can be a watermark) and declared primary key. A table that cannot be
    copied in ``mode`` is returned with its ``problem``, to be reported, not silently skipped."""
    found: list[Found] = []
    with source.connect() as conn:
        inspector = sa.inspect(conn)
        for schema in _schemas(inspector, include):
            try:
                names = inspector.get_table_names(schema=schema)
            except sa.exc.DBAPIError:
                continue  # a schema named in a pattern that does not exist: nothing matches
            names = [
                n for n in names
                if any(_matches(schema, n, p) for p in include)
                and not any(_matches(schema, n, p) for p in exclude)
                and not any(fnmatch.fnmatchcase(n, p) for p in OWN_TABLES)
            ]
            if not names:
                continue
            columns: dict = dict(inspector.get_multi_columns(schema=schema, filter_names=names))
            keys: dict = dict(inspector.get_multi_pk_constraint(schema=schema, filter_names=names))
            for name in sorted(names):
                cols = list(columns.get((schema, name), []))
                pk = tuple((keys.get((schema, name)) or {}).get("constrained_columns") or ())
                found.append(_assess(source, schema, name, cols, pk, mode, watermark_columns, watermark_timezone))
    return found


def _assess(source: Source, schema: str | None, name: str, columns: list[dict], pk: tuple[str, ...], mode: str,
            candidates: Sequence[str], zone: str) -> Found:
    if mode == "change_tracking":
        if not pk:
            return Found(schema, name, None, pk, "no primary key (change tracking needs one)")
        return Found(schema, name, None, pk)
    by_lower = {c["name"].lower(): c for c in columns}
    unusable = []
    for candidate in candidates:
        column = by_lower.get(candidate.lower())
        if column is None:
            continue
        if source.dialect.watermark_kind(sa.Column(column["name"], column["type"]), zone) is not None:
            return Found(schema, name, column["name"], pk)
        unusable.append(f"{column['name']} ({column['type']})")
    if unusable:
        return Found(schema, name, None, pk, f"watermark candidate(s) of a type that cannot be one: {', '.join(unusable)}")
    return Found(schema, name, None, pk, f"no watermark column among the candidates {list(candidates)}")


def asset_names(found: Sequence[Found], taken: Sequence[str] = ()) -> dict[str, str]:
    """A name for each usable table's asset (``landing/<name>``): the table's own name, or
    ``<schema>__<table>`` where two schemas hold the same name, made of safe characters."""
    counts: dict[str, int] = {}
    for f in found:
        counts[f.table.lower()] = counts.get(f.table.lower(), 0) + 1
    names: dict[str, str] = {}
    used = set(taken)
    for f in found:
        base = f.table if counts[f.table.lower()] == 1 or not f.schema else f"{f.schema}__{f.table}"
        name = _UNSAFE.sub("_", base).strip("-") or "table"
        if name[0] in "-":
            name = "t" + name
        candidate, n = name, 2
        while candidate in used:
            candidate, n = f"{name}_{n}", n + 1
        used.add(candidate)
        names[f.qualified] = candidate
    return names


# -- the discovered-tables file ----------------------------------------------------------------

def state_path(config_path: Path) -> Path:
    """Where the discovered tables of a configuration file are kept."""
    return config_path.with_name(config_path.stem + ".discovered.yaml")


def write_state(path: Path, by_source: dict[str, list[Found]]) -> None:
    body: dict[str, Any] = {
        "discovered_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "sources": {
            name: {
                "tables": [
                    {"table": f.qualified, "watermark_column": f.watermark_column, "primary_key": list(f.primary_key)}
                    for f in found if not f.problem
                ],
                "skipped": [{"table": f.qualified, "reason": f.problem} for f in found if f.problem],
            }
            for name, found in sorted(by_source.items())
        },
    }
    header = ("# Tables found by `incremental-assets discover` (do not edit: run it again, then reload the\n"
              "# definitions). Tables listed under `skipped` cannot be copied as configured; the reason says why.\n")
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(header + yaml.safe_dump(body, sort_keys=False))
    temp.replace(path)


def read_state(path: Path) -> dict[str, list[Found]] | None:
    """The discovered tables per source, or None when the file does not exist."""
    if not path.exists():
        return None
    try:
        body = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        out: dict[str, list[Found]] = {}
        for name, entry in (body.get("sources") or {}).items():
            found = []
            for t in entry.get("tables") or []:
                found.append(Found.parse(t["table"], watermark_column=t.get("watermark_column"),
                                         primary_key=tuple(t.get("primary_key") or ())))
            for t in entry.get("skipped") or []:
                found.append(Found.parse(t["table"], problem=t.get("reason") or "skipped"))
            out[name] = found
        return out
    except (yaml.YAMLError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise SourceError(f"{path}: unreadable list of discovered tables ({exc}); run `incremental-assets discover`") from None


# -- discovered tables in the configuration ----------------------------------------------------

def run_discovery(config) -> dict[str, list[Found]]:
    """Discover the tables of every source configured with ``discover:`` (one connection each)."""
    from .config import expand

    out: dict[str, list[Found]] = {}
    for name, src in sorted(config.sources.items()):
        rule = src.discover
        if rule is None:
            continue
        source = Source(name, expand(src.url, where=f"source {name!r}: key 'url'"),
                        retries=src.retries, retry_delay=src.retry_delay_seconds)
        try:
            out[name] = discover(
                source, include=rule.include, exclude=rule.exclude, mode=rule.mode,
                watermark_columns=rule.watermark_columns,
                watermark_timezone=rule.defaults.get("watermark_timezone", "UTC"),
            )
        finally:
            source.dispose()
    return out


def with_discovered_tables(config, *, refresh: bool = False, skipped: list[tuple[str, str, str]] | None = None):
    """``config`` with a table entry for each table its sources discover, from the discovered-
    tables file (made by discovering now when it is missing, or with ``refresh``). A table also
    listed under ``tables:`` keeps that entry (its overrides); tables that cannot be copied are
    logged as warnings, naming the reason (and added to ``skipped`` as (source, table, reason))."""
    from .config import ConfigError, TableConfig

    discovering = sorted(name for name, src in config.sources.items() if src.discover)
    path = state_path(config.path) if config.path else None
    found = None if refresh or path is None else read_state(path)
    if found is None or sorted(found) != discovering:
        found = run_discovery(config)
        if path is not None:
            write_state(path, found)
    explicit = {(t.source, TableRef.parse(t.table)) for t in config.tables}
    taken = [t.name for t in config.tables]
    tables = list(config.tables)
    for source_name in discovering:
        rule = config.sources[source_name].discover
        replicated = config.replica is not None and rule.defaults.get("replica", True) is not False
        usable = []
        for f in found.get(source_name, []):
            if (source_name, TableRef(f.schema, f.table)) in explicit:
                continue
            problem = f.problem
            if not problem and replicated and not f.primary_key and not rule.defaults.get("primary_key"):
                problem = "no primary key (the replica merges by key): list it under tables: with primary_key"
            if problem:
                log.warning("source %r: table %r is not copied: %s", source_name, f.qualified, problem)
                if skipped is not None:
                    skipped.append((source_name, f.qualified, problem))
                continue
            usable.append(f)
        names = asset_names(usable, taken)
        taken.extend(names.values())
        for f in usable:
            entry = {**rule.defaults, "name": names[f.qualified], "source": source_name, "table": f.qualified,
                     "mode": rule.mode}
            if rule.mode == "watermark":
                entry["watermark_column"] = f.watermark_column
            if f.primary_key and not rule.defaults.get("primary_key"):
                entry["primary_key"] = list(f.primary_key)
            try:
                tables.append(TableConfig.model_validate(entry))
            except ValueError as exc:
                raise ConfigError(f"{config.path}: source {source_name!r}: key 'discover': discovered table "
                                  f"{f.qualified!r}: {exc}") from None
    return config.model_copy(update={"tables": tables})
