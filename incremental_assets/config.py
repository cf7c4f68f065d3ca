"""The project's YAML configuration: load, validate, and point at the file, table and key on error.

``${VAR}`` (or ``${VAR:-default}``) in any string is replaced from the environment when the value
is used, not when it is loaded, so secrets never sit in Dagster's resource config shown in the UI.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

#: PyYAML's safe loader, in C where libyaml is there (a discovered state file of hundreds of
#: tables loads ten times faster)
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent
#: the demo: a component instance in the project's defs folder (read by the command line too)
DEMO_CONFIG = PACKAGE_DIR / "demo" / "defs" / "demo" / "defs.yaml"
CONFIG_ENV = "INCREMENTAL_ASSETS_CONFIG"
DEMO_DIR_ENV = "INCREMENTAL_ASSETS_DEMO_DIR"

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")


class ConfigError(ValueError):
    """Invalid configuration; the message names the file, the table and the key."""


def expand(value: str, env: Mapping[str, str] | None = None, *, where: str = "") -> str:
    """Replace ``${VAR}`` / ``${VAR:-default}`` from the environment; a missing variable is an error."""
    env = os.environ if env is None else env

    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable {name} is not set" if where else f"environment variable {name} is not set")

    return _VAR.sub(sub, value)


#: query parameters of a URL that hold a credential (SQLAlchemy / libpq / ODBC / Azure spellings)
_SECRET_QUERY_KEYS = {"password", "passwd", "pwd", "sslpassword", "secret", "token", "sas_token", "account_key", "accountkey", "sig"}
#: credentials inside a query value (an ODBC connection string in ``odbc_connect``, an Azure one)
_SECRET_IN_VALUE = re.compile(r"(?:^|;)\s*(PWD|Password|AccountKey|SharedAccessSignature)\s*=\s*([^;]*)", re.I)


def inline_secret(url: str) -> str | None:
    """What in ``url`` (as written in the file) holds a credential that is not a ``${VAR}``:
    ``"the password"``, ``"query parameter 'name'"``, or None when every credential comes from the
    environment. A ``${VAR:-default}`` counts as its default (the default is written in the file)."""
    markers: list[str] = []

    def mark(match: re.Match) -> str:
        if match.group(2) is not None:
            return match.group(2)
        markers.append(f"IAENVVAR{len(markers)}X")
        return markers[-1]

    text = _VAR.sub(mark, url)
    from_env = set(markers)
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(text)
    except Exception:  # not a SQLAlchemy URL (a folder, azure://...): look at its query only
        parsed = None
    if parsed is not None and parsed.password not in (None, "") and str(parsed.password) not in from_env:
        return "the password"
    query = parsed.query if parsed is not None else dict(
        part.partition("=")[::2] for part in text.partition("?")[2].split("&") if part)
    for key, values in query.items():
        for value in values if isinstance(values, tuple) else (values,):
            if key.lower() in _SECRET_QUERY_KEYS and value and value not in from_env:
                return f"query parameter {key!r}"
            for found in _SECRET_IN_VALUE.finditer(value):
                secret = found.group(2).strip().strip("{}")
                if secret and secret not in from_env:
                    return f"query parameter {key!r} ({found.group(1)}=)"
    return None


def _no_inline_secret(url: str) -> str:
    """``url`` if no credential is written in it, else a ValueError showing the ``${VAR}`` form.

    The resources' configuration is part of every run's snapshot in Dagster's storage and shows in
    the UI, and configuration files get committed: a password must come from the environment."""
    found = inline_secret(url)
    if found is None:
        return url
    if found == "the password":
        from sqlalchemy.engine import make_url

        shown = make_url(_VAR.sub(lambda m: m.group(0) if m.group(2) is None else m.group(2), url))
        example = shown.render_as_string(hide_password=True).replace(":***@", ":${DB_PASSWORD}@", 1)
        example = f"e.g. {example}"
    else:
        example = "e.g. ...=${DB_PASSWORD}, or the whole URL as ${DB_URL}"
    raise ValueError(
        f"{found} is written in the file; passwords come from the environment: "
        f"write ${{VAR}} in its place ({example}) and set that variable"
    )


def env_var_name(value: str) -> str | None:
    """The variable's name when ``value`` is exactly ``${VAR}`` (so Dagster can hold it as an EnvVar)."""
    match = _VAR.fullmatch(value.strip())
    return match.group(1) if match and match.group(2) is None else None


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class DiscoverConfig(_Model):
    """Tables found in the source by pattern (see incremental_assets/discovery.py)."""

    #: glob patterns on ``table`` (the default schema) or ``schema.table``
    include: list[str] = pydantic.Field(["*"], min_length=1)
    exclude: list[str] = []
    mode: Literal["watermark", "change_tracking"] = "watermark"
    #: watermark: the first of these columns (any case) whose type can be a watermark
    watermark_columns: list[str] = ["updated_at", "last_update", "last_modified", "modified_at", "LastModifytime"]
    #: keys every discovered table takes, as in a ``tables:`` entry (partitions, lag_seconds, ...)
    defaults: dict[str, Any] = {}

    @pydantic.field_validator("defaults")
    @classmethod
    def _defaults(cls, value: dict[str, Any]) -> dict[str, Any]:
        own = sorted(set(value) & {"name", "source", "table", "mode", "watermark_column"})
        if own:
            raise ValueError(f"keys {own} are set per discovered table, not as defaults")
        unknown = sorted(set(value) - set(TableConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown table key(s) {unknown}")
        return value


class SourceConfig(_Model):
    url: str
    retries: int = pydantic.Field(3, ge=0, le=20)
    retry_delay_seconds: float = pydantic.Field(1.0, ge=0)
    horizon_wait_seconds: float = pydantic.Field(30.0, ge=0)
    discover: DiscoverConfig | None = None

    _url = pydantic.field_validator("url")(_no_inline_secret)


class LandingConfig(_Model):
    url: str = "./landing"
    format: Literal["parquet", "csv"] = "parquet"
    max_rows_per_file: int | None = pydantic.Field(1_000_000, ge=1)

    _url = pydantic.field_validator("url")(_no_inline_secret)


class PartitionConfig(_Model):
    granularity: Literal["hourly", "daily", "weekly", "monthly"] = "daily"
    start: dt.date | dt.datetime = dt.date(2024, 1, 1)


class ReplicaConfig(_Model):
    """The SQL database every landed slice is merged into."""

    url: str
    schema_name: str | None = pydantic.Field(None, alias="schema")
    retries: int = pydantic.Field(3, ge=0, le=20)
    retry_delay_seconds: float = pydantic.Field(1.0, ge=0)
    on_schema_change: Literal["add_columns", "fail"] = "add_columns"

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    _url = pydantic.field_validator("url")(_no_inline_secret)


class FreshnessConfig(_Model):
    """A Dagster freshness policy (``FreshnessPolicy.time_window``): the asset warns, then fails,
    when its latest materialization is older than these windows (docs/metadata.md)."""

    enabled: bool = True
    fail_window_minutes: float | None = pydantic.Field(None, gt=0)
    warn_window_minutes: float | None = pydantic.Field(None, gt=0)

    @pydantic.model_validator(mode="after")
    def _windows(self) -> FreshnessConfig:
        if self.enabled and self.fail_window_minutes is None:
            raise ValueError("key 'fail_window_minutes': required (or enabled: false)")
        if self.warn_window_minutes is not None and self.warn_window_minutes >= (self.fail_window_minutes or 0):
            raise ValueError("key 'warn_window_minutes': must be below fail_window_minutes")
        return self


class TableReplicaConfig(_Model):
    """Per-table replica options (``replica: false`` opts the table out)."""

    table: str | None = None  # target table name; default: the table's name
    on_schema_change: Literal["add_columns", "fail"] | None = None
    soft_delete: bool = False


class TableConfig(_Model):
    name: str
    source: str
    table: str
    mode: Literal["watermark", "change_tracking"] = "watermark"
    watermark_column: str | None = None
    primary_key: list[str] = []
    columns: list[str] | None = None
    partitions: PartitionConfig = PartitionConfig()
    watermark_timezone: str = "UTC"
    lag_seconds: float = pydantic.Field(0.0, ge=0)
    null_watermark: Literal["fail", "warn"] = "fail"
    batch_size: int = pydantic.Field(100_000, ge=1)
    description: str | None = None
    replica: bool | TableReplicaConfig = True
    #: change tracking: what to do when the last synced version is no longer valid
    on_expired: Literal["reinitialize", "fail"] = "reinitialize"
    #: the freshness policy of landing/<name> and replica/<name> (default: the top-level one)
    freshness: FreshnessConfig | None = None

    @pydantic.model_validator(mode="after")
    def _mode_keys(self) -> TableConfig:
        if self.mode == "watermark" and not self.watermark_column:
            raise ValueError("key 'watermark_column': required with mode: watermark")
        if self.mode == "change_tracking" and self.watermark_column:
            raise ValueError("key 'watermark_column': not used with mode: change_tracking (versions come from change tracking)")
        return self

    @pydantic.field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be letters, digits, '_' or '-' (it names the asset landing/<name> and its folder)")
        return value

    @pydantic.field_validator("watermark_timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        if value.upper() == "UTC":
            return "UTC"
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(value)
        except Exception:
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Europe/Paris)") from None
        return value

    @property
    def lag(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.lag_seconds)


class RunRetryConfig(_Model):
    """Dagster's retry policy for transient failures (bad input is never retried)."""

    max_retries: int = pydantic.Field(2, ge=0, le=10)
    delay_seconds: float = pydantic.Field(10.0, ge=0)

    def policy(self):
        import dagster as dg

        return dg.RetryPolicy(max_retries=self.max_retries, delay=self.delay_seconds, backoff=dg.Backoff.EXPONENTIAL)


class SensorConfig(_Model):
    enabled: bool = True
    interval_seconds: int = pydantic.Field(30, ge=5)
    #: tables copied (and merged) by one run; a source's tables with new rows make several runs
    max_tables_per_run: int = pydantic.Field(50, ge=1, le=1000)


class ProjectConfig(_Model):
    sources: dict[str, SourceConfig]
    landing: LandingConfig = LandingConfig()
    tables: list[TableConfig] = []
    replica: ReplicaConfig | None = None
    sensors: SensorConfig = SensorConfig()
    run_retries: RunRetryConfig = RunRetryConfig()
    #: every table's freshness policy, unless the table sets its own (none by default)
    freshness: FreshnessConfig | None = None
    #: where the file was read from; relative local paths resolve against its folder
    path: Path | None = None

    @pydantic.model_validator(mode="before")
    @classmethod
    def _tables_or_discovery(cls, data: Any) -> Any:
        if isinstance(data, dict) and "tables" not in data:
            sources = data.get("sources") if isinstance(data.get("sources"), dict) else {}
            if not any(isinstance(s, dict) and s.get("discover") for s in sources.values()):
                raise ValueError("key 'tables': list the tables to copy, or give a source a 'discover' key")
        return data

    @pydantic.model_validator(mode="after")
    def _references(self) -> ProjectConfig:
        seen: set[str] = set()
        for i, table in enumerate(self.tables):
            if table.source not in self.sources:
                raise ValueError(
                    f"tables[{i}] (table {table.name!r}): key 'source': unknown source {table.source!r}; "
                    f"configured sources: {sorted(self.sources)}"
                )
            if table.name in seen:
                raise ValueError(f"tables[{i}] (table {table.name!r}): key 'name': duplicate table name")
            seen.add(table.name)
        return self

    def replica_target(self, table: TableConfig) -> str | None:
        """The replica table a configured table merges into, or None when it is not replicated."""
        if self.replica is None or table.replica is False:
            return None
        if isinstance(table.replica, TableReplicaConfig) and table.replica.table:
            return table.replica.table
        return table.name

    def freshness_of(self, table: TableConfig) -> FreshnessConfig | None:
        """The table's freshness settings (None: no freshness policy)."""
        chosen = table.freshness or self.freshness
        return chosen if chosen is not None and chosen.enabled else None

    def table(self, name: str) -> TableConfig:
        for table in self.tables:
            if table.name == name:
                return table
        raise ConfigError(f"{self.path}: no table named {name!r}; configured tables: {[t.name for t in self.tables]}")



def resolve_local(url: str, base_dir: str | Path | None) -> str:
    """A relative local folder resolves against ``base_dir`` (the configuration file's folder)."""
    if "://" in url and not url.startswith("file://"):
        return url
    path = Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return str(path)


def _describe_location(raw: Any, loc: tuple) -> str:
    """'table 'x': key 'y'' for a pydantic error location."""
    parts = []
    if len(loc) >= 2 and loc[0] == "tables" and isinstance(loc[1], int):
        name = None
        if isinstance(raw, dict) and isinstance(raw.get("tables"), list) and loc[1] < len(raw["tables"]):
            entry = raw["tables"][loc[1]]
            name = entry.get("name") if isinstance(entry, dict) else None
        parts.append(f"tables[{loc[1]}] (table {name!r})" if name else f"tables[{loc[1]}]")
        loc = loc[2:]
    elif len(loc) >= 2 and loc[0] == "sources":
        parts.append(f"source {loc[1]!r}")
        loc = loc[2:]
    if loc:
        parts.append("key " + repr(".".join(str(p) for p in loc)))
    return ": ".join(parts) or "top level"


def parse_config(text: str, path: Path | str | None = None) -> ProjectConfig:
    """A configuration file: the standalone file, or a component's ``defs.yaml`` (its ``attributes``)."""
    where = str(path) if path else "<config>"
    try:
        raw = yaml.load(text, Loader=SAFE_LOADER)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    if isinstance(raw, dict) and "type" in raw and "attributes" in raw:  # a component instance's defs.yaml
        raw = raw["attributes"]
        if isinstance(raw, dict) and raw.get("translation") is not None:
            raise ConfigError(
                f"{where}: key 'translation': asset keys and attributes changed by a translation are the "
                "component's: this file is read by Dagster (dg, the UI), not by the command line"
            )
        raw = {k: v for k, v in raw.items() if k != "translation"} if isinstance(raw, dict) else raw
    return validate_config(raw, where, path)


def validate_config(raw: Any, where: str, path: Path | str | None = None) -> ProjectConfig:
    """The configuration from its parsed YAML (a standalone file, or a component's attributes):
    errors name ``where`` (the file), the table and the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys sources, landing, tables")
    try:
        config = ProjectConfig.model_validate({**raw, "path": Path(path).resolve() if path else None})
    except pydantic.ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check its spelling)"
            elif err["type"] == "missing":
                msg = "required key is missing"
            location = _describe_location(raw, tuple(err["loc"])) if err["loc"] else ""
            lines.append(f"{where}: {location}: {msg}" if location else f"{where}: {msg}")
        raise ConfigError("\n".join(lines)) from None
    urls = [(f"{where}: source {name!r}: key 'url'", source.url) for name, source in config.sources.items()]
    urls.append((f"{where}: landing: key 'url'", config.landing.url))
    if config.replica is not None:
        urls.append((f"{where}: replica: key 'url'", config.replica.url))
    # every ${VAR} must be resolvable now, so a bad deployment fails at load, not at 3 a.m.
    for location, url in urls:
        expand(url, where=location)
    if config.replica is not None:
        _check_replica_names(config, where)
    return config


#: the longest table name each replica engine takes, in bytes (SQLite has no limit)
_NAME_BYTES = {"postgresql": 63, "mysql": 64, "mariadb": 64, "mssql": 128}


def _check_replica_names(config: ProjectConfig, where: str) -> None:
    """Each replica table's name and its tombstone table's fit the replica engine's name limit
    (else the table would land, then fail at its first merge)."""
    from sqlalchemy.engine import make_url

    from .replica.base import TOMBSTONE_SUFFIX

    try:
        backend = make_url(expand(config.replica.url)).get_backend_name()
    except Exception:  # not a URL: the replica says so when it opens
        return
    limit = _NAME_BYTES.get(backend)
    if limit is None:
        return
    for i, table in enumerate(config.tables):
        target = config.replica_target(table)
        if target is None:
            continue
        for name, what in ((target, "its name"), (target + TOMBSTONE_SUFFIX, "its tombstone table")):
            size = len(name.encode("utf-8"))
            if size > limit:
                raise ConfigError(
                    f"{where}: tables[{i}] (table {table.name!r}): replica table {target!r}: {what} {name!r} is "
                    f"{size} bytes, over the {limit}-byte limit of {backend} names; choose a replica table name "
                    f"of at most {limit - len(TOMBSTONE_SUFFIX)} bytes with the table's key 'replica': {{table: <name>}}"
                )


def config_path(explicit: str | Path | None = None) -> Path:
    """The configuration file: ``--config``, else ``$INCREMENTAL_ASSETS_CONFIG``, else the demo."""
    chosen = explicit or os.environ.get(CONFIG_ENV)
    return Path(chosen).expanduser().resolve() if chosen else DEMO_CONFIG


def load_config(explicit: str | Path | None = None) -> ProjectConfig:
    path = config_path(explicit)
    if path == DEMO_CONFIG:
        os.environ.setdefault(DEMO_DIR_ENV, str(PROJECT_DIR / ".demo"))
    if not path.exists():
        raise ConfigError(f"configuration file {path} does not exist (set --config or {CONFIG_ENV})")
    return with_discovery(parse_config(path.read_text(), path))


def with_discovery(config: ProjectConfig) -> ProjectConfig:
    """``config`` with the tables its sources discover (see discovery.py), if any do."""
    if any(source.discover for source in config.sources.values()):
        from .discovery import with_discovered_tables  # reads the catalog only when its file is missing

        config = with_discovered_tables(config)
    return config
