"""Replica merges against real SQLite, PostgreSQL and MariaDB databases (no mocks).

ADF's ``customer_table(PersonID, Name, LastModifytime)`` is merged by PersonID with
LastModifytime as the version; the replica must converge whatever the order and repetition
of the slices, keep exact values, and fail clearly on bad input.
"""

from __future__ import annotations

import datetime as dt
import decimal
import itertools
import threading

import pyarrow as pa
import pytest
import sqlalchemy as sa

from incremental_assets.replica import MergeResult, Replica, ReplicaError, reconcile_source
from incremental_assets.replica.base import canonical
from incremental_assets.replica.postgresql import PostgreSQLReplica
from tests.conftest import ENGINE_FIXTURES

UTC = dt.timezone.utc
KEY = ["PersonID"]
V = "LastModifytime"


def ts(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def customers(rows, *, ops=None, tz=False) -> pa.Table:
    """ADF's customer_table rows (PersonID, Name, LastModifytime); ``ops`` adds SYS_CHANGE_OPERATION."""
    table = pa.table(
        {
            "PersonID": pa.array([r[0] for r in rows], pa.int32()),
            "Name": pa.array([r[1] for r in rows], pa.string()),
            V: pa.array([r[2] for r in rows], pa.timestamp("us", tz="UTC" if tz else None)),
        }
    )
    if ops is not None:
        table = table.append_column("SYS_CHANGE_OPERATION", pa.array(ops, pa.string()))
    return table


FIRST = [
    (1, "John", ts("2017-09-01 00:56:00")),
    (2, "Mike", ts("2017-09-02 05:23:00")),
    (3, "Alice", ts("2017-09-03 02:36:00")),
    (4, "Andy", ts("2017-09-04 03:21:00")),
    (5, "Anny", ts("2017-09-05 08:06:00")),
]


def quoted(db, name: str) -> str:
    """Quoted for ``sa.text`` (which doubles ``%`` itself for pyformat drivers)."""
    p = db.engine.dialect.identifier_preparer
    quoted_name = p.quote_identifier(name)
    return quoted_name.replace("%%", "%") if getattr(p, "_double_percents", False) else quoted_name


def read(db, table: str, columns=("PersonID", "Name", V), kinds=(None, None, "timestamp")):
    """The replica table's rows, values made comparable across engines where a kind is given
    ("timestamp": UTC text, "flag": "1"/"0"), else as the driver returns them."""
    cols = ", ".join(quoted(db, c) for c in columns)
    rows = db.rows(f"SELECT {cols} FROM {quoted(db, table)} ORDER BY {quoted(db, columns[0])}")
    return [tuple(v if k is None else canonical(v, k) for v, k in zip(row, kinds)) for row in rows]


def expected(rows):
    return [(r[0], r[1], canonical(r[2], "timestamp")) for r in sorted(rows)]


@pytest.fixture(params=["sqlite", "postgresql", "postgresql-adbc", "postgresql-optimistic", "mariadb", "mariadb_mysqlclient"])
def any_db(request, monkeypatch):
    """The same test on each real engine; ``postgresql-adbc`` stages every merge step that needs
    staging by ADBC (binary COPY into a table of its own) instead of CSV; ``postgresql-optimistic``
    tries every step whose first key is not stored as a plain COPY into the target first."""
    if request.param == "postgresql-adbc":
        monkeypatch.setattr(PostgreSQLReplica, "side_staging_min_rows", 0)
    if request.param == "postgresql-optimistic":
        monkeypatch.setattr(PostgreSQLReplica, "optimistic_min_rows", 0)
        monkeypatch.setattr(PostgreSQLReplica, "KEY_SAMPLE", 1)
    return request.getfixturevalue(ENGINE_FIXTURES[request.param.split("-")[0]])


@pytest.fixture
def replica(any_db):
    r = Replica(any_db.url, retries=0)
    yield r
    r.dispose()


# -- upserts ------------------------------------------------------------------------------------


def test_first_load_then_update_and_insert(any_db, replica):
    first = replica.merge("customer_table", customers(FIRST), KEY, version_column=V)
    assert (first.inserted, first.updated, first.deleted, first.skipped_older) == (5, 0, 0, 0)
    assert read(any_db, "customer_table") == expected(FIRST)

    # ADF's tutorial change: update PersonID 3, insert PersonID 6
    delta = [(3, "NewName", ts("2017-09-08 00:00:00")), (6, "NewPerson", ts("2017-09-09 00:00:00"))]
    second = replica.merge("customer_table", customers(delta), KEY, version_column=V)
    assert (second.inserted, second.updated, second.skipped_older) == (1, 1, 0)
    assert second.added_columns == []
    want = {r[0]: r for r in FIRST} | {r[0]: r for r in delta}
    assert read(any_db, "customer_table") == expected(want.values())


def test_a_merge_after_the_server_ended_idle_connections(any_db, replica):
    if any_db.engine.dialect.name == "sqlite":
        pytest.skip("SQLite has no server to end a connection")
    replica.merge("customer_table", customers(FIRST), KEY, version_column=V)
    assert any_db.end_other_sessions() >= 1  # the replica's pooled connection among them
    delta = [(6, "NewPerson", ts("2017-09-09 00:00:00"))]
    merged = replica.merge("customer_table", customers(delta), KEY, version_column=V)
    assert merged.inserted == 1
    assert read(any_db, "customer_table") == expected(FIRST + delta)


def test_replaying_a_slice_is_a_no_op_in_effect_and_counts_say_so(any_db, replica):
    replica.merge("customer_table", customers(FIRST), KEY, version_column=V)
    again = replica.merge("customer_table", customers(FIRST), KEY, version_column=V)
    # equal versions with equal values change nothing: unchanged, not updated, nothing skipped
    assert (again.inserted, again.updated, again.unchanged, again.deleted, again.skipped_older) == (0, 0, 5, 0, 0)
    assert read(any_db, "customer_table") == expected(FIRST)

    newer = [(r[0], r[1] + "!", r[2] + dt.timedelta(days=30)) for r in FIRST[:2]]
    replica.merge("customer_table", customers(newer), KEY, version_column=V)
    older = replica.merge("customer_table", customers(FIRST), KEY, version_column=V)
    assert (older.inserted, older.updated, older.unchanged, older.skipped_older) == (0, 0, 3, 2)
    assert read(any_db, "customer_table") == expected(newer + FIRST[2:])


def test_merge_converges_whatever_the_order_of_slices(any_db, replica):
    day = dt.timedelta(days=1)
    t0 = ts("2017-09-01 00:00:00")
    slices = [
        customers([(1, "a1", t0), (2, "b1", t0), (3, "c1", t0)], ops=["I", "I", "I"]),
        customers([(1, "a2", t0 + day), (2, None, t0 + day), (4, "d2", t0 + day)], ops=["U", "D", "I"]),
        customers([(1, "a3", t0 + 2 * day), (2, "b3", t0 + 2 * day), (3, None, t0 + 2 * day)], ops=["U", "I", "D"]),
    ]
    finals = []
    for n, order in enumerate(itertools.permutations(range(3))):
        table = f"customers_{n}"
        for i in order:
            replica.merge(table, slices[i], KEY, version_column=V, operation_column="SYS_CHANGE_OPERATION")
        for i in order:  # and every slice once more, in the same order
            replica.merge(table, slices[i], KEY, version_column=V, operation_column="SYS_CHANGE_OPERATION")
        finals.append(read(any_db, table))
    assert all(f == finals[0] for f in finals), finals
    assert finals[0] == expected([(1, "a3", t0 + 2 * day), (2, "b3", t0 + 2 * day), (4, "d2", t0 + day)])


def test_duplicates_within_a_slice_collapse_to_the_highest_version(any_db, replica):
    rows = [
        (1, "old", ts("2024-01-01 00:00:00")),
        (1, "new", ts("2024-01-03 00:00:00")),
        (1, "middle", ts("2024-01-02 00:00:00")),
        (2, "same", ts("2024-01-01 00:00:00")),
        (2, "same", ts("2024-01-01 00:00:00")),  # an exact duplicate is harmless
    ]
    result = replica.merge("customer_table", customers(rows), KEY, version_column=V)
    assert (result.inserted, result.updated) == (2, 0)
    assert read(any_db, "customer_table") == expected([rows[1], rows[3]])


def test_equal_versions_with_different_values_are_a_non_unique_key(replica):
    rows = [(7, "one", ts("2024-01-01 00:00:00")), (7, "two", ts("2024-01-01 00:00:00"))]
    with pytest.raises(ReplicaError, match=r"key \{'PersonID': 7\} is not unique in the source") as err:
        replica.merge("customer_table", customers(rows), KEY, version_column=V)
    assert "customer_table" in str(err.value) and "'Name'" in str(err.value)


def test_a_stream_of_batches_is_merged_in_steps_in_one_transaction(any_db):
    replica = Replica(any_db.url, retries=0, chunk_rows=2)
    batches = customers(FIRST + [(1, "John again", ts("2018-01-01 00:00:00"))]).to_batches(max_chunksize=1)
    result = replica.merge("customer_table", iter(batches), KEY, version_column=V)
    assert (result.inserted, result.updated) == (5, 1)
    assert read(any_db, "customer_table") == expected([(1, "John again", ts("2018-01-01 00:00:00"))] + FIRST[1:])
    assert replica.merge("customer_table", iter([]), KEY, version_column=V) == MergeResult(seconds=pytest.approx(0, abs=1))
    replica.dispose()


def test_steps_alternate_between_new_keys_and_keys_to_compare(any_db):
    replica = Replica(any_db.url, retries=0, chunk_rows=2)
    late = ts("2018-01-01 00:00:00")
    rows = [
        FIRST[0], FIRST[1],  # into an empty table
        (1, "John again", late), FIRST[2],  # a stored key: compared in staging
        FIRST[3], FIRST[4],  # past every stored key: new
        (2, "Mike again", late), (6, "Six", late),  # a stored key again, after a step that staged nothing
    ]
    result = replica.merge("customer_table", iter(customers(rows).to_batches(max_chunksize=1)), KEY, version_column=V)
    assert (result.inserted, result.updated) == (6, 2)
    assert read(any_db, "customer_table") == expected(
        [(1, "John again", late), (2, "Mike again", late), *FIRST[2:], (6, "Six", late)]
    )
    replica.dispose()


def test_keys_outside_the_stored_range_are_new_unless_a_tombstone_is_there(any_db, replica):
    op = "SYS_CHANGE_OPERATION"
    replica.merge("customer_table", customers(FIRST), KEY, version_column=V)  # keys 1..5
    replica.merge(
        "customer_table", customers([(9, None, ts("2018-01-01 00:00:00"))], ops=["D"]), KEY,
        version_column=V, operation_column=op,
    )
    # past the table's keys but not its tombstones': the older insert of 9 must stay deleted
    guarded = replica.merge(
        "customer_table", customers([(9, "Nine", ts("2017-12-01 00:00:00")), (12, "Twelve", ts("2017-12-01 00:00:00"))]),
        KEY, version_column=V,
    )
    assert (guarded.inserted, guarded.updated, guarded.skipped_older) == (1, 0, 1)
    above = replica.merge(
        "customer_table", customers([(20, "Twenty", ts("2017-12-02 00:00:00")), (21, "Twenty-one", None)]),
        KEY, version_column=V,
    )
    below = replica.merge("customer_table", customers([(-3, "Minus three", ts("2017-12-03 00:00:00"))]), KEY, version_column=V)
    assert (above.inserted, above.updated, below.inserted, below.updated) == (2, 0, 1, 0)
    assert [r[0] for r in read(any_db, "customer_table")] == [-3, 1, 2, 3, 4, 5, 12, 20, 21]
    assert read(any_db, "customer_table")[-1] == (21, "Twenty-one", None)


def test_new_keys_into_a_soft_deleting_table_are_not_flagged(any_db, replica):
    op = "SYS_CHANGE_OPERATION"
    replica.merge("customer_table", customers(FIRST[:2], ops=["I", "I"]), KEY, version_column=V, operation_column=op)
    replica.merge(
        "customer_table", customers([(2, None, ts("2018-01-01 00:00:00"))], ops=["D"]), KEY,
        version_column=V, operation_column=op, soft_delete=True,
    )
    new = replica.merge("customer_table", customers(FIRST[2:]), KEY, version_column=V)  # keys 3..5
    assert new.inserted == 3
    flags = read(any_db, "customer_table", columns=("PersonID", "_deleted"), kinds=(None, "flag"))
    assert flags == [(1, "0"), (2, "1"), (3, "0"), (4, "0"), (5, "0")]


def test_an_equal_version_with_other_values_is_written(any_db, replica):
    replica.merge("customer_table", customers(FIRST), KEY, version_column=V)
    changed = [(1, "John!", FIRST[0][2]), (2, None, FIRST[1][2])] + FIRST[2:]
    again = replica.merge("customer_table", customers(changed), KEY, version_column=V)
    assert (again.inserted, again.updated, again.unchanged, again.skipped_older) == (0, 2, 3, 0)
    assert read(any_db, "customer_table") == expected(changed)


def test_postgresql_leaves_rows_a_replay_would_not_change_as_they_are(pg_db):
    replica = Replica(pg_db.url, retries=0)
    replica.merge("customer_table", customers(FIRST), KEY, version_column=V)
    row_versions = 'SELECT "PersonID", xmin::text FROM customer_table ORDER BY 1'
    before = dict(pg_db.rows(row_versions))
    changed = [(1, "John!", FIRST[0][2])] + FIRST[1:]
    again = replica.merge("customer_table", customers(changed), KEY, version_column=V)
    assert (again.inserted, again.updated, again.unchanged, again.skipped_older) == (0, 1, 4, 0)
    after = dict(pg_db.rows(row_versions))
    assert [k for k in before if before[k] != after[k]] == [1]
    assert read(pg_db, "customer_table") == expected(changed)
    replica.dispose()


def test_postgresql_new_keys_between_stored_ones_go_straight_in_unless_one_is_stored(pg_db, monkeypatch, caplog):
    """A big step whose sampled keys are not stored is copied into the target without staging;
    if a key was stored after all, the target's key refuses the copy, which leaves no row, and
    the step is merged by key: last writer wins, nothing twice."""
    import logging

    from incremental_assets.replica import postgresql

    monkeypatch.setattr(PostgreSQLReplica, "optimistic_min_rows", 3)
    monkeypatch.setattr(PostgreSQLReplica, "KEY_SAMPLE", 1)  # the sample: the step's first key
    staged = []
    load = postgresql.PostgreSQLReplica.load_staging
    monkeypatch.setattr(postgresql.PostgreSQLReplica, "load_staging",
                        lambda self, conn, plan, table, execute: (staged.append(table.num_rows), load(self, conn, plan, table, execute)))
    replica = Replica(pg_db.url, retries=0)
    day = ts("2017-09-01 00:00:00")
    replica.merge("customer_table", customers([(k, f"even {k}", day) for k in (2, 4, 6, 8)]), KEY, version_column=V)
    odd = replica.merge("customer_table", customers([(k, f"odd {k}", day) for k in (1, 3, 5, 7)]), KEY, version_column=V)
    assert (odd.inserted, odd.updated) == (4, 0) and staged == []  # between the stored keys, not staged

    caplog.set_level(logging.INFO, logger="incremental_assets")
    later, earlier = ts("2017-09-02 00:00:00"), ts("2017-08-01 00:00:00")
    mixed = customers([(9, "nine", later), (4, "four again", later), (11, "eleven", later), (6, "six, older", earlier)])
    result = replica.merge("customer_table", mixed, KEY, version_column=V)
    assert "a key of the step's 4 rows is stored already" in caplog.text and staged == [4]
    assert (result.inserted, result.updated, result.skipped_older) == (2, 1, 1)
    rows = {r[0]: r[1] for r in read(pg_db, "customer_table")}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]
    assert rows[4] == "four again" and rows[6] == "even 6" and rows[9] == "nine"
    replica.dispose()


def _side_tables(db) -> list[str]:
    return [r[0] for r in db.rows("SELECT relname FROM pg_class WHERE relname LIKE 'ia\\_side\\_%' ORDER BY 1")]


@pytest.fixture
def adbc_staged(monkeypatch):
    """Every PostgreSQL merge step that needs staging goes through ADBC; the tables it staged in."""
    from incremental_assets.replica import postgresql

    monkeypatch.setattr(PostgreSQLReplica, "side_staging_min_rows", 0)
    staged = []
    load = postgresql._SideStaging.load

    def spy(self, conn, rows, execute):
        name = load(self, conn, rows, execute)
        staged.append(name)
        return name

    monkeypatch.setattr(postgresql._SideStaging, "load", spy)
    return staged


def test_postgresql_big_steps_are_staged_by_adbc_in_tables_the_merge_drops(pg_db, adbc_staged):
    replica = Replica(pg_db.url, retries=0)
    replica.merge("customer_table", customers(FIRST), KEY, version_column=V)  # new keys: copied straight in
    delta = [(3, "NewName", ts("2017-09-08 00:00:00")), (6, "NewPerson", ts("2017-09-09 00:00:00"))]
    older = [(1, "Old John", ts("2017-01-01 00:00:00"))]
    result = replica.merge("customer_table", customers(delta + older), KEY, version_column=V)
    assert (result.inserted, result.updated, result.skipped_older) == (1, 1, 1)
    assert len(adbc_staged) == 1 and adbc_staged[0].startswith('"public"."ia_side_')
    assert read(pg_db, "customer_table") == expected(({r[0]: r for r in FIRST} | {r[0]: r for r in delta}).values())
    assert _side_tables(pg_db) == []
    replica.dispose()


def test_postgresql_adbc_staging_falls_back_to_csv_for_a_type_it_cannot_write(pg_db, adbc_staged, caplog):
    replica = Replica(pg_db.url, retries=0)
    big = pa.table({"id": pa.array([1, 2], pa.int64()), "n": pa.array([2**64 - 1, 5], pa.uint64()), "v": [1, 1]})
    replica.merge("big", big, ["id"], version_column="v")
    again = big.set_column(2, "v", pa.array([2, 2], pa.int64())).set_column(1, "n", pa.array([2**63 + 1, 6], pa.uint64()))
    caplog.set_level("INFO", logger="incremental_assets")
    assert replica.merge("big", again, ["id"], version_column="v").updated == 2
    assert adbc_staged == [None]  # uint64 would wrap around in ADBC's bigint
    assert "staging through CSV: column 'n' is uint64" in caplog.text
    assert pg_db.rows("SELECT id, n::text FROM big ORDER BY id") == [(1, str(2**63 + 1)), (2, "6")]
    replica.dispose()


def test_postgresql_a_failed_merge_leaves_no_adbc_staging_table(pg_db, adbc_staged):
    with pg_db.engine.begin() as conn:
        conn.execute(sa.text('CREATE TABLE customer_table ("PersonID" integer PRIMARY KEY, "Name" varchar(5), '
                             '"LastModifytime" timestamp)'))
    replica = Replica(pg_db.url, retries=0)
    replica.merge("customer_table", customers(FIRST), KEY, version_column=V)
    too_long = [(2, "Michael-Longname", ts("2017-10-01 00:00:00"))]
    with pytest.raises(ReplicaError, match="customer_table.*too long"):
        replica.merge("customer_table", customers(too_long), KEY, version_column=V)
    assert adbc_staged and adbc_staged[0] is not None  # staged, then the merge failed reading it
    assert _side_tables(pg_db) == []
    assert read(pg_db, "customer_table") == expected(FIRST)
    replica.dispose()


def test_postgresql_a_table_left_by_a_merge_that_died_is_dropped_by_the_next(pg_db, adbc_staged, caplog):
    replica = Replica(pg_db.url, retries=0)
    replica.merge("customer_table", customers(FIRST), KEY, version_column=V)
    replica.merge("customer_table", customers(FIRST[:1]), KEY, version_column=V)
    prefix = adbc_staged[0].split(".")[1].strip('"')[: -len("0123456789ab")]
    with pg_db.engine.begin() as conn:  # what a merge killed between ADBC's commit and its own leaves
        conn.execute(sa.text(f'CREATE UNLOGGED TABLE "{prefix}deadbeef0000" (x int)'))
        conn.execute(sa.text('CREATE UNLOGGED TABLE "ia_side_00000000_deadbeef0000" (x int)'))  # another table's
    replica.merge("customer_table", customers(FIRST[:1]), KEY, version_column=V)
    assert f"dropped public.{prefix}deadbeef0000, left by a merge that did not finish" in caplog.text
    assert _side_tables(pg_db) == ["ia_side_00000000_deadbeef0000"]
    replica.dispose()


def test_concurrent_merges_of_one_table_queue_and_converge(any_db):
    replicas = [Replica(any_db.url, retries=0) for _ in range(3)]
    replicas[0].ensure_table("customer_table", customers(FIRST).schema, KEY, version_column=V)
    slices = [
        [(k, f"v{i}", ts("2024-01-01 00:00:00") + dt.timedelta(hours=i)) for k in range(1, 200)] for i in range(3)
    ]
    errors = []

    def run(i):
        try:
            replicas[i].merge("customer_table", customers(slices[i]), KEY, version_column=V)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert read(any_db, "customer_table") == expected(slices[2])
    for r in replicas:
        r.dispose()


# -- deletes ------------------------------------------------------------------------------------


def test_deletes_keep_tombstones_so_an_older_insert_cannot_resurrect(any_db, replica):
    op = "SYS_CHANGE_OPERATION"
    replica.merge("customer_table", customers(FIRST[:3], ops=["I"] * 3), KEY, version_column=V, operation_column=op)
    gone = replica.merge(
        "customer_table", customers([(2, None, ts("2017-10-01 00:00:00"))], ops=["D"]), KEY,
        version_column=V, operation_column=op,
    )
    assert (gone.deleted, gone.inserted, gone.updated) == (1, 0, 0)
    assert [r[0] for r in read(any_db, "customer_table")] == [1, 3]
    tomb = read(any_db, "customer_table__deleted", columns=("PersonID", V), kinds=(None, "timestamp"))
    assert tomb == [(2, canonical(ts("2017-10-01 00:00:00"), "timestamp"))]
    assert "SYS_CHANGE_OPERATION" not in [c["name"] for c in sa.inspect(any_db.engine).get_columns("customer_table")]

    replay = replica.merge("customer_table", customers(FIRST[:3], ops=["I"] * 3), KEY, version_column=V, operation_column=op)
    assert (replay.inserted, replay.updated, replay.unchanged, replay.skipped_older) == (0, 0, 2, 1)
    assert [r[0] for r in read(any_db, "customer_table")] == [1, 3]
    # without an operation column too (e.g. a full re-copy): the tombstone still guards
    replay = replica.merge("customer_table", customers(FIRST[1:2]), KEY, version_column=V)
    assert (replay.inserted, replay.skipped_older) == (0, 1)

    back = replica.merge(
        "customer_table", customers([(2, "Mike again", ts("2017-11-01 00:00:00"))], ops=["I"]), KEY,
        version_column=V, operation_column=op,
    )
    assert back.inserted == 1
    assert read(any_db, "customer_table")[1] == (2, "Mike again", canonical(ts("2017-11-01 00:00:00"), "timestamp"))
    stale = replica.merge(
        "customer_table", customers([(2, None, ts("2017-10-01 00:00:00"))], ops=["D"]), KEY,
        version_column=V, operation_column=op,
    )
    assert (stale.deleted, stale.skipped_older) == (0, 1)


def test_soft_delete_flags_the_row_and_reconcile_ignores_it(any_db, replica):
    op = "SYS_CHANGE_OPERATION"
    replica.merge("customer_table", customers(FIRST[:3], ops=["I"] * 3), KEY, version_column=V, operation_column=op)
    result = replica.merge(
        "customer_table", customers([(2, None, ts("2017-10-01 00:00:00"))], ops=["D"]), KEY,
        version_column=V, operation_column=op, soft_delete=True,
    )
    assert result.deleted == 1 and result.added_columns == ["_deleted"]
    rows = read(any_db, "customer_table", columns=("PersonID", "Name", "_deleted"), kinds=(None, None, "flag"))
    assert rows == [(1, "John", "0"), (2, "Mike", "1"), (3, "Alice", "0")]  # the row and its values stay
    assert replica.reconcile("customer_table", KEY)[0] == 2

    replica.merge("customer_table", customers(FIRST[1:2], ops=["I"]), KEY, version_column=V, operation_column=op)
    assert read(any_db, "customer_table", columns=("PersonID", "_deleted"), kinds=(None, "flag"))[1] == (2, "1")
    replica.merge(
        "customer_table", customers([(2, "Mike II", ts("2017-12-01 00:00:00"))], ops=["U"]), KEY,
        version_column=V, operation_column=op,
    )
    assert read(any_db, "customer_table", columns=("PersonID", "Name", "_deleted"), kinds=(None, None, "flag"))[1] == (
        2, "Mike II", "0",
    )


def test_bad_operations_and_null_keys_fail_clearly(replica):
    with pytest.raises(ReplicaError, match=r"column 'SYS_CHANGE_OPERATION'.*'X' is not I, U or D"):
        replica.merge(
            "customer_table", customers(FIRST[:1], ops=["X"]), KEY, version_column=V, operation_column="SYS_CHANGE_OPERATION"
        )
    with pytest.raises(ReplicaError, match=r"column 'PersonID'.*NULL key"):
        replica.merge("customer_table", customers([(None, "x", ts("2024-01-01 00:00:00"))]), KEY, version_column=V)


# -- types and names ------------------------------------------------------------------------------


def _as_python(value, t: pa.DataType):
    """A value read back from any engine, as Python holds the Arrow type (text/naive forms decoded)."""
    if value is None:
        return None
    if pa.types.is_timestamp(t):
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value)
        if t.tz is not None:
            return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return value
    if pa.types.is_decimal(t):
        return decimal.Decimal(value) if isinstance(value, str) else value
    if pa.types.is_boolean(t):
        return bool(value)
    if pa.types.is_binary(t):
        return bytes(value)
    if pa.types.is_date(t):
        return dt.date.fromisoformat(value) if isinstance(value, str) else value
    return value


def test_exact_types_round_trip(any_db, replica):
    data = pa.table(
        {
            "id": pa.array([1, 2, 3], pa.int64()),
            "at": pa.array(
                [dt.datetime(2024, 3, 31, 1, 30, 0, 123456, tzinfo=UTC), dt.datetime(1, 1, 1, tzinfo=UTC), None],
                pa.timestamp("us", tz="UTC"),
            ),
            "local": pa.array([dt.datetime(2024, 1, 1, 12, 0, 0, 1), None, dt.datetime(9999, 12, 31, 23, 59, 59, 999999)]),
            "amount": pa.array(
                [decimal.Decimal("12345678901234.5678"), decimal.Decimal("-0.0001"), None], pa.decimal128(18, 4)
            ),
            "small": pa.array([decimal.Decimal("0.0000000001"), None, decimal.Decimal("1")], pa.decimal128(12, 10)),
            # groups of zero digits inside a value (a binary numeric writer must keep them)
            "grouped": pa.array(
                [decimal.Decimal("45841978490776754309450000.8"), decimal.Decimal("-12.3456789012"), decimal.Decimal("0.0000100000")],
                pa.decimal128(38, 10),
            ),
            "text": pa.array(["it's \"quoted\", \\ back\nslash", "ünïcødé ✓ 𝄞", ""]),
            "blob": pa.array([b"\x00\xff\x01'\"", None, b""], pa.binary()),
            "flag": pa.array([True, False, None]),
            "day": pa.array([dt.date(2024, 2, 29), None, dt.date(1, 1, 1)]),
            "n16": pa.array([-32768, 32767, None], pa.int16()),
            "n32": pa.array([-(2**31), 2**31 - 1, None], pa.int32()),
            "n64": pa.array([-(2**63), 2**63 - 1, None], pa.int64()),
            "ratio": pa.array([0.1, -1e300, None], pa.float64()),
            "version": pa.array([1, 1, 1], pa.int64()),
        }
    )
    cols = data.column_names
    select = f"SELECT {', '.join(quoted(any_db, c) for c in cols)} FROM {quoted(any_db, 'types')} ORDER BY 1"
    # once into the empty table, then again as updates (through the staging table)
    for version in (1, 2):
        data = data.set_column(cols.index("version"), "version", pa.array([version] * 3, pa.int64()))
        replica.merge("types", data, ["id"], version_column="version")
        got = [[_as_python(v, data.schema.field(c).type) for v, c in zip(row, cols)] for row in any_db.rows(select)]
        assert got == [list(r.values()) for r in data.to_pylist()]
    # and an existing table is accepted as it is (its reflected types fit the data)
    assert replica.ensure_table("types", data.schema, ["id"], version_column="version") == []


def test_names_that_need_quotes(any_db, replica):
    table = 'we"ird name'
    data = pa.table({"my key": [1, 2], 'Na"me %s': ["a", "b"], "ver:sion": [1, 1]})
    replica.merge(table, data, ["my key"], version_column="ver:sion")
    replica.merge(table, pa.table({"my key": [2], 'Na"me %s': ["b2"], "ver:sion": [2]}), ["my key"], version_column="ver:sion")
    assert read(any_db, table, columns=("my key", 'Na"me %s', "ver:sion"), kinds=(None, None, None)) == [
        (1, "a", 1), (2, "b2", 2),
    ]
    assert 'Na"me %s' in [c["name"] for c in sa.inspect(any_db.engine).get_columns(table)]
    count, _ = replica.reconcile(table, ["my key"], "ver:sion")
    assert count == 2


def test_timezone_aware_versions(any_db, replica):
    rows = [(1, "a", dt.datetime(2024, 1, 1, 10, 0, 0, 1, tzinfo=UTC)), (2, "b", dt.datetime(2024, 1, 1, 10, 0, 0, tzinfo=UTC))]
    replica.merge("aware", customers(rows, tz=True), KEY, version_column=V)
    older = [(1, "older by 1us", dt.datetime(2024, 1, 1, 10, 0, 0, tzinfo=UTC))]
    assert replica.merge("aware", customers(older, tz=True), KEY, version_column=V).skipped_older == 1
    assert read(any_db, "aware") == expected(rows)


# -- schema drift ---------------------------------------------------------------------------------


def test_schema_drift_adds_new_columns_and_keeps_dropped_ones(any_db, replica):
    replica.merge("customer_table", customers(FIRST[:2]), KEY, version_column=V)
    wider = customers([(3, "Alice", ts("2017-09-03 02:36:00"))]).append_column("Age", pa.array([30], pa.int32()))
    result = replica.merge("customer_table", wider, KEY, version_column=V)
    assert result.added_columns == ["Age"] and result.inserted == 1
    assert read(any_db, "customer_table", columns=("PersonID", "Age"), kinds=(None, None)) == [(1, None), (2, None), (3, 30)]
    assert replica.ensure_table("customer_table", wider.schema, KEY, version_column=V) == []

    # data without Age (landed before it was added, or dropped at the source): merged, Age kept
    # as stored for updated rows, NULL for new ones
    older = customers([(3, "Alice B.", ts("2017-09-04 00:00:00")), (4, "Andy", ts("2017-09-04 03:21:00"))])
    result = replica.merge("customer_table", older, KEY, version_column=V)
    assert (result.inserted, result.updated, result.kept_columns) == (1, 1, ["Age"])
    assert read(any_db, "customer_table", columns=("PersonID", "Name", "Age"), kinds=(None, None, None)) == [
        (1, "John", None), (2, "Mike", None), (3, "Alice B.", 30), (4, "Andy", None)]

    even_wider = wider.append_column("City", pa.array(["Oslo"]))
    with pytest.raises(ReplicaError, match=r"column 'City'.*new column.*'fail'"):
        replica.ensure_table("customer_table", even_wider.schema, KEY, version_column=V, on_schema_change="fail")
    with pytest.raises(ReplicaError, match=r"column 'Age'.*lacks column\(s\) \['Age'\].*'fail'"):
        replica.ensure_table("customer_table", older.schema, KEY, version_column=V, on_schema_change="fail")
    retyped = wider.set_column(3, "Age", pa.array(["thirty"]))
    with pytest.raises(ReplicaError, match=r"table 'customer_table', column 'Age': has type .* cannot hold"):
        replica.merge("customer_table", retyped, KEY, version_column=V)


def test_widened_source_types_widen_the_replica_or_name_the_statement(any_db, replica):
    """int -> bigint (in the key too), numeric(10,2) -> numeric(12,4), real -> double: PostgreSQL
    and MariaDB change the column in place; SQLite names the statements to run."""
    import decimal

    def rows(ids, amounts, ratios, int_type, dec_type, float_type):
        return pa.table({"id": pa.array(ids, int_type), "amount": pa.array([decimal.Decimal(a) for a in amounts], dec_type),
                         "ratio": pa.array(ratios, float_type),
                         V: pa.array([dt.datetime(2024, 1, i) for i in ids], pa.timestamp("us"))})

    replica.merge("w", rows([1], ["12345678.12"], [0.5], pa.int32(), pa.decimal128(10, 2), pa.float32()), ["id"], version_column=V)
    big = rows([2], ["12345678.1234"], [1 / 3], pa.int64(), pa.decimal128(12, 4), pa.float64())
    big = big.set_column(0, "id", pa.array([5_000_000_000], pa.int64()))
    if any_db.engine.dialect.name == "sqlite":
        # SQLite's INTEGER holds 64 bits already; its decimals are text, declared with their digits
        with pytest.raises(ReplicaError, match=r"column 'amount': has type DECIMAL_TEXT\(10,2\).*by running: "
                           r'ALTER TABLE "w" RENAME COLUMN "amount" TO "amount__old"; ALTER TABLE "w" ADD COLUMN "amount" '
                           r'DECIMAL_TEXT\(12,4\); UPDATE "w" SET "amount" = "amount__old"; ALTER TABLE "w" DROP COLUMN "amount__old"'):
            replica.merge("w", big, ["id"], version_column=V)
        with any_db.engine.begin() as conn:  # the statements given, as the user runs them
            for statement in ('ALTER TABLE "w" RENAME COLUMN "amount" TO "amount__old"',
                              'ALTER TABLE "w" ADD COLUMN "amount" DECIMAL_TEXT(12,4)',
                              'UPDATE "w" SET "amount" = "amount__old"', 'ALTER TABLE "w" DROP COLUMN "amount__old"'):
                conn.exec_driver_sql(statement)
    result = replica.merge("w", big, ["id"], version_column=V)
    assert result.inserted == 1
    if any_db.engine.dialect.name != "sqlite":
        assert set(result.widened_columns) == {"id", "amount", "ratio"}
    got = read(any_db, "w", columns=("id", "amount", "ratio"), kinds=(None, "decimal", None))
    assert [(i, str(a)) for i, a, _ in got] == [(1, "12345678.12"), (5_000_000_000, "12345678.1234")]
    assert abs(got[1][2] - 1 / 3) < 1e-15  # a double, not a real
    # the tombstone table's key was widened with the table's
    assert replica.merge("w", big, ["id"], version_column=V).unchanged == 1
    assert replica.adapt_table("w", big.schema, ["id"], version_column=V).widened == {}


def test_wall_clock_timestamps_becoming_instants(any_db, replica):
    """timestamp -> timestamptz at the source: PostgreSQL converts a column holding no value, and
    for one holding values gives the statement to run (their zone is the user's to say); once run,
    the merge goes on. The other engines' timestamp columns hold UTC instants already."""
    def rows(ids, tz, with_value):
        when = [dt.datetime(2024, 1, i, tzinfo=UTC if tz else None) for i in ids]
        return pa.table({"id": pa.array(ids, pa.int64()), V: pa.array(when, pa.timestamp("us", tz=tz)),
                         "seen": pa.array([w if with_value else None for w in when], pa.timestamp("us", tz=tz))})

    replica.merge("z", rows([1], None, False), ["id"], version_column=V)
    instants = rows([2], None, False).set_column(2, "seen", pa.array([None], pa.timestamp("us", tz="UTC")))
    engine = any_db.engine.dialect.name
    if engine == "mysql":  # DATETIME(6) holds UTC instants already
        assert replica.merge("z", rows([3], "UTC", True), ["id"], version_column=V).inserted == 1
        return
    if engine == "postgresql":  # a column holding no value yet: converted
        assert list(replica.merge("z", instants, ["id"], version_column=V).widened_columns) == ["seen"]
        statement = "; ".join(
            f'ALTER TABLE "{t}" ALTER COLUMN "{V}" TYPE timestamp with time zone USING "{V}" AT TIME ZONE \'UTC\''
            for t in ("z", "z__deleted"))
    else:
        with pytest.raises(ReplicaError, match=r"column 'seen'.*change it by running") as caught:
            replica.merge("z", instants, ["id"], version_column=V)
        with any_db.engine.begin() as conn:  # SQLite changes no type in place: the statements given
            for one in str(caught.value).split("change it by running: ")[1].split("; "):
                conn.exec_driver_sql(one)
        assert replica.merge("z", instants, ["id"], version_column=V).inserted == 1
        statement = "; ".join(
            f'ALTER TABLE "{t}" RENAME COLUMN "{V}" TO "{V}__old"; ALTER TABLE "{t}" ADD COLUMN "{V}" TIMESTAMPTZ; '
            f'UPDATE "{t}" SET "{V}" = "{V}__old" || \'+00:00\'; ALTER TABLE "{t}" DROP COLUMN "{V}__old"'
            for t in ("z", "z__deleted"))
    # the version column holds values: the statements to run, for the table and its tombstones
    with pytest.raises(ReplicaError, match=rf"column '{V}': has type .*reads them as UTC.*change it by running") as caught:
        replica.merge("z", rows([3], "UTC", True), ["id"], version_column=V)
    assert str(caught.value).endswith(statement)
    with any_db.engine.begin() as conn:
        for one in statement.split("; "):
            conn.exec_driver_sql(one)
    assert replica.merge("z", rows([3], "UTC", True), ["id"], version_column=V).inserted == 1
    assert read(any_db, "z", columns=("id", V), kinds=(None, "timestamp")) == [
        (1, canonical(dt.datetime(2024, 1, 1, tzinfo=UTC), "timestamp")), (2, canonical(dt.datetime(2024, 1, 2, tzinfo=UTC), "timestamp")),
        (3, canonical(dt.datetime(2024, 1, 3, tzinfo=UTC), "timestamp"))]


def test_existing_table_without_the_key_as_primary_key_fails(any_db, replica):
    q = lambda n: quoted(any_db, n)  # noqa: E731
    any_db.run(f"CREATE TABLE {q('nokey')} ({q('PersonID')} INT, {q('Name')} VARCHAR(255), {q(V)} TIMESTAMP NULL)")
    with pytest.raises(ReplicaError, match=r"table 'nokey', column 'PersonID': .*no primary key or unique index"):
        replica.ensure_table("nokey", customers(FIRST).schema, KEY, version_column=V)
    with pytest.raises(ReplicaError, match=r"column 'Nope': key column is not in the data"):
        replica.ensure_table("other", customers(FIRST).schema, ["Nope"], version_column=V)


# -- reconcile ------------------------------------------------------------------------------------


def test_reconcile_matches_the_source_when_in_sync(any_db, replica):
    q = lambda n: quoted(any_db, n)  # noqa: E731
    any_db.run(
        f"CREATE TABLE {q('src_customer')} ({q('PersonID')} INT PRIMARY KEY, {q('Name')} VARCHAR(255), {q(V)} "
        + ("TIMESTAMP" if any_db.engine.dialect.name == "postgresql" else "DATETIME")
        + ")"
    )
    for pid, name, at in FIRST:
        any_db.run(
            f"INSERT INTO {q('src_customer')} VALUES (:p, :n, :t)",
            params={"p": pid, "n": name, "t": at if any_db.engine.dialect.name != "sqlite" else str(at)},
        )
    source = sa.Table("src_customer", sa.MetaData(), autoload_with=any_db.engine)
    replica.merge("customer_table", customers(FIRST), KEY, version_column=V)

    assert replica.reconcile("customer_table", KEY, V) == reconcile_source(any_db.engine, source, KEY, V)
    assert replica.reconcile("customer_table", KEY) == reconcile_source(any_db.engine, sa.select(source), KEY)
    assert replica.reconcile("customer_table", KEY)[0] == 5

    any_db.run(f"UPDATE {q('src_customer')} SET {q(V)} = :t WHERE {q('PersonID')} = 3",
               params={"t": "2017-09-08 00:00:00" if any_db.engine.dialect.name == "sqlite" else ts("2017-09-08 00:00:00")})
    assert replica.reconcile("customer_table", KEY, V) != reconcile_source(any_db.engine, source, KEY, V)
    assert replica.reconcile("customer_table", KEY) == reconcile_source(any_db.engine, source, KEY)  # same keys
    any_db.run(f"DELETE FROM {q('src_customer')} WHERE {q('PersonID')} = 5")
    assert replica.reconcile("customer_table", KEY) != reconcile_source(any_db.engine, source, KEY)


def test_reconcile_compares_across_engines(any_db, replica, sqlite_db, tmp_path):
    """A SQLite source (text timestamps) against a replica on every engine, aware versions in UTC."""
    sqlite_db.run(
        'CREATE TABLE src (id INTEGER PRIMARY KEY, amount NUMERIC(10,2), at DATETIME)',
        "INSERT INTO src VALUES (1, 1.5, '2024-01-01 10:00:00'), (2, 2, '2024-01-01T11:00:00.5+00:00')",
    )
    data = pa.table(
        {
            "id": pa.array([1, 2], pa.int64()),
            "amount": pa.array([decimal.Decimal("1.50"), decimal.Decimal("2.00")], pa.decimal128(10, 2)),
            "at": pa.array([dt.datetime(2024, 1, 1, 10, tzinfo=UTC), dt.datetime(2024, 1, 1, 11, 0, 0, 500000, tzinfo=UTC)],
                           pa.timestamp("us", tz="UTC")),
        }
    )
    replica.merge("src_copy", data, ["id"], version_column="at")
    source = sa.Table("src", sa.MetaData(), autoload_with=sqlite_db.engine)
    assert replica.reconcile("src_copy", ["id"], "at") == reconcile_source(sqlite_db.engine, source, ["id"], "at")
    with sqlite_db.engine.connect() as conn:
        assert reconcile_source(conn, source, ["id", "amount"]) == replica.reconcile("src_copy", ["id", "amount"])


# -- failures -------------------------------------------------------------------------------------


def test_unreachable_replica_fails_after_retries_without_the_password(caplog):
    replica = Replica("postgresql+psycopg://ia_user:s3cr3t-pw@127.0.0.1:1/replica", retries=2, retry_delay=0.01)
    with pytest.raises(ReplicaError) as err:
        replica.merge("customer_table", customers(FIRST), KEY, version_column=V)
    message = str(err.value)
    assert "unreachable after 3 attempt(s)" in message and "127.0.0.1:1" in message and "ia_user" in message
    assert "s3cr3t-pw" not in message and "s3cr3t-pw" not in repr(replica) and "s3cr3t-pw" not in caplog.text
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_invalid_names_fail_before_touching_the_database():
    replica = Replica("sqlite://", retries=0)
    with pytest.raises(ReplicaError, match="invalid table name"):
        replica.ensure_table(" padded", customers(FIRST).schema, KEY, version_column=V)
    with pytest.raises(ReplicaError, match=r"column '_deleted': is reserved"):
        replica.ensure_table("t", customers(FIRST).append_column("_deleted", pa.array([True] * 5)).schema, KEY, version_column=V)


def test_a_null_version_is_older_than_any_version(any_db, replica):
    replica.merge("customer_table", customers([(1, "unversioned", None)]), KEY, version_column=V)
    replica.merge("customer_table", customers([(1, "unversioned again", None)]), KEY, version_column=V)
    assert read(any_db, "customer_table") == [(1, "unversioned again", None)]
    replica.merge("customer_table", customers([(1, "versioned", ts("2024-01-01 00:00:00"))]), KEY, version_column=V)
    late = replica.merge("customer_table", customers([(1, "unversioned", None)]), KEY, version_column=V)
    assert late.skipped_older == 1
    assert read(any_db, "customer_table") == expected([(1, "versioned", ts("2024-01-01 00:00:00"))])


def test_reconcile_source_takes_naive_source_timestamps_in_their_zone(sqlite_db):
    sqlite_db.run("CREATE TABLE src (id INTEGER PRIMARY KEY, at DATETIME)", "INSERT INTO src VALUES (1, '2024-07-01 12:00:00')")
    replica = Replica(sqlite_db.url, retries=0)
    replica.merge("copy", pa.table({"id": [1], "at": pa.array([dt.datetime(2024, 7, 1, 10, tzinfo=UTC)])}), ["id"], version_column="at")
    source = sa.Table("src", sa.MetaData(), autoload_with=sqlite_db.engine)
    assert reconcile_source(sqlite_db.engine, source, ["id"], "at", column_timezone="Europe/Paris") == replica.reconcile(
        "copy", ["id"], "at"
    )
    assert reconcile_source(sqlite_db.engine, source, ["id"], "at") != replica.reconcile("copy", ["id"], "at")


@pytest.mark.parametrize("name", ["s", "t", "d", "x"])
def test_table_names_that_match_sql_aliases(any_db, replica, name):
    op = "SYS_CHANGE_OPERATION"
    replica.merge(name, customers(FIRST[:2], ops=["I", "I"]), KEY, version_column=V, operation_column=op)
    replica.merge(name, customers(FIRST[:2], ops=["I", "I"]), KEY, version_column=V, operation_column=op)
    gone = replica.merge(name, customers([(1, None, ts("2018-01-01 00:00:00"))], ops=["D"]), KEY, version_column=V,
                         operation_column=op, soft_delete=True)
    gone = replica.merge(name, customers([(2, None, ts("2018-01-01 00:00:00"))], ops=["D"]), KEY, version_column=V,
                         operation_column=op)
    assert gone.deleted == 1
    assert replica.reconcile(name, KEY)[0] == 0
