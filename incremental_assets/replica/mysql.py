"""MySQL / MariaDB replica: executemany into a temporary staging table, then INSERT ... SELECT ...
ON DUPLICATE KEY UPDATE with the version guard.

- ON DUPLICATE KEY UPDATE has no WHERE: each column is set with ``IF(guard, new, old)``, and the
  version column is assigned **last**, because MySQL evaluates the assignments left to right and
  a guard evaluated after the version changed would compare the new version with itself.
- Text is compared binary and without PAD SPACE (``utf8mb4_nopad_bin`` on MariaDB,
  ``utf8mb4_0900_bin`` on MySQL 8): with the default collations the keys ``'a'``, ``'A'`` and
  ``'a '`` would be one key in the replica while they are three in the source.
- Text keys are ``VARCHAR(n)`` within InnoDB's 3072-byte key limit; other text is ``LONGTEXT``.
- Both timestamp kinds are ``DATETIME(6)``; instants are stored in UTC (sessions run in UTC).
- Sessions run in strict mode, so a value that does not fit fails instead of being truncated.
- DDL commits implicitly here, so :meth:`Replica.ensure_table` runs before the merge's transaction;
  merges of one table queue on ``GET_LOCK`` (a session lock, released after the transaction).
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from .base import (
    DELETED, MergePlan, ReplicaDialect, SqlType, TableShape, decimal_text, duration_micros, register, timestamp_text,
)

SQL_MODE = "STRICT_ALL_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION"
#: best first: binary, NO PAD
COLLATIONS = ("utf8mb4_nopad_bin", "utf8mb4_0900_bin", "utf8mb4_bin")
LOCK_WAIT_SECONDS = 3600


@register("mysql", "mariadb")
class MySQLReplica(ReplicaDialect):
    engine_kwargs = {
        "connect_args": {"init_command": f"SET time_zone = '+00:00', sql_mode = '{SQL_MODE}'", "charset": "utf8mb4"}
    }
    max_key_bytes = 3072
    flag_column_sql = "BOOLEAN NOT NULL DEFAULT 0"
    alters_types = True  # MODIFY COLUMN copies the table, converting every value (strict mode: none may not fit)

    def alter_type_sql(self, name: str, column: str, type_sql: str, *, not_null: bool, using: str | None = None) -> str:
        # MODIFY restates the whole column: its nullability too (replica columns have no default)
        return f"ALTER TABLE {name} MODIFY COLUMN {column} {type_sql} {'NOT NULL' if not_null else 'NULL'}"
    op_column_sql = "CAST(0 AS SIGNED)"

    def __init__(self) -> None:
        self.collation = COLLATIONS[-1]

    def prepare(self, conn: sa.Connection) -> None:
        found = set(
            conn.exec_driver_sql(
                "SELECT COLLATION_NAME FROM information_schema.COLLATIONS WHERE COLLATION_NAME IN (%s, %s, %s)",
                COLLATIONS,
            ).scalars()
        )
        self.collation = next((c for c in COLLATIONS if c in found), COLLATIONS[-1])
        conn.rollback()

    @property
    def table_options(self) -> str:  # type: ignore[override]  # a class attribute in the base
        return f" ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE={self.collation}"

    def column_type(self, t: pa.DataType, *, key_bytes: int | None = None) -> str:
        if pa.types.is_boolean(t):
            return "BOOLEAN"
        if pa.types.is_integer(t):
            name = {8: "TINYINT", 16: "SMALLINT", 32: "INT"}.get(t.bit_width, "BIGINT")
            return name + (" UNSIGNED" if pa.types.is_unsigned_integer(t) else "")
        if pa.types.is_floating(t):
            return "DOUBLE" if t.bit_width == 64 else "FLOAT"
        if pa.types.is_decimal(t):
            if t.precision > 65 or t.scale > 30:
                raise ValueError(f"{t} exceeds MySQL's DECIMAL(65,30)")
            return f"DECIMAL({t.precision},{t.scale})"
        if pa.types.is_string(t):
            kind = f"VARCHAR({max(1, key_bytes // 4)})" if key_bytes else "LONGTEXT"
            return f"{kind} CHARACTER SET utf8mb4 COLLATE {self.collation}"
        if pa.types.is_binary(t):
            return f"VARBINARY({key_bytes})" if key_bytes else "LONGBLOB"
        if pa.types.is_date(t):
            return "DATE"
        if pa.types.is_timestamp(t):
            return "DATETIME(6)"
        if pa.types.is_time(t):
            return "TIME(6)"
        if pa.types.is_duration(t):
            return "BIGINT"  # microseconds
        raise ValueError(f"type {t} has no MySQL mapping")

    def sql_type(self, sa_type: sa.types.TypeEngine) -> SqlType:
        name = type(sa_type).__name__.upper()
        if name == "TINYINT" and getattr(sa_type, "display_width", None) == 1:
            return SqlType("bool", text=str(sa_type))
        if name == "DATETIME":
            return SqlType("timestamp", tz=None, text=str(sa_type))  # no zone recorded: UTC by convention
        if name == "TIMESTAMP":
            return SqlType("timestamp", tz=True, text=str(sa_type))
        if name == "YEAR":
            return SqlType("int", bits=16, text=str(sa_type))
        if name == "FLOAT":  # 4 bytes, unless declared with more than 24 bits of precision
            precision = getattr(sa_type, "precision", None)
            return SqlType("float", bits=64 if precision is not None and precision > 24 else 32, text=str(sa_type))
        return super().sql_type(sa_type)

    def reflect(self, conn: sa.Connection, schema: str | None, table: str) -> TableShape | None:
        # SQLAlchemy reads MySQL's columns and keys from SHOW CREATE TABLE and leaves a backtick
        # in a name doubled as it is quoted there: col`q would come back as col``q
        shape = super().reflect(conn, schema, table)
        if shape is None or not any("`" in c for c in shape.columns):
            return shape
        # the true names, in the same (ordinal) order as the reflected ones
        true = conn.exec_driver_sql(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = COALESCE(%s, DATABASE()) "
            "AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
            (schema, table),
        ).scalars().all()
        if len(true) != len(shape.columns):  # changed meanwhile: the reflection is as good as it gets
            return shape
        names = dict(zip(shape.columns, true))

        def name(column: str) -> str:
            return names.get(column, column)

        return TableShape(
            {name(c): t for c, t in shape.columns.items()},
            [frozenset(map(name, key)) for key in shape.unique_keys],
            [name(c) for c in shape.primary_key],
        )

    # -- staging ------------------------------------------------------------------------------
    def create_staging_sql(self, plan: MergePlan) -> list[str]:
        # a temporary table survives a rollback here: drop a leftover of a failed merge first;
        # the key is declared in the CREATE (an ALTER TABLE would commit the merge's transaction)
        return [
            self.drop_staging_sql(plan),
            f"CREATE TEMPORARY TABLE {plan.staging} (PRIMARY KEY ({', '.join(plan.q(k) for k in plan.key)})) "
            f"AS SELECT {self.staging_select_list(plan)} FROM {plan.target} WHERE 1 = 0",
        ]

    def drop_staging_sql(self, plan: MergePlan) -> str:
        return f"DROP TEMPORARY TABLE IF EXISTS {plan.staging}"

    def python_values(self, array):
        t = array.type
        if pa.types.is_floating(t) and pc.any(pc.or_(pc.is_nan(array), pc.is_inf(array))).as_py():
            raise ValueError("NaN and infinite values cannot be stored in MySQL/MariaDB")
        if pa.types.is_timestamp(t):
            return timestamp_text(array, utc_suffix="").to_pylist()
        if pa.types.is_decimal(t):
            return decimal_text(array)
        if pa.types.is_duration(t):
            return duration_micros(array).to_pylist()
        return array.to_pylist()

    # -- merge --------------------------------------------------------------------------------
    @staticmethod
    def _lock_key(name: str) -> str:
        return "ia_replica_" + hashlib.sha1(name.encode()).hexdigest()  # GET_LOCK names: at most 64 chars

    def lock(self, conn: sa.Connection, name: str) -> None:
        got = conn.exec_driver_sql("SELECT GET_LOCK(%s, %s)", (self._lock_key(name), LOCK_WAIT_SECONDS)).scalar()
        if got != 1:
            raise TimeoutError(f"timed out after {LOCK_WAIT_SECONDS}s waiting for another merge of {name!r}")

    def unlock(self, conn: sa.Connection, name: str) -> None:
        conn.exec_driver_sql("SELECT RELEASE_LOCK(%s)", (self._lock_key(name),)).scalar()
        conn.rollback()

    def upsert_sql(self, target, source, columns, key, version, q):
        v = q(version)
        guard = f"({target}.{v} IS NULL OR (VALUES({v}) IS NOT NULL AND VALUES({v}) >= {target}.{v}))"
        ordered = [c for c in columns if c not in key and c != version] + ([] if version in key else [version])  # version last
        if not ordered:  # every column is in the key: nothing to update
            ordered = [key[0]]
            guard = "FALSE"
        sets = ", ".join(f"{q(c)} = IF({guard}, VALUES({q(c)}), {target}.{q(c)})" for c in ordered)
        return (
            f"INSERT INTO {target} ({', '.join(q(c) for c in columns)}) SELECT * FROM ({source}) AS ia_upsert_source "
            f"ON DUPLICATE KEY UPDATE {sets}"
        )

    def distinct_sql(self, pairs: list[tuple[str, str]]) -> str:
        if not pairs:
            return "1 = 0"
        return "(" + " OR ".join(f"NOT ({a} <=> {b})" for a, b in pairs) + ")"

    # multi-table statements, staged rows first (STRAIGHT_JOIN): each staged delete finds its row by
    # key. MariaDB has no semi-join for a single-table DELETE ... WHERE EXISTS: it would read the
    # whole target and run the subquery for each of its rows
    def delete_sql(self, plan: MergePlan) -> str:
        return (
            f"DELETE t FROM {plan.staging} AS s STRAIGHT_JOIN {plan.target} AS t ON {plan.on('t', 's')} "
            f"WHERE {plan.is_delete()} AND {plan.newer_or_equal('s', 't')}"
        )

    def soft_delete_sql(self, plan: MergePlan) -> str:
        q = plan.q
        return (
            f"UPDATE {plan.staging} AS s STRAIGHT_JOIN {plan.target} AS t ON {plan.on('t', 's')} "
            f"SET t.{q(plan.version)} = s.{q(plan.version)}, t.{q(DELETED)} = s.{q(DELETED)} "
            f"WHERE {plan.is_delete()} AND {plan.newer_or_equal('s', 't')}"
        )
