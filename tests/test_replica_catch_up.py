"""The replica knows which landed files it merged, per window, and catches up on every window it
has not merged as landed: after a failed merge, after a copy landed from the UI or by
``dg.materialize``, on the sensor's next tick and on the next ``sync``."""

from __future__ import annotations

import dagster as dg
import pytest
import sqlalchemy as sa

from tests.conftest import Database
from tests.helpers import after_horizon, fresh_time, run_cli, write_config

pytestmark = pytest.mark.usefixtures("dagster_home")

MONTHLY = {"name": "customer_table", "table": "customer_table", "watermark_column": "LastModifytime",
           "primary_key": ["PersonID"], "partitions": {"granularity": "monthly", "start": "2017-09-01"}}
LANDING = dg.AssetKey(["landing", "customer_table"])
REPLICA = dg.AssetKey(["replica", "customer_table"])

#: statements that make the replica table refuse every write, and undo it, per engine
REFUSE = {
    "sqlite": (
        ["CREATE TRIGGER refuse_i BEFORE INSERT ON customer_table BEGIN SELECT RAISE(ABORT, 'replica refuses'); END",
         "CREATE TRIGGER refuse_u BEFORE UPDATE ON customer_table BEGIN SELECT RAISE(ABORT, 'replica refuses'); END"],
        ["DROP TRIGGER refuse_i", "DROP TRIGGER refuse_u"],
    ),
    "postgresql": (
        ["CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
         "'BEGIN RAISE EXCEPTION ''replica refuses''; END'",
         "CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON customer_table FOR EACH ROW EXECUTE FUNCTION refuse()"],
        ["DROP TRIGGER refuse ON customer_table"],
    ),
    "mariadb": (
        ["CREATE TRIGGER refuse_i BEFORE INSERT ON customer_table FOR EACH ROW "
         "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'replica refuses'",
         "CREATE TRIGGER refuse_u BEFORE UPDATE ON customer_table FOR EACH ROW "
         "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'replica refuses'"],
        ["DROP TRIGGER refuse_i", "DROP TRIGGER refuse_u"],
    ),
}


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def replica_db(request, tmp_path):
    """The replica database: a SQLite file, or a fresh PostgreSQL / MariaDB database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'replica.db'}"
        engine = sa.create_engine(url)
        yield request.param, Database(url, engine)
        engine.dispose()
    else:
        yield request.param, request.getfixturevalue({"postgresql": "pg_db", "mariadb": "mariadb_db"}[request.param])


def source_table(db, *rows):
    db.run("CREATE TABLE customer_table (PersonID int, Name varchar(255), LastModifytime datetime)")
    for row in rows:
        db.run("INSERT INTO customer_table VALUES (:id, :name, :t)", params=dict(zip(("id", "name", "t"), row)))


def replica_rows(db: Database):
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text('SELECT "PersonID", "Name" FROM customer_table ORDER BY 1'))] \
            if db.engine.dialect.name != "mysql" else \
            [tuple(r) for r in conn.execute(sa.text("SELECT PersonID, Name FROM customer_table ORDER BY 1"))]


def test_failed_merge_is_reported_and_merged_by_next_sync(sqlite_db, replica_db, tmp_path, capsys):
    engine, replica = replica_db
    source_table(sqlite_db, (1, "John", "2017-09-01 00:56:00"))
    config = write_config(tmp_path, sqlite_db.url, [MONTHLY], replica={"url": replica.url},
                          run_retries={"max_retries": 0})
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert replica_rows(replica) == [(1, "John")]

    refuse, allow = REFUSE[engine]
    replica.run(*refuse)
    sqlite_db.run("INSERT INTO customer_table VALUES (2, 'Mike', :t)",
                  params={"t": fresh_time().strftime("%Y-%m-%d %H:%M:%S")})
    after_horizon()
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 1
    assert "1 row(s)" in out  # landed
    assert "FAILED replica merge" in err and "replica refuses" in err

    # landing is up to date, the replica is not: no "up to date", the merge is tried again
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 1 and "up to date" not in out
    assert "replica behind: 1 window(s) pending merge" in out and "FAILED replica merge" in err

    code, out, err = run_cli(capsys, "--config", str(config), "status")
    assert "1 window(s) pending merge" in out and "landed, never merged" in out
    assert "last merge FAILED" in out and "replica refuses" in out

    replica.run(*allow)
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert "1 inserted, 0 updated" in out
    assert replica_rows(replica) == [(1, "John"), (2, "Mike")]

    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0 and "customer_table: up to date" in out
    code, out, err = run_cli(capsys, "--config", str(config), "status")
    assert "0 windows pending merge" in out and "FAILED" not in out


def test_window_landed_by_materialize_is_merged_by_next_sync(sqlite_db, tmp_path, capsys):
    # the current window, merged once by sync, then landed again outside sync
    source_table(sqlite_db, (1, "John", fresh_time().strftime("%Y-%m-%d %H:%M:%S")))
    after_horizon()
    replica = Database(f"sqlite:///{tmp_path / 'replica.db'}", sa.create_engine(f"sqlite:///{tmp_path / 'replica.db'}"))
    config = write_config(tmp_path, sqlite_db.url, [MONTHLY], replica={"url": replica.url})
    assert run_cli(capsys, "--config", str(config), "sync")[0] == 0

    now = fresh_time()
    sqlite_db.run("UPDATE customer_table SET Name = 'John v2', LastModifytime = :t WHERE PersonID = 1",
                  params={"t": now.strftime("%Y-%m-%d %H:%M:%S")})
    after_horizon()
    from incremental_assets.definitions import load_definitions

    defs = load_definitions(config)
    landing = defs.resolve_assets_def(LANDING)
    window = landing.partitions_def.get_last_partition_key()
    with dg.DagsterInstance.get() as instance:
        assert dg.materialize([landing], instance=instance, partition_key=window).success
    assert replica_rows(replica) == [(1, "John")]

    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert "up to date" not in out
    assert f"1 window(s) pending merge ({window}: 1 landed file(s) not merged)" in out
    assert "0 inserted, 1 updated" in out
    assert replica_rows(replica) == [(1, "John v2")]
    assert "customer_table: up to date" in run_cli(capsys, "--config", str(config), "sync")[1]
    replica.engine.dispose()


def _merged_through(instance) -> tuple[int, int]:
    """(the replica's latest ``landing_merged_through``, the landing's latest storage id)."""
    records = {r.asset_entry.asset_key: r for r in instance.get_asset_records([REPLICA, LANDING])}
    replica, landing = records[REPLICA], records[LANDING]
    through = replica.asset_entry.last_materialization.asset_materialization.metadata["landing_merged_through"].value
    return through, landing.asset_entry.last_materialization_storage_id


def test_replica_records_how_far_every_landing_is_merged(sqlite_db, tmp_path, capsys):
    """Each merge records the landing event up to which every window is merged, which lets the
    sensor and sync skip a table with nothing landed since; a window landed and not merged keeps
    it below that window's event until a merge takes it."""
    source_table(sqlite_db, (1, "John", "2017-09-01 00:56:00"), (2, "Mike", "2017-10-02 00:00:00"))
    replica = Database(f"sqlite:///{tmp_path / 'replica.db'}", sa.create_engine(f"sqlite:///{tmp_path / 'replica.db'}"))
    config = write_config(tmp_path, sqlite_db.url, [MONTHLY], replica={"url": replica.url})
    assert run_cli(capsys, "--config", str(config), "sync")[0] == 0
    with dg.DagsterInstance.get() as instance:
        through, landed = _merged_through(instance)
        assert through == landed

    # an old window landed again (a backfill), its merge not run: the record stays below it
    sqlite_db.run("UPDATE customer_table SET Name = 'John v2' WHERE PersonID = 1")
    from incremental_assets.definitions import load_definitions

    defs = load_definitions(config)
    landing = defs.resolve_assets_def(LANDING)
    with dg.DagsterInstance.get() as instance:
        assert dg.materialize([landing], instance=instance, partition_key="2017-09-01",
                              run_config={"ops": {landing.op.name: {"config": {"refresh": True}}}}).success
        through_before, landed = _merged_through(instance)
        assert through_before < landed
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert "1 window(s) pending merge (2017-09-01" in out
    assert replica_rows(replica) == [(1, "John v2"), (2, "Mike")]
    with dg.DagsterInstance.get() as instance:
        through, landed = _merged_through(instance)
        assert through == landed > through_before
    replica.engine.dispose()


def test_sensor_requests_a_failed_window_again(sqlite_db, tmp_path):
    source_table(sqlite_db, (1, "John", "2017-09-01 00:56:00"))
    replica = Database(f"sqlite:///{tmp_path / 'replica.db'}", sa.create_engine(f"sqlite:///{tmp_path / 'replica.db'}"))
    config = write_config(tmp_path, sqlite_db.url, [MONTHLY], replica={"url": replica.url},
                          run_retries={"max_retries": 0})
    from incremental_assets.definitions import load_definitions

    defs = load_definitions(config)
    landing, merge = defs.resolve_assets_def(LANDING), defs.resolve_assets_def(REPLICA)
    sensor = defs.resolve_sensor_def("incremental_copy_src_sensor")
    with dg.DagsterInstance.get() as instance:
        cursor = None

        def tick():  # as the daemon ticks: each with the cursor the previous one left
            nonlocal cursor
            with dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs,
                                         cursor=cursor) as ctx:
                data = sensor.evaluate_tick(ctx)
            cursor = data.cursor or cursor
            return data.run_requests

        def run(request):
            return dg.materialize([merge], instance=instance, partition_key=request.partition_key,
                                  tags=request.tags, raise_on_error=False)

        assert dg.materialize([landing], instance=instance, partition_key="2017-09-01").success
        (request,) = tick()
        assert request.partition_key == "2017-09-01"
        assert run(request).success
        assert tick() == []
        assert replica_rows(replica) == [(1, "John")]

        replica.run(*REFUSE["sqlite"][0])
        sqlite_db.run("UPDATE customer_table SET Name = 'John v2' WHERE PersonID = 1")
        # a refresh of the window rewrites its file: the window is pending, its merge fails
        assert dg.materialize([landing], instance=instance, partition_key="2017-09-01",
                              tags={"dagster/backfill": "b1"}).success
        (request,) = tick()
        assert request.partition_key == "2017-09-01"
        assert not run(request).success
        # no cursor moved past it: the next tick asks again, and again, until it is merged
        (request,) = tick()
        assert request.partition_key == "2017-09-01"
        assert not run(request).success
        # while a merge of the table is about to start (or queued, or running), nothing more is requested
        queued = instance.create_run_for_job(defs.resolve_job_def(request.job_name), status=dg.DagsterRunStatus.NOT_STARTED,
                                             asset_selection=frozenset(request.asset_selection), tags=request.tags)
        assert tick() == []
        instance.delete_run(queued.run_id)
        (request,) = tick()
        replica.run(*REFUSE["sqlite"][1])
        assert run(request).success
        assert tick() == []
    assert replica_rows(replica) == [(1, "John v2")]
    replica.engine.dispose()


def test_multi_window_merge_records_each_windows_figures(sqlite_db, tmp_path, capsys):
    source_table(sqlite_db, (1, "John", "2017-09-01 00:56:00"), (2, "Mike", "2017-09-02 05:23:00"),
                 (3, "Alice", "2017-10-03 02:36:00"), (4, "Andy", "2017-12-04 03:21:00"))
    config = write_config(tmp_path, sqlite_db.url, [MONTHLY], replica={"url": f"sqlite:///{tmp_path / 'r.db'}"})
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert "merged 3 file(s) of 4 window(s)" in out and "4 inserted" in out

    def merges():
        with dg.DagsterInstance.get() as instance:
            records = instance.fetch_materializations(REPLICA, limit=100).records
        latest = {}
        for r in reversed(records):  # oldest first: the latest of each window wins
            latest[r.partition_key] = {k: v.value for k, v in r.asset_materialization.metadata.items()}
        return latest

    figures = {k: (m["files_merged"], m["rows_inserted"], m["rows_updated"]) for k, m in merges().items()}
    assert figures == {"2017-09-01": (1, 2, 0), "2017-10-01": (1, 1, 0), "2017-11-01": (0, 0, 0),
                       "2017-12-01": (1, 1, 0)}
    # each window records the files it holds merged, by name with a version token
    landed = sorted(p.name for p in (tmp_path / "landing" / "customer_table" / "2017-09-01").iterdir())
    assert sorted(merges()["2017-09-01"]["merged_files"]) == landed and len(landed) == 1

    # merging the range again merges nothing: the files are recorded as merged
    from incremental_assets.definitions import load_definitions

    defs = load_definitions(config)
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize([defs.resolve_assets_def(REPLICA)], instance=instance, tags={
            "dagster/asset_partition_range_start": "2017-09-01", "dagster/asset_partition_range_end": "2017-12-01"})
        assert result.success
    assert {k: m["files_merged"] for k, m in merges().items()} == dict.fromkeys(figures, 0)


def test_merge_whose_connection_is_killed_is_merged_by_next_sync(sqlite_db, pg_db, tmp_path, capsys):
    """Issue 24: the replica's session dies in the middle of a merge (here the replica table's
    trigger ends its own session, as a failover or an administrator would)."""
    source_table(sqlite_db, (1, "John", "2017-09-01 00:56:00"))
    config = write_config(tmp_path, sqlite_db.url, [MONTHLY], replica={"url": pg_db.url, "retries": 0},
                          run_retries={"max_retries": 0})
    assert run_cli(capsys, "--config", str(config), "sync")[0] == 0
    pg_db.run("CREATE FUNCTION die() RETURNS trigger LANGUAGE plpgsql AS "
              "'BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NEW; END'",
              "CREATE TRIGGER die BEFORE INSERT OR UPDATE ON customer_table FOR EACH ROW EXECUTE FUNCTION die()")
    sqlite_db.run("INSERT INTO customer_table VALUES (2, 'Mike', :t)",
                  params={"t": fresh_time().strftime("%Y-%m-%d %H:%M:%S")})
    after_horizon()
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 1 and "FAILED replica merge" in err
    assert replica_rows(pg_db) == [(1, "John")]

    code, out, err = run_cli(capsys, "--config", str(config), "status")
    assert "1 window(s) pending merge" in out and "last merge FAILED" in out

    pg_db.run("DROP TRIGGER die ON customer_table")
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert "replica behind: 1 window(s) pending merge" in out and "1 inserted" in out
    assert "customer_table: up to date" in run_cli(capsys, "--config", str(config), "sync")[1]
    assert replica_rows(pg_db) == [(1, "John"), (2, "Mike")]


def test_a_window_of_many_slices_records_its_files_since_a_full_list(sqlite_db, tmp_path, capsys, monkeypatch):
    """Each merge of a window that gathers a slice per copy lists the files merged since the
    last full list, not every file again; past a few it lists them all again."""
    from incremental_assets.defs import replica as replica_defs

    monkeypatch.setattr(replica_defs, "FILES_SINCE_BASE", 2)
    source_table(sqlite_db)
    config = write_config(tmp_path, sqlite_db.url, [MONTHLY], replica={"url": f"sqlite:///{tmp_path / 'r.db'}"})
    for person in range(1, 6):
        sqlite_db.run("INSERT INTO customer_table VALUES (:id, 'p', :t)",
                      params={"id": person, "t": fresh_time().strftime("%Y-%m-%d %H:%M:%S")})
        after_horizon()
        code, out, err = run_cli(capsys, "--config", str(config), "sync")
        assert code == 0, err
        assert "merged 1 file(s) of 1 window(s)" in out and "1 inserted" in out
    with dg.DagsterInstance.get() as instance:
        records = list(reversed(instance.fetch_materializations(REPLICA, limit=1000).records))
    records = [r for r in records if "empty_window" not in r.asset_materialization.metadata]  # docs/metadata.md
    metas = [{k: v.value for k, v in r.asset_materialization.metadata.items()} for r in records]
    ids = [r.storage_id for r in records]
    assert [len(m["merged_files"]) for m in metas] == [1, 1, 2, 4, 1]
    assert [m.get("merged_files_base") for m in metas] == [None, ids[0], ids[0], None, ids[3]]
    window = records[0].partition_key
    landed = sorted(p.name for p in (tmp_path / "landing" / "customer_table" / window).iterdir())
    from incremental_assets.config import load_config
    from incremental_assets.defs.landing import landing_tables

    project = load_config(config)
    (table,) = replica_defs.replica_tables(project, landing_tables(project))
    with dg.DagsterInstance.get() as instance:
        state = replica_defs.merged_state(instance, table)
    assert sorted(state[window].files) == landed and len(landed) == 5
    assert "customer_table: up to date" in run_cli(capsys, "--config", str(config), "sync")[1]
