"""PostgreSQL: the horizon is held back to the oldest open transaction in the database.

Open transactions are found through ``pg_locks`` (every transaction holds an exclusive lock on its
own virtual transaction id, and ``pg_locks`` is readable by every role) joined to
``pg_stat_activity`` for their start. ``pg_stat_activity`` hides the start, and even the database,
of other roles' sessions unless the source user has ``pg_read_all_stats``: such a transaction has
an unknown start and stops the horizon (safe) instead of being silently ignored. Prepared (2PC)
transactions are listed from ``pg_prepared_xacts``; their start is unknown too.

Reads (:meth:`PostgreSQLDialect.read_batches`) take a columnar fast path through ADBC
(``adbc_driver_postgresql``), which streams a query's result through ``COPY ... TO STDOUT (FORMAT
binary)`` and decodes it into Arrow in C. The slice's bounds travel as transaction-local settings
(``pg_query.py``), and the plan is checked so that a scan does not compute them for every row
(``pg_plans.py``). A background thread reads and converts the next batch while the caller writes
the previous one, so memory holds a few batches of at most ``batch_size`` rows (and about
``batch_bytes``), whatever the size of the slice. Every column is converted to exactly the Arrow
type and values the generic SQLAlchemy path produces (``pg_arrow.py``); a column whose type has no
exact conversion sends the whole read down the generic path, and says so in the log.
The ADBC connections and the reader (``_CopyReader``) stay here with the dialect: the reader takes
its connections from the dialect's pool and gives them back.

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

import datetime as dt
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlencode

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from .base import EngineDialect, Explain, RunRead, register
from .pg_arrow import NoFastPath, _string_array, batch_converter
from .pg_arrow import column_converter  # noqa: F401  (public names of the parts moved out stay importable here)
from .pg_plans import CORRELATION, IN_ORDER_CORRELATION  # noqa: F401
from .pg_plans import _KEEP_SCAN, _SORTS, _STORAGE_ORDER, _explain, _plan_bytes, _plan_nodes, _plan_top, _run_query, _run_update
from .pg_plans import _stored_in_order, per_row_scan
from .pg_query import SETTING_PREFIX, as_text  # noqa: F401
from .pg_query import SliceQuery, _compile_dialect, interval_iso, slice_query
from .types import arrow_type, base_type, text_fallback

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
        self.refine_tables(conn, [table])

    def refine_tables(self, conn: sa.Connection, tables) -> None:
        """:meth:`refine_table` for many tables, in one statement."""
        if not tables:
            return
        quote = _compile_dialect().identifier_preparer.quote_identifier  # quotes, never doubles '%'
        by_relation = {".".join(quote(p) for p in (t.schema, t.name) if p): t for t in tables}
        for relation, name, ndims, base in conn.execute(REFINE, {"relations": list(by_relation)}):
            table = by_relation[relation]
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
    "SELECT r.relation, a.attname, a.attndims, "
    "CASE WHEN t.typtype = 'd' THEN format_type(t.typbasetype, t.typtypmod) END "
    "FROM unnest(CAST(:relations AS text[])) AS r(relation) "
    "JOIN pg_catalog.pg_attribute AS a ON a.attrelid = to_regclass(r.relation) "
    "JOIN pg_catalog.pg_type AS t ON t.oid = a.atttypid "
    "WHERE a.attnum > 0 AND NOT a.attisdropped AND (t.typtype = 'd' OR a.attndims > 1)"
)
_NUMERIC = re.compile(r"numeric\((\d+)(?:,(\d+))?\)")


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
