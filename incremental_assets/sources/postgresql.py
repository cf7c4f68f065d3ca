"""PostgreSQL: the horizon is held back to the oldest open transaction in the database.

Open transactions are found through ``pg_locks`` (every transaction holds an exclusive lock on its
own virtual transaction id, and ``pg_locks`` is readable by every role) joined to
``pg_stat_activity`` for their start. ``pg_stat_activity`` hides the start, and even the database,
of other roles' sessions unless the source user has ``pg_read_all_stats``: such a transaction has
an unknown start and stops the horizon (safe) instead of being silently ignored. Prepared (2PC)
transactions are listed from ``pg_prepared_xacts``; their start is unknown too.

Reads (:meth:`PostgreSQLDialect.read_batches`) take a columnar fast path through ADBC
(``adbc_driver_postgresql``), which streams a query's result through ``COPY ... TO STDOUT (FORMAT
binary)`` and decodes it into Arrow in C. ``COPY`` takes no parameters, and ADBC loads the whole
result of a parameterised query into memory, so the slice's bounds are bound parameters of a
``set_config`` call instead (``SELECT set_config('incremental_assets.p1', CAST($1 AS text), true)``,
transaction-local) and the SELECT reads them back with ``CAST(current_setting(...) AS <type>)``:
values are never formatted into SQL. The planner estimates with those values (stable functions
are folded for estimation), so the plan is the one the real bounds deserve; where that plan is a
sequential scan, the bounds are wrapped in scalar subqueries (evaluated once, not per row) and
index scans are disabled for that statement so the plan stays a sequential scan. ``real`` columns
are selected as text (the generic path parses the server's text too; see :func:`as_text`). A
background thread reads and converts the next batch while the caller writes the previous one, so
memory holds a few batches of at most ``batch_size`` rows (and about ``batch_bytes``), whatever
the size of the slice. Every column is converted to exactly the Arrow type and values the generic
SQLAlchemy path produces (``info.schema``), chosen by the column's PostgreSQL type: the driver's
field metadata where it has some (newer drivers than the 1.8 the project pins), else the
catalog's, read in the slice's own transaction. A column whose type has no exact conversion here
(money, arrays of ``real``, ...) sends the whole read down the generic path, and says so in the
log.

Types (both paths alike, see :meth:`PostgreSQLDialect.result_column`): a domain is read as its
base type; a one-dimensional array as an Arrow list of its element's type (NULL elements kept);
an array declared with more dimensions (``integer[][]``) as JSON text (``array_to_json``); a
value of more than one dimension in a column declared with one fails the read naming the column
(ADBC would flatten it); an enum as its label; ``interval`` as ISO 8601 text with every field
(``P0Y1M2DT3H4M5.000006S``: exact, months and days kept apart, read back by PostgreSQL);
``json``/``jsonb`` as the server's text (``2.50`` stays ``2.50``); ``tsvector``, ranges,
composite and unknown types as the server's text, named in the log.
"""

from __future__ import annotations

import array
import datetime as dt
import decimal
import json
import logging
import queue
import re
import struct
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlencode

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.visitors import replacement_traverse

from .base import ORDER_OPTION, STORAGE_ORDER_OPTION, EngineDialect, Explain, RunRead, register
from .types import _to_text, arrow_type, base_type, text_fallback

if TYPE_CHECKING:
    from .base import Source, TableInfo

log = logging.getLogger("incremental_assets")
T = TypeVar("T")

HIDDEN = "(start hidden: GRANT pg_read_all_stats TO the source user)"

OPEN_TRANSACTIONS = sa.text(
    "SELECT 'transaction of pid ' || l.pid::text "
    f"|| CASE WHEN a.xact_start IS NULL THEN ' {HIDDEN}' ELSE '' END, a.xact_start "
    "FROM pg_locks AS l LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid "
    "WHERE l.locktype = 'virtualxid' AND l.mode = 'ExclusiveLock' AND l.granted "
    "AND l.pid <> pg_backend_pid() "
    "AND (a.datname = current_database() OR (a.datname IS NULL AND a.xact_start IS NULL)) "
    "AND a.backend_type IS DISTINCT FROM 'autovacuum worker' "
    "UNION ALL "
    "SELECT 'prepared transaction ' || quote_literal(gid), NULL "
    "FROM pg_prepared_xacts WHERE database = current_database()"
)


@register("postgresql")
class PostgreSQLDialect(EngineDialect):
    # now() is the transaction's start, stamped a few microseconds before the backend reports it
    clock_margin = dt.timedelta(milliseconds=100)
    #: read slices through ADBC when every column converts exactly (else SQLAlchemy rows)
    fast_path: bool = True
    #: batches a reading thread decodes ahead of the consumer (0: no thread). The thread lets
    #: decoding overlap Parquet encoding: measured on 2 cores with the database on the same
    #: host, 2M rows in three windows landed in 1.18 s instead of 1.27 s, for about 10 MB more
    prefetch: int = 1
    #: ADBC's batch size hint: bytes of COPY data per Arrow batch it decodes
    batch_bytes: int = 2 * 1024 * 1024

    def db_now(self, conn: sa.Connection) -> dt.datetime:
        # clock_timestamp(), not now(): now() is frozen at our own transaction's start
        return conn.execute(sa.text("SELECT clock_timestamp()")).scalar().astimezone(dt.timezone.utc)

    def open_transactions(self, conn: sa.Connection):
        return [
            (who, None if start is None else start.astimezone(dt.timezone.utc))
            for who, start in conn.execute(OPEN_TRANSACTIONS)
        ]

    # -- types -----------------------------------------------------------------------------
    def refine_table(self, conn: sa.Connection, table: sa.Table) -> None:
        """A domain over ``numeric(p,s)`` keeps its precision and scale (reflection drops them),
        and an array column its declared dimensions."""
        quote = _compile_dialect().identifier_preparer.quote_identifier  # quotes, never doubles '%'
        relation = ".".join(quote(p) for p in (table.schema, table.name) if p)
        for name, ndims, base in conn.execute(REFINE, {"relation": relation}):
            if name not in table.c:
                continue
            column = table.c[name]
            match = _NUMERIC.fullmatch(base or "")
            if match and type(column.type).__name__.upper() == "DOMAIN" and isinstance(column.type.data_type, sa.Numeric):
                column.type.data_type = sa.Numeric(int(match[1]), int(match[2] or 0))
            if ndims and ndims > 1 and isinstance(column.type, sa.ARRAY) and not column.type.dimensions:
                column.type = type(column.type)(column.type.item_type, dimensions=ndims)

    def result_column(self, column: sa.Column) -> sa.ColumnElement:
        """How a column is selected: exact text from the server for what lands as text."""
        t = base_type(column.type)
        if type(t).__name__.upper() == "INTERVAL":
            return interval_iso(column)
        if isinstance(t, sa.ARRAY) and (t.dimensions or 1) > 1:
            return sa.cast(sa.func.array_to_json(column), sa.Text)
        if isinstance(t, sa.ARRAY):
            item = base_type(t.item_type)
            if isinstance(item, sa.JSON) or text_fallback(item, arrow_type(item)):
                return sa.cast(column, sa.ARRAY(sa.Text))  # each element as the server's text
            return column
        if isinstance(t, sa.JSON) or text_fallback(column.type, arrow_type(column.type)):
            # json/jsonb too: the driver would parse it, and the text written back would differ
            return sa.cast(column, sa.Text)
        return column

    # -- reads -----------------------------------------------------------------------------
    def read_batches(self, source: Source, select: sa.Select, schema: pa.Schema, batch_size: int) -> Iterator[pa.RecordBatch]:
        """Stream a SELECT as Arrow batches: ADBC (COPY binary), or the generic path when it cannot be exact."""
        reason = None
        if not self.fast_path or source.engine is None:
            reason = "disabled"
        else:
            try:
                import adbc_driver_postgresql  # noqa: F401

                query = slice_query(select)
                uri = libpq_uri(source.url)
            except NoFastPath as exc:
                reason = str(exc)
            except ImportError:
                reason = "adbc_driver_postgresql is not installed"
        if reason is None:
            reader = _CopyReader(self, source, uri, query, schema, batch_size)
            fallback = yield from reader.batches()
            if fallback is None:
                return
            reason = fallback
        log.info("source %r: reading through SQLAlchemy rows (the columnar path is not used: %s)", source.name, reason)
        yield from super().read_batches(source, select, schema, batch_size)

    #: bytes (the planner's estimate: rows times their width) up to which a run of windows of a
    #: table stored in another order than its watermark's is read as one scan the server sorts,
    #: rather than a read per window: the server's temporary files hold about that much
    SORTED_READ_MAX_BYTES = 1 << 30

    def estimate_rows(self, conn: sa.Connection, source: Source, info: TableInfo, lo: Any, hi: Any) -> float | None:
        """The planner's estimate (``EXPLAIN``: the statistics' histogram of the watermark, and
        ``pg_class.reltuples`` scaled to the table's current size); nothing is read."""
        plan = conn.execute(Explain("EXPLAIN (FORMAT JSON)", source.select_rows(info, lo, hi))).scalar()
        plan = json.loads(plan) if isinstance(plan, (str, bytes)) else plan
        rows = _plan_top(plan).get("Plan Rows")
        return float(rows) if isinstance(rows, (int, float)) else None

    def missing_privileges(self, conn: sa.Connection) -> str | None:
        ok = conn.execute(sa.text(
            "SELECT r.rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER') "
            "FROM pg_roles r WHERE r.rolname = current_user"
        )).scalar()
        if ok:
            return None
        user = conn.execute(sa.text("SELECT quote_ident(current_user)")).scalar()
        return (f"role {user} cannot see other roles' transactions in pg_stat_activity, so their start is unknown and "
                f"holds the horizon back: GRANT pg_read_all_stats TO {user};")

    def one_ordered_read(self, source: Source, select: sa.Select, column: str) -> RunRead | None:
        """One read in watermark order serves a run of windows better than a read per window:

        - the plan of the ordered read (EXPLAINed with its real bounds) sorts nothing and the
          table is stored about in the order of ``column`` (the planner's statistics): the index
          is read in order, the table about in storage order; or, where the windows are large
          (``copying.STORAGE_ORDER_WINDOW_ROWS``, by the estimate in ``RunRead.rows``), the table
          is read in storage order, without the index (``RunRead.storage_order``);
        - else, up to :data:`SORTED_READ_MAX_BYTES`, the server scans the range and sorts it
          (see :meth:`_CopyReader._statement`): an index read in order would fetch the rows page
          by page at random, and a read per window re-reads the same pages for every window
          (2M rows stored at random over a year, 366 daily windows: 4.5 s through the index in
          order, 6.8 s a window at a time, 1.4 s sorted).

        Asked on a connection of the fast path, left for the read that follows."""
        try:
            import adbc_driver_manager

            query = slice_query(select)
            uri = libpq_uri(source.url)
        except (NoFastPath, ImportError):
            return None
        if query.relation is None:
            return None

        def ask(conn):
            if query.settings is not None:
                _run_query(conn, query.settings, query.params)
            return _explain(conn, query.direct), _stored_in_order(conn, query.relation, column)

        try:
            conn, (plan, stored_in_order) = self.checkout(source, uri, ask)
        except adbc_driver_manager.Error:
            return None  # the read itself reports what is wrong
        self.adbc_release(uri, conn)
        if stored_in_order and not _plan_nodes(plan, _SORTS):
            return RunRead("in the order of its index", storage_order=True, rows=_plan_top(plan).get("Plan Rows"))
        size = _plan_bytes(plan)
        if size is not None and size <= self.SORTED_READ_MAX_BYTES:
            return RunRead("sorted on the server: the table is stored in another order")
        return None

    #: connections a finished read leaves for the next (a run of many small windows reads each in
    #: a slice of its own: a new connection costs the server a process and the read 3-5 ms)
    IDLE_MAX = 2
    #: an idle connection older than this is closed instead of used again
    IDLE_SECONDS = 60.0

    def adbc_connection(self, source: Source, uri: str):
        """A low-level ADBC connection in a transaction (autocommit off), retrying with backoff
        like :meth:`Source.connect`. The ADBC database (which loads the server's type catalogue
        once) is kept for the next reads of this source. ``adbc_driver_manager.dbapi`` is not
        used: it imports pandas (about 50 MB and 0.3 s) for nothing here."""
        import adbc_driver_manager
        import adbc_driver_postgresql

        def attempt():
            try:
                with self._adbc_lock:
                    if self._adbc_database is None or self._adbc_uri != uri:
                        self._adbc_database = adbc_driver_postgresql.connect(uri)
                        self._adbc_uri = uri
                    database = self._adbc_database
                conn = adbc_driver_manager.AdbcConnection(database)
            except adbc_driver_manager.Error:
                with self._adbc_lock:
                    self._adbc_database = None  # connect afresh next time
                raise
            try:
                conn.set_autocommit(False)
            except BaseException:
                conn.close()
                raise
            return conn

        return source.retrying(attempt, adbc_driver_manager.Error, str)

    def checkout(self, source: Source, uri: str, first: Callable[[Any], T]) -> tuple[Any, T]:
        """A connection in a transaction of its own and what ``first`` (its first statements)
        returned: one a finished read left (closed, and a new one made, if its first statement
        fails: the server restarted, say), or a new one. Closed if ``first`` fails."""
        import adbc_driver_manager

        conn = self.take_idle(uri)
        if conn is not None:
            try:
                conn.set_autocommit(False)  # a transaction of its own, as a new connection's
                return conn, first(conn)
            except adbc_driver_manager.Error:
                _close_all([conn])
            except BaseException:
                _close_all([conn])
                raise
        conn = self.adbc_connection(source, uri)
        try:
            return conn, first(conn)
        except BaseException:
            _close_all([conn])
            raise

    def take_idle(self, uri: str):
        """A connection a finished read left for ``uri`` (see :meth:`adbc_release`), or None."""
        now = time.monotonic()
        with self._adbc_lock:
            fresh = [e for e in self._adbc_idle if now - e[1] <= self.IDLE_SECONDS]
            stale = [e[2] for e in self._adbc_idle if now - e[1] > self.IDLE_SECONDS]
            found = next((e for e in fresh if e[0] == uri), None)
            self._adbc_idle = tuple(e for e in fresh if e is not found)
        _close_all(stale)
        return None if found is None else found[2]

    def adbc_release(self, uri: str, conn) -> None:
        """Take back the connection of a read that went to its end: its transaction is rolled
        back (the slice's settings go with it) and it waits for the next read, or is closed."""
        try:
            conn.rollback()
            # out of any transaction while it waits: ADBC begins the next one at once, and an open
            # transaction would hold back every safe horizon on this database (see open_transactions)
            conn.set_autocommit(True)
        except Exception:  # noqa: BLE001 - a connection that cannot roll back is not kept
            _close_all([conn])
            return
        with self._adbc_lock:
            if len(self._adbc_idle) < self.IDLE_MAX:
                self._adbc_idle = (*self._adbc_idle, (uri, time.monotonic(), conn))
                return
        _close_all([conn])

    def dispose(self) -> None:
        with self._adbc_lock:
            idle, self._adbc_idle = self._adbc_idle, ()
        _close_all([conn for _, _, conn in idle])

    _adbc_idle: tuple = ()  # (uri, when it was left, connection), replaced, never changed in place
    _adbc_database: Any = None
    _adbc_uri: str | None = None
    _adbc_lock = threading.Lock()


REFINE = sa.text(
    "SELECT a.attname, a.attndims, CASE WHEN t.typtype = 'd' THEN format_type(t.typbasetype, t.typtypmod) END "
    "FROM pg_catalog.pg_attribute AS a JOIN pg_catalog.pg_type AS t ON t.oid = a.atttypid "
    "WHERE a.attrelid = to_regclass(:relation) AND a.attnum > 0 AND NOT a.attisdropped"
)
_NUMERIC = re.compile(r"numeric\((\d+)(?:,(\d+))?\)")


def interval_iso(column: sa.ColumnElement) -> sa.ColumnElement:
    """An interval as ISO 8601 text with every field and its sign (``P0Y-1M2DT3H4M5.000006S``),
    whatever the session's IntervalStyle: exact (months, days and time kept apart, microseconds
    kept), and PostgreSQL reads it back as the same interval. NULL stays NULL."""
    text: sa.ColumnElement = sa.literal_column("'P'", sa.Text)
    for part, mark in (("year", "Y"), ("month", "M"), ("day", "D"), ("hour", "H"), ("minute", "M"), ("second", "S")):
        text = text + sa.cast(sa.extract(part, column), sa.Text) + sa.literal_column(f"'{mark}'", sa.Text)
        if part == "day":
            text = text + sa.literal_column("'T'", sa.Text)
    return text


class NoFastPath(Exception):
    """The columnar path cannot reproduce the generic path exactly here (the reason says why)."""


# ------------------------------------------------------------------------------------------------
# SQL and connection


_COMPILE_DIALECT: sa.Dialect | None = None


def _compile_dialect() -> sa.Dialect:
    global _COMPILE_DIALECT
    if _COMPILE_DIALECT is None:
        from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

        # the psycopg dialect renders a cast on every bound parameter ($1::TIMESTAMP WITH TIME
        # ZONE), so the server types them exactly as the generic path does
        _COMPILE_DIALECT = PGDialect_psycopg(paramstyle="numeric_dollar")
    return _COMPILE_DIALECT


def as_text(select: sa.Select) -> tuple[sa.Select, dict[str, str]]:
    """``real`` columns selected as ``CAST(col AS TEXT)``; returns which (name -> kind).

    The generic path parses the server's text of a real (``4.9910328e+07``, ``1.1``) into a
    double; the binary float4 widened to double would differ (``1.100000023841858``), and no
    client-side shortest-digits algorithm is guaranteed to print what the server prints.
    ``numeric`` travels in binary: the driver turns it into the text the server would print
    (checked against the generic path in the tests), and the server sends it for less than it
    costs to print it (measured: 2M rows COPY'd with 0.94 s of server CPU instead of 1.08 s).
    """
    columns: list[sa.ColumnElement] = []
    kinds: dict[str, str] = {}
    changed = False
    for column in select.selected_columns:
        kind = None
        if isinstance(column, sa.Label):
            t = column.type
            if isinstance(t, sa.REAL):
                kind = "real"
            elif not isinstance(column.element, sa.Column) and isinstance(t, sa.String):
                kinds[column.name] = "text"  # text the server renders (see PostgreSQLDialect.result_column)
            elif isinstance(column.element, sa.Column) and isinstance(base_type(t), sa.ARRAY):
                columns.append(_one_dimensional(column.element).label(column.name))
                changed = True
                continue
        if kind is None:
            columns.append(column)
        else:
            columns.append(sa.cast(column.element, sa.Text).label(column.name))
            kinds[column.name] = kind
            changed = True
    if not changed:
        return select, kinds
    return select.with_only_columns(*columns, maintain_column_froms=True), kinds


def _one_dimensional(column: sa.Column) -> sa.ColumnElement:
    """The array column, or an error naming it for a value of more than one dimension: ADBC
    would flatten such a value into one list without a word. The error is a cast of a text that
    is not an array literal, computed from the row (so never folded into a constant)."""
    name = column.name.replace("'", "''")
    message = sa.cast(sa.func.array_ndims(column), sa.Text) + sa.literal_column(
        f"' dimensions in column \"{name}\", declared with one: declare its dimensions to land it as JSON text'", sa.Text
    )
    return sa.case((sa.func.array_ndims(column) > 1, sa.cast(message, column.type)), else_=column)


SETTING_PREFIX = "incremental_assets.p"


@dataclass(frozen=True)
class SliceQuery:
    """A SELECT prepared for ``COPY``: its bound values travel through transaction-local settings."""

    #: the SELECT reading each value as ``CAST(current_setting('incremental_assets.pN') AS type)``
    direct: str
    #: the same with each of those in a scalar subquery: evaluated once, also in a sequential scan
    once: str
    #: ``SELECT set_config('incremental_assets.p1', CAST($1 AS TEXT), true), ...``, or None
    settings: str | None
    #: the values of ``$1, $2...`` as a one-row Arrow batch, or None
    params: pa.RecordBatch | None
    #: columns selected as text: name -> "real" (see :func:`as_text`)
    text_columns: dict[str, str] = field(default_factory=dict)
    #: the table read, as ``to_regclass`` takes it (quoted), or None
    relation: str | None = None
    #: result column -> the table column it reads (for its type in the catalog)
    table_columns: dict[str, str] = field(default_factory=dict)
    #: the column the SELECT is ordered by, for a read of several windows (see ``ORDER_OPTION``)
    order_column: str | None = None
    #: rows in the table's storage order, for a read of several windows (see ``STORAGE_ORDER_OPTION``)
    storage_order: bool = False


def slice_query(select: sa.Select) -> SliceQuery:
    """Compile ``select`` for the fast path; raises NoFastPath for parameters it cannot carry."""
    relation, table_columns = _table_columns(select)  # before as_text() wraps any column
    select, text_columns = as_text(select)
    dialect = _compile_dialect()
    binds: dict[str, tuple[int, BindParameter]] = {}

    def rewrite(once: bool) -> str:
        def replace(element):
            if not isinstance(element, BindParameter):
                return None
            if element.expanding or element.literal_execute:
                raise NoFastPath(f"parameter {element.key!r} is expanded into the SQL")
            number, _ = binds.setdefault(element.key, (len(binds) + 1, element))
            # the setting's name is this module's constant, never a value
            name = sa.literal_column(f"'{SETTING_PREFIX}{number}'")
            value = sa.cast(sa.func.current_setting(name), element.type)
            return sa.select(value).scalar_subquery() if once else value

        rewritten = replacement_traverse(select, {}, replace)  # type: ignore[call-overload]  # a Select is traversible
        compiled = rewritten.compile(dialect=dialect)
        if compiled.positiontup:
            raise NoFastPath("the statement still has bound parameters")
        return compiled.string

    direct = rewrite(False)
    once = rewrite(True)
    options = select.get_execution_options()
    order_column, storage_order = options.get(ORDER_OPTION), bool(options.get(STORAGE_ORDER_OPTION))
    if not binds:
        return SliceQuery(direct, once, None, None, text_columns, relation, table_columns, order_column, storage_order)
    arrays, calls = [], []
    for number, element in sorted(binds.values(), key=lambda b: b[0]):
        value = element.effective_value
        processor = element.type.dialect_impl(dialect).bind_processor(dialect)
        if processor is not None:
            value = processor(value)
        arrays.append(_param_array(value, element.key))
        calls.append(f"set_config('{SETTING_PREFIX}{number}', CAST(${number} AS TEXT), true)")
    params = pa.record_batch(arrays, names=[str(n + 1) for n in range(len(arrays))])
    return SliceQuery(
        direct, once, "SELECT " + ", ".join(calls), params, text_columns, relation, table_columns, order_column, storage_order
    )


def _table_columns(select: sa.Select) -> tuple[str | None, dict[str, str]]:
    """The one table ``select`` reads plain columns of (quoted for ``to_regclass``), and which."""
    relation, columns = None, {}
    for column in select.selected_columns:
        element = column.element if isinstance(column, sa.Label) else column
        if not (isinstance(element, sa.Column) and isinstance(element.table, sa.Table)):
            continue
        table = element.table
        quote = _compile_dialect().identifier_preparer.quote_identifier  # always quotes
        name = ".".join(quote(p) for p in (table.schema, table.name) if p)
        if relation not in (None, name):
            return None, {}
        relation = name
        columns[column.name] = element.name
    return relation, columns


# the type of each column of a table as the server describes a result: a domain as its base
# type, an enum as "enum" (an array of them "_enum")
COLUMN_TYPES = (
    "SELECT a.attname, CASE WHEN t.typtype = 'd' THEN b.typname WHEN t.typtype = 'e' THEN 'enum' "
    "WHEN e.typtype = 'e' THEN '_enum' ELSE t.typname END "
    "FROM pg_catalog.pg_attribute AS a JOIN pg_catalog.pg_type AS t ON t.oid = a.atttypid "
    "LEFT JOIN pg_catalog.pg_type AS b ON b.oid = t.typbasetype "
    "LEFT JOIN pg_catalog.pg_type AS e ON e.oid = t.typelem AND t.typcategory = 'A' "
    "WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped"
)


# the planner's correlation of a column with the table's storage order (no statistics: no row)
CORRELATION = (
    "SELECT s.correlation FROM pg_catalog.pg_stats AS s "
    "JOIN pg_catalog.pg_class AS c ON c.relname = s.tablename "
    "JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace AND n.nspname = s.schemaname "
    "WHERE c.oid = to_regclass($1) AND s.attname = $2"
)


_EPOCH = dt.datetime(1970, 1, 1)
_EPOCH_UTC = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_MICROSECOND = dt.timedelta(microseconds=1)


def _param_array(value: Any, name: str) -> pa.Array:
    """A one-value Arrow array typed so that ADBC binds it as the server type of the value.

    Built from buffers: ``pa.array`` on Python objects imports pandas (about 40 MB) on first use.
    """
    if isinstance(value, bool):
        return pa.Array.from_buffers(pa.bool_(), 1, [None, pa.py_buffer(b"\x01" if value else b"\x00")])
    if isinstance(value, int):
        return pa.Array.from_buffers(pa.int64(), 1, [None, pa.py_buffer(struct.pack("<q", value))])
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            micros, t = (value - _EPOCH) // _MICROSECOND, pa.timestamp("us")
        else:
            micros, t = (value - _EPOCH_UTC) // _MICROSECOND, pa.timestamp("us", tz="UTC")
        return pa.Array.from_buffers(t, 1, [None, pa.py_buffer(struct.pack("<q", micros))])
    if isinstance(value, dt.date):
        days = (value - _EPOCH.date()).days
        return pa.Array.from_buffers(pa.date32(), 1, [None, pa.py_buffer(struct.pack("<i", days))])
    if isinstance(value, str):
        return _string_array([value])
    if isinstance(value, (bytes, bytearray)):
        return _string_array([bytes(value)], pa.binary())
    raise NoFastPath(f"parameter {name} of type {type(value).__name__}")


def _string_array(values: list, type_: pa.DataType = pa.string()) -> pa.Array:
    """A string (or binary) array from Python values, without ``pa.array`` (see :func:`_param_array`)."""
    n = len(values)
    offsets = array.array("i", [0])
    validity = bytearray((n + 7) // 8)
    data = bytearray()
    nulls = 0
    for i, value in enumerate(values):
        if value is None:
            nulls += 1
        else:
            data += value.encode() if isinstance(value, str) else value
            validity[i >> 3] |= 1 << (i & 7)
        offsets.append(len(data))
    if len(data) >= 2**31 or offsets.itemsize != 4:
        return pa.array(values, type=type_)
    buffers = [pa.py_buffer(validity) if nulls else None, pa.py_buffer(offsets), pa.py_buffer(bytes(data))]
    return pa.Array.from_buffers(type_, n, buffers, null_count=nulls)


def libpq_uri(url: str | sa.URL) -> str:
    """A libpq connection URI from a SQLAlchemy URL (``postgresql+psycopg://...``).

    Holds the password: never log or show it (use ``Source.redacted_url``).
    """
    u = make_url(url)
    userinfo = ""
    if u.username:
        userinfo = quote(u.username, safe="")
    if u.password is not None:
        userinfo += ":" + quote(str(u.password), safe="")
    if userinfo:
        userinfo += "@"
    host = u.host or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    port = f":{u.port}" if u.port else ""
    path = "/" + quote(u.database, safe="") if u.database else ""
    query = []
    for key, value in u.query.items():
        if not isinstance(value, str):  # several hosts etc.: leave to psycopg's own parsing
            raise NoFastPath(f"URL option {key!r} has several values")
        query.append((key, value))
    qs = "?" + urlencode(query, quote_via=quote) if query else ""
    return f"postgresql://{userinfo}{host}{port}{path}{qs}"


# ------------------------------------------------------------------------------------------------
# reading


class _End:
    pass


class _Fallback:
    def __init__(self, reason: str):
        self.reason = reason


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _CopyReader:
    """One slice read. With ``prefetch`` > 0 a thread runs the COPY and converts while the caller
    takes batches (bounded queue); with 0 everything runs in the caller's thread."""

    def __init__(self, dialect: PostgreSQLDialect, source: Source, uri: str, query: SliceQuery, schema: pa.Schema,
                 batch_size: int):
        self.dialect = dialect
        self.source = source
        self.uri = uri
        self.query = query
        self.schema = schema
        self.batch_size = max(int(batch_size), 1)
        self.prefetch = max(int(dialect.prefetch), 0)
        self.queue: queue.Queue = queue.Queue(maxsize=max(self.prefetch, 1))
        self.stop = threading.Event()

    def batches(self):
        """Yields converted batches; returns None when done, or the reason to fall back (nothing yielded then)."""
        if self.prefetch == 0:
            produced = self._produce()
            try:
                yield from produced
            except NoFastPath as exc:  # raised before the first batch
                return str(exc)
            finally:
                produced.close()
            return None
        thread = threading.Thread(target=self._run, name="incremental_assets-pg-reader", daemon=True)
        thread.start()
        try:
            while True:
                item = self.queue.get()
                if isinstance(item, pa.RecordBatch):
                    yield item
                elif isinstance(item, _End):
                    return None
                elif isinstance(item, _Fallback):
                    return item.reason
                else:
                    raise item.exc
        finally:
            self.stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    pass
                thread.join(0.05)

    def _run(self) -> None:
        """The reading thread: converted batches into the queue, then an end, a fallback or an error."""
        produced = self._produce()
        try:
            for batch in produced:
                if not self._put(batch):
                    return  # the consumer is gone
            self._put(_End())
        except NoFastPath as exc:
            self._put(_Fallback(str(exc)))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(_Failed(exc))
        finally:
            produced.close()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _statement(self, conn) -> str:
        """Bind the values (transaction-local settings) and choose the statement to COPY.

        The planner picks the plan for the real bounds (it folds ``current_setting`` when it
        estimates). An index scan computes its bounds once; a sequential or bitmap heap scan
        would compute them again for every row it filters or rechecks, so there the bounds
        are wrapped in scalar subqueries (computed once) and the access method the planner
        chose is kept by turning the others off for this transaction.
        """
        query = self.query
        if query.storage_order:
            # rows in storage order: a scan from the table's first page, by this process alone
            # (a synchronised scan starts where another one of the table is; parallel workers
            # interleave their pages)
            for statement in _STORAGE_ORDER:
                _run_update(conn, statement)
        if query.settings is None and query.order_column is None:
            return query.direct
        if query.settings is not None:
            _run_query(conn, query.settings, query.params)
        plan = _explain(conn, query.direct)
        if (
            query.order_column is not None and query.relation is not None and not _plan_nodes(plan, _SORTS)
            and not _stored_in_order(conn, query.relation, query.order_column)
        ):
            # windows read in order from an index over rows stored in another order: the server
            # scans and sorts instead (see PostgreSQLDialect.one_ordered_read)
            for setting in ("enable_indexscan", "enable_indexonlyscan", "enable_bitmapscan"):
                _run_update(conn, f"SET LOCAL {setting} = off")
            plan = _explain(conn, query.direct)
        scan = per_row_scan(plan)
        if scan is None:
            return query.direct
        for setting in _KEEP_SCAN[scan]:
            _run_update(conn, f"SET LOCAL {setting} = off")
        return query.once

    def _column_types(self, conn) -> dict[str, str]:
        """Result column -> its PostgreSQL type name, from the catalog (for drivers whose fields
        carry no type metadata); read in the COPY's transaction, so it describes what is read."""
        query = self.query
        if query.relation is None:
            return {}
        params = pa.record_batch([_string_array([query.relation])], names=["1"])
        table = _run_query(conn, COLUMN_TYPES, params)
        found = dict(zip(table.column(0).to_pylist(), table.column(1).to_pylist()))
        return {column: found.get(attname, "") for column, attname in query.table_columns.items()}

    def _produce(self) -> Generator[pa.RecordBatch, None, None]:
        """Connect, COPY, convert: batches of at most ``batch_size`` rows; closes everything at the end."""
        import adbc_driver_manager

        conn = statement = reader = None
        try:
            conn, sql = self._connect()
            types = self._column_types(conn)
            statement = adbc_driver_manager.AdbcStatement(conn)
            statement.set_options(**{"adbc.postgresql.batch_size_hint_bytes": str(self.dialect.batch_bytes)})
            statement.set_sql_query(sql)  # no parameters: ADBC streams it through COPY (FORMAT binary)
            handle, _ = statement.execute_query()
            reader = pa.RecordBatchReader.from_stream(handle)
            convert = batch_converter(reader.schema, self.schema, self.query.text_columns, types)
            size = self.batch_size
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                for offset in range(0, batch.num_rows, size):
                    yield convert(batch.slice(offset, size) if batch.num_rows > size else batch)
            reader.close()
            statement.close()
            reader = statement = None
            conn, done = None, conn
            self.dialect.adbc_release(self.uri, done)  # read to its end: the next read may use it
        finally:
            # a read stopped early or failed: its connection closes, its (read-only) transaction unfinished
            _close_all([reader, statement, conn])

    def _connect(self):
        """A connection and the statement to COPY on it (see :meth:`PostgreSQLDialect.checkout`)."""
        return self.dialect.checkout(self.source, self.uri, self._statement)


def _close_all(closeables) -> None:
    for closeable in closeables:
        if closeable is not None:
            try:
                closeable.close()
            except Exception:  # noqa: BLE001
                pass


def _run_query(conn, sql: str, params: pa.RecordBatch | None = None) -> pa.Table:
    import adbc_driver_manager

    statement = adbc_driver_manager.AdbcStatement(conn)
    try:
        statement.set_options(**{"adbc.postgresql.use_copy": "false"})
        statement.set_sql_query(sql)
        if params is not None:
            statement.bind(params)
        handle, _ = statement.execute_query()
        with pa.RecordBatchReader.from_stream(handle) as reader:
            return reader.read_all()
    finally:
        statement.close()


def _run_update(conn, sql: str) -> None:
    import adbc_driver_manager

    statement = adbc_driver_manager.AdbcStatement(conn)
    try:
        statement.set_sql_query(sql)
        statement.execute_update()
    finally:
        statement.close()


_KEEP_SCAN = {
    "Seq Scan": ("enable_indexscan", "enable_indexonlyscan", "enable_bitmapscan", "enable_tidscan"),
    "Bitmap Heap Scan": ("enable_seqscan", "enable_indexscan", "enable_indexonlyscan", "enable_tidscan"),
}


_STORAGE_ORDER = ("SET LOCAL synchronize_seqscans = off", "SET LOCAL max_parallel_workers_per_gather = 0")
_SORTS = {"Sort", "Incremental Sort"}
#: the planner's correlation of a column with the table's storage order from which an index read
#: in the column's order reads the table about in storage order (1: exactly)
IN_ORDER_CORRELATION = 0.9


def _explain(conn, sql: str) -> Any:
    plan = _run_query(conn, "EXPLAIN (FORMAT JSON) " + sql).column(0)[0].as_py()
    return json.loads(plan) if isinstance(plan, (str, bytes)) else plan


def _plan_top(plan: Any) -> dict:
    """The top node of an EXPLAIN (FORMAT JSON) plan ({} if none)."""
    top = plan[0] if isinstance(plan, list) and plan else plan
    node = top.get("Plan", {}) if isinstance(top, dict) else {}
    return node if isinstance(node, dict) else {}


def _plan_bytes(plan: Any) -> float | None:
    """The planner's estimate of the bytes a plan returns: its rows times their width."""
    node = _plan_top(plan)
    rows, width = node.get("Plan Rows"), node.get("Plan Width")
    if not isinstance(rows, (int, float)) or not isinstance(width, (int, float)):
        return None
    return rows * width


def _stored_in_order(conn, relation: str, column: str) -> bool:
    """Whether the planner's statistics say the table is stored about in ``column``'s order
    (no statistics: no)."""
    params = pa.record_batch([_string_array([relation]), _string_array([column])], names=["1", "2"])
    correlations = _run_query(conn, CORRELATION, params).column(0).to_pylist()
    return bool(correlations) and all(c is not None and abs(c) >= IN_ORDER_CORRELATION for c in correlations)


def _plan_nodes(plan: Any, kinds: set[str]) -> list[dict]:
    """The nodes of an EXPLAIN (FORMAT JSON) plan whose type is one of ``kinds``."""
    found = []
    nodes = list(plan) if isinstance(plan, list) else [plan]
    while nodes:
        node = nodes.pop()
        if not isinstance(node, dict):
            continue
        if node.get("Node Type") in kinds:
            found.append(node)
        for value in node.values():
            if isinstance(value, dict):
                nodes.append(value)
            elif isinstance(value, list):
                nodes.extend(value)
    return found


def per_row_scan(plan: Any) -> str | None:
    """The scan of an EXPLAIN (FORMAT JSON) plan that would read the settings for every row:
    ``"Seq Scan"``, ``"Bitmap Heap Scan"``, or None (index scans compute their bounds once)."""
    found = None
    for node in _plan_nodes(plan, set(_KEEP_SCAN)):
        if "current_setting" in str(node.get("Filter", "")) + str(node.get("Recheck Cond", "")):
            if node["Node Type"] == "Seq Scan" or found is None:
                found = node["Node Type"]
    return found


# ------------------------------------------------------------------------------------------------
# exact conversion to the generic path's types and values

_INTEGERS = {"int2", "int4", "int8"}
_TEXTS = {"text", "varchar", "bpchar", "name", "enum"}
_SAME = {"bool", "float8", "date", "time", "timestamp", "timestamptz", "bytea"}


def batch_converter(
    source: pa.Schema, target: pa.Schema, text_columns: dict[str, str] | None = None,
    pg_types: dict[str, str] | None = None,
) -> Callable[[pa.RecordBatch], pa.RecordBatch]:
    """Per-column conversions from ADBC's Arrow (``source``) to ``target``; raises NoFastPath.

    ``pg_types`` (column -> PostgreSQL type name) stands in for field metadata the driver lacks.
    """
    if len(source) != len(target):
        raise NoFastPath(f"result has {len(source)} columns, expected {len(target)}")
    converters = [
        column_converter(s, t, text_columns or {}, (pg_types or {}).get(t.name, ""))
        for s, t in zip(source, target)
    ]

    def convert(batch: pa.RecordBatch) -> pa.RecordBatch:
        arrays = [conv(column) for conv, column in zip(converters, batch.columns)]
        return pa.RecordBatch.from_arrays(arrays, schema=target)

    return convert


def column_converter(
    source: pa.Field, target: pa.Field, text_columns: dict[str, str] | None = None, pg_type: str = ""
) -> Callable[[pa.Array], pa.Array]:
    """The conversion of one column, by its PostgreSQL type: the field's metadata, else ``pg_type``."""
    meta = source.metadata or {}
    as_text = (text_columns or {}).get(target.name)
    pg_type = meta.get(b"POSTGRESQL:type", b"").decode() or ("text" if as_text is not None else pg_type)
    st, tt = source.type, target.type
    if as_text is not None:  # selected as CAST(... AS TEXT): see as_text()
        if pg_type == "text" and pa.types.is_string(st):
            if as_text == "text" and pa.types.is_string(tt):
                return _same
            if as_text == "real" and pa.types.is_float64(tt):
                return lambda a: a.cast(pa.float64())  # float(text), as the generic path
            if as_text == "numeric":
                return _numeric_converter(tt)
        raise NoFastPath(f"column {target.name!r}: PostgreSQL {as_text} as {tt}")
    if pg_type.startswith("_") and pa.types.is_list(st) and pa.types.is_list(tt):
        item = column_converter(pa.field(target.name, st.value_type), pa.field(target.name, tt.value_type), None, pg_type[1:])
        return _list_converter(item, tt)
    if pg_type in _INTEGERS and pa.types.is_integer(st) and pa.types.is_integer(tt):
        return _same if st == tt else (lambda a: a.cast(tt, safe=True))
    if pg_type in _SAME and st == tt:
        return _same
    if pg_type in _TEXTS and pa.types.is_string(st) and pa.types.is_string(tt):
        return _same
    if pg_type == "numeric" and _storage_is_string(st):
        return _numeric_converter(tt)
    if pg_type == "uuid" and pa.types.is_string(tt) and _storage_width(st) == 16:
        return _uuid_text
    if pg_type == "uuid" and pa.types.is_string(tt) and _storage_is_binary(st):
        return lambda a: _uuid_text(_storage(a).cast(pa.binary(16)))
    if pg_type in ("json", "jsonb") and pa.types.is_string(tt) and _storage_is_string(st):
        return _json_text
    raise NoFastPath(f"column {target.name!r}: PostgreSQL {pg_type or st} as {tt}")


def _list_converter(item: Callable[[pa.Array], pa.Array], tt: pa.DataType) -> Callable[[pa.Array], pa.Array]:
    """A list column: its elements converted as a column of their own, the lists kept."""

    def convert(a: pa.Array) -> pa.Array:
        offsets = a.offsets  # of a slice: they point into the elements of the whole array
        start = offsets[0].as_py()
        values = item(a.values.slice(start, offsets[-1].as_py() - start))
        offsets = pc.subtract(offsets, pa.scalar(start, pa.int32())) if start else offsets
        return pa.ListArray.from_arrays(offsets, values, type=tt, mask=a.is_null() if a.null_count else None)

    return convert


def _numeric_converter(tt: pa.DataType) -> Callable[[pa.Array], pa.Array]:
    """numeric text -> the generic path's decimal (exact parse) or text (str(Decimal))."""
    if pa.types.is_decimal(tt) and 0 <= tt.scale <= tt.precision:
        return lambda a: _storage(a).cast(tt)
    if pa.types.is_string(tt):
        return _numeric_text
    raise NoFastPath(f"numeric as {tt}")


def _same(a: pa.Array) -> pa.Array:
    return a


def _storage(a: pa.Array) -> pa.Array:
    return a.storage if isinstance(a, pa.ExtensionArray) else a


def _storage_is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t.storage_type if isinstance(t, pa.BaseExtensionType) else t)


def _storage_is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t.storage_type if isinstance(t, pa.BaseExtensionType) else t)


def _storage_width(t: pa.DataType) -> int | None:
    t = t.storage_type if isinstance(t, pa.BaseExtensionType) else t
    return t.byte_width if pa.types.is_fixed_size_binary(t) else None


# unconstrained numeric: the generic path gives str(Decimal(text)), which differs from the
# server's text only below 1e-6 (scientific notation: 1.230E-7, 0E-8) and for NaN / infinities
_DECIMAL_SPECIAL = r"^-?0\.000000|^-?[A-Za-z]"
_SPECIAL_WORDS = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity", "infinity": "Infinity", "-infinity": "-Infinity"}


def _decimal_text(value: str | None) -> str | None:
    if value is None:
        return None
    word = _SPECIAL_WORDS.get(value.lower())
    return word if word is not None else str(decimal.Decimal(value))


def _numeric_text(a: pa.Array) -> pa.Array:
    text = _storage(a)
    special = pc.match_substring_regex(text, _DECIMAL_SPECIAL)
    if not pc.any(special).as_py():
        return text
    fixed = _string_array([_decimal_text(v) for v in text.to_pylist()])
    return pc.if_else(special, fixed, text)


def _json_text(a: pa.Array) -> pa.Array:
    # the generic path deserialises json/jsonb (json.loads) and renders the value with its
    # own text rule: exactly that, per value (no columnar equivalent)
    return _string_array([None if v is None else _to_text(json.loads(v)) for v in _storage(a).to_pylist()])


def _uuid_text(a: pa.Array) -> pa.Array:
    """16-byte UUIDs as lower-case 8-4-4-4-12 text, vectorised."""
    import numpy as np

    storage = _storage(a)
    n = len(storage)
    if n == 0:
        return pa.nulls(0, pa.string())
    data = storage.buffers()[1]
    raw = np.frombuffer(data, dtype=np.uint8, count=(storage.offset + n) * 16, offset=0)[storage.offset * 16:]
    raw = raw.reshape(n, 16)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    hexed = np.empty((n, 32), dtype=np.uint8)
    hexed[:, 0::2] = digits[raw >> 4]
    hexed[:, 1::2] = digits[raw & 0x0F]
    out = np.full((n, 36), ord("-"), dtype=np.uint8)
    out[:, 0:8] = hexed[:, 0:8]
    out[:, 9:13] = hexed[:, 8:12]
    out[:, 14:18] = hexed[:, 12:16]
    out[:, 19:23] = hexed[:, 16:20]
    out[:, 24:36] = hexed[:, 20:32]
    offsets = np.arange(0, 36 * (n + 1), 36, dtype=np.int32)
    text = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(out.tobytes()))
    if storage.null_count:
        text = pc.if_else(storage.is_valid(), text, pa.nulls(1, pa.string())[0])
    return text
