"""The source engine against real databases (SQLite file, PostgreSQL, MariaDB); no mocks.

Slices are half-open ``[lo, hi)``; horizons are exclusive bounds below which no future commit can
land. Late-commit tests hold a transaction open on a second, real connection.
"""

from __future__ import annotations

import datetime as dt
import decimal
import logging
import threading
import time
import traceback

import pyarrow as pa
import pytest
import sqlalchemy as sa

from incremental_assets.sources import (
    Horizon,
    IntegerKind,
    Source,
    SourceError,
    SourceUnavailable,
    TableRef,
    TimestampKind,
)

UTC = dt.timezone.utc

ADF_ROWS = [
    (1, "aaaa", "2017-09-01 00:56:00"),
    (2, "bbbb", "2017-09-02 05:23:00"),
    (3, "cccc", "2017-09-03 02:36:00"),
    (4, "dddd", "2017-09-04 03:21:00"),
    (5, "eeee", "2017-09-05 08:06:00"),
]


def utc(*args) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def engine_of(db) -> str:
    return db.engine.dialect.name  # sqlite | postgresql | mysql


def ts_type(db, fsp: int | None = None) -> str:
    if engine_of(db) == "postgresql":
        return "timestamp" if fsp is None else f"timestamp({fsp})"
    return "datetime" if fsp is None else f"datetime({fsp})"


def read(source: Source, info, lo, hi) -> pa.Table:
    batches = list(source.read_slice(info, lo, hi, batch_size=2))
    for batch in batches:
        assert batch.schema == info.schema
    return pa.Table.from_batches(batches, schema=info.schema)


def col(table: pa.Table, name: str) -> list:
    """A column's values, its name matched without case (PostgreSQL folds unquoted names to lower case)."""
    [real] = [n for n in table.column_names if n.lower() == name.lower()]
    return table.column(real).to_pylist()


def create_adf_table(db, extra_rows=(), *, index=False):
    db.run(f"CREATE TABLE data_source_table (PersonID int, Name varchar(255), LastModifytime {ts_type(db)})")
    if index:
        db.run("CREATE INDEX ix_dst_lm ON data_source_table (LastModifytime)")
    for pid, name, ts in [*ADF_ROWS, *extra_rows]:
        db.run(
            "INSERT INTO data_source_table (PersonID, Name, LastModifytime) VALUES (:p, :n, :t)",
            params={"p": pid, "n": name, "t": ts},
        )


# ---------------------------------------------------------------------------------------------
# slices


def test_adf_table_by_consecutive_slices(any_db, sources):
    create_adf_table(any_db)
    source = sources(any_db)
    info = source.describe_table("data_source_table", watermark_column="LastModifytime")
    assert isinstance(info.kind, TimestampKind) and not info.kind.timezone_aware
    assert [c.lower() for c in info.columns] == ["personid", "name", "lastmodifytime"]
    assert info.watermark_column in info.columns  # the real name, whatever case the engine folded to
    assert info.schema.field(info.watermark_column).type == pa.timestamp("us")
    assert info.watermark_indexed is False

    # bounds: an open start, one bound exactly on row 2's watermark, one between rows, the horizon
    horizon = source.safe_horizon(info)
    assert horizon.value is not None and horizon.value > utc(2017, 9, 6)
    bounds = [None, utc(2017, 9, 2, 5, 23), utc(2017, 9, 4), utc(2017, 9, 5, 8, 6), horizon.value]
    seen: list[int] = []
    for lo, hi in zip(bounds, bounds[1:]):
        part = read(source, info, lo, hi)
        ids = col(part, "PersonID")
        stamps = [v.replace(tzinfo=UTC) for v in col(part, "LastModifytime")]
        assert all((lo is None or s >= lo) and s < hi for s in stamps)
        count, low, high = source.slice_stats(info, lo, hi)
        assert count == len(ids)
        assert source.has_rows(info, lo, hi) == bool(ids)
        if ids:
            assert (low, high) == (min(stamps), max(stamps))
        else:
            assert (low, high) == (None, None)
        seen += ids
    assert sorted(seen) == [1, 2, 3, 4, 5] and len(seen) == len(set(seen))
    # the row exactly on a bound belongs to the slice that starts there
    assert read(source, info, utc(2017, 9, 2, 5, 23), utc(2017, 9, 4)).column(info.columns[0]).to_pylist() == [2, 3]
    assert read(source, info, None, utc(2017, 9, 2, 5, 23)).column(info.columns[0]).to_pylist() == [1]
    # values come back exactly
    everything = read(source, info, None, None).sort_by(info.columns[0]).to_pylist()
    assert list(everything[1].values()) == [2, "bbbb", dt.datetime(2017, 9, 2, 5, 23)]


def test_ties_on_a_boundary_land_in_exactly_one_slice(any_db, sources):
    tie = "2017-09-03 02:36:00"
    create_adf_table(any_db, extra_rows=[(6, "tie1", tie), (7, "tie2", tie), (8, "tie3", tie)])
    source = sources(any_db)
    info = source.describe_table("data_source_table", watermark_column="LastModifytime")
    cut = utc(2017, 9, 3, 2, 36)
    below = read(source, info, utc(2017, 9, 1), cut).column(info.columns[0]).to_pylist()
    above = read(source, info, cut, utc(2017, 9, 6)).column(info.columns[0]).to_pylist()
    assert sorted(below) == [1, 2]
    assert sorted(above) == [3, 4, 5, 6, 7, 8]
    assert source.slice_stats(info, cut, cut + dt.timedelta(microseconds=1))[0] == 4
    assert source.slice_stats(info, cut - dt.timedelta(microseconds=1), cut)[0] == 0
    # an empty slice [x, x) holds nothing, even on a tie
    assert source.slice_stats(info, cut, cut)[0] == 0 and not source.has_rows(info, cut, cut)


@pytest.mark.parametrize("index", [True, False], ids=["index", "no-index"])
def test_windows_with_rows_answers_for_many_windows_at_once(any_db, sources, index):
    create_adf_table(any_db, index=index)
    source = sources(any_db)
    info = source.describe_table("data_source_table", watermark_column="LastModifytime")
    assert info.watermark_indexed is index  # an index probe per window, or an EXISTS each
    # 250 half-day windows from 2017-08-20 (more than one statement's worth), the first open
    edges = [utc(2017, 8, 20) + dt.timedelta(hours=12 * k) for k in range(251)]
    bounds = [(None if k == 0 else lo, hi) for k, (lo, hi) in enumerate(zip(edges, edges[1:]))]
    stamps = [dt.datetime.fromisoformat(ts).replace(tzinfo=UTC) for _, _, ts in ADF_ROWS]
    expected = [any((lo is None or s >= lo) and s < hi for s in stamps) for lo, hi in bounds]
    assert sum(expected) == 5
    assert source.windows_with_rows(info, bounds) == expected
    assert source.windows_with_rows(info, []) == []
    assert [source.has_rows(info, lo, hi) for lo, hi in bounds] == expected


def test_windows_without_an_index_come_from_one_ordered_read(any_db, sources, tmp_path, caplog):
    """No index on the watermark: a run of several windows reads them in one scan in watermark
    order (not a scan per window) and cuts it at the windows' bounds. Each window gets exactly
    the rows a read of its own gets, ties on a bound included; an empty window gets no file, or
    with a refresh loses its files. Then the same with an index."""
    from incremental_assets.copying import PlannedSlice, copy_window_slices
    from incremental_assets.landing import open_landing_store

    stamps = ["2017-08-30 23:59:59.999999", "2017-09-01 00:00:00", "2017-09-01 00:00:00", "2017-09-01 12:00:00",
              "2017-09-03 00:00:00", "2017-09-03 00:00:00.000001", "2017-09-03 23:00:00"]
    create_adf_table(any_db, extra_rows=[(10 + k, "x", ts) for k, ts in enumerate(stamps)])
    source = sources(any_db)
    info = source.describe_table("data_source_table", watermark_column="LastModifytime")
    assert not info.watermark_indexed
    edges = [None, utc(2017, 9, 1), utc(2017, 9, 2), utc(2017, 9, 3), utc(2017, 9, 4)]
    planned = [PlannedSlice(f"w{k}", lo, hi) for k, (lo, hi) in enumerate(zip(edges, edges[1:]))]
    expected = {p.partition: sorted(col(read(source, info, p.lo, p.hi), "PersonID")) for p in planned}
    assert expected == {"w0": [10], "w1": [1, 11, 12, 13], "w2": [2], "w3": [3, 14, 15, 16]}  # 4, 5: later
    stamps = sorted(info.kind.from_db(v) for v in col(read(source, info, None, utc(2017, 9, 4)), "LastModifytime"))
    span = (stamps[0], stamps[-1])  # 2017-08-30 23:59:59[.999999] (as the column's precision keeps it), 09-03 23:00
    assert span[0].date() == dt.date(2017, 8, 30) and span[1] == utc(2017, 9, 3, 23)
    assert source.watermark_range(info, None, utc(2017, 9, 4)) == span
    assert source.watermark_range(info, utc(2017, 9, 6), None) == (None, None)
    batch = 3 if engine_of(any_db) != "sqlite" else 100_000  # several batches cut across windows

    def landed(store):
        return {p.partition: sorted(v for f in store.list_files("t", p.partition)
                                    for v in col(store.read_arrow(f), "PersonID")) for p in planned}

    any_db.run("DELETE FROM data_source_table WHERE PersonID = 2")  # w2 is now empty
    expected["w2"] = []
    caplog.set_level(logging.INFO, logger="incremental_assets")
    store = open_landing_store(str(tmp_path / "one"), "parquet")
    copies = copy_window_slices(source, info, store, planned, table="t", batch_size=batch)
    assert [c.partition for c in copies] == ["w0", "w1", "w3"] and landed(store) == expected
    one_read = "windows from one read in watermark order" in caplog.text
    assert one_read == (engine_of(any_db) != "sqlite")  # SQLite compares its timestamps as text
    copies = copy_window_slices(source, info, store, planned, table="t", batch_size=batch, replace=True)
    assert [(c.partition, c.rows) for c in copies] == [("w0", 1), ("w1", 4), ("w2", 0), ("w3", 4)]
    assert landed(store) == expected

    any_db.run("CREATE INDEX ix_dst_lm ON data_source_table (LastModifytime)")
    info = source.describe_table("data_source_table", watermark_column="LastModifytime")
    assert info.watermark_indexed
    assert source.watermark_range(info, None, utc(2017, 9, 4)) == span
    caplog.clear()
    other = open_landing_store(str(tmp_path / "each"), "parquet")
    copy_window_slices(source, info, other, planned, table="t", batch_size=batch)
    assert landed(other) == expected
    # the other engines read window by window; PostgreSQL sorts the few rows of a table its
    # statistics do not say is stored in watermark order in one read
    assert ("one read" in caplog.text) == (engine_of(any_db) == "postgresql")


def test_integer_watermark_slices_and_horizon(any_db, sources):
    create_adf_table(any_db)
    source = sources(any_db)
    info = source.describe_table("data_source_table", watermark_column="PersonID")
    assert isinstance(info.kind, IntegerKind)
    horizon = source.safe_horizon(info)
    assert horizon.value == 6  # MAX + 1: exclusive
    parts = [read(source, info, lo, hi).column(info.columns[0]).to_pylist() for lo, hi in [(None, 3), (3, 5), (5, horizon.value)]]
    assert parts == [[1, 2], [3, 4], [5]]


def test_selected_columns_keep_the_watermark(any_db, sources):
    create_adf_table(any_db)
    source = sources(any_db)
    info = source.describe_table("data_source_table", watermark_column="LastModifytime", columns=["Name"])
    assert [c.lower() for c in info.columns] == ["name", "lastmodifytime"]
    table = read(source, info, None, None)
    assert table.column_names == info.columns and table.num_rows == 5


# ---------------------------------------------------------------------------------------------
# exact types


def test_postgresql_types_round_trip(pg_db, sources):
    pg_db.run(
        "CREATE TABLE typed (id int PRIMARY KEY, at timestamptz, naive timestamp, amount numeric(18,4), "
        "note text, payload bytea, flag boolean, big numeric)",
        "SET TIME ZONE 'Asia/Kolkata'",
        "INSERT INTO typed VALUES (1, '2024-03-10 12:34:56.123456+05:30', '2024-03-10 12:34:56.654321', "
        "12345678901234.5678, 'héllo ''quoted''', '\\x00ff10'::bytea, true, 123456789012345678901234567890.123456789)",
        "INSERT INTO typed VALUES (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
    )
    source = sources(pg_db)
    info = source.describe_table("typed", watermark_column="at")
    assert info.kind.timezone_aware
    assert info.watermark_indexed is False
    assert info.primary_key == ["id"]
    assert info.schema.field("at").type == pa.timestamp("us", tz="UTC")
    assert info.schema.field("naive").type == pa.timestamp("us")
    assert info.schema.field("amount").type == pa.decimal128(18, 4)
    assert info.schema.field("note").type == pa.string()
    assert info.schema.field("payload").type == pa.binary()
    assert info.schema.field("flag").type == pa.bool_()
    assert info.schema.field("big").type == pa.string()  # unconstrained numeric: kept as exact text

    table = read(source, info, None, None)
    assert table.num_rows == 1  # the NULL-watermark row is not in an unbounded slice either
    row = table.to_pylist()[0]
    instant = utc(2024, 3, 10, 7, 4, 56, 123456)
    assert row["at"] == instant and row["at"].utcoffset() == dt.timedelta(0)
    assert row["naive"] == dt.datetime(2024, 3, 10, 12, 34, 56, 654321)
    assert row["amount"] == decimal.Decimal("12345678901234.5678")
    assert row["note"] == "héllo 'quoted'"
    assert row["payload"] == b"\x00\xff\x10"
    assert row["flag"] is True
    assert decimal.Decimal(row["big"]) == decimal.Decimal("123456789012345678901234567890.123456789")

    # microsecond-exact bounds: [instant, instant + 1us) holds the row, [.., instant) does not
    assert read(source, info, instant, instant + dt.timedelta(microseconds=1)).num_rows == 1
    assert read(source, info, instant - dt.timedelta(seconds=1), instant).num_rows == 0
    # the same instant given in another zone is the same bound
    kolkata = instant.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30)))
    assert read(source, info, kolkata, None).num_rows == 1
    assert source.slice_stats(info, None, None) == (1, instant, instant)

    # a naive timestamp watermark with a column time zone
    local = source.describe_table("typed", watermark_column="naive", column_timezone="Europe/Paris")
    as_utc = utc(2024, 3, 10, 11, 34, 56, 654321)  # 12:34:56.654321 in Paris (UTC+1 in March)
    assert read(source, local, as_utc, as_utc + dt.timedelta(microseconds=1)).num_rows == 1
    assert source.slice_stats(local, None, None)[1] == as_utc


@pytest.mark.parametrize("driver", ["mariadb_db", "mariadb_mysqlclient_db"])
def test_mariadb_types_round_trip(request, driver, sources):
    mariadb_db = request.getfixturevalue(driver)
    mariadb_db.run(
        "CREATE TABLE typed (id int PRIMARY KEY, at6 DATETIME(6), amount DECIMAL(18,4), "
        "stamp TIMESTAMP(6) NULL DEFAULT NULL, plain TIMESTAMP NULL DEFAULT NULL, big BIGINT UNSIGNED, "
        "note varchar(50), payload varbinary(10))",
        # TIMESTAMP is an instant: written from a +05:30 session, it must read as the same UTC instant
        "SET time_zone = '+05:30'",
        "INSERT INTO typed VALUES (1, '2024-03-10 12:34:56.123456', 12345678901234.5678, "
        "'2024-03-10 12:34:56.654321', '2024-03-10 12:34:56', 18446744073709551615, 'héllo', x'00ff10')",
        "INSERT INTO typed VALUES (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
    )
    source = sources(mariadb_db)
    info = source.describe_table("typed", watermark_column="stamp")
    assert info.kind.timezone_aware
    assert info.schema.field("at6").type == pa.timestamp("us")
    assert info.schema.field("amount").type == pa.decimal128(18, 4)
    assert info.schema.field("stamp").type == pa.timestamp("us", tz="UTC")
    assert info.schema.field("plain").type == pa.timestamp("us", tz="UTC")
    assert info.schema.field("big").type == pa.uint64()
    row = read(source, info, None, None).to_pylist()
    assert len(row) == 1
    row = row[0]
    assert row["at6"] == dt.datetime(2024, 3, 10, 12, 34, 56, 123456)
    assert row["amount"] == decimal.Decimal("12345678901234.5678")
    instant = utc(2024, 3, 10, 7, 4, 56, 654321)
    assert row["stamp"] == instant
    assert row["plain"] == utc(2024, 3, 10, 7, 4, 56)
    assert row["big"] == 18446744073709551615
    assert row["note"] == "héllo" and row["payload"] == b"\x00\xff\x10"
    assert read(source, info, instant, instant + dt.timedelta(microseconds=1)).num_rows == 1
    assert read(source, info, None, instant).num_rows == 0
    assert source.slice_stats(info, None, None) == (1, instant, instant)

    naive = source.describe_table("typed", watermark_column="at6")
    assert not naive.kind.timezone_aware
    exact = utc(2024, 3, 10, 12, 34, 56, 123456)
    assert read(source, naive, exact, exact + dt.timedelta(microseconds=1)).num_rows == 1
    assert read(source, naive, None, exact).num_rows == 0


FLOATS = [0.1 + 0.2, 1 / 3, 2.0 ** -1074, 1.7976931348623157e308, -123456.78901234567, None]


def test_floating_point_columns_keep_every_digit(any_db, sources):
    # MySQL/MariaDB DOUBLE reflects as a type that turns floats into decimals of 10 places
    any_db.run("CREATE TABLE floats (id int PRIMARY KEY, x DOUBLE PRECISION)")
    with any_db.engine.begin() as conn:
        for i, value in enumerate(FLOATS):
            conn.execute(sa.text("INSERT INTO floats (id, x) VALUES (:i, :x)"), {"i": i, "x": value})
    source = sources(any_db)
    info = source.describe_table("floats", watermark_column="id")
    assert info.schema.field("x").type == pa.float64()
    got = read(source, info, None, None).sort_by("id")
    assert got.column("x").to_pylist() == FLOATS


def test_driver_values_of_other_types_are_still_converted():
    """A column whose values are all of the type Arrow takes goes as it is; one value of another
    type among them (an int in a text column, a zoned time among naive ones) still converts all."""
    from incremental_assets.sources.types import column_converter, rows_to_batch

    schema = pa.schema([("t", pa.string()), ("ts", pa.timestamp("us", tz="UTC")), ("b", pa.bool_()), ("d", pa.decimal128(5, 2))])
    converters = [column_converter(f.type) for f in schema]
    paris = dt.timezone(dt.timedelta(hours=1))
    rows = [("a", dt.datetime(2024, 1, 1, 12), 1, decimal.Decimal("1.50")),
            (5, dt.datetime(2024, 1, 1, 12, tzinfo=paris), 0, 2.25),
            (None, None, None, None)]
    got = rows_to_batch(rows, schema, converters).to_pylist()
    assert [r["t"] for r in got] == ["a", "5", None]
    assert [r["ts"] for r in got] == [utc(2024, 1, 1, 12), utc(2024, 1, 1, 11), None]
    assert [r["b"] for r in got] == [True, False, None]
    assert [r["d"] for r in got] == [decimal.Decimal("1.50"), decimal.Decimal("2.25"), None]
    same = rows_to_batch([("a", dt.datetime(2024, 1, 1, 12), True, decimal.Decimal("1.50"))], schema, converters)
    assert same.to_pylist() == [{"t": "a", "ts": utc(2024, 1, 1, 12), "b": True, "d": decimal.Decimal("1.50")}]


def test_generic_reads_fetch_blocks_and_yield_whole_batches(sqlite_db, sources, monkeypatch):
    """Rows held as Python objects cost far more than in Arrow: the generic path fetches small
    blocks and joins them into batches of ``batch_size`` rows."""
    create_adf_table(sqlite_db)
    source = sources(sqlite_db)
    monkeypatch.setattr(type(source.dialect), "FETCH_BLOCK", 2)
    fetched = []
    original = sa.engine.CursorResult.fetchmany
    monkeypatch.setattr(sa.engine.CursorResult, "fetchmany",
                        lambda self, size=None: fetched.append(size) or original(self, size))
    info = source.describe_table("data_source_table", watermark_column="LastModifytime")
    batches = list(source.read_slice(info, None, None, batch_size=3))
    assert [b.num_rows for b in batches] == [3, 2]
    assert max(fetched) == 2
    assert pa.Table.from_batches(batches).column("Name").to_pylist() == [n for _, n, _ in ADF_ROWS]


@pytest.mark.parametrize("server_db", ["pg_db", "mariadb_db"])
def test_a_connection_lost_while_idle_is_replaced(request, server_db, sources):
    db = request.getfixturevalue(server_db)
    create_adf_table(db, index=True)
    source = sources(db, retries=0)
    info = source.describe_table("data_source_table", watermark_column="LastModifytime")
    before = source.safe_horizon(info).value
    assert db.end_other_sessions() >= 1  # the source's pooled connection among them
    time.sleep(0.2)
    assert source.safe_horizon(info).value >= before
    assert read(source, info, None, None).num_rows == len(ADF_ROWS)


# ---------------------------------------------------------------------------------------------
# late-committing transactions


def _wait_for_horizon_above(source, info, value, timeout=6.0) -> Horizon:
    deadline = time.monotonic() + timeout
    while True:
        horizon = source.safe_horizon(info)
        if horizon.value is not None and horizon.value > value:
            return horizon
        assert time.monotonic() < deadline, f"horizon never passed {value}: {horizon}"
        time.sleep(0.2)


def _names(table: pa.Table) -> list[str]:
    return sorted(table.column("name").to_pylist())


def test_postgresql_late_commit_timestamp(pg_db, sources):
    pg_db.run(
        "CREATE TABLE events (id serial PRIMARY KEY, name text, ts timestamptz NOT NULL DEFAULT now())",
        "CREATE INDEX events_ts ON events (ts)",
        "INSERT INTO events (name, ts) VALUES ('old', '2000-01-01T00:00:00Z')",
    )
    source = sources(pg_db)
    info = source.describe_table("events", watermark_column="ts")
    assert info.watermark_indexed
    late = pg_db.engine.connect()  # transaction T on its own connection
    try:
        t_start = late.execute(sa.text("SELECT now()")).scalar()  # T's start: the default of its rows
        late.execute(sa.text("INSERT INTO events (name) VALUES ('late')"))
        time.sleep(0.05)
        pg_db.run("INSERT INTO events (name) VALUES ('committed after T started')")
        horizon = source.safe_horizon(info)
        assert horizon.value is not None and horizon.value <= t_start, horizon
        assert "pid" in horizon.note
        first = read(source, info, None, horizon.value)
        assert _names(first) == ["old"]
        late.commit()
    finally:
        late.close()
    top = max(r[0] for r in pg_db.rows("SELECT ts FROM events"))
    nxt = _wait_for_horizon_above(source, info, top)
    second = read(source, info, horizon.value, nxt.value)
    assert _names(second) == ["committed after T started", "late"]


def test_postgresql_late_commit_integer(pg_db, sources):
    pg_db.run("CREATE TABLE items (id serial PRIMARY KEY, name text)", "INSERT INTO items (name) VALUES ('first')")
    source = sources(pg_db, horizon_wait=1)
    info = source.describe_table("items", watermark_column="id")
    assert info.watermark_indexed  # the primary key
    start = source.safe_horizon(info)
    assert start.value == 2
    late = pg_db.engine.connect()
    try:
        late.execute(sa.text("INSERT INTO items (name) VALUES ('late')"))  # takes id 2, uncommitted
        pg_db.run("INSERT INTO items (name) VALUES ('committed')")  # id 3, committed
        assert pg_db.rows("SELECT max(id) FROM items") == [(3,)]
        began = time.monotonic()
        held = source.safe_horizon(info)
        assert held.value is None or held.value <= 2, held
        assert time.monotonic() - began < 5
        late.commit()
    finally:
        late.close()
    # once T has ended the horizon moves on (a longer wait: innodb_trx may take a moment to refresh)
    after = sources(pg_db, horizon_wait=10).safe_horizon(info)
    assert after.value == 4
    assert _names(read(source, info, start.value, after.value)) == ["committed", "late"]
    assert _names(read(source, info, None, start.value)) == ["first"]


def test_postgresql_transaction_of_another_role_is_not_ignored(pg_db, sources):
    """Without pg_read_all_stats, pg_stat_activity hides other roles' transactions: the horizon
    must stop (and say why) rather than pass over them."""
    role = f"ia_reader_{pg_db.url.rsplit('/', 1)[1]}"
    pg_db.run(
        "CREATE TABLE events (id serial PRIMARY KEY, name text, ts timestamptz NOT NULL DEFAULT now())",
        f"CREATE ROLE {role} LOGIN",
        f"GRANT SELECT ON events TO {role}",
    )
    url = sa.make_url(pg_db.url).set(username=role).render_as_string(hide_password=False)
    source = sources(url, horizon_wait=0.5)
    info = source.describe_table("events", watermark_column="ts")
    ids = source.describe_table("events", watermark_column="id")
    late = pg_db.engine.connect()  # a superuser's transaction: hidden from the reader role
    try:
        t_start = late.execute(sa.text("SELECT now()")).scalar()
        late.execute(sa.text("INSERT INTO events (name) VALUES ('late')"))
        pg_db.run("INSERT INTO events (name) VALUES ('committed')")
        time.sleep(1.1)
        hidden = source.safe_horizon(info)
        assert hidden.value is None and "pg_read_all_stats" in hidden.note, hidden
        assert source.safe_horizon(ids).value is None
        pg_db.run(f"GRANT pg_read_all_stats TO {role}")
        seen = source.safe_horizon(info)
        assert seen.value is not None and seen.value <= t_start, seen
        late.commit()
    finally:
        late.close()
        source.dispose()
        pg_db.run(f"REVOKE ALL ON events FROM {role}", f"REVOKE pg_read_all_stats FROM {role}", f"DROP ROLE {role}")


def test_mariadb_late_commit_timestamp(mariadb_db, sources):
    mariadb_db.run(
        "CREATE TABLE events (id int AUTO_INCREMENT PRIMARY KEY, name varchar(40), "
        "ts DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), KEY (ts))",
        "INSERT INTO events (name, ts) VALUES ('old', '2000-01-01 00:00:00')",
    )
    source = sources(mariadb_db)
    info = source.describe_table("events", watermark_column="ts")
    assert info.watermark_indexed
    late = mariadb_db.engine.connect()
    try:
        late.execute(sa.text("SET time_zone = '+00:00'"))
        late.execute(sa.text("INSERT INTO events (name) VALUES ('late')"))
        late_ts = late.execute(sa.text("SELECT ts FROM events WHERE name = 'late'")).scalar().replace(tzinfo=UTC)
        time.sleep(0.05)
        mariadb_db.run("SET time_zone = '+00:00'", "INSERT INTO events (name) VALUES ('committed after T started')")
        horizon = source.safe_horizon(info)
        assert horizon.value is not None and horizon.value <= late_ts, horizon
        assert "thread" in horizon.note
        assert _names(read(source, info, None, horizon.value)) == ["old"]
        late.commit()
    finally:
        late.close()
    top = max(r[0] for r in mariadb_db.rows("SELECT ts FROM events")).replace(tzinfo=UTC)
    nxt = _wait_for_horizon_above(source, info, top)
    assert _names(read(source, info, horizon.value, nxt.value)) == ["committed after T started", "late"]


def test_mariadb_late_commit_integer(mariadb_db, sources):
    mariadb_db.run(
        "CREATE TABLE items (id int AUTO_INCREMENT PRIMARY KEY, name varchar(40))",
        "INSERT INTO items (name) VALUES ('first')",
    )
    source = sources(mariadb_db, horizon_wait=1)
    info = source.describe_table("items", watermark_column="id")
    start = source.safe_horizon(info)
    assert start.value == 2
    late = mariadb_db.engine.connect()
    try:
        late.execute(sa.text("INSERT INTO items (name) VALUES ('late')"))  # id 2, uncommitted
        mariadb_db.run("INSERT INTO items (name) VALUES ('committed')")  # id 3
        held = source.safe_horizon(info)
        assert held.value is None or held.value <= 2, held
        late.commit()
    finally:
        late.close()
    # once T has ended the horizon moves on (a longer wait: innodb_trx may take a moment to refresh)
    after = sources(mariadb_db, horizon_wait=10).safe_horizon(info)
    assert after.value == 4
    assert _names(read(source, info, start.value, after.value)) == ["committed", "late"]


def test_mariadb_horizon_not_fooled_by_stale_innodb_trx_cache(mariadb_db, sources):
    """InnoDB refreshes innodb_trx only after 0.1 s without readers: a busy monitor keeps it stale."""
    mariadb_db.run(
        "CREATE TABLE events (id int AUTO_INCREMENT PRIMARY KEY, name varchar(40), "
        "ts DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6))"
    )
    source = sources(mariadb_db)
    info = source.describe_table("events", watermark_column="ts")
    stop = threading.Event()

    def monitor():
        with mariadb_db.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            while not stop.is_set():
                conn.execute(sa.text("SELECT COUNT(*) FROM information_schema.innodb_trx")).all()
                time.sleep(0.03)

    poller = threading.Thread(target=monitor, daemon=True)
    poller.start()
    late = mariadb_db.engine.connect()
    try:
        time.sleep(0.3)
        late.execute(sa.text("SET time_zone = '+00:00'"))
        late.execute(sa.text("INSERT INTO events (name) VALUES ('late')"))
        late_ts = late.execute(sa.text("SELECT ts FROM events")).scalar().replace(tzinfo=UTC)
        time.sleep(2.2)  # the clock moves well past T's row (beyond margin and flooring)
        horizon = source.safe_horizon(info)
        assert horizon.value is None or horizon.value <= late_ts, horizon
    finally:
        stop.set()
        poller.join()
        late.rollback()
        late.close()


def test_mariadb_statement_waiting_for_a_lock_holds_the_timestamp_horizon(mariadb_db, sources):
    """NOW() is the statement's start: an INSERT waiting for a metadata lock has its timestamp
    already but is not in innodb_trx yet; it must hold the horizon back all the same."""
    mariadb_db.run(
        "CREATE TABLE events (id int AUTO_INCREMENT PRIMARY KEY, name varchar(40), "
        "ts DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6))"
    )
    source = sources(mariadb_db)
    info = source.describe_table("events", watermark_column="ts")
    locker = mariadb_db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    locker.execute(sa.text("LOCK TABLES events READ"))

    def insert_when_unlocked():
        with mariadb_db.engine.connect() as conn:
            conn.execute(sa.text("SET time_zone = '+00:00'"))
            conn.execute(sa.text("INSERT INTO events (name) VALUES ('waited')"))  # autocommit-style: one statement
            conn.commit()

    worker = threading.Thread(target=insert_when_unlocked, daemon=True)
    try:
        worker.start()
        time.sleep(2.5)  # the clock moves well past the waiting statement's timestamp
        assert mariadb_db.rows("SELECT COUNT(*) FROM information_schema.processlist WHERE state LIKE '%metadata lock%'") == [(1,)]
        horizon = source.safe_horizon(info)
    finally:
        locker.execute(sa.text("UNLOCK TABLES"))
        worker.join(10)
        locker.close()
    [(ts,)] = mariadb_db.rows("SELECT ts FROM events")
    assert horizon.value is None or horizon.value <= ts.replace(tzinfo=UTC), (horizon, ts)
    assert "statement of thread" in horizon.note


def test_sqlite_horizon_waits_for_the_writer(sqlite_db, sources):
    sqlite_db.run(
        "CREATE TABLE events (id integer PRIMARY KEY, name text, ts text NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')))"
    )
    sqlite_db.run("INSERT INTO events (name, ts) VALUES ('old', '2000-01-01 00:00:00')")
    source = sources(sqlite_db)
    info = source.describe_table("events", watermark_column="id")
    writer = sqlite_db.engine.raw_connection()
    writer.driver_connection.isolation_level = None
    writer.driver_connection.execute("BEGIN IMMEDIATE")
    writer.driver_connection.execute("INSERT INTO events (name) VALUES ('late')")
    threading.Timer(0.5, lambda: writer.driver_connection.execute("COMMIT")).start()
    began = time.monotonic()
    try:
        horizon = source.safe_horizon(info)  # waits for the writer's lock to go, then answers
        waited = time.monotonic() - began
    finally:
        time.sleep(0.6)
        writer.close()
    assert waited >= 0.4 and horizon.value in (2, 3), (waited, horizon)  # answered only once the writer had committed
    assert _names(read(source, info, None, 2)) == ["old"]
    assert _names(read(source, info, 2, None)) == ["late"]


# ---------------------------------------------------------------------------------------------
# NULL watermarks


def test_null_watermarks_are_counted_and_never_in_a_slice(any_db, sources):
    any_db.run(f"CREATE TABLE t (id int, ts {ts_type(any_db)}, n int)")
    any_db.run(
        "INSERT INTO t VALUES (1, '2020-01-01 00:00:00', 1)",
        "INSERT INTO t VALUES (2, NULL, NULL)",
        "INSERT INTO t VALUES (3, NULL, 3)",
        "INSERT INTO t VALUES (4, '2020-01-02 00:00:00', NULL)",
    )
    source = sources(any_db)
    for column, expected_nulls in [("ts", [2, 3]), ("n", [2, 4])]:
        info = source.describe_table("t", watermark_column=column)
        assert source.null_watermark_count(info) == 2
        with any_db.engine.connect() as conn:
            assert sorted(r[0] for r in conn.execute(source.select_nulls(info))) == expected_nulls
        lo, hi = (utc(1990, 1, 1), utc(2100, 1, 1)) if column == "ts" else (-10, 10)
        for bounds in [(lo, hi), (None, hi), (lo, None), (None, None)]:
            ids = read(source, info, *bounds).column("id").to_pylist()
            assert not set(ids) & set(expected_nulls), (column, bounds, ids)
            assert len(ids) == 2
            assert source.slice_stats(info, *bounds)[0] == 2


# ---------------------------------------------------------------------------------------------
# bad input


def test_unknown_table_and_columns(any_db, sources):
    create_adf_table(any_db)
    source = sources(any_db)
    with pytest.raises(SourceError, match="nope.*not found"):
        source.describe_table("nope", watermark_column="LastModifytime")
    with pytest.raises(SourceError, match="no watermark column 'Missing'"):
        source.describe_table("data_source_table", watermark_column="Missing")
    with pytest.raises(SourceError, match=r"no column\(s\) \['Ghost'\]"):
        source.describe_table("data_source_table", watermark_column="LastModifytime", columns=["Name", "Ghost"])
    with pytest.raises(SourceError, match="primary key"):
        source.describe_table("data_source_table", watermark_column="PersonID", primary_key=["Id"])
    with pytest.raises(SourceError, match="not a table reference"):
        source.describe_table('"unterminated', watermark_column="PersonID")
    with pytest.raises(SourceError, match="not a table reference"):
        source.describe_table("a.b.c", watermark_column="PersonID")


UNSUPPORTED = {
    "sqlite": ["text", "boolean", "blob", "real"],
    "postgresql": ["text", "boolean", "bytea", "numeric(10,2)", "double precision", "jsonb", "uuid"],
    "mysql": ["text", "varchar(20)", "decimal(10,2)", "double", "blob"],
}


def test_unsupported_watermark_types(any_db, sources):
    types = UNSUPPORTED[engine_of(any_db)]
    any_db.run("CREATE TABLE t (id int, " + ", ".join(f"c{i} {t}" for i, t in enumerate(types)) + ")")
    source = sources(any_db)
    for i in range(len(types)):
        with pytest.raises(SourceError, match=f"watermark column 'c{i}'.*cannot be a watermark"):
            source.describe_table("t", watermark_column=f"c{i}")


ODD = 'we"ird; DROP TABLE x;--'


@pytest.mark.parametrize("ref", [ODD, '"we""ird; DROP TABLE x;--"', '"my.table"'])
def test_odd_table_names_are_quoted(any_db, sources, ref):
    name = TableRef.parse(ref).name
    md = sa.MetaData()
    canary = sa.Table("x", md, sa.Column("id", sa.Integer))
    odd = sa.Table(
        name, md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("it's \"col\"", sa.String(20)),
        sa.Column("ts", sa.DateTime),
    )
    md.create_all(any_db.engine)
    with any_db.engine.begin() as conn:
        conn.execute(canary.insert(), [{"id": 1}])
        conn.execute(odd.insert(), [
            {"id": i, "it's \"col\"": f"v{i}'; --", "ts": dt.datetime(2024, 1, i)} for i in (1, 2, 3)
        ])
    source = sources(any_db)
    info = source.describe_table(ref, watermark_column="ts")
    assert info.ref.name == name and TableRef.parse(str(info.ref)) == info.ref
    table = read(source, info, utc(2024, 1, 2), None)
    assert table.column("id").to_pylist() == [2, 3]
    assert table.column("it's \"col\"").to_pylist() == ["v2'; --", "v3'; --"]
    assert source.slice_stats(info, None, None)[0] == 3 and source.null_watermark_count(info) == 0
    assert source.safe_horizon(source.describe_table(ref, watermark_column="id")).value == 4
    assert any_db.rows("SELECT COUNT(*) FROM x") == [(1,)]  # nothing else dropped


def test_schema_qualified_names_on_postgresql(pg_db, sources):
    pg_db.run('CREATE SCHEMA "sales.eu"', 'CREATE TABLE "sales.eu"."my.table" (id int PRIMARY KEY, v text)',
              "INSERT INTO \"sales.eu\".\"my.table\" VALUES (1, 'a'), (2, 'b')")
    source = sources(pg_db)
    info = source.describe_table('"sales.eu"."my.table"', watermark_column="id")
    assert info.ref == TableRef("sales.eu", "my.table")
    assert str(info.ref) == '"sales.eu"."my.table"'
    assert read(source, info, 2, None).column("v").to_pylist() == ["b"]
    pg_db.run("CREATE TABLE public.plain (id int)")
    assert source.describe_table("public.plain", watermark_column="id").ref == TableRef("public", "plain")


def test_postgresql_folded_names_resolve_without_case(pg_db, sources):
    """ADF's DDL run unquoted on PostgreSQL folds names to lower case; the configured names still resolve."""
    create_adf_table(pg_db)
    source = sources(pg_db)
    info = source.describe_table("Data_Source_Table", watermark_column="LastModifytime", columns=["PersonID", "Name"],
                                 primary_key=["PersonID"])
    assert info.ref == TableRef(None, "data_source_table")
    assert (info.columns, info.watermark_column, info.primary_key) == (
        ["personid", "name", "lastmodifytime"], "lastmodifytime", ["personid"])
    pg_db.run('CREATE TABLE "Mixed" (a int, "A" int)')  # exact names win over case-insensitive ones
    assert source.describe_table("Mixed", watermark_column="A").watermark_column == "A"
    assert source.describe_table("mixed", watermark_column="a").ref == TableRef(None, "Mixed")
    pg_db.run('CREATE TABLE "MIXED" (a int)')  # now ambiguous without case: not guessed
    with pytest.raises(SourceError, match="not found"):
        source.describe_table("mixed", watermark_column="a")


def test_table_ref_parse_and_str():
    assert TableRef.parse("t") == TableRef(None, "t")
    assert TableRef.parse("dbo.t") == TableRef("dbo", "t")
    assert TableRef.parse('"my.table"') == TableRef(None, "my.table")
    assert TableRef.parse('s."a""b"') == TableRef("s", 'a"b')
    assert TableRef.parse(ODD) == TableRef(None, ODD)
    for ref in [TableRef(None, "t"), TableRef("s", "my.table"), TableRef(None, ODD), TableRef(None, '"q"'), TableRef("a.b", "c")]:
        assert TableRef.parse(str(ref)) == ref
    for bad in ["", ".", "a.", ".b", "a.b.c", '"a', '"a"b', '""']:
        with pytest.raises(ValueError):
            TableRef.parse(bad)


@pytest.mark.parametrize(
    "url",
    ["postgresql+psycopg://loader:s3cr3t-Pw@127.0.0.1:1/sales", "mysql+pymysql://loader:s3cr3t-Pw@127.0.0.1:1/sales"],
)
def test_unreachable_source(url, sources, caplog):
    source = sources(url, name="orders-db", retries=1, retry_delay=0.1)
    assert "s3cr3t-Pw" not in repr(source)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="incremental_assets"):
        with pytest.raises(SourceUnavailable) as caught:
            source.describe_table("orders", watermark_column="id")
    assert time.monotonic() - began < 10
    message = str(caught.value)
    assert "orders-db" in message and "after 2 attempts" in message and "127.0.0.1" in message
    everything = message + repr(caught.value) + "".join(traceback.format_exception(caught.value)) + caplog.text
    assert "s3cr3t-Pw" not in everything
    assert "retrying" in caplog.text


def test_watermark_index_flag(any_db, sources):
    any_db.run(f"CREATE TABLE t (id int, ts {ts_type(any_db)}, other int)")
    source = sources(any_db)
    assert source.describe_table("t", watermark_column="ts").watermark_indexed is False
    any_db.run("CREATE INDEX t_other_ts ON t (other, ts)")
    assert source.describe_table("t", watermark_column="ts").watermark_indexed is False  # not leading
    any_db.run("CREATE INDEX t_ts ON t (ts)")
    assert source.describe_table("t", watermark_column="ts").watermark_indexed is True
    assert source.describe_table("t", watermark_column="id").watermark_indexed is False
    any_db.run("CREATE TABLE k (id int PRIMARY KEY, v int)")
    assert source.describe_table("k", watermark_column="id").watermark_indexed is True


def test_empty_table_has_no_integer_horizon(any_db, sources):
    any_db.run("CREATE TABLE t (id int PRIMARY KEY)")
    source = sources(any_db, horizon_wait=1)
    info = source.describe_table("t", watermark_column="id")
    assert source.safe_horizon(info).value is None
    assert read(source, info, None, None).num_rows == 0
    assert source.slice_stats(info, None, None) == (0, None, None)


def _table_info_digest(info):
    return (str(info.ref), info.columns, str(info.schema), info.watermark_column, type(info.kind).__name__,
            info.watermark_indexed, info.primary_key)


def test_many_tables_are_described_together_as_each_alone(any_db, sources):
    """Planning hundreds of tables reflects them in a batch: every table's description (types,
    key, watermark index) is what reflecting it alone gives, and a table's error stays its own."""
    name = any_db.engine.dialect.name
    ts = "TIMESTAMP" if name != "mysql" else "DATETIME(6)"
    statements = []
    for i in range(4):
        statements.append(f"CREATE TABLE t{i} (id INTEGER PRIMARY KEY, amount NUMERIC(12, 3), note VARCHAR(20), "
                          f"updated_at {ts} NOT NULL)")
        if i % 2 == 0:
            statements.append(f"CREATE INDEX t{i}_updated ON t{i} (updated_at)")
    statements.append(f"CREATE TABLE nokey (v INTEGER, updated_at {ts} NOT NULL)")
    if name == "postgresql":
        statements += [
            "CREATE DOMAIN money4 AS numeric(14, 4)",
            "CREATE TABLE typed (id int PRIMARY KEY, m money4, grid int[][], updated_at timestamptz NOT NULL)",
        ]
    any_db.run(*statements)
    source = sources(any_db)
    specs = {f"t{i}": {"table": f"t{i}", "watermark_column": "updated_at"} for i in range(4)}
    specs["nokey"] = {"table": "nokey", "watermark_column": "updated_at", "primary_key": ["id"]}
    specs["missing"] = {"table": "no_such_table", "watermark_column": "updated_at"}
    specs["nowm"] = {"table": "t1", "watermark_column": "changed_at"}
    if name == "postgresql":
        specs["typed"] = {"table": "typed", "watermark_column": "updated_at"}
        specs["folded"] = {"table": "T2", "watermark_column": "UPDATED_AT"}
    batched = source.describe_tables(specs)
    assert set(batched) == set(specs)
    for key, spec in specs.items():
        kwargs = {k: v for k, v in spec.items() if k != "table"}
        try:
            alone = source.describe_table(spec["table"], **kwargs)
        except SourceError as exc:
            assert isinstance(batched[key], SourceError), key
            assert str(batched[key]) == str(exc)
            continue
        assert not isinstance(batched[key], SourceError), (key, batched[key])
        assert _table_info_digest(batched[key]) == _table_info_digest(alone), key
    assert batched["t0"].watermark_indexed and not batched["t1"].watermark_indexed
    assert "no primary key column" in str(batched["nokey"]) and "no_such_table" in str(batched["missing"])
    if name == "postgresql":
        assert batched["typed"].schema.field("m").type == pa.decimal128(14, 4)
