"""SQL Server change tracking: golden text of every statement, plus live tests.

SQL Server cannot run here: statements are compiled with SQLAlchemy's ``mssql+pyodbc`` dialect
(qmark parameters, as pyodbc sends them) against hand-built tables, with no driver and no server.
The live tests run only when ``MSSQL_URL`` is set (they are skipped otherwise, CI included).
"""

from __future__ import annotations

import datetime as dt
import os
import uuid

import pyarrow as pa
import pytest
import sqlalchemy as sa

from incremental_assets.sources import Source, SourceError, TableRef
from incremental_assets.tracking import (
    SYS_CHANGE_OPERATION,
    SYS_CHANGE_VERSION,
    ChangeReader,
    ChangeTrackingError,
    change_tracking_status,
    disable_change_tracking,
    enable_change_tracking,
)
from incremental_assets.tracking import base
from incremental_assets.tracking import mssql as engine

from tests.mssql_text import URL, compile_

NAME = "[dbo].[data_source_table]"



@pytest.fixture
def source() -> Source:
    return Source.offline("sales-mssql", URL)

@pytest.fixture
def info(source):
    """ADF's change tracking table as describe_table reflects it."""
    table = sa.Table(
        "data_source_table",
        sa.MetaData(),
        sa.Column("PersonID", sa.Integer, primary_key=True),
        sa.Column("Name", sa.String(255)),
        sa.Column("Age", sa.Integer),
        schema=TableRef("dbo", "data_source_table").sa_schema,
    )
    return source.table_info(table, ref=TableRef("dbo", "data_source_table"))


def diagnosis(**overrides):
    found = {
        "object_id": 1237579447, "database_name": "sales", "database_tracked": 1, "table_tracked": 1,
        "snapshot_isolation_state": 1, "can_view_changes": 1, "retention_period": 2, "retention_units": "DAYS",
        "auto_cleanup": True,
    }
    return {**found, **overrides}


def test_versions_are_read_to_microsofts_recipe():
    assert compile_(engine.VERSIONS.bindparams(name=NAME)) == (
        "SELECT CHANGE_TRACKING_MIN_VALID_VERSION(OBJECT_ID(?)) AS min_valid_version, "
        "CHANGE_TRACKING_CURRENT_VERSION() AS current_version",
        [NAME],
    )


def test_full_copy(source, info):
    assert compile_(base.select_full(source, info, 42)) == (
        "SELECT [dbo].data_source_table.[PersonID] AS [PersonID], [dbo].data_source_table.[Name] AS [Name], "
        "[dbo].data_source_table.[Age] AS [Age], ? AS [SYS_CHANGE_VERSION], ? AS [SYS_CHANGE_OPERATION] \n"
        "FROM [dbo].data_source_table",
        [42, "I"],
    )


def test_changes_take_the_key_from_changetable(source, info):
    assert compile_(engine.select_changes(source, info, 12)) == (
        "SELECT ct.[PersonID] AS [PersonID], [dbo].data_source_table.[Name] AS [Name], "
        "[dbo].data_source_table.[Age] AS [Age], ct.[SYS_CHANGE_VERSION] AS [SYS_CHANGE_VERSION], "
        "ct.[SYS_CHANGE_OPERATION] AS [SYS_CHANGE_OPERATION] \n"
        "FROM CHANGETABLE(CHANGES [dbo].[data_source_table], ?) AS ct "
        "LEFT OUTER JOIN [dbo].data_source_table ON [dbo].data_source_table.[PersonID] = ct.[PersonID]",
        [12],
    )


def test_composite_keys_and_selected_columns(source):
    table = sa.Table(
        "order lines",
        sa.MetaData(),
        sa.Column("order", sa.Integer, primary_key=True),
        sa.Column("line]no", sa.Integer, primary_key=True),
        sa.Column("qty", sa.Integer),
        sa.Column("note", sa.String(20)),
        schema=TableRef("sales.eu", "order lines").sa_schema,
    )
    info = source.table_info(table, columns=["qty"], ref=TableRef("sales.eu", "order lines"))
    reader = ChangeReader(source, '"sales.eu".order lines', columns=["qty"], info=info)
    assert reader.info.columns == ["order", "line]no", "qty"]  # the key is always read
    assert reader.schema.names == ["order", "line]no", "qty", SYS_CHANGE_VERSION, SYS_CHANGE_OPERATION]
    text, params = compile_(engine.select_changes(source, reader.info, 7))
    assert text == (
        "SELECT ct.[order] AS [order], ct.[line]]no] AS [line]]no], [sales.eu].[order lines].qty AS qty, "
        "ct.[SYS_CHANGE_VERSION] AS [SYS_CHANGE_VERSION], ct.[SYS_CHANGE_OPERATION] AS [SYS_CHANGE_OPERATION] \n"
        "FROM CHANGETABLE(CHANGES [sales.eu].[order lines], ?) AS ct LEFT OUTER JOIN [sales.eu].[order lines] "
        "ON [sales.eu].[order lines].[order] = ct.[order] AND [sales.eu].[order lines].[line]]no] = ct.[line]]no]"
    )
    assert params == [7]
    assert engine.object_name(reader.info.ref) == "[sales.eu].[order lines]"


def test_diagnosis_query():
    text, params = compile_(engine.DIAGNOSE.bindparams(name=NAME))
    assert text == (
        "SELECT OBJECT_ID(?) AS object_id, DB_NAME() AS database_name, "
        "CASE WHEN EXISTS (SELECT 1 FROM sys.change_tracking_databases WHERE database_id = DB_ID()) THEN 1 ELSE 0 END "
        "AS database_tracked, "
        "CASE WHEN EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID(?)) THEN 1 ELSE 0 END "
        "AS table_tracked, "
        "(SELECT snapshot_isolation_state FROM sys.databases WHERE database_id = DB_ID()) AS snapshot_isolation_state, "
        "HAS_PERMS_BY_NAME(?, 'OBJECT', 'VIEW CHANGE TRACKING') AS can_view_changes, "
        "(SELECT retention_period FROM sys.change_tracking_databases WHERE database_id = DB_ID()) AS retention_period, "
        "(SELECT retention_period_units_desc FROM sys.change_tracking_databases WHERE database_id = DB_ID()) AS retention_units, "
        "(SELECT is_auto_cleanup_on FROM sys.change_tracking_databases WHERE database_id = DB_ID()) AS auto_cleanup"
    )
    assert params == [NAME, NAME, NAME]


def test_enable_and_disable_statements():
    ref = TableRef("dbo", "data_source_table")
    assert engine.enable_database_sql("sales") == (
        "ALTER DATABASE [sales] SET CHANGE_TRACKING = ON (CHANGE_RETENTION = 2 DAYS, AUTO_CLEANUP = ON)"
    )
    assert engine.enable_database_sql(None, dt.timedelta(hours=36)) == (
        "ALTER DATABASE CURRENT SET CHANGE_TRACKING = ON (CHANGE_RETENTION = 36 HOURS, AUTO_CLEANUP = ON)"
    )
    assert engine.enable_database_sql("we]ird", dt.timedelta(minutes=90, seconds=1)).startswith(
        "ALTER DATABASE [we]]ird] SET CHANGE_TRACKING = ON (CHANGE_RETENTION = 91 MINUTES"
    )
    assert engine.snapshot_sql("sales") == "ALTER DATABASE [sales] SET ALLOW_SNAPSHOT_ISOLATION ON"
    assert engine.enable_table_sql(ref) == "ALTER TABLE [dbo].[data_source_table] ENABLE CHANGE_TRACKING"
    assert engine.disable_table_sql(ref) == "ALTER TABLE [dbo].[data_source_table] DISABLE CHANGE_TRACKING"


def test_not_enabled_says_which_sql_enables_it(source):
    ref = TableRef("dbo", "data_source_table")
    message = str(engine.problem(source, ref, diagnosis(database_tracked=0, table_tracked=0, snapshot_isolation_state=0)))
    assert "'dbo.data_source_table'" in message and "not enabled" in message
    assert (
        "ALTER DATABASE [sales] SET CHANGE_TRACKING = ON (CHANGE_RETENTION = 2 DAYS, AUTO_CLEANUP = ON); "
        "ALTER TABLE [dbo].[data_source_table] ENABLE CHANGE_TRACKING; "
        "ALTER DATABASE [sales] SET ALLOW_SNAPSHOT_ISOLATION ON"
    ) in message
    table_only = str(engine.problem(source, ref, diagnosis(table_tracked=0)))
    assert table_only.endswith("enable it with: ALTER TABLE [dbo].[data_source_table] ENABLE CHANGE_TRACKING")
    snapshot = str(engine.problem(source, ref, diagnosis(snapshot_isolation_state=0)))
    assert "snapshot isolation is not allowed" in snapshot and snapshot.endswith("ALTER DATABASE [sales] SET ALLOW_SNAPSHOT_ISOLATION ON")
    permission = str(engine.problem(source, ref, diagnosis(can_view_changes=0)))
    assert "VIEW CHANGE TRACKING" in permission and "GRANT SELECT, VIEW CHANGE TRACKING ON [dbo].[data_source_table]" in permission
    missing = str(engine.problem(source, ref, diagnosis(object_id=None)))
    assert "'dbo.data_source_table'" in missing and "not found" in missing
    assert engine.problem(source, ref, diagnosis()) is None
    assert all("S3cret-pw" not in m for m in (message, table_only, snapshot, permission, missing))


def test_retention_from_the_catalog():
    assert engine._retention(diagnosis()) == dt.timedelta(days=2)
    assert engine._retention(diagnosis(retention_period=90, retention_units="MINUTES")) == dt.timedelta(minutes=90)
    assert engine._retention(diagnosis(retention_period=None)) is None


def test_change_schema_and_offline_read(source, info):
    reader = ChangeReader(source, "dbo.data_source_table", info=info)
    assert reader.schema == pa.schema(
        [("PersonID", pa.int64()), ("Name", pa.string()), ("Age", pa.int64()),
         (SYS_CHANGE_VERSION, pa.int64()), (SYS_CHANGE_OPERATION, pa.string())]
    )
    assert base.tracker_for(source).native
    with pytest.raises(SourceError, match="offline") as caught:
        with reader.read(None):
            pass
    assert "S3cret-pw" not in str(caught.value)


def test_keyless_table_is_refused(source):
    table = sa.Table("project_table", sa.MetaData(), sa.Column("Project", sa.String(255)), sa.Column("Creationtime", sa.DateTime))
    info = source.table_info(table)
    with pytest.raises(ChangeTrackingError, match="'project_table'.*no primary key"):
        ChangeReader(source, "project_table", info=info)


# -- live ---------------------------------------------------------------------------------------------
MSSQL_URL = os.environ.get("MSSQL_URL")
live = pytest.mark.skipif(not MSSQL_URL, reason="set MSSQL_URL to run the SQL Server live tests")


@pytest.fixture
def live_table():
    name = f"ia_ct_{uuid.uuid4().hex[:8]}"
    engine_ = sa.create_engine(MSSQL_URL)
    with engine_.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE dbo.{name} (PersonID int PRIMARY KEY, Name varchar(255), Age int)")
        conn.exec_driver_sql(
            f"INSERT INTO dbo.{name} VALUES (1, 'aaaa', 21), (2, 'bbbb', 24), (3, 'cccc', 20), (4, 'dddd', 26), (5, 'eeee', 22)"
        )
    source = Source("live-mssql", MSSQL_URL, retries=0)
    yield engine_, source, f"dbo.{name}"
    source.dispose()
    with engine_.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS dbo.{name}")
    engine_.dispose()


@live
def test_live_change_tracking_tutorial(live_table):
    engine_, source, table = live_table
    with pytest.raises(ChangeTrackingError, match="ENABLE CHANGE_TRACKING"):
        with ChangeReader(source, table).read(None):
            pass
    enable_change_tracking(source, table)
    assert "already enabled" in enable_change_tracking(source, table)
    status = change_tracking_status(source, table)
    assert status["enabled"] and status["native"] and status["current_version"] is not None
    reader = ChangeReader(source, table)
    with reader.read(None) as full:
        rows = pa.Table.from_batches(list(full.batches), schema=full.schema)
    assert full.reinitialized and rows.num_rows == 5
    with engine_.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO {table} VALUES (6, 'new', 50)")
        conn.exec_driver_sql(f"UPDATE {table} SET Age = 10, Name = 'update' WHERE PersonID = 1")
        conn.exec_driver_sql(f"DELETE FROM {table} WHERE PersonID = 2")
    with reader.read(full.new_version) as delta:
        rows = pa.Table.from_batches(list(delta.batches), schema=delta.schema)
    got = {r["PersonID"]: (r[SYS_CHANGE_OPERATION], r["Name"]) for r in rows.to_pylist()}
    assert got == {6: ("I", "new"), 1: ("U", "update"), 2: ("D", None)}
    assert not delta.reinitialized and delta.new_version > full.new_version
    with pytest.raises(ChangeTrackingError):
        with reader.read(-1, on_expired="fail"):
            pass
    assert "disabled" in disable_change_tracking(source, table)
