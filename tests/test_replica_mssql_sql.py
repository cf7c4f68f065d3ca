"""SQL Server replica: golden text of the generated T-SQL, compiled without a server.

Live tests run only when ``MSSQL_URL`` names a SQL Server (``mssql+pyodbc://...``): SQL Server
cannot run on the machines the rest of the suite runs on.
"""

from __future__ import annotations

import datetime as dt
import decimal
import os
import uuid

import pyarrow as pa
import pytest

from incremental_assets.replica import Replica, ReplicaError, reconcile_source
from incremental_assets.replica.mssql import MSSQLReplica

URL = "mssql+pyodbc://ia_user:s3cr3t@sqlhost:1433/replica?driver=ODBC+Driver+18+for+SQL+Server"
UTC = dt.timezone.utc

CUSTOMERS = pa.schema(
    [
        ("PersonID", pa.int32()),
        ("Name", pa.string()),
        ("LastModifytime", pa.timestamp("us", tz="UTC")),
        ("SYS_CHANGE_OPERATION", pa.string()),
    ]
)
# the version guard: the staged row (s) may overwrite the stored one (t), NULL versions being oldest
GUARD = "(t.[LastModifytime] IS NULL OR (s.[LastModifytime] IS NOT NULL AND s.[LastModifytime] >= t.[LastModifytime]))"
# a stored row equal to the staged one (NULL equal to NULL) is not rewritten
CHANGED = "EXISTS (SELECT s.[Name], s.[LastModifytime] EXCEPT SELECT t.[Name], t.[LastModifytime])"
NOT_TOMBSTONED = (
    "(d.[PersonID] IS NULL OR (s.[LastModifytime] IS NOT NULL AND s.[LastModifytime] >= d.[LastModifytime]))"
)


@pytest.fixture
def replica():
    return Replica.offline(URL, schema="dbo")


def test_create_table_maps_every_type_exactly(replica):
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("code", pa.string()),
            ("at", pa.timestamp("us", tz="UTC")),
            ("local", pa.timestamp("ns")),
            ("amount", pa.decimal128(18, 4)),
            ("note", pa.large_string()),
            ("photo", pa.binary()),
            ("flag", pa.bool_()),
            ("day", pa.date32()),
            ("n16", pa.int16()),
            ("n32", pa.int32()),
            ("u8", pa.uint8()),
            ("u64", pa.uint64()),
            ("ratio", pa.float64()),
            ("rv", pa.binary()),
        ]
    )
    table, tombstones = replica.create_table_sql("orders", schema, ["id", "code"], version_column="rv")
    assert table == (
        "CREATE TABLE [dbo].[orders] ([id] BIGINT NOT NULL, [code] NVARCHAR(442) NOT NULL, "
        "[at] DATETIMEOFFSET(6), [local] DATETIME2(6), [amount] DECIMAL(18,4), [note] NVARCHAR(MAX), "
        "[photo] VARBINARY(MAX), [flag] BIT, [day] DATE, [n16] SMALLINT, [n32] INT, [u8] TINYINT, "
        "[u64] DECIMAL(20,0), [ratio] FLOAT(53), [rv] VARBINARY(MAX), PRIMARY KEY ([id], [code]))"
    )
    assert tombstones == (
        "CREATE TABLE [dbo].[orders__deleted] ([id] BIGINT NOT NULL, [code] NVARCHAR(442) NOT NULL, "
        "[rv] VARBINARY(MAX), PRIMARY KEY ([id], [code]))"
    )


def test_text_keys_are_bounded_within_the_900_byte_key_limit(replica):
    schema = pa.schema([("Project", pa.string()), ("Creationtime", pa.timestamp("us"))])
    assert replica.create_table_sql("project_table", schema, ["Project"], version_column="Creationtime") == [
        "CREATE TABLE [dbo].[project_table] ([Project] NVARCHAR(450) NOT NULL, [Creationtime] DATETIME2(6), "
        "PRIMARY KEY ([Project]))",
        "CREATE TABLE [dbo].[project_table__deleted] ([Project] NVARCHAR(450) NOT NULL, [Creationtime] DATETIME2(6), "
        "PRIMARY KEY ([Project]))",
    ]


def test_merge_with_deletes_is_staging_then_one_merge_with_holdlock(replica):
    statements = replica.merge_sql(
        "customer_table", CUSTOMERS, ["PersonID"], version_column="LastModifytime", operation_column="SYS_CHANGE_OPERATION"
    )
    create, keyed, insert, count, merge, tombstones, drop = statements
    # staging: the target's own column types and collations (SELECT INTO), plus the operation flag,
    # clustered on the key
    assert create == (
        "SELECT TOP (0) [PersonID], [Name], [LastModifytime], CAST(0 AS SMALLINT) AS [__ia_op] "
        "INTO [#ia_stage] FROM [dbo].[customer_table]"
    )
    assert keyed == "ALTER TABLE [#ia_stage] ADD PRIMARY KEY CLUSTERED ([PersonID])"
    assert insert == "INSERT INTO [#ia_stage] ([PersonID], [Name], [LastModifytime], [__ia_op]) VALUES (?, ?, ?, ?)"
    assert merge == (
        "MERGE INTO [dbo].[customer_table] WITH (HOLDLOCK) AS t "
        "USING (SELECT s.[PersonID], s.[Name], s.[LastModifytime], s.[__ia_op] FROM [#ia_stage] AS s "
        "LEFT JOIN [dbo].[customer_table__deleted] AS d ON d.[PersonID] = s.[PersonID] "
        f"WHERE s.[__ia_op] = 1 OR {NOT_TOMBSTONED}) AS s "
        "ON t.[PersonID] = s.[PersonID] "
        f"WHEN MATCHED AND s.[__ia_op] = 1 AND {GUARD} THEN DELETE "
        f"WHEN MATCHED AND s.[__ia_op] = 0 AND {GUARD} AND {CHANGED} "
        "THEN UPDATE SET t.[Name] = s.[Name], t.[LastModifytime] = s.[LastModifytime] "
        "WHEN NOT MATCHED BY TARGET AND s.[__ia_op] = 0 "
        "THEN INSERT ([PersonID], [Name], [LastModifytime]) VALUES (s.[PersonID], s.[Name], s.[LastModifytime]);"
    )
    assert tombstones == (
        "MERGE INTO [dbo].[customer_table__deleted] WITH (HOLDLOCK) AS t "
        "USING (SELECT s.[PersonID], s.[LastModifytime] FROM [#ia_stage] AS s WHERE s.[__ia_op] = 1) AS s "
        "ON t.[PersonID] = s.[PersonID] "
        f"WHEN MATCHED AND {GUARD} AND EXISTS (SELECT s.[LastModifytime] EXCEPT SELECT t.[LastModifytime]) "
        "THEN UPDATE SET t.[LastModifytime] = s.[LastModifytime] "
        "WHEN NOT MATCHED BY TARGET THEN INSERT ([PersonID], [LastModifytime]) VALUES (s.[PersonID], s.[LastModifytime]);"
    )
    assert drop == "DROP TABLE [#ia_stage]"
    assert count.startswith("SELECT COUNT(*), SUM(CASE WHEN s.[__ia_op] = 0 AND " + NOT_TOMBSTONED + " AND t.[PersonID] IS NULL")
    assert count.endswith(
        "FROM [#ia_stage] AS s LEFT JOIN [dbo].[customer_table] AS t ON t.[PersonID] = s.[PersonID] "
        "LEFT JOIN [dbo].[customer_table__deleted] AS d ON d.[PersonID] = s.[PersonID]"
    )
    # updated and unchanged are told apart by the same comparison
    assert f"AND t.[PersonID] IS NOT NULL AND {GUARD} AND {CHANGED} THEN 1" in count
    assert f"AND t.[PersonID] IS NOT NULL AND {GUARD} AND NOT {CHANGED} THEN 1" in count
    assert "SYS_CHANGE_OPERATION" not in " ".join(statements)


def test_merge_without_operations_is_an_upsert_guarded_by_tombstones(replica):
    *_, merge, drop = replica.merge_sql("customer_table", CUSTOMERS.remove(3), ["PersonID"], version_column="LastModifytime")
    assert merge == (
        "MERGE INTO [dbo].[customer_table] WITH (HOLDLOCK) AS t "
        "USING (SELECT s.[PersonID], s.[Name], s.[LastModifytime] FROM [#ia_stage] AS s "
        f"LEFT JOIN [dbo].[customer_table__deleted] AS d ON d.[PersonID] = s.[PersonID] WHERE {NOT_TOMBSTONED}) AS s "
        "ON t.[PersonID] = s.[PersonID] "
        f"WHEN MATCHED AND {GUARD} AND {CHANGED} THEN UPDATE SET t.[Name] = s.[Name], t.[LastModifytime] = s.[LastModifytime] "
        "WHEN NOT MATCHED BY TARGET "
        "THEN INSERT ([PersonID], [Name], [LastModifytime]) VALUES (s.[PersonID], s.[Name], s.[LastModifytime]);"
    )


def test_soft_delete_updates_the_flag_and_version_then_merges_the_upserts(replica):
    statements = replica.merge_sql(
        "customer_table", CUSTOMERS, ["PersonID"], version_column="LastModifytime",
        operation_column="SYS_CHANGE_OPERATION", soft_delete=True,
    )
    count, soft, merge = statements[3], statements[4], statements[5]
    # a delete of a row flagged already is not counted
    assert "AND EXISTS (SELECT s.[_deleted] EXCEPT SELECT t.[_deleted]) THEN 1" in count
    assert soft == (
        "UPDATE t SET t.[LastModifytime] = s.[LastModifytime], t.[_deleted] = s.[_deleted] "
        "FROM [dbo].[customer_table] AS t INNER JOIN [#ia_stage] AS s ON t.[PersonID] = s.[PersonID] "
        f"WHERE s.[__ia_op] = 1 AND {GUARD}"
    )
    assert "THEN DELETE" not in merge and "t.[_deleted] = s.[_deleted]" in merge
    assert f"WHERE s.[__ia_op] = 0 AND {NOT_TOMBSTONED}) AS s" in merge


def test_identifiers_are_bracket_quoted(replica):
    schema = pa.schema([("my]key", pa.int32()), ("v", pa.int64())])
    create, _ = replica.create_table_sql("we]ird name", schema, ["my]key"], version_column="v")
    assert create == "CREATE TABLE [dbo].[we]]ird name] ([my]]key] INT NOT NULL, [v] BIGINT, PRIMARY KEY ([my]]key]))"


def test_new_columns_and_the_soft_delete_flag_are_added_nullable_or_defaulted():
    dialect = MSSQLReplica()
    assert dialect.add_column_sql("[dbo].[t]", "[Age]", "INT") == "ALTER TABLE [dbo].[t] ADD [Age] INT NULL"
    assert dialect.add_column_sql("[dbo].[t]", "[_deleted]", dialect.flag_column_sql) == (
        "ALTER TABLE [dbo].[t] ADD [_deleted] BIT NOT NULL DEFAULT 0"
    )


def test_a_widened_column_is_changed_by_a_statement_the_merge_gives():
    """SQL Server's ALTER COLUMN must restate nullability; the merge does not run it (a key
    column's constraint must be dropped around it) but gives it to run."""
    dialect = MSSQLReplica()
    assert not dialect.alters_types
    assert dialect.alter_type_sql("[dbo].[t]", "[amount]", "DECIMAL(12,4)", not_null=False) == (
        "ALTER TABLE [dbo].[t] ALTER COLUMN [amount] DECIMAL(12,4) NULL"
    )
    assert dialect.alter_type_sql("[dbo].[t]", "[id]", "BIGINT", not_null=True) == (
        "ALTER TABLE [dbo].[t] ALTER COLUMN [id] BIGINT NOT NULL"
    )


def test_values_are_sent_as_text_the_server_converts_exactly():
    dialect = MSSQLReplica()
    at = pa.chunked_array([pa.array([dt.datetime(2024, 1, 31, 10, 0, 0, 123456, tzinfo=UTC), None], pa.timestamp("us", tz="UTC"))])
    assert dialect.python_values(at) == ["2024-01-31 10:00:00.123456+00:00", None]
    amounts = pa.chunked_array([pa.array([decimal.Decimal("0.0000000001"), decimal.Decimal("-5")], pa.decimal128(12, 10))])
    assert dialect.python_values(amounts) == ["0.0000000001", "-5.0000000000"]
    with pytest.raises(ValueError, match="exceeds SQL Server's DECIMAL"):
        dialect.column_type(pa.decimal256(40, 2))


def test_offline_replica_never_connects_and_hides_the_password(replica):
    assert "s3cr3t" not in repr(replica)
    with pytest.raises(ReplicaError, match="built offline") as err:
        replica.reconcile("customer_table", ["PersonID"])
    assert "s3cr3t" not in str(err.value)


# -- live, only with a SQL Server ------------------------------------------------------------------

MSSQL_URL = os.environ.get("MSSQL_URL")
live = pytest.mark.skipif(not MSSQL_URL, reason="set MSSQL_URL=mssql+pyodbc://... to run the live SQL Server tests")


@pytest.fixture
def live_replica():
    replica = Replica(MSSQL_URL, retries=1, retry_delay=0.5)
    table = f"ia_test_{uuid.uuid4().hex[:8]}"
    yield replica, table
    with replica.engine.begin() as conn:
        for name in (table, table + "__deleted"):
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS [{name}]")
    replica.dispose()


def _customers(rows, ops=None):
    t = pa.table(
        {
            "PersonID": pa.array([r[0] for r in rows], pa.int32()),
            "Name": pa.array([r[1] for r in rows]),
            "LastModifytime": pa.array([r[2] for r in rows], pa.timestamp("us", tz="UTC")),
        }
    )
    return t.append_column("SYS_CHANGE_OPERATION", pa.array(ops)) if ops else t


@pytest.mark.mssql
@live
def test_live_merge_replay_delete_and_reconcile(live_replica):
    import sqlalchemy as sa

    replica, table = live_replica
    t0 = dt.datetime(2024, 1, 1, tzinfo=UTC)
    day = dt.timedelta(days=1)
    op = "SYS_CHANGE_OPERATION"
    first = replica.merge(table, _customers([(1, "a", t0), (2, "b", t0)], ["I", "I"]), ["PersonID"],
                          version_column="LastModifytime", operation_column=op)
    assert first.inserted == 2
    second = replica.merge(table, _customers([(1, "a2", t0 + day), (2, None, t0 + day)], ["U", "D"]), ["PersonID"],
                           version_column="LastModifytime", operation_column=op)
    assert (second.updated, second.deleted) == (1, 1)
    replay = replica.merge(table, _customers([(1, "a", t0), (2, "b", t0)], ["I", "I"]), ["PersonID"],
                           version_column="LastModifytime", operation_column=op)
    assert (replay.inserted, replay.updated, replay.skipped_older) == (0, 0, 2)
    with replica.engine.connect() as conn:
        rows = conn.exec_driver_sql(f"SELECT [PersonID], [Name], [LastModifytime] FROM [{table}]").all()
    assert [(r[0], r[1]) for r in rows] == [(1, "a2")]
    source = sa.select(sa.literal(1).label("PersonID"), sa.literal(t0 + day).label("LastModifytime")).subquery()
    assert replica.reconcile(table, ["PersonID"])[0] == 1
    assert reconcile_source(replica.engine, source, ["PersonID"]) == replica.reconcile(table, ["PersonID"])
