"""SQL Server / Azure SQL replica: a ``#temp`` staging table filled with pyodbc ``fast_executemany``,
then ``MERGE ... WITH (HOLDLOCK)`` with the version guard and the deletes in one statement.

- The staging table is ``SELECT TOP (0) ... INTO #...`` from the target: it has the target's types
  and, above all, its collations (a ``#temp`` table otherwise takes tempdb's collation and the
  key join fails with a collation conflict).
- ``HOLDLOCK`` (serializable range locks) stops two merges from inserting the same key between
  MERGE's match and its insert; merges of one table also queue on ``sp_getapplock``.
- Text keys are ``NVARCHAR(n)`` within the 900-byte key limit; other text is ``NVARCHAR(MAX)``.
  Timestamps, decimals, dates and times are sent as text the server converts exactly
  (pyodbc would round datetimes and times, and scientific-notation decimals do not convert).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from .base import (
    DELETED,
    PARAM,
    MergePlan,
    ReplicaDialect,
    SqlType,
    decimal_text,
    duration_micros,
    register,
    timestamp_text,
)

LOCK_WAIT_MS = 3_600_000
LOCK_SQL = (
    "SET NOCOUNT ON; DECLARE @result int; "
    "EXEC @result = sp_getapplock @Resource = ?, @LockMode = 'Exclusive', @LockOwner = 'Transaction', "
    "@LockTimeout = ?; SELECT @result"
)
BATCH_ROWS = 10_000


@register("mssql")
class MSSQLReplica(ReplicaDialect):
    max_key_bytes = 900
    driver_paramstyle = "qmark"  # pyodbc
    flag_column_sql = "BIT NOT NULL DEFAULT 0"

    def staging_name(self, token: str) -> str:
        return f"#ia_stage_{token}" if token else "#ia_stage"

    def column_type(self, t: pa.DataType, *, key_bytes: int | None = None) -> str:
        if pa.types.is_boolean(t):
            return "BIT"
        if pa.types.is_integer(t):
            if pa.types.is_uint8(t):
                return "TINYINT"
            signed_bits = t.bit_width + (1 if pa.types.is_unsigned_integer(t) else 0)
            if signed_bits <= 16:
                return "SMALLINT"
            if signed_bits <= 32:
                return "INT"
            if signed_bits <= 64:
                return "BIGINT"
            return "DECIMAL(20,0)"
        if pa.types.is_floating(t):
            return "FLOAT(53)" if t.bit_width == 64 else "REAL"
        if pa.types.is_decimal(t):
            if t.precision > 38:
                raise ValueError(f"{t} exceeds SQL Server's DECIMAL(38)")
            return f"DECIMAL({t.precision},{t.scale})"
        if pa.types.is_string(t):
            return f"NVARCHAR({min(4000, max(1, key_bytes // 2))})" if key_bytes else "NVARCHAR(MAX)"
        if pa.types.is_binary(t):
            return f"VARBINARY({min(8000, key_bytes)})" if key_bytes else "VARBINARY(MAX)"
        if pa.types.is_date(t):
            return "DATE"
        if pa.types.is_timestamp(t):
            return "DATETIMEOFFSET(6)" if t.tz is not None else "DATETIME2(6)"
        if pa.types.is_time(t):
            return "TIME(6)"
        if pa.types.is_duration(t):
            return "BIGINT"  # microseconds
        raise ValueError(f"type {t} has no SQL Server mapping")

    def sql_type(self, sa_type: sa.types.TypeEngine) -> SqlType:
        name = type(sa_type).__name__.upper()
        if name == "TINYINT":
            return SqlType("int", bits=8, unsigned=True, text=str(sa_type))
        if name in ("MONEY", "SMALLMONEY"):
            return SqlType("decimal", precision=19 if name == "MONEY" else 10, scale=4, text=name)
        return super().sql_type(sa_type)

    def add_column_sql(self, name: str, column: str, type_sql: str) -> str:
        return f"ALTER TABLE {name} ADD {column} {type_sql}" + ("" if "NULL" in type_sql else " NULL")

    # not run by the merge: a key column's constraint (and any index on the column) must be
    # dropped and created again around it, which is the table owner's call
    def alter_type_sql(self, name: str, column: str, type_sql: str, *, not_null: bool, using: str | None = None) -> str:
        return f"ALTER TABLE {name} ALTER COLUMN {column} {type_sql} {'NOT NULL' if not_null else 'NULL'}"

    # -- staging ------------------------------------------------------------------------------
    def create_staging_sql(self, plan: MergePlan) -> list[str]:
        return [
            f"SELECT TOP (0) {self.staging_select_list(plan)} INTO {plan.staging} FROM {plan.target}",
            f"ALTER TABLE {plan.staging} ADD PRIMARY KEY CLUSTERED ({', '.join(plan.q(k) for k in plan.key)})",
        ]

    def clear_staging_sql(self, plan: MergePlan) -> str:
        return f"TRUNCATE TABLE {plan.staging}"

    def python_values(self, array):
        t = array.type
        if pa.types.is_floating(t) and pc.any(pc.or_(pc.is_nan(array), pc.is_inf(array))).as_py():
            raise ValueError("NaN and infinite values cannot be stored in SQL Server")
        if pa.types.is_timestamp(t):
            return timestamp_text(array).to_pylist()
        if pa.types.is_decimal(t):
            return decimal_text(array)
        if pa.types.is_uint64(t) or pa.types.is_date(t) or pa.types.is_time(t):
            return pc.cast(array, pa.string()).to_pylist()
        if pa.types.is_duration(t):
            return duration_micros(array).to_pylist()
        return array.to_pylist()

    @staticmethod
    def input_sizes(schema: pa.Schema) -> list:
        """``setinputsizes`` for fast_executemany: (MAX) columns must be bound as such or pyodbc
        allocates their full 2 GB per row (pyodbc issue #547) or truncates them."""
        import pyodbc

        sizes = []
        for f in schema:
            t = f.type
            if (
                pa.types.is_string(t) or pa.types.is_timestamp(t) or pa.types.is_decimal(t)
                or pa.types.is_date(t) or pa.types.is_time(t) or pa.types.is_uint64(t)
            ):  # sent as text (see python_values)
                sizes.append((pyodbc.SQL_WVARCHAR, 0, 0))
            elif pa.types.is_binary(t):
                sizes.append((pyodbc.SQL_VARBINARY, 0, 0))
            else:
                sizes.append(None)
        return sizes

    def load_staging(self, conn: sa.Connection, plan: MergePlan, table: pa.Table, execute) -> None:
        sql = self.insert_staging_sql(plan).replace(PARAM, "?")
        sizes = self.input_sizes(table.schema)
        cursor = conn.connection.driver_connection.cursor()  # pyodbc, inside the merge's transaction
        try:
            cursor.fast_executemany = True
            for batch in table.to_batches(max_chunksize=BATCH_ROWS):
                rows = list(zip(*self.python_columns(batch)))
                cursor.setinputsizes(sizes)
                cursor.executemany(sql, rows)
        finally:
            cursor.close()

    # -- merge --------------------------------------------------------------------------------
    def lock(self, conn: sa.Connection, name: str) -> None:
        result = conn.exec_driver_sql(LOCK_SQL, (name[:255], LOCK_WAIT_MS)).scalar()
        if result is None or result < 0:
            raise TimeoutError(f"could not take the lock for {name!r} (sp_getapplock returned {result})")

    @staticmethod
    def _merge(target: str, source: str, columns: list[str], key: list[str], version: str, q, *, matched: list[str], insert_when: str = "") -> str:
        on = " AND ".join(f"t.{q(k)} = s.{q(k)}" for k in key)
        cols = ", ".join(q(c) for c in columns)
        values = ", ".join(f"s.{q(c)}" for c in columns)
        return (
            f"MERGE INTO {target} WITH (HOLDLOCK) AS t USING ({source}) AS s ON {on} "
            + " ".join(matched)
            + f" WHEN NOT MATCHED BY TARGET{insert_when} THEN INSERT ({cols}) VALUES ({values});"
        )

    @staticmethod
    def _guard(version: str, q) -> str:
        v = q(version)
        return f"(t.{v} IS NULL OR (s.{v} IS NOT NULL AND s.{v} >= t.{v}))"

    @staticmethod
    def _sets(columns: list[str], key: list[str], q) -> str:
        return ", ".join(f"t.{q(c)} = s.{q(c)}" for c in columns if c not in key)

    def distinct_sql(self, pairs):
        # EXISTS ... EXCEPT: NULL-safe on every version (IS DISTINCT FROM needs SQL Server 2022)
        if not pairs:
            return "1 = 0"
        return f"EXISTS (SELECT {', '.join(a for a, _ in pairs)} EXCEPT SELECT {', '.join(b for _, b in pairs)})"

    def _changed(self, columns: list[str], key: list[str], q) -> str:
        """The staged row differs from the stored one: an equal row is not rewritten."""
        return self.distinct_sql([(f"s.{q(c)}", f"t.{q(c)}") for c in columns if c not in key])

    def upsert_sql(self, target, source, columns, key, version, q):
        if not [c for c in columns if c not in key]:  # every column is in the key: insert only
            return self._merge(target, source, columns, key, version, q, matched=[])
        guard = f"{self._guard(version, q)} AND {self._changed(columns, key, q)}"
        update = f"WHEN MATCHED AND {guard} THEN UPDATE SET {self._sets(columns, key, q)}"
        return self._merge(target, source, columns, key, version, q, matched=[update])

    def merge_statements(self, plan: MergePlan) -> list[str]:
        if not plan.deletes or plan.soft_delete:
            return super().merge_statements(plan)
        # hard deletes: one MERGE deletes, updates and inserts
        q, guard = plan.q, self._guard(plan.version, plan.q)
        cols = ", ".join(f"s.{q(c)}" for c in plan.staging_columns)
        source = (
            f"SELECT {cols} FROM {plan.staging} AS s LEFT JOIN {plan.tombstones} AS d ON {plan.on('d', 's')} "
            f"WHERE {plan.is_delete()} OR {plan.not_tombstoned('s')}"
        )
        main = self._merge(
            plan.target, source, plan.columns, plan.key, plan.version, q,
            matched=[
                f"WHEN MATCHED AND {plan.is_delete()} AND {guard} THEN DELETE",
                f"WHEN MATCHED AND {plan.is_upsert()} AND {guard} AND {self._changed(plan.columns, plan.key, q)} "
                f"THEN UPDATE SET {self._sets(plan.columns, plan.key, q)}",
            ],
            insert_when=f" AND {plan.is_upsert()}",
        )
        tombstones = self.upsert_sql(
            plan.tombstones, self.tombstone_source_sql(plan), plan.tomb_columns, plan.key, plan.version, q
        )
        return [main, tombstones]

    def soft_delete_sql(self, plan: MergePlan) -> str:
        q = plan.q
        return (
            f"UPDATE t SET t.{q(plan.version)} = s.{q(plan.version)}, t.{q(DELETED)} = s.{q(DELETED)} "
            f"FROM {plan.target} AS t INNER JOIN {plan.staging} AS s ON {plan.on('t', 's')} "
            f"WHERE {plan.is_delete()} AND {plan.newer_or_equal('s', 't')}"
        )
