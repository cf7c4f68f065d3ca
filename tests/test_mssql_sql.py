"""SQL Server: golden text of the T-SQL the source engine generates, plus live tests.

SQL Server cannot run here: statements are compiled with SQLAlchemy's ``mssql+pyodbc`` dialect
(qmark parameters, as pyodbc sends them) against hand-built tables, with no driver and no server.
The live tests run only when ``MSSQL_URL`` is set (they are skipped otherwise, CI included).
"""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid

import pyarrow as pa
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mssql as ms

from incremental_assets.sources import IntegerKind, RowversionKind, Source, SourceError, TableRef, TimestampKind
from incremental_assets.sources import mssql as engine

from tests.mssql_text import PYODBC, URL, compile_

UTC = dt.timezone.utc



@pytest.fixture
def source() -> Source:
    return Source.offline("sales-mssql", URL)

@pytest.fixture
def adf_table() -> sa.Table:
    return sa.Table(
        "data_source_table",
        sa.MetaData(),
        sa.Column("PersonID", sa.Integer, primary_key=True),
        sa.Column("Name", sa.String(255)),
        sa.Column("LastModifytime", ms.DATETIME2(7)),
        sa.Column("Changed", ms.DATETIMEOFFSET(7)),
        sa.Column("RV", ms.ROWVERSION),
        schema=TableRef("dbo", "data_source_table").sa_schema,  # as describe_table reflects it
    )


COLUMNS = (
    "SELECT [dbo].data_source_table.[PersonID] AS [PersonID], [dbo].data_source_table.[Name] AS [Name], "
    "[dbo].data_source_table.[LastModifytime] AS [LastModifytime], [dbo].data_source_table.[Changed] AS [Changed], "
    "[dbo].data_source_table.[RV] AS [RV] \nFROM [dbo].data_source_table \n"
)


def test_offline_source_never_connects(source):
    assert "S3cret-pw" not in repr(source)
    with pytest.raises(SourceError, match="offline") as caught:
        source.connect()
    assert "S3cret-pw" not in str(caught.value)
    source.dispose()  # harmless


def test_types_and_kinds(source, adf_table):
    info = source.table_info(adf_table, watermark_column="RV")
    assert isinstance(info.kind, RowversionKind)
    assert info.schema == pa.schema(
        [
            ("PersonID", pa.int64()),
            ("Name", pa.string()),
            ("LastModifytime", pa.timestamp("us")),
            ("Changed", pa.timestamp("us", tz="UTC")),
            ("RV", pa.binary()),
        ]
    )
    assert info.primary_key == ["PersonID"] and info.ref == TableRef("dbo", "data_source_table")
    assert info.watermark_indexed is False
    assert source.table_info(adf_table, watermark_column="RV", indexes=[{"column_names": ["RV"]}]).watermark_indexed
    assert source.table_info(adf_table, watermark_column="PersonID").watermark_indexed  # the primary key
    assert isinstance(source.table_info(adf_table, watermark_column="PersonID").kind, IntegerKind)
    stamp = source.table_info(adf_table, watermark_column="LastModifytime").kind
    assert stamp == TimestampKind(timezone_aware=False)
    assert source.table_info(adf_table, watermark_column="Changed").kind == TimestampKind(timezone_aware=True)
    legacy = sa.Table("t", sa.MetaData(), sa.Column("ts", ms.TIMESTAMP), sa.Column("n", sa.Numeric(18, 0)))
    assert isinstance(source.table_info(legacy, watermark_column="ts").kind, RowversionKind)  # timestamp = rowversion
    assert isinstance(source.table_info(legacy, watermark_column="n").kind, IntegerKind)
    with pytest.raises(SourceError, match="cannot be a watermark"):
        source.table_info(adf_table, watermark_column="Name")


def test_rowversion_slice_select(source, adf_table):
    info = source.table_info(adf_table, watermark_column="RV")
    sql, params = compile_(source.select_slice(info, 0x7D1, 0x7D9))
    assert sql == COLUMNS + "WHERE [dbo].data_source_table.[RV] >= ? AND [dbo].data_source_table.[RV] < ?"
    assert params == [bytes.fromhex("00000000000007D1"), bytes.fromhex("00000000000007D9")]

    sql, params = compile_(source.select_slice(info, None, 0x7D9))
    assert sql == COLUMNS + "WHERE [dbo].data_source_table.[RV] < ?"
    assert params == [bytes.fromhex("00000000000007D9")]

    sql, params = compile_(source.select_slice(info, None, None))
    assert (sql, params) == (COLUMNS + "WHERE [dbo].data_source_table.[RV] IS NOT NULL", [])

    sql, params = compile_(source.select_nulls(info))
    assert (sql, params) == (COLUMNS + "WHERE [dbo].data_source_table.[RV] IS NULL", [])


def test_stats_and_existence_selects(source, adf_table):
    info = source.table_info(adf_table, watermark_column="RV")
    sql, params = compile_(source.select_stats(info, 1, 2**63))
    assert sql == (
        "SELECT count(*) AS count_1, min([dbo].data_source_table.[RV]) AS min_1, max([dbo].data_source_table.[RV]) AS max_1 \n"
        "FROM [dbo].data_source_table \n"
        "WHERE [dbo].data_source_table.[RV] >= ? AND [dbo].data_source_table.[RV] < ?"
    )
    assert params == [bytes.fromhex("0000000000000001"), bytes.fromhex("8000000000000000")]
    sql, params = compile_(source.select_any(info, 1, 2))
    assert sql == (
        "SELECT TOP 1 1 \nFROM [dbo].data_source_table \n"
        "WHERE [dbo].data_source_table.[RV] >= ? AND [dbo].data_source_table.[RV] < ?"
    )
    assert params == [bytes.fromhex("0000000000000001"), bytes.fromhex("0000000000000002")]
    # many windows in one statement: a 1 or 0 per window, the first open below
    sql, params = compile_(source.select_windows_with_rows(info, [(None, 2), (2, 3)]))
    assert sql == (
        "SELECT CASE WHEN (EXISTS (SELECT TOP 1 1 \nFROM [dbo].data_source_table \n"
        "WHERE [dbo].data_source_table.[RV] < ?)) THEN ? ELSE ? END AS w0, "
        "CASE WHEN (EXISTS (SELECT TOP 1 1 \nFROM [dbo].data_source_table \n"
        "WHERE [dbo].data_source_table.[RV] >= ? AND [dbo].data_source_table.[RV] < ?)) THEN ? ELSE ? END AS w1"
    )
    assert params == [bytes.fromhex("0000000000000002"), 1, 0, bytes.fromhex("0000000000000002"), bytes.fromhex("0000000000000003"), 1, 0]
    # with an index on the watermark: a MIN per window, which SQL Server answers with one seek
    # (EXISTS would be planned as a scan when the statistics say the window holds many rows)
    indexed = source.table_info(adf_table, watermark_column="RV", indexes=[{"column_names": ["RV"]}])
    sql, params = compile_(source.select_windows_with_rows(indexed, [(None, 2), (2, 3)]))
    assert sql == (
        "SELECT CASE WHEN ((SELECT min([dbo].data_source_table.[RV]) AS min_1 \nFROM [dbo].data_source_table \n"
        "WHERE [dbo].data_source_table.[RV] < ?) IS NOT NULL) THEN ? ELSE ? END AS w0, "
        "CASE WHEN ((SELECT min([dbo].data_source_table.[RV]) AS min_2 \nFROM [dbo].data_source_table \n"
        "WHERE [dbo].data_source_table.[RV] >= ? AND [dbo].data_source_table.[RV] < ?) IS NOT NULL) THEN ? ELSE ? END AS w1"
    )
    assert params == [bytes.fromhex("0000000000000002"), 1, 0, bytes.fromhex("0000000000000002"), bytes.fromhex("0000000000000003"), 1, 0]


def test_timestamp_slice_binds_exact_values(source, adf_table):
    naive = source.table_info(adf_table, watermark_column="LastModifytime")
    lo = dt.datetime(2017, 9, 1, 0, 56, 0, 123456, tzinfo=UTC)
    hi = dt.datetime(2017, 9, 2, 7, 23, tzinfo=dt.timezone(dt.timedelta(hours=2)))  # 05:23 UTC
    sql, params = compile_(source.select_slice(naive, lo, hi))
    assert sql == (
        COLUMNS + "WHERE [dbo].data_source_table.[LastModifytime] >= ? AND [dbo].data_source_table.[LastModifytime] < ?"
    )
    assert params == [dt.datetime(2017, 9, 1, 0, 56, 0, 123456), dt.datetime(2017, 9, 2, 5, 23)]

    paris = source.table_info(adf_table, watermark_column="LastModifytime", column_timezone="Europe/Paris")
    assert compile_(source.select_slice(paris, lo, None))[1] == [dt.datetime(2017, 9, 1, 2, 56, 0, 123456)]

    aware = source.table_info(adf_table, watermark_column="Changed")
    sql, params = compile_(source.select_slice(aware, lo, hi))
    assert sql.endswith("WHERE [dbo].data_source_table.[Changed] >= ? AND [dbo].data_source_table.[Changed] < ?")
    assert params == [lo, dt.datetime(2017, 9, 2, 5, 23, tzinfo=UTC)]


def test_integer_slice_select(source, adf_table):
    info = source.table_info(adf_table, watermark_column="PersonID", columns=["Name"])
    sql, params = compile_(source.select_slice(info, 3, 6))
    assert sql == (
        "SELECT [dbo].data_source_table.[Name] AS [Name], [dbo].data_source_table.[PersonID] AS [PersonID] \n"
        "FROM [dbo].data_source_table \n"
        "WHERE [dbo].data_source_table.[PersonID] >= ? AND [dbo].data_source_table.[PersonID] < ?"
    )
    assert params == [3, 6]


def test_odd_identifiers_are_bracket_quoted(source):
    ref = TableRef.parse('"my.schema".we]ird; DROP TABLE x;--')
    assert ref == TableRef("my.schema", "we]ird; DROP TABLE x;--")
    odd = sa.Table(
        ref.name,
        sa.MetaData(),
        sa.Column("it's [col]", sa.String(10)),
        sa.Column("RV", ms.ROWVERSION),
        schema=ref.sa_schema,  # as describe_table reflects it
    )
    info = source.table_info(odd, watermark_column="RV", ref=ref)
    sql, params = compile_(source.select_slice(info, 1, None))
    assert sql == (
        "SELECT [my.schema].[we]]ird; DROP TABLE x;--].[it's [col]]] AS [it's [col]]], "
        "[my.schema].[we]]ird; DROP TABLE x;--].[RV] AS [RV] \n"
        "FROM [my.schema].[we]]ird; DROP TABLE x;--] \n"
        "WHERE [my.schema].[we]]ird; DROP TABLE x;--].[RV] >= ?"
    )
    assert params == [bytes.fromhex("0000000000000001")]


def test_horizon_statements_golden():
    assert str(engine.NOW) == "SELECT SYSUTCDATETIME()"
    assert str(engine.ROWVERSION_HORIZON) == "SELECT MIN_ACTIVE_ROWVERSION()"
    to_utc = "DATEADD(minute, -DATEPART(TZOFFSET, SYSDATETIMEOFFSET()), {})"
    assert str(engine.OPEN_TRANSACTIONS) == (
        "SELECT CONCAT('transaction of session ', st.session_id) AS who, "
        f"{to_utc.format('at.transaction_begin_time')} AS started_utc "
        "FROM sys.dm_tran_session_transactions AS st "
        "JOIN sys.dm_tran_active_transactions AS at ON at.transaction_id = st.transaction_id "
        "WHERE st.session_id <> @@SPID AND ("
        "EXISTS (SELECT 1 FROM sys.dm_tran_database_transactions AS dt "
        "WHERE dt.transaction_id = st.transaction_id AND dt.database_id = DB_ID()) "
        "OR EXISTS (SELECT 1 FROM sys.dm_exec_sessions AS s "
        "WHERE s.session_id = st.session_id AND s.database_id = DB_ID()))"
    )
    assert str(engine.RUNNING_REQUESTS) == (
        "SELECT CONCAT('statement of session ', r.session_id) AS who, "
        f"{to_utc.format('r.start_time')} AS started_utc "
        "FROM sys.dm_exec_requests AS r JOIN sys.dm_exec_sessions AS s ON s.session_id = r.session_id "
        "WHERE r.session_id <> @@SPID AND s.is_user_process = 1 AND r.database_id = DB_ID()"
    )
    for statement in (engine.NOW, engine.ROWVERSION_HORIZON, engine.OPEN_TRANSACTIONS, engine.RUNNING_REQUESTS):
        compiled = statement.compile(dialect=PYODBC)
        assert str(compiled) == str(statement) and not compiled.positiontup  # nothing bound, nothing formatted
    assert "DATEDIFF_BIG" not in str(engine.OPEN_TRANSACTIONS)  # DATEADD rejects a bigint increment


class _Rows:
    """The two calls the dialect makes on a result: ``scalar()`` and ``all()``."""

    def __init__(self, rows):
        self._rows = rows

    def scalar(self):
        return self._rows[0][0]

    def all(self):
        return list(self._rows)


class _Conn:
    """A stand-in connection answering the dialect's fixed statements (no SQL Server here)."""

    def __init__(self, answers):
        self.answers, self.seen = answers, []

    def execute(self, statement):
        self.seen.append(str(statement))
        return _Rows(self.answers[str(statement)])


def test_horizon_values_from_server_answers():
    dialect = engine.MSSQLDialect()
    began = dt.datetime(2024, 5, 1, 12, 0, 0, 3000)
    conn = _Conn(
        {
            str(engine.ROWVERSION_HORIZON): [(bytes.fromhex("00000000000007D1"),)],
            str(engine.NOW): [(dt.datetime(2024, 5, 1, 12, 0, 5, 1234),)],
            str(engine.OPEN_TRANSACTIONS): [("transaction of session 57", began)],
            str(engine.RUNNING_REQUESTS): [("statement of session 60", began - dt.timedelta(seconds=1))],
        }
    )
    assert dialect.rowversion_horizon(conn) == 0x7D1
    assert RowversionKind().to_text(0x7D1) == "0x00000000000007D1"
    assert dialect.db_now(conn) == dt.datetime(2024, 5, 1, 12, 0, 5, 1234, tzinfo=UTC)
    # legacy datetime (3 ms steps): starts are widened by one step, towards the safe side
    assert dialect.open_transactions(conn) == [("transaction of session 57", began.replace(tzinfo=UTC) - dt.timedelta(milliseconds=4))]
    holds = dialect.timestamp_holds(conn)
    assert [who for who, _ in holds] == ["statement of session 60", "transaction of session 57"]
    assert dialect.clock_margin >= dt.timedelta(seconds=1)


def test_permission_error_names_the_grant():
    class Denied:
        def execute(self, statement):
            raise sa.exc.DBAPIError(str(statement), None, Exception("VIEW SERVER STATE permission was denied"))

    with pytest.raises(SourceError, match="VIEW SERVER STATE"):
        engine.MSSQLDialect().open_transactions(Denied())


# ---------------------------------------------------------------------------------------------
# live: only with a real SQL Server in MSSQL_URL

MSSQL_URL = os.environ.get("MSSQL_URL")
live = pytest.mark.skipif(not MSSQL_URL, reason="set MSSQL_URL to run the live SQL Server tests")


@pytest.fixture
def mssql_table():
    engine_ = sa.create_engine(MSSQL_URL)
    name = f"ia_{uuid.uuid4().hex[:10]}"
    with engine_.begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE TABLE dbo.{name} (PersonID int NOT NULL PRIMARY KEY, Name varchar(255), "
                "LastModifytime datetime2(7) NOT NULL DEFAULT SYSUTCDATETIME(), RV rowversion)"
            )
        )
        conn.execute(sa.text(f"CREATE INDEX ix_{name}_rv ON dbo.{name} (RV)"))
        for pid, name_ in enumerate(["aaaa", "bbbb", "cccc", "dddd", "eeee"], start=1):
            conn.execute(
                sa.text(f"INSERT INTO dbo.{name} (PersonID, Name, LastModifytime) VALUES (:p, :n, :t)"),
                {"p": pid, "n": name_, "t": dt.datetime(2017, 9, pid, 1, 2, 3)},
            )
    yield engine_, name
    with engine_.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS dbo.{name}"))
    engine_.dispose()


def _ids(source, info, lo, hi) -> list[int]:
    return sorted(
        v for batch in source.read_slice(info, lo, hi) for v in batch.column("PersonID").to_pylist()
    )


@pytest.mark.mssql
@live
def test_live_rowversion_slices_and_late_commit(mssql_table):
    engine_, name = mssql_table
    source = Source("live-mssql", MSSQL_URL)
    try:
        info = source.describe_table(f"dbo.{name}", watermark_column="RV")
        assert isinstance(info.kind, RowversionKind) and info.watermark_indexed
        first = source.safe_horizon(info)
        assert first.value is not None and "MIN_ACTIVE_ROWVERSION" in first.note
        assert _ids(source, info, None, first.value) == [1, 2, 3, 4, 5]
        count, low, high = source.slice_stats(info, None, first.value)
        assert count == 5 and low < high < first.value

        late = engine_.connect()
        try:
            late.execute(sa.text(f"INSERT INTO dbo.{name} (PersonID, Name) VALUES (6, 'late')"))
            late_rv = int.from_bytes(late.execute(sa.text(f"SELECT RV FROM dbo.{name} WHERE PersonID = 6")).scalar(), "big")
            with engine_.begin() as other:
                other.execute(sa.text(f"INSERT INTO dbo.{name} (PersonID, Name) VALUES (7, 'committed')"))
            held = source.safe_horizon(info)
            assert held.value <= late_rv, (held, late_rv)
            assert _ids(source, info, first.value, held.value) == []
            stamp = source.describe_table(f"dbo.{name}", watermark_column="LastModifytime")
            late_ts = late.execute(sa.text(f"SELECT LastModifytime FROM dbo.{name} WHERE PersonID = 6")).scalar()
            stamp_horizon = source.safe_horizon(stamp)
            assert stamp_horizon.value is None or stamp_horizon.value <= late_ts.replace(tzinfo=UTC), stamp_horizon
            late.commit()
        finally:
            late.close()
        after = source.safe_horizon(info)
        assert _ids(source, info, held.value, after.value) == [6, 7]
        assert _ids(source, info, None, after.value) == [1, 2, 3, 4, 5, 6, 7]
    finally:
        source.dispose()


@pytest.mark.mssql
@live
def test_live_timestamp_slices_and_odd_names(mssql_table):
    engine_, name = mssql_table
    odd = f'{name}]; DROP TABLE x;--'
    with engine_.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE dbo.[{odd.replace(']', ']]')}] (id int PRIMARY KEY, ts datetime2(7))"))
        conn.execute(sa.text(f"INSERT INTO dbo.[{odd.replace(']', ']]')}] VALUES (1, '2024-01-01T00:00:00.1234567')"))
    source = Source("live-mssql", MSSQL_URL)
    try:
        info = source.describe_table(f"dbo.{name}", watermark_column="LastModifytime")
        bound = dt.datetime(2017, 9, 3, 1, 2, 3, tzinfo=UTC)  # exactly row 3: it starts the second slice
        assert _ids(source, info, None, bound) == [1, 2]
        assert _ids(source, info, bound, None) == [3, 4, 5]
        weird = source.describe_table(f"dbo.{odd}", watermark_column="ts")
        rows = [r for b in source.read_slice(weird, None, None) for r in b.to_pylist()]
        assert rows == [{"id": 1, "ts": dt.datetime(2024, 1, 1, 0, 0, 0, 123456)}]
        horizon = source.safe_horizon(info)
        assert horizon.value is not None and horizon.value <= dt.datetime.now(UTC)
    finally:
        source.dispose()
        with engine_.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS dbo.[{odd.replace(']', ']]')}]"))


@pytest.mark.mssql
@live
def test_live_unreachable_is_reported_without_password():
    url = sa.make_url(MSSQL_URL).set(host="127.0.0.1", port=1, password="S3cret-pw")
    source = Source("dead-mssql", url.render_as_string(hide_password=False), retries=1, retry_delay=0.1)
    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        source.describe_table("dbo.t", watermark_column="RV")
    assert "dead-mssql" in str(caught.value) and "S3cret-pw" not in str(caught.value)
    assert time.monotonic() - started < 120
