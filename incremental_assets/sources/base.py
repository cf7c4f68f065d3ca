"""A source database: reflection, safe horizons and streaming watermark reads.

Everything specific to one engine lives in that engine's module (``sqlite.py``,
``postgresql.py``, ``mysql.py``, ``mssql.py``) as an :class:`EngineDialect`; this module never
branches on the engine's name.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from urllib.parse import quote
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import quoted_name
from sqlalchemy.sql.expression import ClauseElement, Executable

from .types import arrow_type, base_type, column_converter, is_timezone_aware, rows_to_batch, text_fallback
from .watermarks import IntegerKind, RowversionKind, TimestampKind, WatermarkKind

log = logging.getLogger("incremental_assets")

#: execution option of a slice's SELECT in watermark order: the watermark column's name (an
#: engine's fast path may choose how the server produces that order)
ORDER_OPTION = "incremental_assets_order"
#: execution option of a slice's SELECT read in the table's storage order, about the watermark's
#: (no ORDER BY): the engine's reader keeps that order (no parallel or synchronised scans)
STORAGE_ORDER_OPTION = "incremental_assets_storage_order"
T = TypeVar("T")
UTC = dt.timezone.utc


class SourceError(Exception):
    """A problem with a source, its tables or columns; the message never holds a password."""


class SourceUnavailable(SourceError):
    """The source could not be reached after the configured retries (transient)."""


class SourceAuthenticationFailed(SourceError):
    """The source refused the credentials: permanent, so never retried."""


#: SQLSTATEs of a refused login: invalid authorization specification, invalid password (PostgreSQL)
_AUTH_SQLSTATES = {"28000", "28P01"}
#: MySQL / MariaDB: access denied for user (1045), to an auth plugin's user (1698)
_AUTH_MYSQL_ERRORS = {1045, 1698}
#: the same as drivers word them when they give no code (libpq's connection errors, SQL Server 18456)
_AUTH_TEXT = re.compile(
    r"password authentication failed|authentication failed for user|no pg_hba\.conf entry|"
    r"role \"[^\"]*\" (?:does not exist|is not permitted to log in)|Access denied for user|Login failed for user|\b18456\b",
    re.I,
)


def is_authentication_failure(exc: BaseException) -> bool:
    """Whether a driver's error (or SQLAlchemy's wrapper of it) is a refused login, which no retry
    can mend: psycopg / libpq (SQLSTATE 28P01 / 28000 or its message), PyMySQL and mysqlclient
    (error 1045), pyodbc (SQLSTATE 28000, SQL Server error 18456), ADBC (its SQLSTATE)."""
    orig = getattr(exc, "orig", None) or exc
    for attr in ("sqlstate", "pgcode"):
        if getattr(orig, attr, None) in _AUTH_SQLSTATES:
            return True
    args = getattr(orig, "args", None) or (None,)
    if isinstance(args[0], (int, str)) and (args[0] in _AUTH_MYSQL_ERRORS or args[0] in _AUTH_SQLSTATES):
        return True
    return bool(_AUTH_TEXT.search(str(orig)))


def redact_url(url: str | sa.URL) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL we can parse: show nothing of it
        return "<unparseable url>"


def scrub(message: str, url: str | sa.URL) -> str:
    """Remove the password of ``url`` from a driver's message, in case the driver echoes it
    (as written, or percent-encoded as in a libpq URI)."""
    try:
        password = make_url(url).password
    except Exception:
        password = None
    if password:
        message = message.replace(str(password), "***").replace(quote(str(password), safe=""), "***")
    return re.sub(r"(AccountKey|Password|PWD|SharedAccessSignature)=[^;'\"\s]+", r"\1=***", message, flags=re.I)


@dataclass(frozen=True)
class TableRef:
    """A configured table reference: ``table`` or ``schema.table``; double quotes keep dots."""

    schema: str | None
    name: str

    @classmethod
    def parse(cls, text: str) -> TableRef:
        """``table``, ``schema.table``, or either part in double quotes (``"my.table"``, ``""`` for a quote).

        An unquoted part is taken literally up to the next dot, quotes included, so a table
        called ``we"ird`` can be written as it is.
        """
        parts: list[str] = []
        i, n = 0, len(text)
        while True:
            if i < n and text[i] == '"':
                buf, i = "", i + 1
                while True:
                    if i >= n:
                        raise ValueError(f"not a table reference: {text!r} (unterminated double quote)")
                    if text[i] == '"':
                        if i + 1 < n and text[i + 1] == '"':
                            buf, i = buf + '"', i + 2
                            continue
                        i += 1
                        break
                    buf, i = buf + text[i], i + 1
                parts.append(buf)
                if i == n:
                    break
                if text[i] != ".":
                    raise ValueError(f"not a table reference: {text!r} (a quoted part must end at a dot or the end)")
                i += 1
            else:
                dot = text.find(".", i)
                if dot < 0:
                    parts.append(text[i:])
                    break
                parts.append(text[i:dot])
                i = dot + 1
        if not all(parts) or len(parts) > 2:
            raise ValueError(f"not a table reference: {text!r} (use table or schema.table; quote parts holding dots)")
        return cls(parts[0], parts[1]) if len(parts) == 2 else cls(None, parts[0])

    @property
    def sa_schema(self) -> str | None:
        """The schema for SQLAlchemy, always quoted as one identifier (SQL Server's dialect would
        otherwise read a dotted schema such as ``my.schema`` as ``database.owner``)."""
        return None if self.schema is None else quoted_name(self.schema, quote=True)

    @staticmethod
    def _quote(part: str) -> str:
        return '"' + part.replace('"', '""') + '"' if ("." in part or part.startswith('"')) else part

    def __str__(self) -> str:
        """The configuration text of this reference: ``TableRef.parse(str(ref)) == ref``."""
        name = self._quote(self.name)
        return f"{self._quote(self.schema)}.{name}" if self.schema else name


@dataclass
class TableInfo:
    ref: TableRef
    table: sa.Table
    columns: list[str]
    schema: pa.Schema
    watermark_column: str | None = None
    kind: WatermarkKind | None = None
    watermark_indexed: bool = True
    primary_key: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Horizon:
    """The exclusive upper bound below which no future commit can land, and why it is where it is."""

    value: Any
    note: str = ""
    #: open transactions keep it below the database's clock or MAX (None: no bound at all)
    held_back: bool = False

    def minus(self, lag: dt.timedelta) -> Horizon:
        """The same horizon for a table whose values are stamped by clocks ``lag`` behind."""
        if not lag or self.value is None:
            return self
        return Horizon(self.value - lag, f"{self.note}, minus lag {lag}", self.held_back)


@dataclass(frozen=True)
class RunRead:
    """How one read serves a run of windows (see :meth:`EngineDialect.one_ordered_read`)."""

    #: in a few words, for the log
    how: str
    #: the table is stored about in watermark order: a read in storage order (no ORDER BY, the
    #: server's cheapest scan) may serve instead, cut by a reader that sorts out the rows that
    #: are not in order (``copying.StorageOrderSplit``)
    storage_order: bool = False
    #: the rows of the range, as the planner estimates them (None: unknown)
    rows: float | None = None


class Explain(Executable, ClauseElement):
    """``<prefix> <statement>`` (e.g. ``EXPLAIN (FORMAT JSON) SELECT ...``), its parameters bound
    as the statement's own (SQLAlchemy's documented recipe for custom constructs)."""

    inherit_cache = False

    def __init__(self, prefix: str, statement: sa.Select):
        self.prefix = prefix
        self.statement = statement


@compiles(Explain)
def _compile_explain(element: Explain, compiler, **kw) -> str:
    return f"{element.prefix} {compiler.process(element.statement, **kw)}"


class EngineDialect:
    """Engine-specific behaviour. Subclasses override what their engine does differently."""

    #: keyword arguments for ``sqlalchemy.create_engine``
    engine_kwargs: dict[str, Any] = {}
    #: whether rows read in watermark order may be split into windows by comparing their Arrow
    #: values with the windows' bounds (the engine compares the column's values as Arrow does)
    splits_ordered_reads: bool = True
    #: how much earlier than the clock / a reported transaction start a not-yet-visible row's
    #: timestamp may be (delay before a new transaction shows in :meth:`timestamp_holds`, or
    #: between a statement taking its timestamp and its transaction being registered)
    clock_margin: dt.timedelta = dt.timedelta(0)

    def dispose(self) -> None:
        """Close what the dialect keeps open beside the SQLAlchemy engine (none by default)."""

    def reflected(self, conn: sa.Connection, table: sa.Table, indexes: list[dict]) -> tuple[sa.Table, list[dict]]:
        """The reflected table and its indexes, with anything the reflection got wrong put right."""
        return table, indexes

    def db_now(self, conn: sa.Connection) -> dt.datetime:
        """The database clock, as an aware UTC datetime."""
        raise NotImplementedError

    def open_transactions(self, conn: sa.Connection) -> list[tuple[str, dt.datetime | None]]:
        """Other sessions' open transactions in this database: (description, start time UTC)."""
        return []

    def timestamp_holds(self, conn: sa.Connection) -> list[tuple[str, dt.datetime | None]]:
        """What may still commit a row whose timestamp is already in the past: (who, since when).

        Defaults to :meth:`open_transactions`; engines whose statements take their timestamp
        before their transaction becomes visible add running statements.
        """
        return self.open_transactions(conn)

    def rowversion_horizon(self, conn: sa.Connection) -> int:
        raise SourceError("rowversion watermarks exist only on SQL Server")

    def bind_timestamp(self, kind: TimestampKind, value: dt.datetime) -> sa.BindParameter | Any:
        return sa.literal(kind.to_column_value(value), type_=sa.DateTime(timezone=kind.timezone_aware))

    def bind_rowversion(self, value: int) -> Any:
        return sa.literal(int(value).to_bytes(8, "big"), type_=sa.LargeBinary)

    def is_timezone_aware(self, sa_type: sa.types.TypeEngine) -> bool:
        """Whether a column holds instants (its values mean one UTC time whatever the session zone)."""
        return is_timezone_aware(sa_type)

    def arrow_type(self, sa_type: sa.types.TypeEngine) -> pa.DataType:
        t = arrow_type(sa_type)
        if pa.types.is_timestamp(t) and t.tz is None and self.is_timezone_aware(sa_type):
            return pa.timestamp(t.unit, tz="UTC")
        return t

    def fractional_digits(self, sa_type: sa.types.TypeEngine) -> int:
        """The fractional second digits a timestamp column holds (its declared precision, else 6)."""
        if type(sa_type).__name__.upper() == "SMALLDATETIME":
            return 0
        precision = getattr(sa_type, "precision", None)
        return min(precision, 6) if isinstance(precision, int) else 6

    def watermark_kind(self, column: sa.Column, column_timezone: str) -> WatermarkKind | None:
        t = base_type(column.type)
        if type(t).__name__.upper() in {"ROWVERSION", "TIMESTAMP"} and not isinstance(t, sa.DateTime):
            return RowversionKind()
        if isinstance(t, sa.DateTime) or type(t).__name__.upper() == "DATETIMEOFFSET":
            return TimestampKind(timezone_aware=self.is_timezone_aware(t), column_timezone=column_timezone,
                                 fractional_digits=self.fractional_digits(t))
        if isinstance(t, sa.Integer) or (isinstance(t, sa.Numeric) and t.scale == 0):
            return IntegerKind()
        return None

    def refine_table(self, conn: sa.Connection, table: sa.Table) -> None:
        """Complete what reflection left out of ``table``'s column types (a domain's numeric
        precision, an array's declared dimensions, a geometry column...); nothing by default."""

    def refine_tables(self, conn: sa.Connection, tables: Sequence[sa.Table]) -> None:
        """:meth:`refine_table` for many tables (engines that can do it in one statement do)."""
        for table in tables:
            self.refine_table(conn, table)

    def estimate_rows(self, conn: sa.Connection, source: Source, info: TableInfo, lo: Any, hi: Any) -> float | None:
        """How many rows of ``info``'s table lie in ``[lo, hi)`` (the whole table when both are
        None; :meth:`Source.select_rows` selects them), by the engine's statistics or an index,
        without reading the table (None: unknown)."""
        return None

    def missing_privileges(self, conn: sa.Connection) -> str | None:
        """What the source user lacks to see other sessions' transactions (which the safe horizon
        needs), with the statement that grants it; None when nothing is missing or the engine
        needs nothing."""
        return None

    def one_ordered_read(self, source: Source, select: sa.Select, column: str) -> RunRead | None:
        """How one read of ``select`` (a range of windows in the order of the watermark
        ``column``, which has an index) would serve the windows better than a read of each;
        None: a read per window. Unknown here: None."""
        return None

    #: rows fetched and converted at a time by the generic path
    FETCH_BLOCK = 10_000

    def result_column(self, column: sa.Column) -> sa.ColumnElement:
        """How a column is selected; engines whose drivers mangle a type read it as text instead."""
        return column

    def read_batches(self, source: Source, select: sa.Select, schema: pa.Schema, batch_size: int) -> Iterator[pa.RecordBatch]:
        """Stream a SELECT as Arrow batches in bounded memory (the generic path: SQLAlchemy rows)."""
        converters = [column_converter(f.type) for f in schema]
        # rows as Python objects take about ten times their Arrow size: they are fetched and
        # converted a block at a time, and the blocks of a batch joined in Arrow
        block = max(1, min(batch_size, self.FETCH_BLOCK))
        with source.connect() as conn:
            result = conn.execution_options(stream_results=True, max_row_buffer=block).execute(select)
            blocks, count = [], 0
            while rows := result.fetchmany(min(block, batch_size - count)):
                blocks.append(rows_to_batch(rows, schema, converters))
                count += len(rows)
                if count == batch_size:
                    yield _joined(blocks, schema)
                    blocks, count = [], 0
            if blocks:
                yield _joined(blocks, schema)


def _type_name(sa_type: sa.types.TypeEngine) -> str:
    try:
        return str(sa_type)
    except Exception:  # noqa: BLE001 - a type without a compiler of its own
        return type(sa_type).__name__


def _joined(batches: list[pa.RecordBatch], schema: pa.Schema) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches, schema=schema).combine_chunks().to_batches()[0]


def dialect_for(engine_name: str) -> EngineDialect:
    from . import mssql, mysql, postgresql, sqlite  # noqa: F401  (registration by import)

    try:
        return _DIALECTS[engine_name]()
    except KeyError:
        raise SourceError(f"unsupported database engine {engine_name!r}: use sqlite, postgresql, mysql or mssql") from None


_DIALECTS: dict[str, type[EngineDialect]] = {}


def register(*names: str):
    def wrap(cls: type[EngineDialect]) -> type[EngineDialect]:
        for name in names:
            _DIALECTS[name] = cls
        return cls

    return wrap


class Source:
    """One configured source database."""

    def __init__(self, name: str, url: str, *, retries: int = 3, retry_delay: float = 1.0, horizon_wait: float = 30.0):
        parsed = self._setup(name, url, retries=retries, retry_delay=retry_delay, horizon_wait=horizon_wait)
        try:
            # pre-ping: a pooled connection the server ended while it sat idle (a restart, a
            # failover, an idle timeout) is replaced at checkout instead of failing a statement
            self.engine = sa.create_engine(parsed, pool_pre_ping=True, **self.dialect.engine_kwargs)
        except Exception as exc:  # missing driver, bad options
            raise SourceError(f"source {name!r} ({self.redacted_url}): {scrub(str(exc), url)}") from None

    def _setup(self, name: str, url: str, *, retries: int, retry_delay: float, horizon_wait: float) -> sa.URL:
        self.name = name
        self.url = url
        self.redacted_url = redact_url(url)
        self.retries = retries
        self.retry_delay = retry_delay
        self.horizon_wait = horizon_wait
        try:
            parsed = make_url(url)
        except Exception:
            raise SourceError(f"source {name!r}: not a SQLAlchemy URL: {self.redacted_url}") from None
        self.dialect = dialect_for(parsed.get_backend_name())
        return parsed

    @classmethod
    def offline(cls, name: str, url: str, **options: Any) -> Source:
        """A source that only builds SQL (no driver loaded, no engine, never connects).

        With :meth:`table_info` it yields the exact statements a real source would run, e.g. to
        check generated SQL for engines that cannot run here.
        """
        self = cls.__new__(cls)
        self._setup(name, url, retries=options.get("retries", 0), retry_delay=options.get("retry_delay", 0.0),
                    horizon_wait=options.get("horizon_wait", 0.0))
        self.engine = None
        return self

    def __repr__(self) -> str:
        return f"Source({self.name!r}, {self.redacted_url!r})"

    # -- connections -----------------------------------------------------------------------
    def connect(self) -> sa.Connection:
        """Connect, retrying with exponential backoff; fail naming the source, never the password."""
        if self.engine is None:
            raise SourceError(f"source {self.name!r} ({self.redacted_url}) was built offline and cannot connect")
        return self.retrying(self.engine.connect, sa.exc.OperationalError, lambda exc: str(exc.orig))

    def retrying(self, attempt: Callable[[], T], transient, describe: Callable[[Any], str] = str) -> T:
        """``attempt()``, retried with exponential backoff on ``transient`` errors, then
        SourceUnavailable naming the source and never the password. A refused login fails at
        once (SourceAuthenticationFailed): retrying the same credentials cannot succeed."""
        delay = self.retry_delay
        for number in range(self.retries + 1):
            try:
                return attempt()
            except transient as exc:
                if is_authentication_failure(exc):
                    raise SourceAuthenticationFailed(
                        f"source {self.name!r} ({self.redacted_url}): authentication failed, check the user "
                        f"and the password its URL takes from the environment: {scrub(describe(exc), self.url).strip()}"
                    ) from None
                if number == self.retries:
                    raise SourceUnavailable(
                        f"source {self.name!r} ({self.redacted_url}) is unreachable after {self.retries + 1} attempts: "
                        f"{scrub(describe(exc), self.url).strip()}"
                    ) from None
                log.warning("source %r unreachable (attempt %d), retrying in %.1fs", self.name, number + 1, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
        self.dialect.dispose()

    # -- reflection ------------------------------------------------------------------------
    def describe_table(
        self,
        table: str,
        *,
        watermark_column: str | None = None,
        columns: Sequence[str] | None = None,
        column_timezone: str = "UTC",
        primary_key: Sequence[str] | None = None,
    ) -> TableInfo:
        try:
            ref = TableRef.parse(table)
        except ValueError as exc:
            raise SourceError(f"source {self.name!r}: {exc}") from None
        with self.connect() as conn:
            try:
                sa_table = sa.Table(ref.name, sa.MetaData(), schema=ref.sa_schema, autoload_with=conn)
            except sa.exc.NoSuchTableError:
                # the engine folded an unquoted name's case (PostgreSQL: lower): accept a unique match
                try:
                    inspector = sa.inspect(conn)
                    known = inspector.get_table_names(schema=ref.sa_schema) + inspector.get_view_names(schema=ref.sa_schema)
                except sa.exc.DBAPIError:  # e.g. an unknown schema
                    known = []
                same = [n for n in known if n.lower() == ref.name.lower()]
                if len(same) != 1:
                    raise SourceError(f"table {str(ref)!r} not found in source {self.name!r} ({self.redacted_url})") from None
                ref = TableRef(ref.schema, same[0])
                sa_table = sa.Table(ref.name, sa.MetaData(), schema=ref.sa_schema, autoload_with=conn)
            indexes: list = list(sa.inspect(conn).get_indexes(ref.name, schema=ref.sa_schema))
            sa_table, indexes = self.dialect.reflected(conn, sa_table, indexes)
            self.dialect.refine_table(conn, sa_table)
        return self.table_info(
            sa_table,
            watermark_column=watermark_column,
            columns=columns,
            column_timezone=column_timezone,
            primary_key=primary_key,
            indexes=indexes,
            ref=ref,
        )

    def describe_tables(self, specs: Mapping[str, Mapping[str, Any]]) -> dict[str, TableInfo | SourceError]:
        """:meth:`describe_table` for many tables at once: ``specs`` maps a name of the caller's
        to the keyword arguments of :meth:`describe_table` (``table`` included). The tables of a
        schema are reflected together (``MetaData.reflect`` reads the catalog in a few statements
        on engines that can, PostgreSQL's among them), so a source of hundreds of tables is
        described in about the time of a few. Each table's answer is its :class:`TableInfo` or
        the :class:`SourceError` describing it alone would raise; a table the batch cannot find
        as named is described alone (which resolves a name whose case the engine folded)."""
        out: dict[str, TableInfo | SourceError] = {}
        by_schema: dict[str | None, list[tuple[str, TableRef, Mapping[str, Any]]]] = {}
        for name, spec in specs.items():
            try:
                ref = TableRef.parse(spec["table"])
            except ValueError as exc:
                out[name] = SourceError(f"source {self.name!r}: {exc}")
                continue
            by_schema.setdefault(ref.sa_schema, []).append((name, ref, spec))
        alone: list[tuple[str, Mapping[str, Any]]] = []
        with self.connect() as conn:
            inspector = sa.inspect(conn)
            for schema, items in by_schema.items():
                if len(items) < 2:
                    alone += [(name, spec) for name, _, spec in items]
                    continue
                try:
                    known = set(inspector.get_table_names(schema=schema)) | set(inspector.get_view_names(schema=schema))
                    present = sorted({ref.name for _, ref, _ in items if ref.name in known})
                    metadata = sa.MetaData()
                    if present:
                        metadata.reflect(conn, schema=schema, only=present, views=True, resolve_fks=False)
                    indexes = inspector.get_multi_indexes(schema=schema, filter_names=present, kind=sa.engine.ObjectKind.ANY) if present else {}
                except sa.exc.DBAPIError:
                    conn.rollback()
                    alone += [(name, spec) for name, _, spec in items]
                    continue
                found: dict[str, tuple[sa.Table, list[dict]]] = {}
                for ref_name in present:
                    sa_table = metadata.tables.get(ref_name if schema is None else f"{schema}.{ref_name}")
                    if sa_table is not None:
                        found[ref_name] = self.dialect.reflected(
                            conn, sa_table, [dict(ix) for ix in indexes.get((schema, ref_name), [])])
                self.dialect.refine_tables(conn, [t for t, _ in found.values()])
                for name, ref, spec in items:
                    if ref.name not in found:
                        alone.append((name, spec))
                        continue
                    sa_table, table_indexes = found[ref.name]
                    kwargs = {k: v for k, v in spec.items() if k != "table"}
                    try:
                        out[name] = self.table_info(sa_table, indexes=table_indexes, ref=ref, **kwargs)
                    except SourceError as exc:
                        out[name] = exc
        for name, spec in alone:
            kwargs = {k: v for k, v in spec.items() if k != "table"}
            try:
                out[name] = self.describe_table(spec["table"], **kwargs)
            except SourceError as exc:
                out[name] = exc
        return out

    def table_info(
        self,
        sa_table: sa.Table,
        *,
        watermark_column: str | None = None,
        columns: Sequence[str] | None = None,
        column_timezone: str = "UTC",
        primary_key: Sequence[str] | None = None,
        indexes: Sequence[Mapping[str, Any]] = (),
        ref: TableRef | None = None,
    ) -> TableInfo:
        """A :class:`TableInfo` for an already reflected (or hand-built) table; no database access.

        ``indexes`` are as ``Inspector.get_indexes`` returns them (used for ``watermark_indexed``).
        """
        ref = ref or TableRef(sa_table.schema, sa_table.name)
        names = [c.name for c in sa_table.columns]

        def resolve(name: str) -> str:
            """The column's real name; a unique case-insensitive match stands in for a folded name."""
            if name in names:
                return name
            same = [n for n in names if n.lower() == name.lower()]
            return same[0] if len(same) == 1 else name

        columns = [resolve(c) for c in columns] if columns else columns
        primary_key = [resolve(c) for c in primary_key] if primary_key else primary_key
        watermark_column = resolve(watermark_column) if watermark_column is not None else None
        if columns:
            missing = [c for c in columns if c not in names]
            if missing:
                raise SourceError(f"table {str(ref)!r} in source {self.name!r} has no column(s) {missing}; it has {names}")
            selected = list(dict.fromkeys(columns))
            if watermark_column and watermark_column not in selected:
                selected.append(watermark_column)
        else:
            selected = names
        keys = list(primary_key or [c.name for c in sa_table.primary_key.columns])
        missing_keys = [k for k in keys if k not in names]
        if missing_keys:
            raise SourceError(f"table {str(ref)!r} in source {self.name!r} has no primary key column(s) {missing_keys}")
        if watermark_column is not None and watermark_column not in names:
            raise SourceError(
                f"table {str(ref)!r} in source {self.name!r} has no watermark column {watermark_column!r}; it has {names}"
            )
        for c in selected:
            sa_type = sa_table.c[c].type
            if isinstance(sa_type, sa.Float) and sa_type.asdecimal:
                # MySQL's DOUBLE and REAL reflect so: SQLAlchemy would round every value to a
                # Decimal of 10 places; the column lands as float64, the driver's value as it is
                sa_type.asdecimal = False
        schema = pa.schema([pa.field(c, self.dialect.arrow_type(sa_table.c[c].type)) for c in selected])
        for f in schema:
            fallback = text_fallback(sa_table.c[f.name].type, f.type)
            if fallback:
                log.info(
                    "source %r, table %s: column %r (%s) lands as %s: no exact Arrow type for it",
                    self.name, ref, f.name, _type_name(sa_table.c[f.name].type), fallback,
                )
        info = TableInfo(ref=ref, table=sa_table, columns=selected, schema=schema, primary_key=keys)
        if watermark_column is not None:
            column = sa_table.c[watermark_column]
            kind = self.dialect.watermark_kind(column, column_timezone)
            if kind is None:
                raise SourceError(
                    f"watermark column {watermark_column!r} of table {str(ref)!r} has type {column.type}, "
                    "which cannot be a watermark: use a timestamp, an integer or a rowversion column"
                )
            info.watermark_column = watermark_column
            info.kind = kind
            leading = {ix["column_names"][0] for ix in indexes if ix.get("column_names")}
            pk_cols = [c.name for c in sa_table.primary_key.columns]
            info.watermark_indexed = watermark_column in leading or (pk_cols[:1] == [watermark_column])
        return info

    # -- horizons --------------------------------------------------------------------------
    def _bind(self, info: TableInfo, value: Any) -> Any:
        kind = info.kind
        if isinstance(kind, TimestampKind):
            return self.dialect.bind_timestamp(kind, value)
        if isinstance(kind, RowversionKind):
            return self.dialect.bind_rowversion(value)
        return sa.literal(int(value), type_=sa.BigInteger)

    def safe_horizon(self, info: TableInfo, *, lag: dt.timedelta = dt.timedelta(0)) -> Horizon:
        """The exclusive upper bound of the next slice: no later commit can land below it.

        Timestamps: the database clock (read first), held back to the oldest start among what may
        still commit an earlier timestamp (:meth:`EngineDialect.timestamp_holds`: open
        transactions, and on some engines running statements), minus the engine's
        ``clock_margin``, floored to whole seconds, minus ``lag`` for clocks outside the database.
        Anything open since an unknown time gives ``Horizon(None)``: no progress, never a guess.
        Integers: ``MAX + 1`` once every transaction that was open when MAX was read has ended
        (ids are handed out before commit). Rowversions: ``MIN_ACTIVE_ROWVERSION()``.
        """
        kind = info.kind
        if isinstance(kind, RowversionKind):
            with self.connect() as conn:
                return Horizon(self.dialect.rowversion_horizon(conn), "MIN_ACTIVE_ROWVERSION()")
        if isinstance(kind, TimestampKind):
            return self.timestamp_horizon(lag=lag)
        return self._integer_horizon(info)

    def timestamp_horizon(self, *, lag: dt.timedelta = dt.timedelta(0)) -> Horizon:
        """The safe horizon of every timestamp watermark of this source (see :meth:`safe_horizon`):
        it depends on the database's clock and open transactions, not on the table, so one
        reading serves all of a source's tables (each subtracting its own ``lag``)."""
        with self.connect() as conn:
            now = self.dialect.db_now(conn)  # first: whatever starts after this is later than it
            holds = self.dialect.timestamp_holds(conn)
        horizon, note, held = now, "database clock", False
        unknown = [who for who, start in holds if start is None]
        if unknown:
            return Horizon(None, f"held back: {unknown[0]} open since an unknown time", held_back=True)
        if holds:
            who, oldest = min(holds, key=lambda s: s[1])
            if oldest < horizon:
                horizon, note, held = oldest, f"held back by {who} open since {oldest.isoformat()}", True
        margin = self.dialect.clock_margin
        if margin:
            horizon -= margin
            note += f", minus margin {margin}"
        horizon = horizon.replace(microsecond=0) - lag
        if lag:
            note += f", minus lag {lag}"
        return Horizon(horizon, note, held_back=held)

    def _integer_horizon(self, info: TableInfo) -> Horizon:
        col = info.table.c[info.watermark_column]
        deadline = time.monotonic() + self.horizon_wait
        with self.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            top = conn.execute(sa.select(sa.func.max(col))).scalar()
            read_at = self.dialect.db_now(conn)
            while True:
                blocking = [(w, s) for w, s in self.dialect.open_transactions(conn) if s is None or s <= read_at]
                if not blocking:
                    break
                if time.monotonic() > deadline:
                    who = ", ".join(w for w, _ in blocking[:3])
                    return Horizon(
                        None, f"held back: transaction(s) {who} open since before MAX({info.watermark_column}) was read",
                        held_back=True,
                    )
                time.sleep(0.2)
        if top is None:
            return Horizon(None, "table is empty")
        return Horizon(int(top) + 1, f"MAX({info.watermark_column}) + 1, no older transaction open")

    # -- reads -----------------------------------------------------------------------------
    def range_filter(self, info: TableInfo, lo: Any, hi: Any) -> list:
        col = info.table.c[info.watermark_column]
        clauses = []
        if lo is not None:
            clauses.append(col >= self._bind(info, lo))
        if hi is not None:
            clauses.append(col < self._bind(info, hi))
        if not clauses:
            clauses.append(col.is_not(None))
        return clauses

    def select_slice(
        self, info: TableInfo, lo: Any, hi: Any, *, ordered: bool = False, storage_order: bool = False
    ) -> sa.Select:
        query = sa.select(*self._result_columns(info)).where(*self.range_filter(info, lo, hi))
        if storage_order:
            return query.execution_options(**{STORAGE_ORDER_OPTION: True})
        if not ordered:
            return query
        return query.order_by(info.table.c[info.watermark_column]).execution_options(**{ORDER_OPTION: info.watermark_column})

    def _result_columns(self, info: TableInfo) -> list:
        return [self.dialect.result_column(info.table.c[c]).label(c) for c in info.columns]

    def read_slice(
        self, info: TableInfo, lo: Any, hi: Any, *, batch_size: int = 100_000, ordered: bool = False,
        storage_order: bool = False,
    ) -> Iterator[pa.RecordBatch]:
        """Rows with ``lo <= watermark < hi`` (either bound may be open) as Arrow batches; with
        ``ordered``, in watermark order (see :meth:`EngineDialect.splits_ordered_reads`); with
        ``storage_order``, in the order the table stores them (see :class:`RunRead`)."""
        select = self.select_slice(info, lo, hi, ordered=ordered, storage_order=storage_order)
        return self.dialect.read_batches(self, select, info.schema, batch_size)

    def one_ordered_read(self, info: TableInfo, lo: Any, hi: Any) -> RunRead | None:
        """How one read of ``[lo, hi)`` in watermark order would serve its windows better than a
        read each (the watermark has an index), or None (see :meth:`EngineDialect.one_ordered_read`)."""
        return self.dialect.one_ordered_read(self, self.select_slice(info, lo, hi, ordered=True), info.watermark_column)

    def select_stats(self, info: TableInfo, lo: Any, hi: Any) -> sa.Select:
        col = self.dialect.result_column(info.table.c[info.watermark_column])
        return sa.select(sa.func.count(), sa.func.min(col), sa.func.max(col)).where(*self.range_filter(info, lo, hi))

    def select_any(self, info: TableInfo, lo: Any, hi: Any) -> sa.Select:
        return sa.select(sa.literal_column("1")).select_from(info.table).where(*self.range_filter(info, lo, hi)).limit(1)

    def slice_stats(self, info: TableInfo, lo: Any, hi: Any) -> tuple[int, Any, Any]:
        """Row count, min and max watermark in ``[lo, hi)``: cheap with an index on the watermark."""
        with self.connect() as conn:
            count, low, high = conn.execute(self.select_stats(info, lo, hi)).one()
        kind = info.kind
        return int(count), (None if low is None else kind.from_db(low)), (None if high is None else kind.from_db(high))

    def select_first(self, info: TableInfo, lo: Any, hi: Any) -> sa.Select:
        """The lowest watermark in ``[lo, hi)``: with an index on the watermark, one probe of the
        index wherever the rows lie. (``EXISTS`` leaves the plan to row estimates: a window the
        statistics say holds many rows is read in table order until a row matches, which is a
        scan of most of the table when the window's rows are stored last.)"""
        return sa.select(sa.func.min(info.table.c[info.watermark_column])).where(*self.range_filter(info, lo, hi))

    def has_rows(self, info: TableInfo, lo: Any, hi: Any) -> bool:
        """Whether ``[lo, hi)`` holds a row: the lowest watermark's index probe, or, without an
        index, the first matching row of a scan."""
        with self.connect() as conn:
            if info.watermark_indexed:
                return conn.execute(self.select_first(info, lo, hi)).scalar() is not None
            return conn.execute(self.select_any(info, lo, hi)).first() is not None

    #: windows asked about per statement by :meth:`windows_with_rows` (two bound values each)
    WINDOWS_PER_PROBE = 100

    def windows_with_rows(self, info: TableInfo, bounds: Sequence[tuple[Any, Any]]) -> list[bool]:
        """For each ``[lo, hi)`` of ``bounds``, whether it holds a row, a hundred windows per
        statement (a year of daily windows is four round trips): an index probe per window
        (:meth:`select_first`), or, without an index, an ``EXISTS`` that stops at the first row."""
        flags: list[bool] = []
        with self.connect() as conn:
            for start in range(0, len(bounds), self.WINDOWS_PER_PROBE):
                query = self.select_windows_with_rows(info, bounds[start:start + self.WINDOWS_PER_PROBE])
                flags.extend(bool(v) for v in conn.execute(query).one())
        return flags

    def select_windows_with_rows(self, info: TableInfo, bounds: Sequence[tuple[Any, Any]]) -> sa.Select:
        """One row, a 1 or 0 per window: ``CASE WHEN (SELECT MIN(...)) IS NOT NULL THEN 1 ELSE 0
        END`` with an index, ``CASE WHEN EXISTS (...) ...`` without (both taken in a select list
        by every engine, SQL Server included)."""
        def probe(lo, hi):
            if info.watermark_indexed:
                return self.select_first(info, lo, hi).scalar_subquery().is_not(None)
            return self.select_any(info, lo, hi).exists()

        return sa.select(*(sa.case((probe(lo, hi), 1), else_=0).label(f"w{k}") for k, (lo, hi) in enumerate(bounds)))

    def _aggregate(self, info: TableInfo, func, lo: Any, hi: Any) -> Any:
        col = self.dialect.result_column(info.table.c[info.watermark_column])
        query = sa.select(func(col))
        if lo is not None or hi is not None:
            query = query.where(*self.range_filter(info, lo, hi))
        with self.connect() as conn:
            value = conn.execute(query).scalar()
        return None if value is None else info.kind.from_db(value)

    def watermark_range(self, info: TableInfo, lo: Any = None, hi: Any = None) -> tuple[Any, Any]:
        """The lowest and highest watermark in ``[lo, hi)`` ((None, None) when it holds no row):
        two index probes, or, without an index on the watermark, one scan for both."""
        col = self.dialect.result_column(info.table.c[info.watermark_column])
        where = self.range_filter(info, lo, hi)
        if info.watermark_indexed:  # one statement asking both would scan the range on SQLite
            queries: list[sa.Select[Any]] = [sa.select(sa.func.min(col)).where(*where), sa.select(sa.func.max(col)).where(*where)]
        else:
            queries = [sa.select(sa.func.min(col), sa.func.max(col)).where(*where)]
        with self.connect() as conn:
            values = [v for query in queries for v in conn.execute(query).one()]
        return tuple(None if v is None else info.kind.from_db(v) for v in values)

    #: tables asked about per statement by :meth:`ranges` (two scalar subqueries each)
    TABLES_PER_PROBE = 50

    def ranges(self, probes: Sequence[tuple[TableInfo, Any, Any]]) -> list[tuple[Any, Any]]:
        """:meth:`watermark_range` of many tables at once: for each ``(info, lo, hi)``, the lowest
        and highest watermark in ``[lo, hi)``, ``TABLES_PER_PROBE`` tables per statement over one
        connection (with an index on each watermark, two index probes per table), so a sensor
        asks about hundreds of tables in a few round trips."""
        out: list[tuple[Any, Any]] = []
        with self.connect() as conn:
            for start in range(0, len(probes), self.TABLES_PER_PROBE):
                chunk = probes[start:start + self.TABLES_PER_PROBE]
                columns = []
                for k, (info, lo, hi) in enumerate(chunk):
                    col = self.dialect.result_column(info.table.c[info.watermark_column])
                    where = self.range_filter(info, lo, hi)
                    columns.append(sa.select(sa.func.min(col)).where(*where).scalar_subquery().label(f"l{k}"))
                    columns.append(sa.select(sa.func.max(col)).where(*where).scalar_subquery().label(f"h{k}"))
                row = conn.execute(sa.select(*columns)).one()
                for k, (info, _, _) in enumerate(chunk):
                    low, high = row[2 * k], row[2 * k + 1]
                    out.append((None if low is None else info.kind.from_db(low),
                                None if high is None else info.kind.from_db(high)))
        return out

    def max_watermark(self, info: TableInfo, lo: Any = None, hi: Any = None) -> Any:
        """The highest watermark in ``[lo, hi)`` (the whole table by default); NULLs are ignored."""
        return self._aggregate(info, sa.func.max, lo, hi)

    def null_watermark_count(self, info: TableInfo) -> int:
        col = info.table.c[info.watermark_column]
        query = sa.select(sa.func.count()).select_from(info.table).where(col.is_(None))
        with self.connect() as conn:
            return int(conn.execute(query).scalar())

    def estimate_rows(self, info: TableInfo, lo: Any = None, hi: Any = None) -> int | None:
        """The rows of ``[lo, hi)`` (the whole table when both are None), estimated from the
        engine's statistics (:meth:`EngineDialect.estimate_rows`), never by reading the rows; None
        when the engine cannot tell or the question fails (an estimate never fails a copy)."""
        if info.watermark_column is None:
            lo = hi = None
        try:
            with self.connect() as conn:
                rows = self.dialect.estimate_rows(conn, self, info, lo, hi)
        except Exception as exc:  # noqa: BLE001 - an estimate is optional
            log.debug("source %r: no row estimate for %s: %s", self.name, info.ref, scrub(str(exc), self.url))
            return None
        return None if rows is None else max(0, int(round(rows)))

    def select_rows(self, info: TableInfo, lo: Any = None, hi: Any = None) -> sa.Select:
        """``SELECT 1 FROM <table> [WHERE lo <= watermark < hi]``: what an estimate is asked of."""
        query: sa.Select[Any] = sa.select(sa.literal_column("1")).select_from(info.table)
        if lo is not None or hi is not None:
            query = query.where(*self.range_filter(info, lo, hi))
        return query

    def missing_index_note(self, info: TableInfo, *, table: str | None = None, column: str | None = None) -> str:
        """What to tell the user when no index leads with the watermark column ("" when one does),
        with the statement that creates one; ``table`` and ``column`` as the configuration names them."""
        if info.watermark_column is None or info.watermark_indexed:
            return ""
        return (
            f"no index leads with {column or info.watermark_column!r} on {table or str(info.ref)!r}: every incremental "
            f"read scans the table (a run of several windows reads them in one sorted scan). Create one, e.g. "
            f"{self.create_index_sql(info)}"
        )

    def create_index_sql(self, info: TableInfo) -> str:
        """The statement that creates an index on the watermark column, every name quoted by the
        engine's own rules (for the user to run; nothing here runs it)."""
        column = info.table.c[info.watermark_column]
        name = f"ix_{info.table.name}_{info.watermark_column}"[:60]
        dialect = self.engine.dialect if self.engine is not None else None
        return str(sa.schema.CreateIndex(sa.Index(name, column)).compile(dialect=dialect)).strip()

    def select_nulls(self, info: TableInfo) -> sa.Select:
        return sa.select(*self._result_columns(info)).where(info.table.c[info.watermark_column].is_(None))
