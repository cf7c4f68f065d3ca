"""Real-world column types land and replicate exactly, or as text with a log line naming the column.

A Pagila-like table on PostgreSQL (arrays, domains, enums, tsvector, uuid, bytea, numeric,
interval, json/jsonb, a range, a composite) and a MariaDB table (JSON, SET, ENUM, BIT, YEAR,
spatial types) are read by the engine on each path, landed (Parquet, CSV), and merged into a
PostgreSQL replica (array columns) and a SQLite replica (JSON text for lists)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from incremental_assets.landing import open_landing_store
from tests.helpers import after_horizon, fresh_time, landed, run_cli, write_config

UTC = dt.timezone.utc

PG_SCHEMA = [
    "CREATE DOMAIN year AS integer CHECK (VALUE >= 1901 AND VALUE <= 2155)",
    "CREATE DOMAIN price AS numeric(4,2)",
    "CREATE DOMAIN label AS text",
    "CREATE DOMAIN stamp AS timestamptz",
    "CREATE TYPE mpaa_rating AS ENUM ('G', 'PG', 'PG-13', 'R', 'NC-17')",
    "CREATE TYPE pair AS (a integer, b text)",
    "CREATE TABLE film (film_id integer PRIMARY KEY, title text, release_year year, rental_rate price, "
    "label label, stamped stamp, rating mpaa_rating, special_features text[], scores integer[], "
    "prices numeric(6,2)[], seen timestamptz[], grid integer[][], ratings mpaa_rating[], fulltext tsvector, "
    "code uuid, raw bytea, amount numeric, exact numeric(10,3), span interval, doc json, docb jsonb, "
    "during int4range, duo pair, last_update timestamptz NOT NULL)",
    "INSERT INTO film VALUES (1, 'ACADEMY DINOSAUR', 2006, 0.99, 'epic', '2024-05-02 03:04:05.123456+02', 'PG', "
    "'{Trailers,\"Deleted Scenes\",NULL}', '{1,NULL,3}', '{1.50,NULL,-2.25}', '{\"2020-01-01 00:00:00.123456+00\",NULL}', "
    "'{{1,2},{3,4}}', '{G,R}', to_tsvector('english', 'the fat cats'), 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', "
    "'\\x00ff', 1.5, 2.125, '1 mon 2 days 03:04:05.000006', '{\"b\": 1, \"a\": [1, 2.50]}', '{\"b\": 1, \"a\": [1, 2.50]}', "
    "'[1,5)', '(1,\"x y\")', '2024-05-01 10:00:00+00')",
    "INSERT INTO film (film_id, last_update) VALUES (2, '2024-05-01 11:00:00+00')",
    "INSERT INTO film (film_id, title, special_features, scores, prices, span, last_update) VALUES "
    "(3, 'EDGE', ARRAY['a\"b', 'c\\d', 'x,y', '', 'NULL'], '{}', '{}', '-1 mon +2 days -03:00:00.5', "
    "'2024-05-01 12:00:00+00')",
]

#: the landed type of each column, on both read paths
PG_LANDED = [
    ("film_id", pa.int64()),
    ("title", pa.string()),
    ("release_year", pa.int64()),  # domain over integer: its base type
    ("rental_rate", pa.decimal128(4, 2)),  # domain over numeric(4,2): precision and scale kept
    ("label", pa.string()),
    ("stamped", pa.timestamp("us", tz="UTC")),
    ("rating", pa.string()),  # enum: its label
    ("special_features", pa.list_(pa.string())),
    ("scores", pa.list_(pa.int64())),
    ("prices", pa.list_(pa.decimal128(6, 2))),
    ("seen", pa.list_(pa.timestamp("us", tz="UTC"))),
    ("grid", pa.string()),  # declared two-dimensional: JSON text
    ("ratings", pa.list_(pa.string())),
    ("fulltext", pa.string()),
    ("code", pa.string()),
    ("raw", pa.binary()),
    ("amount", pa.string()),  # unconstrained numeric: its exact text
    ("exact", pa.decimal128(10, 3)),
    ("span", pa.string()),  # interval: ISO 8601 text with every field
    ("doc", pa.string()),
    ("docb", pa.string()),
    ("during", pa.string()),
    ("duo", pa.string()),
    ("last_update", pa.timestamp("us", tz="UTC")),
]

ROW_1 = {
    "film_id": 1, "title": "ACADEMY DINOSAUR", "release_year": 2006, "rental_rate": Decimal("0.99"), "label": "epic",
    "stamped": dt.datetime(2024, 5, 2, 1, 4, 5, 123456, tzinfo=UTC), "rating": "PG",
    "special_features": ["Trailers", "Deleted Scenes", None], "scores": [1, None, 3],
    "prices": [Decimal("1.50"), None, Decimal("-2.25")], "seen": [dt.datetime(2020, 1, 1, 0, 0, 0, 123456, tzinfo=UTC), None],
    "grid": "[[1,2],[3,4]]", "ratings": ["G", "R"], "fulltext": "'cat':3 'fat':2",
    "code": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "raw": b"\x00\xff", "amount": "1.5", "exact": Decimal("2.125"),
    "span": "P0Y1M2DT3H4M5.000006S", "doc": '{"b": 1, "a": [1, 2.50]}', "docb": '{"a": [1, 2.50], "b": 1}',
    "during": "[1,5)", "duo": '(1,"x y")', "last_update": dt.datetime(2024, 5, 1, 10, tzinfo=UTC),
}
ROW_3_EDGES = {
    "special_features": ['a"b', "c\\d", "x,y", "", "NULL"], "scores": [], "prices": [],
    "span": "P0Y-1M2DT-3H0M-0.500000S",
}

TABLE = {"name": "film", "table": "film", "watermark_column": "last_update",
         "partitions": {"granularity": "monthly", "start": "2024-05-01"}}


def _read(source, info, fast: bool) -> pa.Table:
    source.dialect.fast_path = fast
    return pa.Table.from_batches(list(source.read_slice(info, None, None)), schema=info.schema).sort_by("film_id")


@pytest.mark.parametrize("fast", [True, False], ids=["adbc", "generic"])
def test_postgresql_types_land_exactly_on_both_paths(pg_db, sources, caplog, fast):
    pg_db.run(*PG_SCHEMA)
    source = sources(pg_db)
    with caplog.at_level(logging.INFO, logger="incremental_assets"):
        info = source.describe_table("film", watermark_column="last_update")
        got = _read(source, info, fast)
    assert [(f.name, f.type) for f in got.schema] == PG_LANDED
    rows = got.to_pylist()
    assert rows[0] == ROW_1  # json as the server's text: json as written, jsonb normalised
    assert all(v is None for k, v in rows[1].items() if k not in ("film_id", "last_update"))
    assert {k: rows[2][k] for k in ROW_3_EDGES} == ROW_3_EDGES
    # batches of one row: lists cut out of a bigger batch keep their own elements
    one_by_one = pa.Table.from_batches(list(source.read_slice(info, None, None, batch_size=1)), schema=info.schema)
    assert one_by_one.sort_by("film_id").to_pylist() == rows
    # the fast path was taken (or not) as asked, and every text fallback is named in the log
    assert ("reading through SQLAlchemy rows" in caplog.text) == (not fast)
    for column, landed_as in (("grid", "JSON text"), ("fulltext", "text"), ("span", "ISO 8601 text"),
                              ("during", "text"), ("duo", "text")):
        assert f"column {column!r} " in caplog.text
        assert f"lands as {landed_as}" in caplog.text.split(f"column {column!r} ")[1].splitlines()[0]
    for exact in ("special_features", "release_year", "rental_rate", "rating", "code", "doc"):
        assert f"column {exact!r}" not in caplog.text


@pytest.mark.parametrize("fast", [True, False], ids=["adbc", "generic"])
def test_a_multidimensional_value_in_a_one_dimensional_column_fails_naming_it(pg_db, sources, fast):
    """PostgreSQL does not enforce an array's declared dimensions; ADBC would flatten such a
    value into one list. The read fails and names the column instead of landing a wrong value."""
    pg_db.run(
        "CREATE TABLE boxes (id int, sizes int[], at timestamptz)",
        "INSERT INTO boxes VALUES (1, '{1,2}', '2024-01-01'), (2, '{{1,2},{3,4}}', '2024-01-02')",
    )
    source = sources(pg_db)
    source.dialect.fast_path = fast
    info = source.describe_table("boxes", watermark_column="at")
    with pytest.raises(Exception, match="sizes") as failure:
        list(source.read_slice(info, None, None))
    assert "dimension" in str(failure.value)


def _replica_schema(pg_server, tmp_path) -> str:
    schema = f"rep_{tmp_path.name[-8:].replace('-', '_').lower()}"
    with pg_server.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    return pg_server.url.set(query={"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


@pytest.mark.usefixtures("dagster_home")
def test_pagila_film_into_a_postgresql_replica(pg_db, pg_server, tmp_path, capsys):
    """Lists land as Parquet lists and become array columns: ``'Trailers' = ANY(special_features)``
    works on the replica, and every value equals the source's, also after an update."""
    pg_db.run(*PG_SCHEMA)
    replica_url = _replica_schema(pg_server, tmp_path)
    config = write_config(tmp_path, pg_db.url, [{**TABLE, "primary_key": ["film_id"]}], replica={"url": replica_url})
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert "3 inserted" in out

    files, data = landed(str(tmp_path / "landing"), "film")
    schema = pq.read_schema(tmp_path / "landing" / files[0])  # the Parquet file's own schema
    assert [(f.name, f.type) for f in schema] == PG_LANDED
    assert data.sort_by("film_id").to_pylist()[0] == ROW_1

    replica = sa.create_engine(replica_url)
    try:
        _check_replica(pg_db, replica)
        # an update goes through the staging table and the upsert
        pg_db.run("UPDATE film SET special_features = '{Commentaries,NULL,\"Behind the \\\"Scenes\\\"\"}', "
                  "scores = '{7}', last_update = :t WHERE film_id = 1", params={"t": fresh_time().replace(tzinfo=UTC)})
        after_horizon()
        for _ in range(15):  # the safe horizon waits for transactions open anywhere on the shared server
            code, out, err = run_cli(capsys, "--config", str(config), "sync")
            assert code == 0, err
            if "1 updated" in out:
                break
            time.sleep(1)
        assert "1 updated" in out
        _check_replica(pg_db, replica)
        with replica.connect() as conn:
            assert conn.execute(sa.text("SELECT special_features FROM film WHERE film_id = 1")).scalar() == [
                "Commentaries", None, 'Behind the "Scenes"']
    finally:
        replica.dispose()


def _check_replica(pg_db, replica: sa.Engine) -> None:
    with replica.connect() as conn:
        assert conn.execute(sa.text("SELECT film_id FROM film WHERE 'Trailers' = ANY(special_features)")).scalars().all() == (
            [1] if pg_db.rows("SELECT count(*) FROM film WHERE 'Trailers' = ANY(special_features)")[0][0] else [])
        types = dict(conn.execute(sa.text(
            "SELECT column_name, format_type(atttypid, atttypmod) FROM information_schema.columns "
            "JOIN pg_attribute ON attrelid = to_regclass('film') AND attname = column_name "
            "WHERE table_name = 'film' AND table_schema = current_schema()")).all())
    assert types["special_features"] == "text[]" and types["scores"] == "bigint[]"
    assert types["prices"] == "numeric(6,2)[]" and types["seen"] == "timestamp with time zone[]"
    assert types["rental_rate"] == "numeric(4,2)" and types["release_year"] == "bigint"
    # the same values: arrays, domains and enums as they are; text fallbacks as the server's text
    same = ("film_id, title, release_year, rental_rate, label, stamped, rating::text, special_features, scores, "
            "prices, seen, ratings::text[], code::text, raw, amount::text, exact, doc::text, docb::text, during::text, duo::text, "
            "fulltext::text, CAST(CAST(span AS interval) AS text)")
    source_rows = pg_db.rows(f"SELECT {same} FROM film ORDER BY film_id")
    with replica.connect() as conn:
        replica_rows = [tuple(r) for r in conn.execute(sa.text(f"SELECT {same} FROM film ORDER BY film_id"))]
    for got, want in zip(replica_rows, source_rows):
        assert [(i, g) for i, (g, w) in enumerate(zip(got, want)) if g != w] == [], want


@pytest.mark.usefixtures("dagster_home")
@pytest.mark.parametrize("replica_kind", ["sqlite", "mariadb"])
def test_lists_as_json_text_in_csv_and_a_replica_without_arrays(pg_db, tmp_path, capsys, request, replica_kind):
    """Without array columns (SQLite, MariaDB; SQL Server alike) a list is stored as JSON text;
    CSV lands it as JSON text too, and reads it back as the list."""
    pg_db.run(*PG_SCHEMA)
    if replica_kind == "sqlite":
        replica_url = f"sqlite:///{tmp_path / 'replica.db'}"
    else:
        replica_url = request.getfixturevalue("mariadb_db").url
    config = write_config(tmp_path, pg_db.url, [{**TABLE, "primary_key": ["film_id"]}], fmt="csv", replica={"url": replica_url})
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    files, data = landed(str(tmp_path / "landing"), "film", "csv")
    assert data.sort_by("film_id").column("special_features").to_pylist()[0] == '["Trailers","Deleted Scenes",null]'
    store = open_landing_store(str(tmp_path / "landing"), "csv")
    typed = store.read_arrow(files[0], schema=pa.schema(PG_LANDED)).sort_by("film_id")
    assert typed.to_pylist()[0] == ROW_1 and typed.to_pylist()[2]["span"] == ROW_3_EDGES["span"]
    replica = sa.create_engine(replica_url)
    try:
        with replica.connect() as conn:
            rows = conn.execute(sa.text("SELECT special_features, prices, seen, scores, release_year, rental_rate "
                                        "FROM film ORDER BY film_id")).all()
    finally:
        replica.dispose()
    assert json.loads(rows[0][0]) == ["Trailers", "Deleted Scenes", None]
    assert json.loads(rows[0][1]) == ["1.50", None, "-2.25"]  # decimals as exact text
    assert json.loads(rows[0][2]) == ["2020-01-01T00:00:00.123456Z", None]
    assert json.loads(rows[2][0]) == ['a"b', "c\\d", "x,y", "", "NULL"] and json.loads(rows[2][3]) == []
    assert rows[1][0] is None
    assert rows[0][4] == 2006 and Decimal(str(rows[0][5])) == Decimal("0.99")


MARIADB_TABLE = (
    "CREATE TABLE gadgets (id int PRIMARY KEY, spec JSON, tags SET('red','green','blue'), size ENUM('S','M','L'), "
    "flags BIT(5), mask BIT(64), made YEAR, shape GEOMETRY, spot POINT, updated datetime(6) NOT NULL)"
)
MARIADB_ROWS = (
    "INSERT INTO gadgets VALUES "
    "(1, '{\"b\": 1, \"a\": [1, 2.50]}', 'red,blue', 'M', b'10101', 18446744073709551615, 2006, "
    "ST_GeomFromText('LINESTRING(0 0,1 1)'), ST_GeomFromText('POINT(1.5 2)'), '2024-05-01 10:00:00'), "
    "(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '2024-05-01 11:00:00'), "
    "(3, '[]', '', 'S', b'0', 0, 1901, NULL, ST_GeomFromText('POINT(0 0)', 4326), '2024-05-01 12:00:00')"
)
MARIADB_LANDED = [
    ("id", pa.int64()), ("spec", pa.string()), ("tags", pa.string()), ("size", pa.string()), ("flags", pa.int64()),
    ("mask", pa.uint64()), ("made", pa.int16()), ("shape", pa.binary()), ("spot", pa.binary()),
    ("updated", pa.timestamp("us")),
]
LINESTRING_WKB = bytes.fromhex("010200000002000000" + "00" * 16 + "000000000000f03f" * 2)
POINT_WKB = bytes.fromhex("0101000000" + "000000000000f83f" + "0000000000000040")
ORIGIN_WKB = bytes.fromhex("0101000000" + "00" * 16)
MARIADB_VALUES = [
    (1, '{"b": 1, "a": [1, 2.50]}', "red,blue", "M", 21, 2**64 - 1, 2006, LINESTRING_WKB, POINT_WKB),
    (2, None, None, None, None, None, None, None, None),
    (3, "[]", "", "S", 0, 0, 1901, None, ORIGIN_WKB),
]


@pytest.mark.parametrize("driver", ["mariadb_db", "mariadb_mysqlclient_db"], ids=["pymysql", "mysqlclient"])
def test_mariadb_types_land_exactly(request, sources, driver):
    mariadb_db = request.getfixturevalue(driver)
    mariadb_db.run(MARIADB_TABLE, MARIADB_ROWS)
    source = sources(mariadb_db)
    info = source.describe_table("gadgets", watermark_column="updated")
    got = pa.Table.from_batches(list(source.read_slice(info, None, None)), schema=info.schema).sort_by("id")
    assert [(f.name, f.type) for f in got.schema] == MARIADB_LANDED
    names = [n for n, _ in MARIADB_LANDED[:-1]]
    assert [tuple(r[n] for n in names) for r in got.to_pylist()] == MARIADB_VALUES
    # the WKB is the server's own: it reads it back as the same shape
    assert mariadb_db.rows("SELECT ST_AsText(ST_GeomFromWKB(:w))".replace(":w", "x'" + POINT_WKB.hex() + "'")) == [("POINT(1.5 2)",)]


@pytest.mark.usefixtures("dagster_home")
def test_mariadb_types_into_a_sqlite_replica(mariadb_db, tmp_path, capsys):
    mariadb_db.run(MARIADB_TABLE, MARIADB_ROWS)
    replica_url = f"sqlite:///{tmp_path / 'replica.db'}"
    table = {"name": "gadgets", "table": "gadgets", "watermark_column": "updated", "primary_key": ["id"],
             "partitions": {"granularity": "monthly", "start": "2024-05-01"}}
    config = write_config(tmp_path, mariadb_db.url, [table], replica={"url": replica_url})
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    replica = sa.create_engine(replica_url)
    try:
        with replica.connect() as conn:
            rows = [tuple(r) for r in conn.execute(sa.text(
                "SELECT id, spec, tags, size, flags, mask, made, shape, spot FROM gadgets ORDER BY id"))]
    finally:
        replica.dispose()
    # SQLite has no unsigned 64-bit integer: BIT(64) is stored as its exact decimal text or number
    assert [r[:5] + r[6:] for r in rows] == [v[:5] + v[6:] for v in MARIADB_VALUES]
    assert [None if r[5] is None else int(Decimal(str(r[5]))) for r in rows] == [2**64 - 1, None, 0]


def test_uuid_and_enum_keys_are_plain_text(pg_db, sources):
    """uuid and enum values land as their text (what a replica compares and indexes)."""
    pg_db.run(
        "CREATE TYPE state AS ENUM ('new', 'done')",
        "CREATE TABLE tasks (id uuid PRIMARY KEY, state state, at timestamptz)",
        "INSERT INTO tasks VALUES (:u, 'done', '2024-01-01')",
        params={"u": str(uuid.UUID(int=5))},
    )
    source = sources(pg_db)
    info = source.describe_table("tasks", watermark_column="at")
    for fast in (True, False):
        got = pa.Table.from_batches(list(_read_tasks(source, info, fast)), schema=info.schema)
        assert got.to_pylist()[0]["id"] == "00000000-0000-0000-0000-000000000005"
        assert got.to_pylist()[0]["state"] == "done"


def _read_tasks(source, info, fast):
    source.dialect.fast_path = fast
    return source.read_slice(info, None, None)


@pytest.mark.parametrize("fast", [True, False], ids=["adbc", "generic"])
def test_a_domain_over_timestamptz_is_a_watermark(pg_db, sources, fast):
    """A watermark column of a domain type works as its base type: bounds, horizon and values."""
    pg_db.run(
        "CREATE DOMAIN stamp AS timestamptz NOT NULL",
        "CREATE TABLE events (id int PRIMARY KEY, tags text[], at stamp)",
        "INSERT INTO events VALUES (1, '{a}', '2024-05-01 10:00:00+00'), (2, '{b,c}', '2024-05-02 10:00:00+00'), "
        "(3, NULL, '2024-05-03 10:00:00+00')",
    )
    source = sources(pg_db)
    source.dialect.fast_path = fast
    info = source.describe_table("events", watermark_column="at")
    assert info.schema.field("at").type == pa.timestamp("us", tz="UTC")
    got = pa.Table.from_batches(list(source.read_slice(
        info, dt.datetime(2024, 5, 2, tzinfo=UTC), dt.datetime(2024, 5, 3, 10, tzinfo=UTC))), schema=info.schema)
    assert got.to_pylist() == [{"id": 2, "tags": ["b", "c"], "at": dt.datetime(2024, 5, 2, 10, tzinfo=UTC)}]


@pytest.mark.parametrize("fast", [True, False], ids=["adbc", "generic"])
def test_arrays_of_uuid_json_and_ranges(pg_db, sources, fast):
    """Elements keep the text they would have as columns: uuid text, json as the server's text,
    a range as the server's text."""
    pg_db.run(
        "CREATE TABLE things (id int, ids uuid[], docs jsonb[], spans int4range[], at timestamptz)",
        "INSERT INTO things VALUES (1, ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, NULL], "
        "ARRAY['{\"a\": 2.50}'::jsonb], ARRAY['[1,5)'::int4range, NULL], '2024-01-01')",
    )
    source = sources(pg_db)
    source.dialect.fast_path = fast
    info = source.describe_table("things", watermark_column="at")
    got = pa.Table.from_batches(list(source.read_slice(info, None, None)), schema=info.schema)
    assert [(f.name, f.type) for f in got.schema][1:4] == [(c, pa.list_(pa.string())) for c in ("ids", "docs", "spans")]
    row = got.to_pylist()[0]
    assert row["ids"] == ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", None]
    assert row["docs"] == ['{"a": 2.50}'] and row["spans"] == ["[1,5)", None]


@pytest.mark.parametrize(
    ("url", "array_sql", "text_sql"),
    [
        ("postgresql+psycopg://u@h/db", '"special_features" text[]', '"grid" text'),
        ("mssql+pyodbc://u@h/db?driver=ODBC+Driver+18+for+SQL+Server", "[special_features] NVARCHAR(MAX)", "[grid] NVARCHAR(MAX)"),
        ("sqlite:///unused.db", '"special_features" TEXT', '"grid" TEXT'),
    ],
    ids=["postgresql", "mssql", "sqlite"],
)
def test_replica_tables_for_lists(url, array_sql, text_sql):
    """The DDL a replica creates for a list column: an array on PostgreSQL, text (JSON) elsewhere."""
    from incremental_assets.replica import Replica

    schema = pa.schema([("film_id", pa.int64()), ("special_features", pa.list_(pa.string())), ("grid", pa.string()),
                        ("last_update", pa.timestamp("us", tz="UTC"))])
    table, _ = Replica.offline(url).create_table_sql("film", schema, ["film_id"], version_column="last_update")
    assert array_sql in table and text_sql in table
