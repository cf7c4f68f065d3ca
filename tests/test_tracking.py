"""Change tracking on real PostgreSQL, MariaDB and SQLite databases (installed); no mocks.

ADF's change tracking tutorial table ``data_source_table(PersonID int PRIMARY KEY, Name
varchar(255), Age int)``. A small last-writer-wins "replica" (a dict) checks that applying the
reads in order converges to the source. Concurrency tests hold transactions open on second, real
connections.
"""

from __future__ import annotations

import datetime as dt
import threading
import time

import pyarrow as pa
import pytest
import sqlalchemy as sa

from incremental_assets.sources import Source
from incremental_assets.tracking import (
    SYS_CHANGE_OPERATION,
    SYS_CHANGE_VERSION,
    ChangeReader,
    ChangeTrackingError,
    change_tracking_status,
    cleanup_change_tracking,
    disable_change_tracking,
    enable_change_tracking,
)
from incremental_assets.tracking.base import derived_name
from tests.conftest import ENGINE_FIXTURES

TABLE = "data_source_table"
ADF_ROWS = [(1, "aaaa", 21), (2, "bbbb", 24), (3, "cccc", 20), (4, "dddd", 26), (5, "eeee", 22)]


def engine_of(db) -> str:
    return db.engine.dialect.name  # sqlite | postgresql | mysql


def q(db, name: str) -> str:
    return db.engine.dialect.identifier_preparer.quote_identifier(name)


def create_table(db, name: str = TABLE, *, key: bool = True, rows=ADF_ROWS) -> None:
    """ADF's tutorial table, with the tutorial's column case on every engine."""
    pk = " PRIMARY KEY" if key else ""
    db.run(f"CREATE TABLE {q(db, name)} ({q(db, 'PersonID')} int{pk}, {q(db, 'Name')} varchar(255), {q(db, 'Age')} int)")
    for row in rows:
        insert(db, *row, name=name)


def insert(db, person, who, age, *, name: str = TABLE, conn=None) -> None:
    sql = sa.text(f"INSERT INTO {q(db, name)} VALUES (:p, :n, :a)")
    if conn is not None:
        conn.execute(sql, {"p": person, "n": who, "a": age})
    else:
        db.run(sql.text, params={"p": person, "n": who, "a": age})


def sql(db, text: str) -> str:
    """Write tutorial SQL with "quoted" names; this gives it the engine's own quotes."""
    return text.replace('"', "`") if engine_of(db) == "mysql" else text


@pytest.fixture
def sources():
    made: list[Source] = []

    def make(db, name: str = "src") -> Source:
        source = Source(name, db.url, retries=0, retry_delay=0.0)
        made.append(source)
        return source

    yield make
    for source in made:
        source.dispose()


def readable(db, source: Source, table: str = TABLE, timeout: float = 20.0) -> None:
    """On PostgreSQL, wait until every transaction begun so far has ended (a transaction left open
    in another database of the shared server holds the readable version back); elsewhere a no-op."""
    if engine_of(db) != "postgresql":
        return
    with db.engine.begin() as conn:
        mine = conn.execute(sa.text("SELECT pg_current_xact_id()::text::bigint")).scalar()
    deadline = time.monotonic() + timeout
    while change_tracking_status(source, table)["current_version"] < mine and time.monotonic() < deadline:
        time.sleep(0.1)


def read(reader: ChangeReader, last, **options):
    """One read, consumed inside its snapshot: (change set, rows as a pyarrow Table)."""
    with reader.read(last, **options) as changes:
        table = pa.Table.from_batches(list(changes.batches), schema=changes.schema)
    return changes, table


def by_key(table: pa.Table, key: str = "PersonID") -> dict:
    return {row[key]: row for row in table.to_pylist()}


class Replica:
    """Last writer wins by SYS_CHANGE_VERSION, deletes leave tombstones; a full copy replaces all."""

    def __init__(self):
        self.rows: dict = {}

    def apply(self, changes, table: pa.Table, key: str = "PersonID") -> None:
        if changes.reinitialized:
            self.rows = {}
        for row in table.to_pylist():
            version, op = row.pop(SYS_CHANGE_VERSION), row.pop(SYS_CHANGE_OPERATION)
            held = self.rows.get(row[key])
            if held is not None and held[0] > version:
                continue
            self.rows[row[key]] = (version, None if op == "D" else row)

    def live(self) -> dict:
        return {k: tuple(r.values()) for k, (_, r) in self.rows.items() if r is not None}


def source_rows(db, name: str = TABLE) -> dict:
    return {r[0]: tuple(r) for r in db.rows(f"SELECT * FROM {q(db, name)}")}


# -- the tutorial ------------------------------------------------------------------------------
def test_adf_change_tracking_tutorial(any_db, sources):
    db, source = any_db, sources(any_db)
    create_table(db)
    summary = enable_change_tracking(source, TABLE)
    assert "enabled" in summary and TABLE in summary
    status = change_tracking_status(source, TABLE)
    assert status["enabled"] is True and status["primary_key"] == ["PersonID"]
    reader, replica = ChangeReader(source, TABLE), Replica()

    # first run: a full copy, every row an insert stamped with the new version
    full, rows = read(reader, None)
    assert full.reinitialized and full.reason == "first run" and full.previous_version is None
    assert rows.num_rows == 5 and full.counts == {"I": 5, "U": 0, "D": 0}
    assert set(rows.column(SYS_CHANGE_OPERATION).to_pylist()) == {"I"}
    assert set(rows.column(SYS_CHANGE_VERSION).to_pylist()) == {full.new_version}
    assert rows.schema.names == ["PersonID", "Name", "Age", SYS_CHANGE_VERSION, SYS_CHANGE_OPERATION]
    assert rows.schema.field(SYS_CHANGE_VERSION).type == pa.int64()
    assert full.min_valid_version <= full.new_version
    replica.apply(full, rows)

    # the tutorial's change: one insert, one update
    insert(db, 6, "new", 50)
    db.run(sql(db, 'UPDATE data_source_table SET "Age" = 10, "Name" = \'update\' WHERE "PersonID" = 1'))
    readable(db, source)
    delta, rows = read(reader, full.new_version)
    assert not delta.reinitialized and delta.reason == "" and delta.previous_version == full.new_version
    changed = by_key(rows)
    assert set(changed) == {1, 6}
    assert changed[6][SYS_CHANGE_OPERATION] == "I" and (changed[6]["Name"], changed[6]["Age"]) == ("new", 50)
    assert changed[1][SYS_CHANGE_OPERATION] == "U" and (changed[1]["Name"], changed[1]["Age"]) == ("update", 10)
    for row in changed.values():
        assert full.new_version < row[SYS_CHANGE_VERSION] <= delta.new_version
    assert delta.counts == {"I": 1, "U": 1, "D": 0}
    replica.apply(delta, rows)

    # a delete keeps its key; the other columns are NULL
    db.run(sql(db, 'DELETE FROM data_source_table WHERE "PersonID" = 2'))
    readable(db, source)
    deleted, rows = read(reader, delta.new_version)
    assert rows.to_pylist() == [
        {"PersonID": 2, "Name": None, "Age": None, SYS_CHANGE_VERSION: rows.column(SYS_CHANGE_VERSION)[0].as_py(), SYS_CHANGE_OPERATION: "D"}
    ]
    assert rows.column(SYS_CHANGE_VERSION)[0].as_py() > delta.new_version
    replica.apply(deleted, rows)
    assert replica.live() == source_rows(db)

    # replaying from the same version gives the same net changes; from the newest, nothing
    again, rows_again = read(reader, full.new_version)
    assert not again.reinitialized
    assert {k: (r[SYS_CHANGE_OPERATION], r["Name"]) for k, r in by_key(rows_again).items()} == {
        1: ("U", "update"), 2: ("D", None), 6: ("I", "new")
    }
    nothing, rows = read(reader, deleted.new_version)
    assert rows.num_rows == 0 and nothing.new_version >= deleted.new_version


def test_net_changes_follow_sql_server(any_db, sources):
    db, source = any_db, sources(any_db)
    create_table(db)
    enable_change_tracking(source, TABLE)
    reader = ChangeReader(source, TABLE)
    start, _ = read(reader, None)
    insert(db, 10, "ins-upd", 1)
    db.run(sql(db, 'UPDATE data_source_table SET "Age" = 2 WHERE "PersonID" = 10'))  # insert + update: I
    insert(db, 11, "ins-del", 1)
    db.run(sql(db, 'DELETE FROM data_source_table WHERE "PersonID" = 11'))  # insert + delete: D
    db.run(sql(db, 'UPDATE data_source_table SET "Age" = 99 WHERE "PersonID" = 1'))
    db.run(sql(db, 'DELETE FROM data_source_table WHERE "PersonID" = 1'))  # update + delete: D
    db.run(sql(db, 'DELETE FROM data_source_table WHERE "PersonID" = 2'))
    insert(db, 2, "again", 7)  # delete + re-insert: U
    db.run(sql(db, 'UPDATE data_source_table SET "PersonID" = 30 WHERE "PersonID" = 3'))  # key change: D 3, I 30
    db.run(sql(db, 'UPDATE data_source_table SET "Age" = "Age" + 1 WHERE "PersonID" = 4'))
    db.run(sql(db, 'UPDATE data_source_table SET "Age" = "Age" + 1 WHERE "PersonID" = 4'))  # update + update: U
    readable(db, source)
    changes, rows = read(reader, start.new_version)
    got = {k: r[SYS_CHANGE_OPERATION] for k, r in by_key(rows).items()}
    assert got == {10: "I", 11: "D", 1: "D", 2: "U", 3: "D", 30: "I", 4: "U"}
    assert by_key(rows)[10]["Age"] == 2 and by_key(rows)[2]["Name"] == "again" and by_key(rows)[4]["Age"] == 28
    assert changes.counts == {"I": 2, "U": 2, "D": 3}
    replica = Replica()
    replica.apply(start, read(reader, None)[1])
    replica.apply(changes, rows)
    assert replica.live() == source_rows(db)


def test_batches_stream_in_bounded_sizes(any_db, sources):
    db, source = any_db, sources(any_db)
    create_table(db, rows=[(i, f"p{i}", i) for i in range(1, 24)])
    enable_change_tracking(source, TABLE)
    with ChangeReader(source, TABLE).read(None, batch_size=5) as changes:
        sizes = [b.num_rows for b in changes.batches]
    assert sizes == [5, 5, 5, 5, 3] and changes.counts["I"] == 23


def test_selected_columns_always_hold_the_key(any_db, sources):
    db, source = any_db, sources(any_db)
    create_table(db)
    enable_change_tracking(source, TABLE)
    reader = ChangeReader(source, TABLE, columns=["Name"])
    full, rows = read(reader, None)
    assert rows.schema.names == ["PersonID", "Name", SYS_CHANGE_VERSION, SYS_CHANGE_OPERATION]
    db.run(sql(db, 'DELETE FROM data_source_table WHERE "PersonID" = 5'))
    readable(db, source)
    _, rows = read(reader, full.new_version)
    assert [(r["PersonID"], r[SYS_CHANGE_OPERATION]) for r in rows.to_pylist()] == [(5, "D")]


ODD_TABLE = 'Odd tab-le%:x'


def test_odd_names_are_quoted(any_db, sources):
    db, source = any_db, sources(any_db)
    table = sa.Table(
        ODD_TABLE,
        sa.MetaData(),
        sa.Column("Per son:ID", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("Na%me\"x'", sa.String(50)),
    )
    table.create(db.engine)
    with db.engine.begin() as conn:
        conn.execute(table.insert(), [{"Per son:ID": 1, "Na%me\"x'": "a"}, {"Per son:ID": 2, "Na%me\"x'": "b"}])
    enable_change_tracking(source, ODD_TABLE)
    reader = ChangeReader(source, ODD_TABLE)
    full, rows = read(reader, None)
    assert rows.num_rows == 2
    with db.engine.begin() as conn:
        conn.execute(table.update().where(table.c["Per son:ID"] == 1).values({"Na%me\"x'": "A"}))
        conn.execute(table.delete().where(table.c["Per son:ID"] == 2))
        conn.execute(table.insert(), [{"Per son:ID": 3, "Na%me\"x'": "c"}])
    readable(db, source, ODD_TABLE)
    _, rows = read(reader, full.new_version)
    got = {r["Per son:ID"]: (r["Na%me\"x'"], r[SYS_CHANGE_OPERATION]) for r in rows.to_pylist()}
    assert got == {1: ("A", "U"), 2: (None, "D"), 3: ("c", "I")}
    assert "removed" in disable_change_tracking(source, ODD_TABLE)


def test_long_names_get_short_derived_names(any_db, sources):
    db, source = any_db, sources(any_db)
    long = "t" * 60
    assert derived_name(long, "__ct", 63) != long + "__ct" and len(derived_name(long, "__ct", 63)) <= 63
    assert derived_name("é" * 40, "__ct_u", 63).encode().__len__() <= 63
    create_table(db, long)
    enable_change_tracking(source, long)
    reader = ChangeReader(source, long)
    full, rows = read(reader, None)
    insert(db, 6, "x", 1, name=long)
    readable(db, source, long)
    _, rows = read(reader, full.new_version)
    assert by_key(rows).keys() == {6}
    assert "removed" in disable_change_tracking(source, long)


def test_mariadb_text_key_in_the_tables_own_charset(mariadb_db, sources):
    db, source = mariadb_db, sources(mariadb_db)
    db.run("CREATE TABLE codes (code varchar(20) PRIMARY KEY, label varchar(50)) DEFAULT CHARSET=latin1 COLLATE latin1_swedish_ci")
    db.run("INSERT INTO codes VALUES ('a', 'one'), ('b', 'two')")
    enable_change_tracking(source, "codes")
    reader = ChangeReader(source, "codes")
    full, _ = read(reader, None)
    db.run("UPDATE codes SET label = 'uno' WHERE code = 'a'", "DELETE FROM codes WHERE code = 'b'")
    _, rows = read(reader, full.new_version)
    got = {r["code"]: (r["label"], r[SYS_CHANGE_OPERATION]) for r in rows.to_pylist()}
    assert got == {"a": ("uno", "U"), "b": (None, "D")}


# -- validity: truncation, cleanup, re-enabling -------------------------------------------------
@pytest.fixture(params=["postgresql", "mariadb", "mariadb_mysqlclient"])
def truncating_db(request):
    return request.getfixturevalue(ENGINE_FIXTURES[request.param])


def test_truncate_makes_the_next_read_reinitialize(truncating_db, sources):
    db, source = truncating_db, sources(truncating_db)
    create_table(db)
    enable_change_tracking(source, TABLE)
    reader = ChangeReader(source, TABLE)
    full, _ = read(reader, None)
    db.run(f"TRUNCATE TABLE {q(db, TABLE)}")
    insert(db, 7, "after", 1)
    readable(db, source)
    with pytest.raises(ChangeTrackingError, match="below the minimum valid version") as caught:
        read(reader, full.new_version, on_expired="fail")
    assert TABLE in str(caught.value)
    again, rows = read(reader, full.new_version)
    assert again.reinitialized and f"last synced version {full.new_version} is below the minimum valid version" in again.reason
    assert again.min_valid_version > full.new_version
    assert by_key(rows).keys() == {7}
    # after the re-initialisation, plain deltas again
    insert(db, 8, "later", 2)
    readable(db, source)
    delta, rows = read(reader, again.new_version)
    assert not delta.reinitialized and by_key(rows).keys() == {8}


def test_cleanup_raises_the_minimum_valid_version(any_db, sources):
    db, source = any_db, sources(any_db)
    create_table(db)
    enable_change_tracking(source, TABLE, retention=dt.timedelta(days=2))
    assert change_tracking_status(source, TABLE)["retention"] == dt.timedelta(days=2)
    reader = ChangeReader(source, TABLE)
    full, _ = read(reader, None)
    insert(db, 6, "x", 1)
    readable(db, source)
    delta, rows = read(reader, full.new_version)
    assert rows.num_rows == 1
    assert "no change older than" in cleanup_change_tracking(source, TABLE)  # 2 days: nothing to delete
    summary = cleanup_change_tracking(source, TABLE, retention=dt.timedelta(0))
    assert "deleted 1 change" in summary
    with pytest.raises(ChangeTrackingError, match="below the minimum valid version"):
        read(reader, full.new_version, on_expired="fail")
    expired, rows = read(reader, full.new_version)
    assert expired.reinitialized and rows.num_rows == 6
    current, rows = read(reader, delta.new_version)  # whoever had read everything is still valid
    assert not current.reinitialized and rows.num_rows == 0


def test_not_enabled_names_the_command(any_db, sources):
    db, source = any_db, sources(any_db)
    create_table(db)
    with pytest.raises(ChangeTrackingError) as caught:
        read(ChangeReader(source, TABLE), None)
    message = str(caught.value)
    assert f"incremental-assets enable-change-tracking --table {TABLE}" in message and "not enabled" in message
    assert change_tracking_status(source, TABLE)["enabled"] is False


def test_no_primary_key_is_refused(any_db, sources):
    db, source = any_db, sources(any_db)
    create_table(db, "keyless", key=False)
    with pytest.raises(ChangeTrackingError, match="'keyless'.*no primary key"):
        enable_change_tracking(source, "keyless")
    with pytest.raises(ChangeTrackingError, match="'keyless'.*no primary key"):
        read(ChangeReader(source, "keyless"), None)
    # a key from the configuration will do
    enable_change_tracking(source, "keyless", primary_key=["PersonID"])
    full, rows = read(ChangeReader(source, "keyless", primary_key=["PersonID"]), None)
    assert rows.num_rows == 5
    with pytest.raises(ChangeTrackingError, match=r"keyed by \['PersonID'\], not \['Name'\]"):
        read(ChangeReader(source, "keyless", primary_key=["Name"]), None)


def triggers_of(db, table: str) -> set[str]:
    if engine_of(db) == "sqlite":
        return {r[0] for r in db.rows(f"SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = '{table}'")}
    if engine_of(db) == "postgresql":
        return {r[0] for r in db.rows(f"SELECT tgname FROM pg_trigger WHERE tgrelid = '{table}'::regclass AND NOT tgisinternal")}
    return {r[0] for r in db.rows("SELECT trigger_name FROM information_schema.triggers "
                                  f"WHERE event_object_schema = DATABASE() AND event_object_table = '{table}'")}


def test_enable_is_idempotent_and_disable_removes_everything(any_db, sources):
    db, source = any_db, sources(any_db)
    create_table(db)
    tables_before = set(sa.inspect(db.engine).get_table_names())
    enable_change_tracking(source, TABLE)
    assert "already enabled" in enable_change_tracking(source, TABLE)
    assert len(triggers_of(db, TABLE)) >= 3 and f"{TABLE}__ct" in sa.inspect(db.engine).get_table_names()
    reader = ChangeReader(source, TABLE)
    full, _ = read(reader, None)

    assert "removed" in disable_change_tracking(source, TABLE)
    assert triggers_of(db, TABLE) == set()
    assert f"{TABLE}__ct" not in sa.inspect(db.engine).get_table_names()
    assert "already disabled" in disable_change_tracking(source, TABLE)
    assert change_tracking_status(source, TABLE)["enabled"] is False
    with pytest.raises(ChangeTrackingError, match="enable-change-tracking"):
        read(reader, full.new_version)
    insert(db, 9, "untracked", 1)  # while disabled: not recorded

    # enabling again continues the versions: the old one is no longer valid
    enable_change_tracking(source, TABLE)
    readable(db, source)
    again, rows = read(reader, full.new_version)
    assert again.reinitialized and "below the minimum valid version" in again.reason and rows.num_rows == 6

    disable_change_tracking(source, TABLE, forget=True)
    assert set(sa.inspect(db.engine).get_table_names()) == tables_before
    assert "not enabled" in disable_change_tracking(source, TABLE)
    # even forgotten, a version from before is not taken for a valid one
    enable_change_tracking(source, TABLE)
    readable(db, source)
    fresh, _ = read(reader, again.new_version)
    assert fresh.reinitialized and fresh.new_version > again.new_version


def test_dropped_trigger_is_reported_and_enable_repairs_it(any_db, sources):
    db, source = any_db, sources(any_db)
    create_table(db)
    enable_change_tracking(source, TABLE)
    reader = ChangeReader(source, TABLE)
    full, _ = read(reader, None)
    on = f" ON {q(db, TABLE)}" if engine_of(db) == "postgresql" else ""
    db.run(f"DROP TRIGGER {q(db, TABLE + '__ct_d')}{on}")
    db.run(sql(db, 'DELETE FROM data_source_table WHERE "PersonID" = 1'))  # not recorded
    with pytest.raises(ChangeTrackingError, match=r"__ct_d' is missing"):
        read(reader, full.new_version)
    assert change_tracking_status(source, TABLE)["enabled"] is False
    enable_change_tracking(source, TABLE)
    readable(db, source)
    repaired, rows = read(reader, full.new_version)
    assert repaired.reinitialized and by_key(rows).keys() == {2, 3, 4, 5}


# -- concurrency ----------------------------------------------------------------------------------
def test_postgresql_late_commit_is_never_skipped(pg_db, sources):
    db, source = pg_db, sources(pg_db)
    create_table(db)
    enable_change_tracking(source, TABLE)
    reader, replica = ChangeReader(source, TABLE), Replica()
    full, rows = read(reader, None)
    replica.apply(full, rows)
    seen: set = set()
    with db.engine.connect() as t1:
        insert(db, 10, "t1", 1, conn=t1)  # T1 writes first and stays open
        insert(db, 11, "t2", 2)  # T2 writes later and commits first
        first, rows = read(reader, full.new_version)
        assert 10 not in by_key(rows)  # not committed
        seen |= by_key(rows).keys()
        replica.apply(first, rows)
        t1.commit()
    readable(db, source)
    second, rows = read(reader, first.new_version)
    assert 10 in by_key(rows) and by_key(rows)[10][SYS_CHANGE_OPERATION] == "I"
    seen |= by_key(rows).keys()
    replica.apply(second, rows)
    assert seen == {10, 11}
    assert first.new_version <= second.new_version
    assert replica.live() == source_rows(db)


def test_postgresql_key_changed_in_other_than_id_order(pg_db, sources):
    """T1 (older id) re-inserts a key after T2 (younger id) deleted it and committed; a read
    falls between their ids (T3 still open): the key must never be reported deleted."""
    db, source = pg_db, sources(pg_db)
    create_table(db)
    enable_change_tracking(source, TABLE)
    reader, replica = ChangeReader(source, TABLE), Replica()
    full, rows = read(reader, None)
    replica.apply(full, rows)
    xid = sa.text("SELECT pg_current_xact_id()::text::bigint")
    with db.engine.connect() as t1, db.engine.connect() as t3:
        insert(db, 100, "t1", 1, conn=t1)
        t1_id = t1.execute(xid).scalar()
        insert(db, 101, "t3", 1, conn=t3)
        t3_id = t3.execute(xid).scalar()
        db.run(sql(db, 'DELETE FROM data_source_table WHERE "PersonID" = 1'))  # T2, youngest, commits
        insert(db, 1, "again", 99, conn=t1)
        t1.commit()
        deadline = time.monotonic() + 20
        while change_tracking_status(source, TABLE)["current_version"] < t1_id and time.monotonic() < deadline:
            time.sleep(0.1)
        first, rows = read(reader, full.new_version)
        assert t1_id <= first.new_version < t3_id
        assert {k: r[SYS_CHANGE_OPERATION] for k, r in by_key(rows).items()} == {100: "I", 1: "I"}
        replica.apply(first, rows)
        t3.commit()
    readable(db, source)
    second, rows = read(reader, first.new_version)
    got = {k: r[SYS_CHANGE_OPERATION] for k, r in by_key(rows).items()}
    assert got == {101: "I", 1: "U"}  # T2's delete, read late, does not delete the re-inserted row
    replica.apply(second, rows)
    assert replica.live() == source_rows(db) and replica.live()[1] == (1, "again", 99)


def test_mariadb_writers_wait_for_the_counter_and_nothing_is_lost(mariadb_db, sources):
    db, source = mariadb_db, sources(mariadb_db)
    create_table(db)
    enable_change_tracking(source, TABLE)
    reader, replica = ChangeReader(source, TABLE), Replica()
    full, rows = read(reader, None)
    replica.apply(full, rows)
    errors: list[BaseException] = []

    def t2():
        try:
            insert(db, 11, "t2", 2)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    with db.engine.connect() as t1:
        insert(db, 10, "t1", 1, conn=t1)  # T1 holds the counter until it ends
        writer = threading.Thread(target=t2)
        writer.start()
        time.sleep(0.3)
        assert writer.is_alive()  # T2 waits for T1's counter lock
        first, rows = read(reader, full.new_version)  # readers never wait
        assert rows.num_rows == 0 and first.new_version == full.new_version
        t1.commit()
    writer.join(10)
    assert not writer.is_alive() and not errors
    second, rows = read(reader, first.new_version)
    assert {k: r[SYS_CHANGE_OPERATION] for k, r in by_key(rows).items()} == {10: "I", 11: "I"}
    replica.apply(second, rows)
    assert replica.live() == source_rows(db)


def test_sqlite_read_is_one_snapshot(sqlite_db, sources):
    """A read in WAL mode keeps its snapshot while a writer commits: the rows and the version agree."""
    db, source = sqlite_db, sources(sqlite_db)
    db.run("PRAGMA journal_mode=WAL")
    create_table(db)
    enable_change_tracking(source, TABLE)
    reader = ChangeReader(source, TABLE)
    with reader.read(None, batch_size=2) as full:
        first = next(full.batches)
        insert(db, 6, "during", 1)  # commits while the read is open
        rest = list(full.batches)
    assert first.num_rows + sum(b.num_rows for b in rest) == 5
    _, rows = read(reader, full.new_version)
    assert by_key(rows).keys() == {6}
