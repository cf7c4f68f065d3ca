"""MySQL/MariaDB's columnar path (ConnectorX): where it is taken, it lands exactly what the
generic path (SQLAlchemy rows) lands; where it could not, the generic path is taken and the
log says why."""

import datetime as dt
import logging
import os
import time

import pyarrow as pa
import pytest

from incremental_assets.sources.mysql import MySQLDialect, connectorx_uri

try:
    import connectorx  # noqa: F401
except ImportError:
    if os.environ.get("CI", "").lower() == "true":
        raise  # CI installs the dev extra, which has it: its absence is a failure there
    pytest.skip("connectorx is not installed (the dev extra installs it)", allow_module_level=True)

FALLBACK = "the columnar path is not used"
UTC = dt.timezone.utc


@pytest.fixture(params=["mariadb_db", "mariadb_mysqlclient_db"])
def maria(request):
    return request.getfixturevalue(request.param)


def _both(source, info, lo=None, hi=None, *, monkeypatch, caplog):
    """The slice through the columnar path and through the generic path, and the columnar read's log."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="incremental_assets"):
        fast = pa.Table.from_batches(list(source.read_slice(info, lo, hi, batch_size=3)), schema=info.schema)
    said = caplog.text
    monkeypatch.setattr(MySQLDialect, "columnar", False)
    try:
        generic = pa.Table.from_batches(list(source.read_slice(info, lo, hi, batch_size=3)), schema=info.schema)
    finally:
        monkeypatch.setattr(MySQLDialect, "columnar", True)
    return fast, generic, said


def test_the_columnar_path_lands_what_the_generic_path_lands(maria, sources, monkeypatch, caplog):
    maria.run(
        "CREATE TABLE typed (id int PRIMARY KEY, ti tinyint, flag tinyint(1), si smallint, mi mediumint, "
        "big bigint, ubig bigint unsigned, uint int unsigned, amount decimal(12,2), wide decimal(28,10), "
        "x double, note varchar(40) CHARACTER SET utf8mb4, latin varchar(10) CHARACTER SET latin1, "
        "body text CHARACTER SET utf8mb4, code char(3), kind enum('a','bb'), at6 datetime(6), at0 datetime, "
        "stamp timestamp(6) NULL DEFAULT NULL, day date, raw varbinary(8), blobby blob, "
        "doc json) DEFAULT CHARSET=utf8mb4",  # MariaDB's JSON is text
        # TIMESTAMP is an instant: written from a +05:30 session, it reads as the same UTC instant
        "SET time_zone = '+05:30'",
        "INSERT INTO typed VALUES (1, -128, 2, -32768, -8388608, -9223372036854775808, 18446744073709551615, "
        "4294967295, -9999999999.99, 999999999999999999.9999999999, 0.1, 'héllo 😀', 'café', 'a\\tb\\nc', 'ab', 'bb', "
        "'2024-03-10 12:34:56.123456', '2024-03-10 12:34:56', '2024-03-10 12:34:56.654321', '2024-02-29', "
        "x'00ff10', x'', '{\"a\": [1, 2]}')",
        "INSERT INTO typed VALUES (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
        "NULL, NULL, '2024-03-11 00:00:00', NULL, NULL, NULL, NULL, NULL, NULL)",
        "INSERT INTO typed VALUES (3, 127, 0, 32767, 8388607, 9223372036854775807, 0, 0, 0.01, -0.0000000001, "
        "-1.7976931348623157e308, '', '', '', '', 'a', '2024-03-11 00:00:00.000001', '1000-01-01 00:00:00', "
        "'1970-01-01 05:30:01', '9999-12-31', x'', x'ffffffffffffffff', '[]')",
    )
    source = sources(maria)
    info = source.describe_table("typed", watermark_column="at6")
    fast, generic, said = _both(source, info, monkeypatch=monkeypatch, caplog=caplog)
    assert FALLBACK not in said, said
    assert fast.num_rows == 3 and fast.equals(generic), (fast.to_pylist(), generic.to_pylist())
    row = fast.sort_by("id").to_pylist()[0]
    assert row["stamp"] == dt.datetime(2024, 3, 10, 7, 4, 56, 654321, tzinfo=UTC)
    assert row["note"] == "héllo 😀" and row["latin"] == "café" and row["flag"] == 2
    assert str(row["wide"]) == "999999999999999999.9999999999" and row["ubig"] == 18446744073709551615

    # half-open slices at microsecond bounds, as the generic path cuts them
    for lo, hi in ((dt.datetime(2024, 3, 11), dt.datetime(2024, 3, 11, 0, 0, 0, 1)), (None, dt.datetime(2024, 3, 11))):
        fast, generic, said = _both(source, info, lo, hi, monkeypatch=monkeypatch, caplog=caplog)
        assert FALLBACK not in said and fast.equals(generic)
        assert fast.column("id").to_pylist() == ([2] if lo else [1])


@pytest.mark.parametrize("sql_type, value", [
    ("float", "1.1"),  # single precision: ConnectorX widens the float, the generic path parses the text
    ("decimal(30,2)", "1234567890123456789012345678.12"),  # more digits than ConnectorX's decimals hold
    ("decimal(12,11)", "0.12345678901"),  # more places than ConnectorX's decimals keep
    ("year", "2024"),
    ("time(6)", "'-838:59:59.000000'"),
    ("set('a','b')", "'a,b'"),
    ("bit(3)", "b'101'"),
], ids=lambda v: v.split("(")[0] if isinstance(v, str) and v[0].isalpha() else None)
def test_a_column_the_columnar_path_cannot_keep_exactly_takes_the_generic_path(maria, sources, monkeypatch, caplog, sql_type, value):
    maria.run(f"CREATE TABLE odd (id int PRIMARY KEY, v {sql_type})", f"INSERT INTO odd VALUES (1, {value}), (2, NULL)")
    source = sources(maria)
    info = source.describe_table("odd", watermark_column="id")
    fast, generic, said = _both(source, info, monkeypatch=monkeypatch, caplog=caplog)
    assert FALLBACK in said and "'v'" in said, said  # the log names the column
    assert fast.equals(generic) and fast.num_rows == 2


def test_the_connectorx_uri_keeps_the_password_and_refuses_options_it_would_not_honour():
    uri = connectorx_uri("mysql+pymysql://us%40er:p%40ss%3Aword@db.example:3307/sales?charset=utf8mb4")
    assert uri == "mysql://us%40er:p%40ss%3Aword@db.example:3307/sales"
    from incremental_assets.sources.mysql import NoColumnar

    with pytest.raises(NoColumnar, match="ssl_ca"):
        connectorx_uri("mysql+pymysql://u:p@db/sales?ssl_ca=/etc/ca.pem")


def test_a_source_whose_url_has_options_reads_through_the_generic_path(mariadb_db, sources, monkeypatch, caplog):
    mariadb_db.run("CREATE TABLE t (id int PRIMARY KEY)", "INSERT INTO t VALUES (1), (2)")
    source = sources(mariadb_db)
    info = source.describe_table("t", watermark_column="id")
    monkeypatch.setattr(type(source), "url", property(lambda self: self.__dict__["url"]), raising=False)
    source.__dict__["url"] = mariadb_db.url + ("&" if "?" in mariadb_db.url else "?") + "local_infile=1"
    with caplog.at_level(logging.INFO, logger="incremental_assets"):
        got = pa.Table.from_batches(list(source.read_slice(info, None, None)), schema=info.schema)
    assert got.column("id").to_pylist() == [1, 2]
    assert "URL option 'local_infile'" in caplog.text


def test_timestamps_read_in_utc_whatever_the_servers_time_zone(mariadb_db, sources, monkeypatch, caplog):
    """TIMESTAMP columns hold instants; a server whose sessions start in another time zone must not
    shift them (nor the bounds of a slice)."""
    mariadb_db.run("CREATE TABLE ts (id int PRIMARY KEY, stamp timestamp(6) NULL DEFAULT NULL)",
                   "SET time_zone = '+00:00'", "INSERT INTO ts VALUES (1, '2024-03-10 07:04:56.654321'), (2, NULL)")
    source = sources(mariadb_db)
    info = source.describe_table("ts", watermark_column="stamp")
    (zone,), = mariadb_db.rows("SELECT @@GLOBAL.time_zone")
    mariadb_db.run("SET GLOBAL time_zone = '+03:00'")
    try:
        instant = dt.datetime(2024, 3, 10, 7, 4, 56, 654321, tzinfo=UTC)
        fast, generic, said = _both(source, info, instant, instant + dt.timedelta(microseconds=1), monkeypatch=monkeypatch, caplog=caplog)
    finally:
        mariadb_db.run(f"SET GLOBAL time_zone = '{zone}'")
    assert FALLBACK not in said
    assert fast.to_pylist() == generic.to_pylist() == [{"id": 1, "stamp": instant}]


def test_only_numbers_and_times_are_written_into_the_querys_text(mariadb_db, sources):
    import sqlalchemy as sa

    from incremental_assets.sources.mysql import NoColumnar, literal_query

    dialect = sources(mariadb_db).engine.dialect
    t = sa.table("t", sa.column("at"), sa.column("name"))
    at = dt.datetime(2024, 1, 1, 0, 0, 0, 5)
    assert literal_query(sa.select(t.c.at).where(t.c.at >= sa.literal(at, sa.DateTime())), dialect).endswith(
        "WHERE t.at >= '2024-01-01 00:00:00.000005'")
    with pytest.raises(NoColumnar, match="str"):
        literal_query(sa.select(t.c.at).where(t.c.name == "x' OR '1'='1"), dialect)


def test_a_password_with_url_characters_reaches_the_columnar_path(mariadb_db, sources, caplog):
    import sqlalchemy as sa

    user, password = f"ia_{os.getpid()}", "p@ss:w/rd%#?"
    url = sa.make_url(mariadb_db.url)
    mariadb_db.run("CREATE TABLE t (id int PRIMARY KEY)", "INSERT INTO t VALUES (1), (2)")
    for host in ("%", "localhost"):
        mariadb_db.run(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY '{password}'",
                       f"GRANT SELECT ON `{url.database}`.* TO '{user}'@'{host}'")
    try:
        source = sources(url.set(username=user, password=password).render_as_string(hide_password=False))
        info = source.describe_table("t", watermark_column="id")
        with caplog.at_level(logging.INFO, logger="incremental_assets"):
            got = pa.Table.from_batches(list(source.read_slice(info, None, None)), schema=info.schema)
        assert got.column("id").to_pylist() == [1, 2]
        assert FALLBACK not in caplog.text, caplog.text
    finally:
        for host in ("%", "localhost"):
            mariadb_db.run(f"DROP USER IF EXISTS '{user}'@'{host}'")


def test_a_read_stopped_early_leaves_no_query_running(mariadb_db, sources):
    mariadb_db.run("CREATE TABLE many (id int PRIMARY KEY)", "INSERT INTO many SELECT seq FROM seq_1_to_50000")
    source = sources(mariadb_db)
    info = source.describe_table("many", watermark_column="id")
    batches = source.read_slice(info, None, None, batch_size=1000)
    assert next(iter(batches)).num_rows == 1000
    batches.close()
    running = "SELECT COUNT(*) FROM information_schema.processlist WHERE info LIKE '%%FROM many%%' AND id <> CONNECTION_ID()"
    for _ in range(50):
        if mariadb_db.rows(running) == [(0,)]:
            break
        time.sleep(0.1)
    assert mariadb_db.rows(running) == [(0,)]
