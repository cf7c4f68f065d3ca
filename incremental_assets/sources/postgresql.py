"""PostgreSQL: the horizon is held back to the oldest open transaction in the database.

Open transactions are found through ``pg_locks`` (every transaction holds an exclusive lock on its
own virtual transaction id, and ``pg_locks`` is readable by every role) joined to
``pg_stat_activity`` for their start. ``pg_stat_activity`` hides the start, and even the database,
of other roles' sessions unless the source user has ``pg_read_all_stats``: such a transaction has
an unknown start and stops the horizon (safe) instead of being silently ignored. Prepared (2PC)
transactions are listed from ``pg_prepared_xacts``; their start is unknown too.

Reads (:meth:`PostgreSQLDialect.read_batches`) take a columnar fast path through ADBC
(``adbc_driver_postgresql``): the SQLAlchemy SELECT is compiled to SQL text with ``$n``
parameters, which the server binds (values are never formatted into SQL), and run as
``DECLARE ... NO SCROLL CURSOR`` in a transaction; each ``FETCH <batch_size>`` comes back in
PostgreSQL's binary format and is decoded into Arrow by the driver's C code. That keeps memory
bounded by the batch size (ADBC would otherwise load the whole result of a parameterised query
into memory: only unparameterised queries stream through ``COPY``) and lets the planner see
the real bounds. A background thread fetches and converts the next batch while the caller
writes the previous one. Every column is then converted to exactly the Arrow type and values the
generic SQLAlchemy path produces (``info.schema``); a column whose type has no exact conversion
here (arrays, intervals, money, enums, ...) sends the whole read down the generic path.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from .base import EngineDialect, SourceUnavailable, register, scrub
from .types import _to_text

if TYPE_CHECKING:
    from .base import Source

log = logging.getLogger("incremental_assets")

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

CURSOR_NAME = "incremental_assets_slice"


@register("postgresql")
class PostgreSQLDialect(EngineDialect):
    # now() is the transaction's start, stamped a few microseconds before the backend reports it
    clock_margin = dt.timedelta(milliseconds=100)
    #: read slices through ADBC when every column converts exactly (else SQLAlchemy rows)
    fast_path: bool = True
    #: batches fetched ahead of the consumer by the reading thread (memory: about
    #: ``prefetch + 2`` batches of ``batch_size`` rows)
    prefetch: int = 1

    def db_now(self, conn: sa.Connection) -> dt.datetime:
        # clock_timestamp(), not now(): now() is frozen at our own transaction's start
        return conn.execute(sa.text("SELECT clock_timestamp()")).scalar().astimezone(dt.timezone.utc)

    def open_transactions(self, conn: sa.Connection):
        return [
            (who, None if start is None else start.astimezone(dt.timezone.utc))
            for who, start in conn.execute(OPEN_TRANSACTIONS)
        ]

    # -- reads -----------------------------------------------------------------------------
    def read_batches(self, source: Source, select: sa.Select, schema: pa.Schema, batch_size: int) -> Iterator[pa.RecordBatch]:
        """Stream a SELECT as Arrow batches: ADBC binary cursor, or the generic path when it cannot be exact."""
        reason = None
        if not self.fast_path or source.engine is None:
            reason = "disabled"
        else:
            try:
                select, text_floats = real_as_text(select)
                sql, params = compile_select(select)
                uri = libpq_uri(source.url)
                import adbc_driver_postgresql.dbapi  # noqa: F401
            except NoFastPath as exc:
                reason = str(exc)
            except ImportError:
                reason = "adbc_driver_postgresql is not installed"
        if reason is None:
            reader = _CursorReader(self, source, uri, sql, params, schema, batch_size, text_floats)
            fallback = yield from reader.batches()
            if fallback is None:
                return
            reason = fallback
        log.info("source %r: reading through SQLAlchemy rows (the columnar path is not used: %s)", source.name, reason)
        yield from super().read_batches(source, select, schema, batch_size)

    def connect_adbc(self, source: Source, uri: str):
        """An ADBC connection (in a transaction), retrying with backoff like :meth:`Source.connect`."""
        import adbc_driver_manager
        import adbc_driver_postgresql.dbapi as pg_dbapi

        delay = source.retry_delay
        for attempt in range(source.retries + 1):
            try:
                return pg_dbapi.connect(uri, autocommit=False)
            except adbc_driver_manager.Error as exc:
                message = _scrub(str(exc), source.url)
                if attempt == source.retries:
                    raise SourceUnavailable(
                        f"source {source.name!r} ({source.redacted_url}) is unreachable after {source.retries + 1} "
                        f"attempts: {message.strip()}"
                    ) from None
                log.warning("source %r unreachable (attempt %d), retrying in %.1fs", source.name, attempt + 1, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")


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


def real_as_text(select: sa.Select) -> tuple[sa.Select, frozenset[str]]:
    """``real`` columns selected as ``CAST(col AS TEXT)``.

    The generic path parses the server's text of a ``real`` (``4.9910328e+07``, ``1.1``) into a
    double; the binary float4 widened to double would differ (``1.100000023841858``), and no
    client-side shortest-digits algorithm is guaranteed to print exactly what the server prints.
    """
    columns, names = [], set()
    for column in select.selected_columns:
        if isinstance(column, sa.Label) and isinstance(column.type, sa.REAL):
            columns.append(sa.cast(column.element, sa.Text).label(column.name))
            names.add(column.name)
        else:
            columns.append(column)
    if not names:
        return select, frozenset()
    return select.with_only_columns(*columns, maintain_column_froms=True), frozenset(names)


def compile_select(select: sa.Select) -> tuple[str, pa.RecordBatch | None]:
    """SQL text with ``$1, $2...`` and its parameters as a one-row Arrow batch (None without any)."""
    compiled = select.compile(dialect=_compile_dialect())
    values = compiled.construct_params()
    processors = getattr(compiled, "_bind_processors", {}) or {}
    names = list(compiled.positiontup or [])
    if not names:
        return compiled.string, None
    arrays, fields = [], []
    for i, name in enumerate(names):
        value = values[name]
        if name in processors:
            value = processors[name](value)
        arrays.append(pa.array([value], type=_param_type(value, name)))
        fields.append(str(i + 1))
    return compiled.string, pa.record_batch(arrays, names=fields)


def _param_type(value: Any, name: str) -> pa.DataType:
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            return pa.timestamp("us")
        return pa.timestamp("us", tz="UTC")
    if isinstance(value, dt.date):
        return pa.date32()
    if isinstance(value, str):
        return pa.string()
    if isinstance(value, (bytes, bytearray)):
        return pa.binary()
    raise NoFastPath(f"parameter {name} of type {type(value).__name__}")


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


def _scrub(message: str, url: str) -> str:
    message = scrub(message, url)
    try:
        password = make_url(url).password
    except Exception:
        password = None
    if password:
        message = message.replace(quote(str(password), safe=""), "***")
    return message


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


class _CursorReader:
    """One slice read: a thread runs DECLARE / FETCH and converts; the caller takes batches."""

    def __init__(self, dialect: PostgreSQLDialect, source: Source, uri: str, sql: str, params, schema: pa.Schema,
                 batch_size: int, text_floats: frozenset[str] = frozenset()):
        self.dialect = dialect
        self.text_floats = text_floats
        self.source = source
        self.uri = uri
        self.sql = sql
        self.params = params
        self.schema = schema
        self.batch_size = max(int(batch_size), 1)
        self.queue: queue.Queue = queue.Queue(maxsize=max(dialect.prefetch, 1))
        self.stop = threading.Event()

    def batches(self):
        """Yields converted batches; returns None when done, or the reason to fall back (nothing yielded then)."""
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

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        conn = cursor = None
        try:
            conn = self.dialect.connect_adbc(self.source, self.uri)
            cursor = conn.cursor()
            # the cursor is read to its end: plan for all rows, not the first 10%
            cursor.execute("SET LOCAL cursor_tuple_fraction = 1")
            cursor.execute(f"DECLARE {CURSOR_NAME} NO SCROLL CURSOR FOR {self.sql}", self.params)
            cursor.adbc_statement.set_options(**{"adbc.postgresql.use_copy": "false"})
            fetch = f"FETCH FORWARD {self.batch_size} FROM {CURSOR_NAME}"
            convert = None
            while not self.stop.is_set():
                cursor.execute(fetch)
                table = cursor.fetch_arrow_table()
                if convert is None:
                    convert = batch_converter(table.schema, self.schema, self.text_floats)
                if table.num_rows == 0:
                    break
                for batch in table.to_batches():
                    if batch.num_rows and not self._put(convert(batch)):
                        return
            self._put(_End())
        except NoFastPath as exc:
            self._put(_Fallback(str(exc)))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(_Failed(exc))
        finally:
            for closeable in (cursor, conn):
                if closeable is not None:
                    try:
                        closeable.close()  # ends the (read-only) transaction: nothing to commit
                    except Exception:  # noqa: BLE001
                        pass


# ------------------------------------------------------------------------------------------------
# exact conversion to the generic path's types and values

_INTEGERS = {"int2", "int4", "int8"}
_TEXTS = {"text", "varchar", "bpchar", "name"}
_SAME = {"bool", "float8", "date", "time", "timestamp", "timestamptz", "bytea"}


def batch_converter(
    source: pa.Schema, target: pa.Schema, text_floats: frozenset[str] = frozenset()
) -> Callable[[pa.RecordBatch], pa.RecordBatch]:
    """Per-column conversions from ADBC's Arrow (``source``) to ``target``; raises NoFastPath."""
    if len(source) != len(target):
        raise NoFastPath(f"result has {len(source)} columns, expected {len(target)}")
    converters = [column_converter(s, t, text_floats) for s, t in zip(source, target)]

    def convert(batch: pa.RecordBatch) -> pa.RecordBatch:
        arrays = [conv(column) for conv, column in zip(converters, batch.columns)]
        return pa.RecordBatch.from_arrays(arrays, schema=target)

    return convert


def column_converter(source: pa.Field, target: pa.Field, text_floats: frozenset[str] = frozenset()) -> Callable[[pa.Array], pa.Array]:
    meta = source.metadata or {}
    pg_type = meta.get(b"POSTGRESQL:type", b"").decode()
    st, tt = source.type, target.type
    if pg_type in _INTEGERS and pa.types.is_integer(st) and pa.types.is_integer(tt):
        return _same if st == tt else (lambda a: a.cast(tt, safe=True))
    if pg_type in _SAME and st == tt:
        return _same
    if pg_type in _TEXTS and pa.types.is_string(st) and pa.types.is_string(tt):
        return _same
    if pg_type == "text" and target.name in text_floats and pa.types.is_string(st) and pa.types.is_float64(tt):
        # a real read as the server's text (see real_as_text): float(text), as the generic path
        return lambda a: a.cast(pa.float64())
    if pg_type == "numeric" and _storage_is_string(st):
        if pa.types.is_decimal(tt):
            return lambda a: _storage(a).cast(tt)
        if pa.types.is_string(tt):
            return _numeric_text
    if pg_type == "uuid" and pa.types.is_string(tt) and _storage_width(st) == 16:
        return _uuid_text
    if pg_type in ("json", "jsonb") and pa.types.is_string(tt) and _storage_is_string(st):
        return _json_text
    raise NoFastPath(f"column {target.name!r}: PostgreSQL {pg_type or st} as {tt}")


def _same(a: pa.Array) -> pa.Array:
    return a


def _storage(a: pa.Array) -> pa.Array:
    return a.storage if isinstance(a, pa.ExtensionArray) else a


def _storage_is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t.storage_type if isinstance(t, pa.BaseExtensionType) else t)


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
    fixed = pa.array([_decimal_text(v) for v in text.to_pylist()], type=pa.string())
    return pc.if_else(special, fixed, text)


def _json_text(a: pa.Array) -> pa.Array:
    # the generic path deserialises json/jsonb (json.loads) and renders the value with its
    # own text rule: exactly that, per value (no columnar equivalent)
    return pa.array(
        [None if v is None else _to_text(json.loads(v)) for v in _storage(a).to_pylist()], type=pa.string()
    )


def _uuid_text(a: pa.Array) -> pa.Array:
    """16-byte UUIDs as lower-case 8-4-4-4-12 text, vectorised."""
    import numpy as np

    storage = _storage(a)
    n = len(storage)
    if n == 0:
        return pa.array([], type=pa.string())
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
        text = pc.if_else(storage.is_valid(), text, pa.scalar(None, pa.string()))
    return text
