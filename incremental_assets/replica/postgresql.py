"""PostgreSQL replica: COPY into a staging table, then INSERT ... ON CONFLICT.

Rows whose keys cannot be in the table yet (an empty table, or an integer key past its range) are
copied straight into it instead. A big step (``side_staging_min_rows``) is staged by ADBC's binary
COPY (``adbc_driver_postgresql``, about 3x faster than CSV for the server to read) into an
unlogged table of its own: ADBC has its own connection, so that table is committed beside the
merge's transaction, which reads it and drops it; see :class:`_SideStaging`. Otherwise batches
go to a temporary table as CSV written by Arrow's C++ writer (no per-row Python), through psycopg
3's ``cursor.copy``. Every non-NULL text value is quoted (Arrow's
"needed" style quotes all strings), so an empty string stays an empty string and an unquoted empty
field is NULL; numbers, dates and times, whose text is never empty, go unquoted, which leaves the
server ~10% less to parse. Lists land in array columns (``text[]``, ``numeric(6,2)[]``...),
staged as array literals with every element quoted. Merges of one table queue on a
transaction-scoped advisory lock.
"""

from __future__ import annotations

import hashlib
import io
import logging
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import sqlalchemy as sa

from ..landing.formats import list_parts
from ..sources.base import scrub
from .base import DELETED, PARAM, MergePlan, ReplicaDialect, on_conflict_upsert, register, utc_wall_clock

log = logging.getLogger("incremental_assets")
_CSV = pacsv.WriteOptions(include_header=False, quoting_style="needed")
COPY_BATCH_ROWS = 100_000


def _copy_ready(array: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """A column as COPY's CSV reads it back exactly (Arrow's text is fine for everything else)."""
    t = array.type
    if pa.types.is_binary(t):  # bytea hex input
        return pa.array([None if b is None else "\\x" + b.hex() for b in array.to_pylist()], pa.string())
    if pa.types.is_duration(t):
        return pc.binary_join_element_wise(pc.cast(pc.cast(array, pa.int64()), pa.string()), "microseconds", " ")
    if pa.types.is_null(t):
        return pc.cast(array, pa.string())
    if pa.types.is_timestamp(t):
        return utc_wall_clock(array)  # read in the session's zone, UTC during a merge
    if pa.types.is_list(t):
        return pa.chunked_array([_array_literal(chunk) for chunk in array.chunks], pa.string())
    return array


def _array_literal(array: pa.ListArray) -> pa.Array:
    """Lists as PostgreSQL array literals (``{"Trailers",NULL}``): every element in double quotes
    (backslash and quote escaped), as its COPY text; NULL elements unquoted."""
    offsets, values = list_parts(array)
    ready = _copy_ready(pa.chunked_array([values], values.type))
    items = (ready if pa.types.is_string(ready.type) else pc.cast(ready, pa.string())).to_pylist()
    valid = array.is_valid().to_pylist()

    def element(e):
        return "NULL" if e is None else '"' + e.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return pa.array(
        ["{" + ",".join(map(element, items[offsets[i]:offsets[i + 1]])) + "}" if valid[i] else None for i in range(len(array))],
        pa.string(),
    )


def _csv(batch: pa.RecordBatch) -> memoryview:
    ready = pa.table([_copy_ready(pa.chunked_array([c])) for c in batch.columns], names=batch.schema.names)
    buf = io.BytesIO()
    pacsv.write_csv(ready, buf, _CSV)
    return buf.getbuffer()


def _copy(conn: sa.Connection, table: str, columns: list[str], rows: pa.Table) -> None:
    """COPY ``rows`` (in ``columns`` order) into ``table`` within the merge's transaction."""
    raw = conn.connection.driver_connection  # psycopg.Connection
    batches = rows.to_batches(max_chunksize=COPY_BATCH_ROWS)
    # the next batch's CSV is written (GIL released) while the server parses the current one
    with ThreadPoolExecutor(1) as pool, raw.cursor() as cur:
        with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT csv)") as copy:
            pending = pool.submit(_csv, batches[0]) if batches else None
            for i in range(len(batches)):
                data = pending.result()
                pending = pool.submit(_csv, batches[i + 1]) if i + 1 < len(batches) else None
                copy.write(data)


def _outside(lo: int, hi: int, low: int | None, high: int | None) -> bool:
    """Whether [lo, hi] misses every key of a table whose keys span [low, high] (None: no rows)."""
    return low is None or hi < low or lo > high


def _binary_copy_type(t: pa.DataType) -> str | None:
    """The column type ADBC's binary COPY writes Arrow type ``t`` as (staged types only), or None
    where it has none or writes it lossily (uint64 wraps around in bigint)."""
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_integer(t):
        return {("int", 8): "smallint", ("int", 16): "smallint", ("int", 32): "integer", ("int", 64): "bigint",
                ("uint", 8): "smallint", ("uint", 16): "integer", ("uint", 32): "bigint"}.get(
            ("uint" if pa.types.is_unsigned_integer(t) else "int", t.bit_width))
    if pa.types.is_float32(t):
        return "real"
    if pa.types.is_float64(t):
        return "double precision"
    if pa.types.is_decimal(t):
        return "text"  # see _SideStaging.load
    if pa.types.is_string(t):
        return "text"
    if pa.types.is_binary(t):
        return "bytea"
    if pa.types.is_date32(t):
        return "date"
    if pa.types.is_timestamp(t) and t.unit == "us":
        return "timestamp with time zone" if t.tz is not None else "timestamp without time zone"
    if pa.types.is_time64(t) and t.unit == "us":
        return "time without time zone"
    if pa.types.is_duration(t) and t.unit == "us":
        return "interval"
    return None


class _SideStaging:
    """Steps staged by ADBC (``adbc_ingest``: binary COPY) into unlogged tables of their own.

    ADBC cannot join the merge's transaction, so each step's table is created, filled and
    committed on ADBC's connection; the merge then reads it like the temporary staging table and
    drops it before committing. The merge's lock is taken before any such table is created, and
    merges of one table queue on it, so a table left by a merge that died (named after its target)
    is dropped by the next merge of that target. The tables are unlogged (no WAL) and live in the
    replica's schema (the session's current schema when none is set). Any ADBC failure (no ADBC,
    no CREATE privilege, an unexpected type) sends this and the next steps down the CSV path.
    """

    def __init__(self, replica, table: str, min_rows: int):
        self.replica = replica
        self.min_rows = min_rows
        self.prefix = "ia_side_" + hashlib.sha1(f"{replica.schema or ''}.{table}".encode()).hexdigest()[:8] + "_"
        self.schema: str | None = None
        self.database: Any = None
        self.conn: Any = None
        self.created: list[str] = []
        self.enabled = True

    def _fail(self, what: str, exc: BaseException) -> None:
        log.info("replica %s: staging through CSV: %s failed: %s", self.replica.redacted_url, what,
                 scrub(str(exc), self.replica.url).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        self.enabled = False

    def _run(self, sql: str) -> None:
        import adbc_driver_manager

        statement = adbc_driver_manager.AdbcStatement(self.conn)
        try:
            statement.set_sql_query(sql)
            statement.execute_update()
        finally:
            statement.close()

    def _start(self, conn: sa.Connection, execute) -> None:
        """Connect, find the schema, and drop what a merge of this table that died left behind."""
        import adbc_driver_manager
        import adbc_driver_postgresql

        from ..sources.postgresql import libpq_uri

        schema = self.replica.schema or execute(conn, "SELECT current_schema()").scalar()
        if schema is None:
            raise ValueError("the session has no current schema")
        left = execute(
            conn, "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE n.nspname = {PARAM} AND c.relname LIKE {PARAM}", (schema, self.prefix.replace("_", "\\_") + "%"),
        ).scalars().all()
        q = self.replica._q
        for name in left:
            try:
                with conn.begin_nested():  # a table we may not drop must not fail the merge
                    execute(conn, f"DROP TABLE IF EXISTS {q(schema)}.{q(name)}")
            except sa.exc.DBAPIError as exc:
                log.warning("replica %s: could not drop %s.%s, left by a merge that did not finish: %s",
                            self.replica.redacted_url, schema, name, str(exc.orig).strip().splitlines()[0])
            else:
                log.warning("replica %s: dropped %s.%s, left by a merge that did not finish",
                            self.replica.redacted_url, schema, name)
        self.database = adbc_driver_postgresql.connect(libpq_uri(self.replica.url))
        self.conn = adbc_driver_manager.AdbcConnection(self.database)
        self.conn.set_autocommit(False)
        self.schema = schema

    def load(self, conn: sa.Connection, staged: pa.Table, execute) -> str | None:
        """Stage ``staged`` in a new committed table; what the merge reads it as (its qualified
        name, or a subquery over it when decimals need casting back), or None (use CSV)."""
        if not self.enabled or staged.num_rows < self.min_rows:
            return None
        types = [_binary_copy_type(f.type) for f in staged.schema]
        if None in types:
            bad = staged.schema.field(types.index(None))
            self.enabled = False
            log.info("replica %s: staging through CSV: column %r is %s", self.replica.redacted_url, bad.name, bad.type)
            return None
        try:
            if self.conn is None:
                self._start(conn, execute)
        except Exception as exc:  # noqa: BLE001 - any failure here only costs speed
            self._fail("connecting ADBC", exc)
            self.close()
            return None
        import adbc_driver_manager

        q = self.replica._q
        name = self.prefix + uuid.uuid4().hex[:12]
        columns = ", ".join(f"{q(f.name)} {t}" for f, t in zip(staged.schema, types))
        # decimals travel as their exact text, cast back as the merge reads them: the binary
        # numeric writer of the ADBC 1.8 driver drops groups of zero digits (12.3456789012 lands
        # as 1234.56789012), and the server parses the text for about what the binary costs it
        decimals = any(pa.types.is_decimal(f.type) for f in staged.schema)
        reads = ", ".join(
            f"CAST({q(f.name)} AS numeric({f.type.precision},{f.type.scale})) AS {q(f.name)}"
            if pa.types.is_decimal(f.type) else q(f.name)
            for f in staged.schema
        )
        if decimals:
            staged = pa.table(
                [c.cast(pa.string()) if pa.types.is_decimal(c.type) else c for c in staged.columns],
                names=staged.column_names,
            )
        try:
            self._run(f"CREATE UNLOGGED TABLE {q(self.schema)}.{q(name)} ({columns})")
            statement = adbc_driver_manager.AdbcStatement(self.conn)
            try:
                statement.set_options(**{
                    adbc_driver_manager.INGEST_OPTION_TARGET_TABLE: name,
                    adbc_driver_manager.INGEST_OPTION_MODE: adbc_driver_manager.INGEST_OPTION_MODE_APPEND,
                    adbc_driver_manager.StatementOptions.INGEST_TARGET_DB_SCHEMA.value: self.schema,
                })
                # batches of bounded size: ADBC encodes the next while the server reads the last
                # (one batch of a whole step takes twice as long)
                batches = staged.to_batches(max_chunksize=COPY_BATCH_ROWS)
                statement.bind_stream(pa.RecordBatchReader.from_batches(staged.schema, batches))
                statement.execute_update()
            finally:
                statement.close()
            self.conn.commit()
        except adbc_driver_manager.Error as exc:
            try:
                self.conn.rollback()  # nothing was committed: no table is left
            except adbc_driver_manager.Error:
                pass
            self._fail("ADBC ingest", exc)
            return None
        self.created.append(name)
        qualified = f"{q(self.schema)}.{q(name)}"
        return f"(SELECT {reads} FROM {qualified})" if decimals else qualified

    def drop_sql(self) -> list[str]:
        """Dropped in the merge's transaction: it reads them, so only it may (its locks would
        block a drop from ADBC's connection until it ends)."""
        q = self.replica._q
        return [f"DROP TABLE IF EXISTS {q(self.schema)}.{q(name)}" for name in self.created]

    def close(self) -> None:
        """After the merge's transaction: drop what it did not (it failed), close ADBC."""
        import adbc_driver_manager

        try:
            if self.conn is not None and self.created:
                q = self.replica._q
                for name in self.created:
                    self._run(f"DROP TABLE IF EXISTS {q(self.schema)}.{q(name)}")
                self.conn.commit()
        except adbc_driver_manager.Error as exc:
            log.warning("replica %s: could not drop staging table(s) %s: %s (the next merge of the table drops them)",
                        self.replica.redacted_url, self.created, scrub(str(exc), self.replica.url).strip())
        finally:
            for handle in (self.conn, self.database):
                if handle is not None:
                    handle.close()
            self.conn = self.database = None


@register("postgresql")
class PostgreSQLReplica(ReplicaDialect):
    flag_column_sql = "boolean NOT NULL DEFAULT false"
    alters_types = True  # ALTER COLUMN ... TYPE rewrites the table, converting every value

    def alter_type_sql(self, name: str, column: str, type_sql: str, *, not_null: bool, using: str | None = None) -> str:
        return f"ALTER TABLE {name} ALTER COLUMN {column} TYPE {type_sql}" + (f" USING {using}" if using else "")

    def utc_instants_sql(self, column: str) -> str:
        return f"{column} AT TIME ZONE 'UTC'"
    array_columns = True
    name_rule = "compares quoted column names exactly"
    #: steps of at least this many rows are staged by ADBC's binary COPY (None: never); below it,
    #: connecting and committing a table of their own costs more than CSV does
    side_staging_min_rows: int | None = 100_000

    def name_key(self, name: str) -> str:
        return name

    def column_type(self, t: pa.DataType, *, key_bytes: int | None = None) -> str:
        if pa.types.is_boolean(t):
            return "boolean"
        if pa.types.is_integer(t):
            signed_bits = t.bit_width + (1 if pa.types.is_unsigned_integer(t) else 0)
            if signed_bits <= 16:
                return "smallint"
            if signed_bits <= 32:
                return "integer"
            if signed_bits <= 64:
                return "bigint"
            return "numeric(20,0)"
        if pa.types.is_floating(t):
            return "double precision" if t.bit_width == 64 else "real"
        if pa.types.is_decimal(t):
            return f"numeric({t.precision},{t.scale})"
        if pa.types.is_string(t):
            return "text"
        if pa.types.is_binary(t):
            return "bytea"
        if pa.types.is_date(t):
            return "date"
        if pa.types.is_timestamp(t):
            return "timestamp with time zone" if t.tz is not None else "timestamp without time zone"
        if pa.types.is_time(t):
            return "time without time zone"
        if pa.types.is_duration(t):
            return "interval"
        if pa.types.is_list(t) and not pa.types.is_nested(t.value_type):
            return self.column_type(t.value_type) + "[]"
        raise ValueError(f"type {t} has no PostgreSQL mapping")

    def create_staging_sql(self, plan: MergePlan) -> list[str]:
        return [
            f"CREATE TEMPORARY TABLE {plan.staging} ON COMMIT DROP AS "
            f"SELECT {self.staging_select_list(plan)} FROM {plan.target} WHERE 1 = 0",
            f"ALTER TABLE {plan.staging} ADD PRIMARY KEY ({', '.join(plan.q(k) for k in plan.key)})",
        ]

    # both tables aliased: the staging may be a subquery (side staging with decimals), which
    # PostgreSQL before 16 accepts in FROM only with an alias
    def delete_sql(self, plan: MergePlan) -> str:
        return (
            f"DELETE FROM {plan.target} AS t USING {plan.staging} AS s "
            f"WHERE {plan.on('t', 's')} AND {plan.is_delete()} AND {plan.newer_or_equal('s', 't')}"
        )

    def soft_delete_sql(self, plan: MergePlan) -> str:
        q = plan.q
        return (
            f"UPDATE {plan.target} AS t SET {q(plan.version)} = s.{q(plan.version)}, {q(DELETED)} = s.{q(DELETED)} "
            f"FROM {plan.staging} AS s "
            f"WHERE {plan.on('t', 's')} AND {plan.is_delete()} AND {plan.newer_or_equal('s', 't')}"
        )

    def clear_staging_sql(self, plan: MergePlan) -> str:
        return f"TRUNCATE {plan.staging}"

    def lock(self, conn: sa.Connection, name: str) -> None:
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (name,))

    def begin_merge(self, conn: sa.Connection) -> None:
        # UTC: COPY reads the naive UTC text of instants; no JIT: compiling the merge's big
        # joins costs more than it saves (0.3-0.5 s per statement at a million rows)
        conn.exec_driver_sql("SET LOCAL TIME ZONE 'UTC'", execution_options={"no_parameters": True})
        conn.exec_driver_sql("SET LOCAL jit = off", execution_options={"no_parameters": True})

    #: a step with fewer staged rows than the target's (estimated) rows divided by this is merged
    #: with nested loops only: a key lookup in the target and its tombstones per staged row. The
    #: planner's costs (random_page_cost 4) would otherwise read a cached table of a million rows
    #: whole, by a hash join, to merge ten thousand. Bigger steps are left to the planner.
    lookup_ratio = 4

    def before_step(self, conn: sa.Connection, plan: MergePlan, rows: int, execute) -> None:
        stored = execute(conn, f"SELECT reltuples FROM pg_class WHERE oid = to_regclass({PARAM})", (plan.target,)).scalar()
        # never analyzed (-1): lookups, which cost in proportion to the step whatever the table's size
        lookups = stored is None or stored < 0 or rows * self.lookup_ratio < stored
        setting = "off" if lookups else "on"
        for name in ("enable_hashjoin", "enable_mergejoin"):
            conn.exec_driver_sql(f"SET LOCAL {name} = {setting}", execution_options={"no_parameters": True})

    @contextmanager
    def side_staging(self, replica, table: str) -> Iterator[_SideStaging | None]:
        if self.side_staging_min_rows is None:
            yield None
            return
        side = _SideStaging(replica, table, self.side_staging_min_rows)
        try:
            yield side
        finally:
            side.close()

    def load_staging(self, conn: sa.Connection, plan: MergePlan, table: pa.Table, execute) -> None:
        _copy(conn, plan.staging, [plan.q(c) for c in plan.staging_columns], table)

    def all_new(self, conn: sa.Connection, plan: MergePlan, staged: pa.Table, execute) -> bool:
        """Also true when an integer key's staged range lies wholly outside the keys of the target
        and of its tombstones: the next slice of an ever-growing id (index endpoint reads only)."""
        key = staged.column(plan.key[0])
        if len(plan.key) > 1 or not pa.types.is_integer(key.type):
            return super().all_new(conn, plan, staged, execute)
        k = plan.q(plan.key[0])
        ends = ", ".join(f"(SELECT {f}({k}) FROM {t})" for t in (plan.target, plan.tombstones) for f in ("MIN", "MAX"))
        t_min, t_max, d_min, d_max = execute(conn, f"SELECT {ends}").one()
        lo, hi = (v.as_py() for v in pc.min_max(key).values())
        return _outside(lo, hi, t_min, t_max) and _outside(lo, hi, d_min, d_max)

    def insert_new(self, conn: sa.Connection, plan: MergePlan, staged: pa.Table, execute) -> bool:
        # straight into the target: no key to compare, so staging would only be written and read back
        _copy(conn, plan.target, [plan.q(c) for c in plan.columns], staged)
        return False

    #: a step at least this big, whose keys lie among the stored ones, is tried as a plain COPY into
    #: the target when none of a sample of :attr:`KEY_SAMPLE` of its keys is stored (new rows with
    #: keys between stored ones: random ids, UUIDs, a backfill)
    optimistic_min_rows = 100_000
    KEY_SAMPLE = 1_000

    def insert_if_new(self, conn: sa.Connection, plan: MergePlan, staged: pa.Table, execute) -> bool | None:
        """Besides :meth:`all_new`'s cases: a big step whose sampled keys are not stored (and no
        tombstone is) is copied straight into the target in a savepoint; the target's unique key
        refuses it if some key was stored after all, and the step is then merged by key. Staging
        a million rows, counting and inserting them cost about twice the COPY."""
        if self.all_new(conn, plan, staged, execute):
            return self.insert_new(conn, plan, staged, execute)
        if not self._probably_new(conn, plan, staged, execute):
            return None
        import psycopg

        try:
            with conn.begin_nested():
                self.insert_new(conn, plan, staged, execute)
        except psycopg.errors.UniqueViolation:
            log.info("replica table %s: a key of the step's %d rows is stored already: merging them by key",
                     plan.target, staged.num_rows)
            return None
        return False

    def _probably_new(self, conn: sa.Connection, plan: MergePlan, staged: pa.Table, execute) -> bool:
        if staged.num_rows < self.optimistic_min_rows or len(plan.key) > 1:
            return False
        key = staged.column(plan.key[0])
        if not (pa.types.is_integer(key.type) or pa.types.is_string(key.type)):
            return False
        k = plan.q(plan.key[0])
        sample = key.take(pa.array(range(0, len(key), max(1, len(key) // self.KEY_SAMPLE)))).to_pylist()
        found = execute(
            conn,
            f"SELECT EXISTS (SELECT 1 FROM {plan.target} WHERE {k} = ANY(CAST({PARAM} AS {self.column_type(key.type)}[]))) "
            f"OR EXISTS (SELECT 1 FROM {plan.tombstones})",
            (sample,),
        ).scalar()
        return not found

    def upsert_sql(self, target, source, columns, key, version, q):
        # a stored row identical to the new one, byte for byte (a replayed slice), is left alone:
        # rewriting it would only add a dead row version, an index entry and WAL (about half the
        # time of such a merge). ``*=`` compares binary images, so values that are equal but
        # differ (1.0 and 1.00, '1 day' and '24 hours', 0 and -0) are still written.
        data = [c for c in columns if c not in key]
        if not data:
            return on_conflict_upsert(target, source, columns, key, version, q)
        stored = ", ".join(f"t.{q(c)}" for c in data)
        new = ", ".join(f"excluded.{q(c)}" for c in data)
        # cast to record: a bare ROW() *= ROW() would be compared column by column, and no column
        # type has a *= operator of its own
        unchanged = f"ROW({stored})::record *= ROW({new})::record"
        return on_conflict_upsert(target, source, columns, key, version, q, and_where=f"NOT {unchanged}")
