"""PostgreSQL's columnar read path (ADBC, COPY binary) against the generic SQLAlchemy path.

The fast path must return exactly the Arrow schema and values of the generic path, stream in
bounded memory, keep values as bound parameters, and fall back where it cannot be exact.
"""

from __future__ import annotations

import datetime as dt
import logging
from decimal import Decimal
import math
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from incremental_assets.landing.formats import ParquetSliceWriter
from incremental_assets.landing.local import LocalLandingStore
from incremental_assets.sources import Source, SourceUnavailable
from incremental_assets.sources import postgresql as pgmod
from incremental_assets.sources.base import EngineDialect

UTC = dt.timezone.utc
GENERIC = EngineDialect.read_batches
FALLBACK_LOG = "reading through SQLAlchemy rows"


def utc(*args) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


@pytest.fixture(params=[0, 1], ids=["in-thread", "reading-thread"])
def prefetch(request, monkeypatch):
    """Both ways of reading: in the caller's thread, and with a reading thread ahead of it."""
    monkeypatch.setattr(pgmod.PostgreSQLDialect, "prefetch", request.param)
    return request.param


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail if the fast path hands a read to the generic path."""

    def boom(*args, **kwargs):
        raise AssertionError("the fast path fell back to the generic path")
        yield  # pragma: no cover

    monkeypatch.setattr(EngineDialect, "read_batches", boom)


def fast(source: Source, info, lo, hi, batch_size=7) -> tuple[pa.Table, list[pa.RecordBatch]]:
    batches = list(source.read_slice(info, lo, hi, batch_size=batch_size))
    for batch in batches:
        assert batch.schema == info.schema
        assert 0 < batch.num_rows <= batch_size
    return pa.Table.from_batches(batches, schema=info.schema), batches


def generic(source: Source, info, lo, hi, batch_size=7) -> pa.Table:
    batches = list(GENERIC(source.dialect, source, source.select_slice(info, lo, hi), info.schema, batch_size))
    return pa.Table.from_batches(batches, schema=info.schema)


def assert_same(a: pa.Table, b: pa.Table) -> None:
    """Same schema and values (NaN equal to NaN), whatever the chunking."""
    assert a.schema == b.schema
    assert a.num_rows == b.num_rows
    for name in a.column_names:
        x, y = a.column(name), b.column(name)
        if pa.types.is_floating(x.type):
            norm = lambda v: "nan" if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
            assert [norm(v) for v in x.to_pylist()] == [norm(v) for v in y.to_pylist()], name
        else:
            assert x.equals(y), (name, x.to_pylist()[:5], y.to_pylist()[:5])


# ---------------------------------------------------------------------------------------------
# every common type, NULLs in every column, a bounded slice

ALL_TYPES = """
CREATE TABLE typed (
    id int8 PRIMARY KEY, i2 int2, i4 int4, amount numeric(12,3), whole numeric(10,0), huge numeric(50,10),
    free numeric, f8 float8, f4 real, t text, vc varchar(30), ch char(4), flag bool, d date,
    naive timestamp, at timestamptz, tm time, raw bytea, u uuid, j json, jb jsonb
)
"""

ALL_ROWS = """
INSERT INTO typed
SELECT g, (g % 32000 - 16000)::int2, g * 1000 - 2000000000, (g * 12.345)::numeric(12,3) * (CASE WHEN g % 2 = 0 THEN -1 ELSE 1 END),
       g * 10000, ('1234567890123456789012345678901234567890.' || lpad(g::text, 10, '0'))::numeric,
       (ARRAY['0.0000001230', '12.500', '-0.000000', '123456789012345678901234567890.1', 'NaN', 'Infinity',
              '-Infinity', '0', '1E-20', '100'])[g % 10 + 1]::numeric,
       (ARRAY[1.5, -0.1, 1e300, 'NaN', '-Infinity', 5e-324])[g % 6 + 1]::float8 * g,
       (ARRAY[1.1, 49910328, 3.4028235e38, 1e-45, 'NaN', 'Infinity', 0.1, 16777217])[g % 8 + 1]::real,
       'héllo ''' || g || E'''\\n\\t"', 'v' || g, 'c' || (g % 10), g % 3 = 0,
       date '2024-02-29' + g, timestamp '2024-03-10 12:34:56.654321' + g * interval '1 hour 1 microsecond',
       timestamptz '2024-03-10 12:34:56.123456+05:30' + g * interval '61 minutes 7 microseconds',
       time '00:00:00.000001' + g * interval '1 minute', decode(lpad(to_hex(g), 6, '0') || '00ff', 'hex'),
       ('a0eebc99-9c0b-4ef8-bb6d-' || lpad(to_hex(g), 12, '0'))::uuid,
       (ARRAY['{"b": 1, "a": [1, 2.50, {"z": null}]}', '"text"', '5', 'true', 'null', '[]', '{"é": "ü", "n": 1.10}',
              '12345678901234567890', '{"aa": 1, "b": 2}', '  {"sp" :  1 }  '])[g % 10 + 1]::json,
       (ARRAY['{"b": 1, "a": [1, 2.50]}', '"s"', '1.0', 'false', 'null', '{}', '{"é": "ü"}', '[1e400]',
              '{"aa": 1, "b": 2}', '{"nested": {"k": [true, null]}}'])[g % 10 + 1]::jsonb
FROM generate_series(1, 150) AS g
"""


def test_every_type_matches_the_generic_path(pg_db, sources, no_fallback, prefetch):
    pg_db.run(
        ALL_TYPES,
        "SET TIME ZONE 'America/New_York'",  # the server's session zone changes no value
        ALL_ROWS,
        # NULL in every column but the watermark, and a row whose watermark is NULL (never read)
        "INSERT INTO typed (id, at) VALUES (1000, '2024-03-12 00:00:00.000001+00')",
        "INSERT INTO typed (id) VALUES (1001)",
    )
    source = sources(pg_db)
    info = source.describe_table("typed", watermark_column="at")
    assert info.schema.field("huge").type == pa.decimal256(50, 10)
    assert info.schema.field("free").type == pa.string()
    assert info.schema.field("f4").type == pa.float64()

    lo, hi = utc(2024, 3, 10, 10, 0, 0, 123456), utc(2024, 3, 15, 1, 2, 3, 4)
    for bounds in [(lo, hi), (None, hi), (lo, None), (None, None)]:
        expected = generic(source, info, *bounds)
        got, batches = fast(source, info, *bounds)
        assert len(batches) > 2
        assert_same(got, expected)
    # the slice really is bounded, NULLs are there, the NULL watermark is not
    table, _ = fast(source, info, lo, hi)
    at = table.column("at").to_pylist()
    assert at and min(at) >= lo and max(at) < hi
    assert 1000 in table.column("id").to_pylist()
    everything, _ = fast(source, info, None, None)
    assert 1001 not in everything.column("id").to_pylist()
    null_row = [r for r in everything.to_pylist() if r["id"] == 1000][0]
    assert all(v is None for k, v in null_row.items() if k not in ("id", "at"))


def test_exact_values_not_just_equal_paths(pg_db, sources, no_fallback):
    """A few values checked by hand, so that both paths being wrong the same way would show."""
    pg_db.run(
        "CREATE TABLE v (at timestamptz, amount numeric(18,4), free numeric, r real, u uuid, jb jsonb)",
        "INSERT INTO v VALUES ('2024-03-10 12:34:56.123456+05:30', 12345678901234.5678, 0.0000001230, 1.1, "
        "'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '{\"b\": 1, \"a\": 2}')",
    )
    source = sources(pg_db)
    info = source.describe_table("v", watermark_column="at")
    [row] = fast(source, info, None, None)[0].to_pylist()
    assert row["at"] == utc(2024, 3, 10, 7, 4, 56, 123456)
    assert str(row["amount"]) == "12345678901234.5678"
    assert row["free"] == "1.230E-7"  # str(Decimal): the generic path's rendering
    assert row["r"] == 1.1  # the server's text of the real, not 1.100000023841858
    assert row["u"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert row["jb"] == '{"a": 2, "b": 1}'


def test_naive_and_integer_watermarks(pg_db, sources, no_fallback):
    pg_db.run(
        "CREATE TABLE n (id bigint, at timestamp(6), note text)",
        "INSERT INTO n SELECT g, timestamp '2024-03-31 00:00:00' + g * interval '7 minutes 3 microseconds', "
        "'n' || g FROM generate_series(1, 400) g",
    )
    source = sources(pg_db)
    local = source.describe_table("n", watermark_column="at", column_timezone="Europe/Paris")
    # bounds around the DST change in Paris (2024-03-31 01:00 UTC), given in UTC
    lo, hi = utc(2024, 3, 31, 0, 30), utc(2024, 3, 31, 5, 0, 0, 999)
    assert_same(fast(source, local, lo, hi)[0], generic(source, local, lo, hi))
    assert fast(source, local, lo, hi)[0].num_rows > 0
    ids = source.describe_table("n", watermark_column="id")
    assert_same(fast(source, ids, 17, 342)[0], generic(source, ids, 17, 342))
    assert fast(source, ids, 17, 342)[0].column("id").to_pylist() == list(range(17, 342))


def test_empty_slice(pg_db, sources, no_fallback):
    pg_db.run("CREATE TABLE e (id int, at timestamptz)", "INSERT INTO e VALUES (1, '2024-01-01')")
    source = sources(pg_db)
    info = source.describe_table("e", watermark_column="at")
    assert list(source.read_slice(info, utc(2025, 1, 1), utc(2025, 2, 1))) == []


@pytest.mark.parametrize(
    "table, ref",
    [
        ('"we""ird.Table $1"', '"we""ird.Table $1"'),  # dots, quotes and $1 in the name
        ('"Sales Dept"."Order Lines"', '"Sales Dept"."Order Lines"'),
    ],
)
def test_names_needing_quotes(pg_db, sources, no_fallback, table, ref):
    if "Sales" in table:
        pg_db.run('CREATE SCHEMA "Sales Dept"')
    pg_db.run(
        f'CREATE TABLE {table} ("Id" int, "Amount $1" numeric(8,2), "select" text, "Modified At" timestamptz)',
        f"INSERT INTO {table} SELECT g, g * 1.25, 'x' || g, timestamptz '2024-05-01 00:00:00+00' + g * interval '1 hour' "
        "FROM generate_series(1, 50) g",
    )
    source = sources(pg_db)
    info = source.describe_table(ref, watermark_column="Modified At")
    lo, hi = utc(2024, 5, 1, 10), utc(2024, 5, 2, 3)
    got = fast(source, info, lo, hi)[0]
    assert_same(got, generic(source, info, lo, hi))
    assert got.column("Id").to_pylist() == list(range(10, 27))
    assert got.schema.names == ["Id", "Amount $1", "select", "Modified At"]


def test_types_from_the_catalog_when_the_driver_names_none(pg_db, sources, no_fallback, monkeypatch):
    """Drivers before 1.10 attach no PostgreSQL type to their fields: each column's type is then
    read from the catalog in the slice's transaction (a domain as its base type), with the same
    values as the generic path; a type the catalog cannot name still falls back, never guesses."""
    seen: list[dict] = []
    original = pgmod.batch_converter

    def without_metadata(source, target, text_columns=None, pg_types=None):
        seen.append(dict(pg_types or {}))
        return original(pa.schema([f.remove_metadata() for f in source]), target, text_columns, pg_types)

    monkeypatch.setattr(pgmod, "batch_converter", without_metadata)
    pg_db.run(
        'CREATE SCHEMA "Ops"',
        "CREATE DOMAIN money2 AS numeric(12,2) CHECK (VALUE >= 0)",
        'CREATE TABLE "Ops"."Line Items" ("Id" int8, amount money2, free numeric, r real, u uuid, j json, jb jsonb, '
        "note varchar(20), at timestamptz)",
        """INSERT INTO "Ops"."Line Items" SELECT g, g * 1.25, (g * 0.0000001)::numeric, g / 3.0, """
        "('a0eebc99-9c0b-4ef8-bb6d-' || lpad(to_hex(g), 12, '0'))::uuid, "
        """('{"b": ' || g || ', "a": [1, 2.50]}')::json, ('{"k": ' || g || '}')::jsonb, 'n' || g, """
        "timestamptz '2024-05-01 00:00:00+00' + g * interval '1 hour' FROM generate_series(1, 40) g",
    )
    source = sources(pg_db)
    info = source.describe_table('"Ops"."Line Items"', watermark_column="at")
    got = fast(source, info, None, None)[0]
    assert_same(got, generic(source, info, None, None))
    assert got.column("u").to_pylist()[0] == "a0eebc99-9c0b-4ef8-bb6d-000000000001"
    assert str(got.column("amount").to_pylist()[1]) == "2.50"
    # r (real) is selected as text, whatever its catalog type says; j and jb are selected as the
    # server's text (CAST(j AS TEXT): no plain column, no catalog type)
    assert seen and seen[0] == {
        "Id": "int8", "amount": "numeric", "free": "numeric", "r": "float4", "u": "uuid",
        "note": "varchar", "at": "timestamptz",
    }


def test_streams_in_bounded_memory(pg_db, sources, no_fallback, prefetch):
    pg_db.run(
        "CREATE TABLE big (id bigint, note text, at timestamptz)",
        "INSERT INTO big SELECT g, md5(g::text) || md5((-g)::text), timestamptz '2024-01-01' + g * interval '1 second' "
        "FROM generate_series(1, 300000) g",
    )
    source = sources(pg_db)
    info = source.describe_table("big", watermark_column="at")
    count = rows = 0
    biggest = held = 0
    for batch in source.read_slice(info, None, None, batch_size=5000):
        count += 1
        rows += batch.num_rows
        assert batch.num_rows <= 5000
        biggest = max(biggest, batch.nbytes)
        held = max(held, batch.get_total_buffer_size())  # a slice may share the driver's batch
    assert rows == 300_000
    assert count >= 60  # many batches, not one result set
    assert biggest < 500_000  # each small: 5000 rows of about 84 bytes
    assert held < 8_000_000  # what a batch keeps alive: the driver's batch (4 MB hint), never the 25 MB slice


def _copy_sessions(pg_db) -> int:
    return pg_db.rows(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND query LIKE 'COPY %'"
    )[0][0]


@pytest.fixture
def on_publish(monkeypatch):
    """``on_publish(fn)``: ``fn(staged)`` is called as each staged slice is published, just before
    (on the thread that publishes: a run's windows are published while the next one is written)."""
    from incremental_assets.landing import StagedSlice

    def install(fn):
        publish = StagedSlice.publish

        def publishing(staged):
            fn(staged)
            return publish(staged)

        monkeypatch.setattr(StagedSlice, "publish", publishing)

    return install


def test_stopping_early_closes_the_connection(pg_db, sources, no_fallback, prefetch):
    pg_db.run(
        "CREATE TABLE s (id bigint, at timestamptz)",
        "INSERT INTO s SELECT g, timestamptz '2024-01-01' + g * interval '1 second' FROM generate_series(1, 100000) g",
    )
    source = sources(pg_db)
    info = source.describe_table("s", watermark_column="at")
    batches = source.read_slice(info, None, None, batch_size=1000)
    next(batches)
    assert _copy_sessions(pg_db) == 1
    batches.close()  # the consumer gives up (a failed write): the reader thread ends, the connection closes
    for _ in range(50):
        if _copy_sessions(pg_db) == 0:
            break
        time.sleep(0.1)
    assert _copy_sessions(pg_db) == 0


def test_a_value_that_cannot_be_exact_fails_the_read(pg_db, sources, no_fallback, prefetch):
    """numeric(p,s) admits NaN, which no decimal holds: the read fails (as the generic path's does),
    it does not land a wrong value, and the connection is closed."""
    pg_db.run(
        "CREATE TABLE nan (amount numeric(10,2), at timestamptz)",
        "INSERT INTO nan SELECT g, timestamptz '2024-01-01' + g * interval '1 second' FROM generate_series(1, 20000) g",
        "INSERT INTO nan VALUES ('NaN', '2024-06-01')",
    )
    source = sources(pg_db)
    info = source.describe_table("nan", watermark_column="at")
    with pytest.raises(pa.ArrowInvalid):
        list(source.read_slice(info, None, None, batch_size=1000))
    with pytest.raises(pa.ArrowInvalid):
        generic(source, info, None, None)
    assert pg_db.rows("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                      "AND pid <> pg_backend_pid() AND query LIKE 'COPY %' AND state = 'active'")[0][0] == 0


def test_unsupported_types_fall_back_exactly(pg_db, sources, caplog, prefetch):
    pg_db.run(
        "CREATE TABLE odd (id int, ratios real[], tags int[], at timestamptz)",
        "INSERT INTO odd VALUES (1, '{1.1,NULL}', '{1,2}', '2024-01-01'), (2, NULL, NULL, '2024-01-02')",
    )
    source = sources(pg_db)
    info = source.describe_table("odd", watermark_column="at")
    with caplog.at_level(logging.INFO, logger="incremental_assets"):
        got = pa.Table.from_batches(list(source.read_slice(info, None, None, batch_size=7)), schema=info.schema)
    # a real inside an array would widen in binary (1.100000023841858): the generic path parses its text
    assert FALLBACK_LOG in caplog.text and "ratios" in caplog.text
    assert got.column("ratios").to_pylist() == [[1.1, None], None]
    assert_same(got, generic(source, info, None, None))


# ---------------------------------------------------------------------------------------------
# SQL, parameters, URLs


def test_values_are_bound_never_formatted(pg_db, sources):
    pg_db.run("CREATE TABLE b (id int, at timestamptz)")
    source = sources(pg_db)
    info = source.describe_table("b", watermark_column="at")
    lo, hi = utc(2024, 3, 10, 7, 4, 56, 123456), utc(2031, 1, 2)
    query = pgmod.slice_query(source.select_slice(info, lo, hi))
    for sql in (query.direct, query.once):
        assert "2024" not in sql and "2031" not in sql
        assert "current_setting('incremental_assets.p1')" in sql and "current_setting('incremental_assets.p2')" in sql
    assert "$1" in query.settings and "2024" not in query.settings
    assert query.params.column(0).to_pylist() == [lo]
    assert query.params.column(1).to_pylist() == [hi]
    unbounded = pgmod.slice_query(source.select_slice(info, None, None))
    assert unbounded.settings is None and "IS NOT NULL" in unbounded.direct


def test_the_plan_follows_the_bounds(pg_db, sources, monkeypatch):
    """Few rows: the index, which reads the values once; the whole table: a sequential scan with
    the values computed once (not re-read from the settings for every row)."""
    pg_db.run(
        "CREATE TABLE p (id bigint, at timestamptz)",
        "INSERT INTO p SELECT g, timestamptz '2024-01-01' + g * interval '1 second' FROM generate_series(1, 50000) g",
        "CREATE INDEX ON p (at)",
        "ANALYZE p",
    )
    source = sources(pg_db)
    info = source.describe_table("p", watermark_column="at")
    chosen = []
    original = pgmod._CopyReader._statement

    def spy(self, conn):
        sql = original(self, conn)
        chosen.append("once" if sql == self.query.once else "direct")
        return sql

    monkeypatch.setattr(pgmod._CopyReader, "_statement", spy)
    few = fast(source, info, utc(2024, 1, 1, 1), utc(2024, 1, 1, 1, 0, 10), batch_size=100)[0]
    everything = fast(source, info, utc(2023, 1, 1), utc(2025, 1, 1), batch_size=10000)[0]
    assert (few.num_rows, everything.num_rows) == (10, 50000)
    assert chosen == ["direct", "once"]
    # rows in no physical order: a bitmap heap scan rechecks rows; its bounds are computed once too
    pg_db.run(
        "CREATE TABLE shuffled AS SELECT g AS id, timestamptz '2024-01-01' + ((g * 7919) % 50000) * interval '1 second' AS at "
        "FROM generate_series(1, 50000) g",
        "CREATE INDEX ON shuffled (at)",
        "ANALYZE shuffled",
    )
    info = source.describe_table("shuffled", watermark_column="at")
    lo, hi = utc(2024, 1, 1, 1), utc(2024, 1, 1, 3)
    got = fast(source, info, lo, hi, batch_size=1000)[0]
    assert got.num_rows == 7200 and chosen[-1] == "once"
    assert_same(got.sort_by("id"), generic(source, info, lo, hi).sort_by("id"))


def test_per_row_scan_detection():
    filt = "(at >= (current_setting('incremental_assets.p1'))::timestamptz)"
    seq = [{"Plan": {"Node Type": "Seq Scan", "Filter": filt}}]
    index = [{"Plan": {"Node Type": "Index Scan", "Index Cond": filt}}]
    bitmap = [{"Plan": {"Node Type": "Bitmap Heap Scan", "Recheck Cond": filt,
                        "Plans": [{"Node Type": "Bitmap Index Scan", "Index Cond": filt}]}}]
    nested = [{"Plan": {"Node Type": "Gather", "Plans": [seq[0]["Plan"]]}}]
    assert pgmod.per_row_scan(seq) == "Seq Scan"
    assert pgmod.per_row_scan(index) is None
    assert pgmod.per_row_scan(bitmap) == "Bitmap Heap Scan"
    assert pgmod.per_row_scan(nested) == "Seq Scan"


@pytest.mark.parametrize(
    "url, uri",
    [
        ("postgresql+psycopg://u:p%40ss%3Aw%2Fo rd@db.example.com:5433/sales",
         "postgresql://u:p%40ss%3Aw%2Fo%20rd@db.example.com:5433/sales"),
        ("postgresql+psycopg://loader@[::1]/db?sslmode=require&application_name=ia x",
         "postgresql://loader@[::1]/db?sslmode=require&application_name=ia%20x"),
        ("postgresql+psycopg:///db?host=/var/run/postgresql", "postgresql:///db?host=%2Fvar%2Frun%2Fpostgresql"),
        ("postgresql://u@h/d", "postgresql://u@h/d"),
    ],
)
def test_libpq_uri(url, uri):
    assert pgmod.libpq_uri(url) == uri


def test_unreachable_fast_path_names_the_source_never_the_password(caplog):
    url = "postgresql+psycopg://loader:s3cr3t%2FPw@127.0.0.1:1/sales"
    source = Source.offline("erp", url, retries=1, retry_delay=0.01)
    with caplog.at_level(logging.DEBUG), pytest.raises(SourceUnavailable) as err:
        source.dialect.adbc_connection(source, pgmod.libpq_uri(url))
    message = str(err.value)
    assert "'erp'" in message and "after 2 attempts" in message
    assert "s3cr3t" not in message and "s3cr3t" not in caplog.text and "%2FPw" not in message


# ---------------------------------------------------------------------------------------------
# the Parquet writer


def test_parquet_writer_keeps_types_and_chooses_dictionaries(tmp_path):
    n = 50_000
    schema = pa.schema([
        ("id", pa.int64()), ("code", pa.string()), ("note", pa.string()),
        ("at", pa.timestamp("us", tz="UTC")), ("amount", pa.decimal128(12, 2)), ("flag", pa.bool_()),
        ("empty", pa.string()),
    ])
    ids = pa.array(range(n), type=pa.int64())
    code = pa.array([f"c{i % 16}" for i in range(n)])  # repeats: dictionary-encoded
    note = pa.array([f"note {i}" for i in range(n)])  # unique: plain
    at = pa.array([i * 1_000_003 for i in range(n)], type=pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    amount = pa.array([Decimal(i) / 4 for i in range(n)], type=pa.decimal128(12, 2))
    flag = pa.array([i % 2 == 0 for i in range(n)])
    table = pa.Table.from_arrays([ids, code, note, at, amount, flag, pa.nulls(n, pa.string())], schema=schema)
    path = tmp_path / "out.parquet"
    writer = ParquetSliceWriter(row_group_rows=20_000)
    writer.open(str(path), schema)
    for batch in table.to_batches(max_chunksize=3000):
        writer.write_batch(batch)
    rows, nbytes = writer.close()
    assert rows == n and nbytes == path.stat().st_size
    back = pq.read_table(path)
    assert back.schema == schema and back.equals(table)
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 3
    encodings = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i).encodings for i in range(len(schema))}
    assert "RLE_DICTIONARY" in encodings["code"]
    assert "RLE_DICTIONARY" not in encodings["id"] and "RLE_DICTIONARY" not in encodings["note"]


def test_parquet_writer_without_rows_writes_the_schema(tmp_path):
    schema = pa.schema([("id", pa.int64()), ("at", pa.timestamp("us", tz="UTC"))])
    writer = ParquetSliceWriter()
    writer.open(str(tmp_path / "empty.parquet"), schema)
    assert writer.close()[0] == 0
    assert pq.read_table(tmp_path / "empty.parquet").schema == schema


# ---------------------------------------------------------------------------------------------
# windows of one run: each read starts while the slice before it is written


def _windows_table(pg_db, sources, *, index=True):
    from incremental_assets.copying import PlannedSlice

    pg_db.run(
        "CREATE TABLE w (id bigint, at timestamptz)",
        # January and March hold rows, February none; stored out of watermark order
        "INSERT INTO w SELECT g, timestamptz '2024-01-01' + g * interval '1 minute' FROM generate_series(0, 29999) g "
        "ORDER BY md5(g::text)",
        "INSERT INTO w SELECT 100000 + g, timestamptz '2024-03-01' + g * interval '1 minute' FROM generate_series(0, 29999) g "
        "ORDER BY md5(g::text)",
        *(["CREATE INDEX ON w (at)"] if index else []),
    )
    source = sources(pg_db)
    info = source.describe_table("w", watermark_column="at")
    assert info.watermark_indexed == index
    bounds = [None, utc(2024, 2, 1), utc(2024, 3, 1), utc(2024, 4, 1)]
    planned = [PlannedSlice(f"2024-0{m}", lo, hi) for m, (lo, hi) in enumerate(zip(bounds, bounds[1:]), start=1)]
    return source, info, planned


@pytest.fixture
def per_window(monkeypatch):
    """Windows of a table stored in another order than its watermark's are read one by one
    (not sorted by the server in one read)."""
    monkeypatch.setattr(pgmod.PostgreSQLDialect, "SORTED_READ_MAX_BYTES", 0)


def test_window_reads_start_while_the_previous_window_is_written(pg_db, sources, tmp_path, no_fallback, per_window, on_publish):
    from incremental_assets.copying import copy_window_slices
    from incremental_assets.landing import open_landing_store

    source, info, planned = _windows_table(pg_db, sources)
    store = open_landing_store(str(tmp_path / "landing"), "parquet")
    under_way, published = {}, []
    on_publish(lambda staged: under_way.__setitem__(staged.partition, _copy_sessions(pg_db)))
    copies = copy_window_slices(source, info, store, planned, table="w", batch_size=1000,
                                landed=lambda copy: published.append((copy.partition, [f.path for f in copy.files])))
    # February has no row: skipped by the probe, never read
    assert [(c.partition, c.rows) for c in copies] == [("2024-01", 30000), ("2024-03", 30000)]
    # when January's file was published, March's COPY was already running; after March, nothing
    assert under_way == {"2024-01": 1, "2024-03": 0}
    # landed is told of each window once published, in order, with its files
    assert [(c.partition, [f.path for f in c.files]) for c in copies] == published and all(files for _, files in published)
    landed_ids = sorted(i for c in copies for f in c.files for i in pq.read_table(f.uri).column("id").to_pylist())
    assert landed_ids == list(range(30000)) + list(range(100000, 130000))


def test_reads_of_many_windows_reuse_connections_that_hold_no_transaction(pg_db, sources, tmp_path, no_fallback, on_publish):
    """A run of many small windows does not open a connection per window: a read that went to its
    end leaves its connection for the next one, out of any transaction (an open one would hold
    back the safe horizon of every table of the database); dispose closes them."""
    from incremental_assets.copying import PlannedSlice, copy_window_slices
    from incremental_assets.landing import open_landing_store

    pg_db.run(
        "CREATE TABLE d (id bigint, at timestamptz)",
        "INSERT INTO d SELECT g, timestamptz '2024-01-01 06:00Z' + g * interval '1 day' FROM generate_series(0, 29) g",
        "CREATE INDEX ON d (at)",
    )
    source = sources(pg_db)
    info = source.describe_table("d", watermark_column="at")
    day = dt.timedelta(days=1)
    planned = [PlannedSlice(f"d{k}", utc(2024, 1, 1) + k * day, utc(2024, 1, 1) + (k + 1) * day) for k in range(30)]
    others = "datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    before = {r[0] for r in pg_db.rows(f"SELECT pid FROM pg_stat_activity WHERE {others}")}
    seen: set[int] = set()

    on_publish(lambda staged: seen.update(r[0] for r in pg_db.rows(f"SELECT pid FROM pg_stat_activity WHERE {others}")))
    store = open_landing_store(str(tmp_path / "landing"), "parquet")
    copies = copy_window_slices(source, info, store, planned, table="d", batch_size=1000)
    assert [c.rows for c in copies] == [1] * 30
    # the source's own connection, at most two reading and the test's: not one per window
    assert len(seen - before) <= 4, len(seen - before)
    waiting = pg_db.rows(f"SELECT pid, state FROM pg_stat_activity WHERE {others} AND pid <> ALL(ARRAY{sorted(before) or [0]}::int[])")
    assert waiting and all(state == "idle" for _, state in waiting), waiting
    horizon = source.safe_horizon(info)
    assert "held back" not in horizon.note, horizon
    # a connection that died while it waited (the server restarted, say) is replaced, not an error
    source.engine.dispose()  # (only the reads' connections are killed here: a backend of a pooled
    # connection that dispose just closed may still be on its way out)
    pids = sorted(pid for pid, _ in waiting)
    assert pg_db.rows(f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE pid = ANY(ARRAY{pids}::int[])") == [(len(waiting),)]
    again = copy_window_slices(source, info, store, planned[:3], table="d", batch_size=1000, replace=True)
    assert [c.rows for c in again] == [1, 1, 1]
    waiting = pg_db.rows(f"SELECT pid, state FROM pg_stat_activity WHERE {others}")
    source.dispose()
    deadline = time.monotonic() + 5
    while {pid for pid, _ in waiting} & {r[0] for r in pg_db.rows(f"SELECT pid FROM pg_stat_activity WHERE {others}")}:
        assert time.monotonic() < deadline, "connections left open after dispose"
        time.sleep(0.05)


def test_asking_which_windows_hold_rows_probes_the_index(pg_db, sources):
    """A window the statistics say holds half the table is not found by reading the table in
    storage order until a row matches (EXISTS is planned as such a scan): each window is one
    probe of the watermark's index, however the rows are stored."""
    source, info, planned = _windows_table(pg_db, sources)
    pg_db.run("ANALYZE w")
    bounds = [(p.lo, p.hi) for p in planned]
    assert source.windows_with_rows(info, bounds) == [True, False, True]
    assert source.has_rows(info, utc(2024, 3, 1), None) and not source.has_rows(info, utc(2024, 2, 1), utc(2024, 3, 1))
    statements = {
        "windows_with_rows": source.select_windows_with_rows(info, bounds),
        "has_rows": source.select_first(info, utc(2024, 1, 1), None),
    }
    with source.engine.connect() as conn:
        for what, statement in statements.items():
            compiled = statement.compile(dialect=source.engine.dialect)
            plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params))
            assert "Seq Scan" not in plan and "Index Only Scan" in plan, (what, plan)


def test_windows_without_an_index_come_from_one_copy(pg_db, sources, tmp_path, no_fallback, on_publish):
    """timestamptz with no index: one COPY in watermark order serves every window (one sorted scan,
    not a scan per window), cut at the windows' UTC bounds: each window's rows arrive sorted."""
    from incremental_assets.copying import copy_window_slices
    from incremental_assets.landing import open_landing_store

    source, info, planned = _windows_table(pg_db, sources, index=False)
    store = open_landing_store(str(tmp_path / "landing"), "parquet")
    sessions = []
    on_publish(lambda staged: sessions.append(_copy_sessions(pg_db)))
    copies = copy_window_slices(source, info, store, planned, table="w", batch_size=1000)
    assert [(c.partition, c.rows) for c in copies] == [("2024-01", 30000), ("2024-03", 30000)]
    # never a second COPY: at January's publication the one COPY is still streaming March (1), or
    # the kernel's socket buffers already took the rest of this small table and it has ended (0)
    assert sessions[0] <= 1 and sessions[1] == 0, sessions
    for copy in copies:
        stamps = [a for f in copy.files for a in pq.read_table(f.uri).column("at").to_pylist()]
        assert stamps == sorted(stamps) and (copy.lo is None or min(stamps) >= copy.lo) and max(stamps) < copy.hi
    landed_ids = sorted(i for c in copies for f in c.files for i in pq.read_table(f.uri).column("id").to_pylist())
    assert landed_ids == list(range(30000)) + list(range(100000, 130000))


def test_a_failed_window_stops_the_read_started_for_the_next(pg_db, sources, tmp_path, no_fallback, per_window, monkeypatch):
    """January's file cannot be published (the disk is full, say): the run fails with that error,
    the read started for March stops, and nothing of either window is left, not even a temp file."""
    from incremental_assets.copying import copy_window_slices
    from incremental_assets.landing import LandingError, open_landing_store

    from .helpers import local_publish_fails

    source, info, planned = _windows_table(pg_db, sources)
    store = open_landing_store(str(tmp_path / "landing"), "parquet")
    local_publish_fails(monkeypatch, "2024-01")
    landed = []
    with pytest.raises(LandingError, match=r"No space left on device.*2024-01"):
        copy_window_slices(source, info, store, planned, table="w", batch_size=1000, landed=landed.append)
    for _ in range(50):
        if _copy_sessions(pg_db) == 0:
            break
        time.sleep(0.1)
    assert _copy_sessions(pg_db) == 0
    assert landed == []
    assert not [p for p in (tmp_path / "landing" / "w").rglob("*") if p.is_file()]  # nothing of any window


def test_a_refresh_empties_a_window_whose_rows_are_gone(pg_db, sources, tmp_path, no_fallback):
    from incremental_assets.copying import copy_window_slices
    from incremental_assets.landing import open_landing_store

    source, info, planned = _windows_table(pg_db, sources)
    store = open_landing_store(str(tmp_path / "landing"), "parquet")
    copy_window_slices(source, info, store, planned, table="w", batch_size=1000)
    assert store.list_files("w", "2024-03")
    pg_db.run("DELETE FROM w WHERE at >= timestamptz '2024-03-01'")  # March's rows are deleted at the source

    # an incremental copy skips the now empty March; a refresh replaces its files by nothing
    copy_window_slices(source, info, store, planned, table="w", batch_size=1000)
    assert store.list_files("w", "2024-03")
    copies = copy_window_slices(source, info, store, planned, table="w", batch_size=1000, replace=True)
    assert [(c.partition, c.rows) for c in copies] == [("2024-01", 30000), ("2024-02", 0), ("2024-03", 0)]
    assert store.list_files("w", "2024-03") == [] and store.list_files("w", "2024-02") == []
    assert len(store.list_files("w", "2024-01")) == 1


def test_windows_with_an_index_come_from_one_copy_in_order_or_sorted(pg_db, sources, tmp_path, no_fallback, caplog,
                                                                    monkeypatch, on_publish):
    """With an index on the watermark, one COPY serves a run of windows (not a query, a
    connection turn and a thread per window), cut at the windows' bounds: each window lands
    exactly what a read of its own gets, a row on a bound in the window it starts. A table stored
    in watermark order is read in storage order (windows of many rows, into a local landing
    folder, whose files wait unpublished until the read has ended) or from the index in order
    (smaller windows, or Azure); one stored in
    another order is sorted by the server (an index read would fetch its rows page by page at
    random), unless it holds more rows than the server should sort: then each window is read alone."""
    from incremental_assets import copying
    from incremental_assets.copying import PlannedSlice, copy_window_slices
    from incremental_assets.landing import open_landing_store

    pg_db.run(
        # 40 days of 1,000 rows each, one of them on each midnight
        "CREATE TABLE o (id bigint, at timestamptz)",
        "INSERT INTO o SELECT g, timestamptz '2024-01-01Z' + g * interval '86.4 seconds' FROM generate_series(0, 39999) g",
        "CREATE TABLE s AS SELECT * FROM o ORDER BY md5(id::text)",
        "CREATE INDEX ON o (at)", "CREATE INDEX ON s (at)", "ANALYZE o", "ANALYZE s",
    )
    source = sources(pg_db)
    day = dt.timedelta(days=1)
    planned = [PlannedSlice(f"d{k:02d}", None if k == 0 else utc(2024, 1, 1) + k * day, utc(2024, 1, 1) + (k + 1) * day)
               for k in range(40)]
    caplog.set_level(logging.INFO, logger="incremental_assets")
    # (the planner's estimate of the rows' width is 16 bytes: 40,000 rows are about 640 kB)
    # (storage order from windows of 500 rows here: by default, 100,000, the index is read)
    cases = [("o", "in the order of its index", 1 << 30, True, 500), ("o", "in the order of its index", 1 << 30, True, 100_000),
             ("o", "in the order of its index", 1 << 30, False, 500),
             ("s", "sorted on the server", 1 << 30, True, 500), ("s", None, 100_000, True, 500)]
    for table, how, most, cheap_publish, window_rows in cases:
        monkeypatch.setattr(pgmod.PostgreSQLDialect, "SORTED_READ_MAX_BYTES", most)
        monkeypatch.setattr(LocalLandingStore, "cheap_publish", cheap_publish)  # False: as Azure's
        monkeypatch.setattr(copying, "STORAGE_ORDER_WINDOW_ROWS", window_rows)
        info = source.describe_table(table, watermark_column="at")
        assert info.watermark_indexed
        said = source.one_ordered_read(info, None, planned[-1].hi)
        assert (said is None) if how is None else said.how.startswith(how)
        assert (said is not None and said.storage_order) == (table == "o")
        expected = {p.partition: sorted(fast(source, info, p.lo, p.hi)[0].column("id").to_pylist()) for p in planned}
        assert [len(ids) for ids in expected.values()] == [1000] * 40 and expected["d01"][0] == 1000
        caplog.clear()
        sessions = []
        on_publish(lambda staged, sessions=sessions: sessions.append(_copy_sessions(pg_db)))
        store = open_landing_store(str(tmp_path / f"{table}-{most}-{cheap_publish}-{window_rows}"), "parquet")
        copies = copy_window_slices(source, info, store, planned, table=table, batch_size=700)
        landed = {c.partition: [i for f in c.files for i in pq.read_table(f.uri).column("id").to_pylist()] for c in copies}
        assert {k: sorted(v) for k, v in landed.items()} == expected
        one_read = "windows from one read in watermark order ('at': "
        if how is None:
            assert one_read not in caplog.text
        elif table == "o" and cheap_publish and window_rows < 1000:
            assert "40 windows from one read in storage order, about the watermark's ('at')" in caplog.text
            assert "read again" not in caplog.text
            assert sessions == [0] * 40  # published once the read has ended
        else:
            assert one_read + how in caplog.text
            # one COPY at a time, streaming the next windows when the first is published (the later
            # ones are published while the read goes on: it may have ended by then), over by the last
            assert len(sessions) == 40 and sessions[0] == 1 and max(sessions) == 1 and sessions[-1] == 0, sessions
            assert all(v == sorted(v) for v in landed.values())  # ids follow the watermark here


def _about_in_order(pg_db, sources, table="a", late=False):
    """A table stored about in watermark order, as tables written over time are: 40 days of
    1,000 rows in order, then rows updated in place (HOT: a new version in the same page, a later
    watermark: they come early in a scan); ``late``: with two rows of days 3 and 17 written late,
    stored after every other row."""
    from incremental_assets.copying import PlannedSlice

    rows = "SELECT g AS id, timestamptz '2024-01-01Z' + g * interval '86.4 seconds' AS at, 'x' AS note FROM generate_series(0, 39999) g"
    if late:
        rows += (" UNION ALL SELECT 90001, timestamptz '2024-01-04 12:00Z', 'late'"
                 " UNION ALL SELECT 90002, timestamptz '2024-01-18 00:00Z', 'late'")
    pg_db.run(
        f"CREATE TABLE {table} (id bigint, at timestamptz, note text) WITH (fillfactor = 50)",
        f"INSERT INTO {table} SELECT id, at, note FROM ({rows}) r ORDER BY id",  # stored in that order
        f"CREATE INDEX ON {table} (at)", f"ANALYZE {table}",
        # updated in place, moved to the last day (the note is not indexed: HOT updates)
        f"UPDATE {table} SET at = at + interval '39 days' * (1 - (id / 1000) / 40.0) WHERE id % 97 = 0 AND id < 30000",
    )
    source = sources(pg_db)
    day = dt.timedelta(days=1)
    planned = [PlannedSlice(f"d{k:02d}", None if k == 0 else utc(2024, 1, 1) + k * day, utc(2024, 1, 1) + (k + 1) * day)
               for k in range(40)]
    return source, planned


def _landed_windows(copies):
    return {c.partition: sorted(i for f in c.files for i in pq.read_table(f.uri).column("id").to_pylist()) for c in copies}


def test_a_table_about_in_watermark_order_lands_each_window_exactly(pg_db, sources, tmp_path, no_fallback, caplog,
                                                                   monkeypatch):
    """Read in storage order, rows updated in place come ahead of their window and wait for it;
    rows written late, after their window's turn, make their window be read again on its own.
    Every window lands exactly the rows a read of its own gets."""
    from incremental_assets import copying
    from incremental_assets.copying import StorageOrderSplit, copy_window_slices
    from incremental_assets.landing import open_landing_store

    monkeypatch.setattr(copying, "STORAGE_ORDER_WINDOW_ROWS", 500)  # windows of about 1,000 rows here
    # a window's turn ends 16 kB of the read after its latest row (a day's rows are about 30 kB):
    # the table is small, and the default (8 MB) would hold all of it in memory in the first turn
    monkeypatch.setattr(StorageOrderSplit, "PAST_BYTES", 16 * 1024)

    source, planned = _about_in_order(pg_db, sources)
    info = source.describe_table("a", watermark_column="at")
    assert source.one_ordered_read(info, None, planned[-1].hi).storage_order
    caplog.set_level(logging.INFO, logger="incremental_assets")

    store = open_landing_store(str(tmp_path / "updated"), "parquet")
    copies = copy_window_slices(source, info, store, planned, table="a", batch_size=500)
    expected = {p.partition: sorted(fast(source, info, p.lo, p.hi)[0].column("id").to_pylist()) for p in planned}
    assert _landed_windows(copies) == expected
    assert len(expected["d39"]) > 1000  # the updated rows moved there
    assert "from one read in storage order" in caplog.text and "read again" not in caplog.text

    _, planned = _about_in_order(pg_db, sources, table="b", late=True)
    info = source.describe_table("b", watermark_column="at")
    caplog.clear()
    store = open_landing_store(str(tmp_path / "late"), "parquet")
    copies = copy_window_slices(source, info, store, planned, table="b", batch_size=500)
    expected = {p.partition: sorted(fast(source, info, p.lo, p.hi)[0].column("id").to_pylist()) for p in planned}
    assert _landed_windows(copies) == expected
    assert 90001 in expected["d03"] and 90002 in expected["d17"]
    assert "2 window(s) read again on their own (rows out of watermark order): d03, d17" in caplog.text
    assert [c.partition for c in copies] == [p.partition for p in planned]  # landed in window order


def test_nothing_of_a_run_in_storage_order_is_visible_when_it_fails(pg_db, sources, tmp_path, no_fallback, monkeypatch):
    """The files of a run read in storage order are published once the read has ended: a run
    that fails before leaves no file, not even of the windows it had written."""
    from incremental_assets import copying
    from incremental_assets.landing import open_landing_store

    source, planned = _about_in_order(pg_db, sources)
    info = source.describe_table("a", watermark_column="at")
    store = open_landing_store(str(tmp_path / "landing"), "parquet")
    turns = []
    real_rows = copying.StorageOrderSplit.rows

    def rows(self, window):
        turns.append(window)
        if window == 30:
            raise RuntimeError("the connection was lost in window 30")
        yield from real_rows(self, window)

    monkeypatch.setattr(copying.StorageOrderSplit, "rows", rows)
    monkeypatch.setattr(copying, "STORAGE_ORDER_WINDOW_ROWS", 500)  # windows of about 1,000 rows here
    with pytest.raises(RuntimeError, match="window 30"):
        copying.copy_window_slices(source, info, store, planned, table="a", batch_size=500)
    assert turns == list(range(31))
    assert store.list_files("a") == []
    assert [p for p in (tmp_path / "landing").rglob("*") if p.is_file()] == []  # nor any temporary file


def test_a_run_of_windows_does_not_load_pandas(pg_db, tmp_path):
    """Cutting one read at the windows' bounds takes no pyarrow conversion of Python values,
    which imports pandas where it is installed (0.2 s and 30 MB of every run's process)."""
    pytest.importorskip("pandas", reason="pandas is not installed: nothing could load it")
    pg_db.run(
        "CREATE TABLE p (id bigint, at timestamptz)",
        "INSERT INTO p SELECT g, timestamptz '2024-01-01Z' + g * interval '1 hour' FROM generate_series(0, 2399) g",
        "ANALYZE p",
    )
    script = f"""
import datetime as dt, sys
from incremental_assets.copying import PlannedSlice, copy_window_slices
from incremental_assets.landing import open_landing_store
from incremental_assets.sources import Source
source = Source("src", {pg_db.url!r})
info = source.describe_table("p", watermark_column="at")
start = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
planned = [PlannedSlice(str(k), None if k == 0 else start + dt.timedelta(days=k), start + dt.timedelta(days=k + 1)) for k in range(100)]
copies = copy_window_slices(source, info, open_landing_store({str(tmp_path)!r}, "parquet"), planned, table="p")
source.dispose()
print(sum(c.rows for c in copies), len(copies), "pandas" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2400", "100", "False"]
