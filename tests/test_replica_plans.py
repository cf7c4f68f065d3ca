"""Replica merges: every statement on every path runs on the engines here (PostgreSQL 15, MariaDB
10.11, SQLite 3.40), costs a key lookup per staged row (checked with each engine's EXPLAIN), and
counts what changed; keys that hold the version (tables partitioned by their timestamp) merge.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import re

import pyarrow as pa
import pytest
import sqlalchemy as sa
from sqlalchemy import event

from incremental_assets.replica import Replica
from tests.conftest import ENGINE_FIXTURES

OP = "SYS_CHANGE_OPERATION"
T0 = dt.datetime(2024, 1, 1)


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def db(request):
    return request.getfixturevalue(ENGINE_FIXTURES[request.param])


def items(ids, *, version, ops=None, note="n", amount="1.50") -> pa.Table:
    """A change-tracked table of items: id, note, amount numeric(12,2), version (bigint)."""
    ids = list(ids)
    table = pa.table({
        "id": pa.array(ids, pa.int64()),
        "note": pa.array([f"{note}{i}" for i in ids], pa.string()),
        "amount": pa.array([decimal.Decimal(amount)] * len(ids), pa.decimal128(12, 2)),
        "version": pa.array([version] * len(ids), pa.int64()),
    })
    if ops is not None:
        table = table.append_column(OP, pa.array(ops if isinstance(ops, list) else [ops] * len(ids), pa.string()))
    return table


def rows(db, table: str, columns: str = "id, note, version"):
    return db.rows(f"SELECT {columns} FROM {table} ORDER BY id")


# -- counting ----------------------------------------------------------------------------------


def test_merging_the_same_file_twice_counts_nothing_changed_the_second_time(db):
    replica = Replica(db.url, retries=0)
    replica.merge("items", items(range(1, 11), version=1, ops="I"), ["id"], version_column="version",
                  operation_column=OP, soft_delete=True)
    change = pa.concat_tables([
        items(range(1, 4), version=2, ops="U", note="changed"),  # 3 updated
        items(range(4, 6), version=2, ops="D"),  # 2 soft-deleted
        items(range(6, 8), version=1, ops="U"),  # 2 equal to the stored rows
        items(range(11, 13), version=2, ops="I"),  # 2 new
    ])
    first = replica.merge("items", change, ["id"], version_column="version", operation_column=OP, soft_delete=True)
    assert (first.inserted, first.updated, first.unchanged, first.deleted, first.skipped_older) == (2, 3, 2, 2, 0)
    again = replica.merge("items", change, ["id"], version_column="version", operation_column=OP, soft_delete=True)
    assert (again.inserted, again.updated, again.unchanged, again.deleted, again.skipped_older) == (0, 0, 7, 0, 0)
    assert replica.reconcile("items", ["id"])[0] == 10
    replica.dispose()


# -- the version in the key --------------------------------------------------------------------


def readings(pairs, value="x") -> pa.Table:
    return pa.table({
        "sensor": pa.array([p[0] for p in pairs], pa.int32()),
        "taken_at": pa.array([T0 + dt.timedelta(hours=p[1]) for p in pairs], pa.timestamp("us")),
        "value": pa.array([value] * len(pairs), pa.string()),
    })


def test_a_key_that_holds_the_version_merges(db):
    """A table partitioned by its timestamp has it in its primary key: rows are appended, a row
    re-landed with other values (same key, so same version) is updated, a replay changes nothing."""
    replica = Replica(db.url, retries=0)
    key = ["sensor", "taken_at"]
    first = replica.merge("readings", readings([(1, 0), (1, 1), (2, 0)]), key, version_column="taken_at")
    assert first.inserted == 3
    more = replica.merge("readings", readings([(1, 1), (1, 2), (2, 0)], value="y"), key, version_column="taken_at")
    assert (more.inserted, more.updated, more.unchanged) == (1, 2, 0)
    replay = replica.merge("readings", readings([(1, 1), (1, 2), (2, 0)], value="y"), key, version_column="taken_at")
    assert (replay.inserted, replay.updated, replay.unchanged) == (0, 0, 3)
    got = db.rows("SELECT sensor, value FROM readings ORDER BY sensor, taken_at")
    assert got == [(1, "x"), (1, "y"), (1, "y"), (2, "y")]
    tombstone_columns = [c["name"] for c in sa.inspect(db.engine).get_columns("readings__deleted")]
    assert tombstone_columns == ["sensor", "taken_at"]
    replica.dispose()


def test_a_key_of_only_the_version_and_deletes(db):
    replica = Replica(db.url, retries=0)
    data = pa.table({"id": pa.array([1, 2, 3], pa.int64()), "v": pa.array([1, 2, 3], pa.int64())})
    replica.merge("only_key", data.append_column(OP, pa.array(["I"] * 3)), ["id", "v"], version_column="v",
                  operation_column=OP)
    gone = replica.merge("only_key", data.slice(0, 1).append_column(OP, pa.array(["D"])), ["id", "v"],
                         version_column="v", operation_column=OP)
    assert gone.deleted == 1
    assert db.rows("SELECT id FROM only_key ORDER BY id") == [(2,), (3,)]
    assert db.rows("SELECT id, v FROM only_key__deleted") == [(1, 1)]
    replica.dispose()


# -- PostgreSQL: the side path (large steps) on every statement --------------------------------


@pytest.mark.parametrize("soft_delete", [False, True])
def test_postgresql_side_staged_steps_with_deletes_and_decimals(pg_db, soft_delete):
    """Steps staged beside the transaction (ADBC), forced by lowering the threshold; decimals make
    the staging a subquery, which PostgreSQL 15 accepts only with an alias."""
    replica = Replica(pg_db.url, retries=0)
    replica.dialect.side_staging_min_rows = 1
    replica.merge("items", items(range(1, 101), version=1, ops="I"), ["id"], version_column="version",
                  operation_column=OP, soft_delete=soft_delete)
    change = pa.concat_tables([
        items(range(1, 41), version=2, ops="U", note="u", amount="2.25"),
        items(range(41, 61), version=2, ops="D"),
        items(range(101, 111), version=2, ops="I"),
    ])
    staged = []
    event.listen(replica.engine, "before_cursor_execute",
                 lambda conn, cur, sql, *a: staged.append(sql) if "ia_side_" in sql else None)
    result = replica.merge("items", change, ["id"], version_column="version", operation_column=OP, soft_delete=soft_delete)
    assert (result.inserted, result.updated, result.deleted) == (10, 40, 20)
    assert any("(SELECT" in s and "ia_side_" in s for s in staged)  # the subquery form ran
    assert replica.reconcile("items", ["id"]) == (90, replica.reconcile("items", ["id"])[1])
    assert pg_db.rows("SELECT count(*) FROM items__deleted") == [(20,)]
    assert pg_db.rows("SELECT amount FROM items WHERE id = 1") == [(decimal.Decimal("2.25"),)]
    if soft_delete:
        assert pg_db.rows("SELECT count(*) FROM items WHERE _deleted") == [(20,)]
    # a replay through the side path: nothing changes, an older insert does not resurrect
    replay = replica.merge("items", change, ["id"], version_column="version", operation_column=OP, soft_delete=soft_delete)
    assert (replay.inserted, replay.updated, replay.deleted, replay.unchanged) == (0, 0, 0, 50)
    old = replica.merge("items", items(range(41, 61), version=1, ops="I"), ["id"], version_column="version",
                        operation_column=OP, soft_delete=soft_delete)
    assert (old.inserted, old.skipped_older) == (0, 20)
    assert pg_db.rows("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'ia_side_%'") == [(0,)]
    replica.dispose()


# -- plans: a key lookup per staged row ----------------------------------------------------------


def _pg_scans(plan: dict, relations: set[str]) -> list[str]:
    """Nodes that read a whole relation of ``relations``: a Seq Scan, or an index scan with no condition."""
    found = []
    node_type, relation = plan.get("Node Type", ""), plan.get("Relation Name")
    if relation in relations:
        if node_type == "Seq Scan" or (
            node_type in ("Index Scan", "Index Only Scan") and "Index Cond" not in plan
        ):
            found.append(f"{node_type} on {relation}")
    for child in plan.get("Plans", []):
        found += _pg_scans(child, relations)
    return found


def _full_scans(cursor, engine: str, sql: str, names: set[str]) -> list[str]:
    """What in the plan of ``sql`` reads a table of ``names`` (the target, its tombstones) whole."""
    if engine == "postgresql":
        cursor.execute("EXPLAIN (FORMAT JSON) " + sql)
        value = cursor.fetchone()[0]
        plan = (json.loads(value) if isinstance(value, str) else value)[0]["Plan"]
        return _pg_scans(plan, names)
    if engine == "sqlite":
        cursor.execute("EXPLAIN QUERY PLAN " + sql)
        details = [r[3] for r in cursor.fetchall()]
        return [d for d in details if d.startswith("SCAN ") and d.split()[1] in names]
    cursor.execute("EXPLAIN " + sql)
    columns = [c[0] for c in cursor.description]
    found = []
    for row in cursor.fetchall():
        r = dict(zip(columns, row))
        if r["table"] in names and r["type"] in ("ALL", "index"):
            found.append(f"{r['type']} on {r['table']} ({r['rows']} rows)")
    return found


@pytest.fixture(params=["sqlite", "postgresql", "postgresql-side", "mariadb"])
def plan_db(request):
    """``postgresql-side``: every step staged beside the transaction (the threshold lowered to 1)."""
    return request.param.endswith("-side"), request.getfixturevalue(ENGINE_FIXTURES[request.param.split("-")[0]])


@pytest.mark.parametrize("soft_delete", [False, True, None])
def test_each_merge_statement_finds_stored_rows_by_key(plan_db, soft_delete):
    """A 20,000-row replica with 5,000 tombstones; 60 staged changes. No statement of the merge may
    read the replica or its tombstones whole (a full scan, or one per staged row)."""
    side, db = plan_db
    engine = db.engine.dialect.name
    replica = Replica(db.url, retries=0)
    ops = soft_delete is not None
    kwargs = {"operation_column": OP, "soft_delete": bool(soft_delete)} if ops else {}
    base = items(range(1, 25_001), version=1, **({"ops": "I"} if ops else {}))
    replica.merge("items", base, ["id"], version_column="version", **kwargs)
    gone = items(range(20_001, 25_001), version=2, ops="D")
    if not ops:  # tombstones from a change-tracked merge of the same table
        replica.merge("items", gone, ["id"], version_column="version", operation_column=OP)
    else:
        replica.merge("items", gone, ["id"], version_column="version", **kwargs)
    with db.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE items" if engine != "mysql" else "ANALYZE TABLE items")
        conn.exec_driver_sql("ANALYZE items__deleted" if engine != "mysql" else "ANALYZE TABLE items__deleted")
    change = [
        items(range(100, 120), version=3, note="u", **({"ops": "U"} if ops else {})),
        items(range(25_001, 25_021), version=3, **({"ops": "I"} if ops else {})),
        items(range(50, 60), version=0, **({"ops": "U"} if ops else {})),  # older: skipped
    ]
    if ops:
        change.append(items(range(200, 210), version=3, ops="D"))
    names = {"items", "items__deleted", "t", "d"}
    checked, scans = [], []

    def explain(conn, cursor, statement, parameters, context, executemany):
        staged = "ia_stage" in statement or '"ia_side_' in statement
        if executemany or not staged or statement.lstrip().upper().startswith(("CREATE", "DROP", "ALTER")):
            return
        if re.match(r"\s*INSERT INTO \S*ia_stage", statement):
            return  # loading the staging table
        checked.append(statement)
        scans.extend(f"{found}: {statement}" for found in _full_scans(cursor, engine, statement, names))

    event.listen(replica.engine, "before_cursor_execute", explain)
    if side:
        replica.dialect.side_staging_min_rows = 1
    result = replica.merge("items", pa.concat_tables(change), ["id"], version_column="version", **kwargs)
    assert (result.inserted, result.updated, result.skipped_older) == (20, 20, 10)
    assert result.deleted == (10 if ops else 0)
    assert len(checked) >= (4 if ops else 2)  # the count, the deletes, the upsert, the tombstones
    assert not side or all("ia_side_" in c for c in checked)
    assert [s[:200] for s in scans] == []
    replica.dispose()


def test_rows_older_than_a_snapshot_leave_tombstones_of_their_own_key_when_the_key_holds_the_version(db):
    replica = Replica(db.url, retries=0)
    key = ["sensor", "taken_at"]
    replica.merge("readings", readings([(1, 0), (1, 1), (2, 3)]), key, version_column="taken_at")
    gone = replica.delete_older_than("readings", key, version_column="taken_at", version=T0 + dt.timedelta(hours=2))
    assert gone == 2
    assert db.rows("SELECT sensor FROM readings") == [(2,)]
    assert db.rows("SELECT count(*) FROM readings__deleted") == [(2,)]
    # the documented limit: the tombstone's version is the row's own, and an equal version is not
    # older, so re-merging a file that holds the row brings it back
    again = replica.merge("readings", readings([(1, 0)]), key, version_column="taken_at")
    assert (again.inserted, again.skipped_older) == (1, 0)
    replica.dispose()
