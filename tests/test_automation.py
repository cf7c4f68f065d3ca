"""One sensor per source: all of a source's tables probed in a few statements, the tables with new
rows copied and merged by batched runs, a failing table failing alone — on real PostgreSQL and
MariaDB, with a real Dagster instance."""

from __future__ import annotations

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml

from incremental_assets.definitions import load_definitions

pytestmark = pytest.mark.usefixtures("dagster_home")

N = 12


def create_tables(db, n=N):
    ts = "timestamptz" if db.url.startswith("postgresql") else "datetime(6)"
    for i in range(n):
        db.run(f"CREATE TABLE t{i:02d} (id int PRIMARY KEY, val int, updated_at {ts} NOT NULL)",
               f"CREATE INDEX ix_t{i:02d} ON t{i:02d} (updated_at)")
        if i % 4 != 3:  # every fourth table is empty
            db.run(f"INSERT INTO t{i:02d} VALUES (1, {i}, '2026-11-02 10:00:00'), (2, {i}, '2026-11-02 11:00:00')")


def write_config(tmp_path, db, **sensors):
    config = {
        "sources": {"erp": {"url": db.url, "retries": 0, "discover": {
            "include": ["t*"], "defaults": {"partitions": {"granularity": "daily", "start": "2026-11-01"}}}}},
        "landing": {"url": str(tmp_path / "landing")},
        "replica": {"url": f"sqlite:///{tmp_path / 'replica.db'}"},
        "sensors": {"interval_seconds": 30, **sensors},
    }
    path = tmp_path / "erp.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def tick(defs, instance, sensor_name="incremental_copy_erp_sensor"):
    sensor = defs.resolve_sensor_def(sensor_name)
    with dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs) as ctx:
        return sensor.evaluate_tick(ctx)


def execute(defs, instance, request: dg.RunRequest):
    job = defs.resolve_job_def(request.job_name)
    return job.execute_in_process(instance=instance, asset_selection=list(request.asset_selection),
                                  partition_key=request.partition_key, tags=request.tags, raise_on_error=False)


def replica_rows(tmp_path, table):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'replica.db'}")
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(f"SELECT id, val FROM {table} ORDER BY id")).all()
    finally:
        engine.dispose()


@pytest.mark.parametrize("db_fixture", ["pg_db", "mariadb_db"])
def test_one_sensor_probes_every_table_and_batches_the_copies(request, db_fixture, tmp_path):
    db = request.getfixturevalue(db_fixture)
    create_tables(db)
    defs = load_definitions(write_config(tmp_path, db, max_tables_per_run=5))
    assert [s.name for s in defs.sensors if "landing" in s.name] == []  # no sensor per table
    source = defs.resources["source_erp"].get()
    statements = []
    sa.event.listen(source.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with dg.DagsterInstance.get() as instance:
        tick(defs, instance)  # the first tick reflects the tables; later ones reuse the reflection
        statements.clear()
        data = tick(defs, instance)
        # every table probed in a few statements over one connection, not a few per table
        probes = [s for s in statements if "min(" in s.lower() or "max(" in s.lower()]
        assert 1 <= len(probes) <= 2, len(probes)
        assert len(statements) <= 8, statements
        requests = data.run_requests
        # 9 tables with rows, in runs of at most 5 that land and merge them; the empty ones wait
        assert sorted(len(r.asset_selection) for r in requests) == [8, 10]
        selected = {k.to_user_string() for r in requests for k in r.asset_selection}
        assert selected == {f"{kind}/t{i:02d}" for i in range(N) if i % 4 != 3 for kind in ("landing", "replica")}
        assert {r.partition_key for r in requests} == {"2026-11-02"}
        assert all(r.tags["incremental_assets/source"] == "erp" for r in requests)

        # a table whose watermark column goes away fails its own step; the others land and merge
        db.run("ALTER TABLE t01 DROP COLUMN updated_at")
        results = [execute(defs, instance, r) for r in requests]
        failed = {e.step_key for res in results for e in res.all_events if e.is_step_failure}
        assert failed == {"landing__t01"}
        for i in (0, 2, 4, 5, 6, 8, 9, 10):
            assert replica_rows(tmp_path, f"t{i:02d}") == [(1, i), (2, i)]

        # nothing new: the sensor skips (the broken table is named, not hidden)
        db.run(f"ALTER TABLE t01 ADD COLUMN updated_at {'timestamptz' if db.url.startswith('postgresql') else 'datetime(6)'}")
        data = tick(defs, instance)
        assert not data.run_requests

        # a backfill of one table's window (from the UI, say) is merged by the next tick, alone
        db.run("UPDATE t05 SET val = 50 WHERE id = 2")
        landing = defs.resolve_assets_def(dg.AssetKey(["landing", "t05"]))
        assert dg.materialize([landing], instance=instance, partition_key="2026-11-02",
                              tags={"dagster/backfill": "one-window"}).success
        (merge,) = tick(defs, instance).run_requests
        assert merge.asset_selection == [dg.AssetKey(["replica", "t05"])] and merge.partition_key == "2026-11-02"
        assert execute(defs, instance, merge).success
        assert replica_rows(tmp_path, "t05") == [(1, 5), (2, 50)]
        assert not tick(defs, instance).run_requests


def test_tables_with_a_run_in_flight_wait_for_it(pg_db, tmp_path):
    create_tables(pg_db, 4)
    defs = load_definitions(write_config(tmp_path, pg_db))
    with dg.DagsterInstance.get() as instance:
        first = tick(defs, instance).run_requests
        assert len(first) == 1
        # the run is made, not started yet: a second tick must not request the same tables again
        job = defs.resolve_job_def(first[0].job_name)
        run = instance.create_run_for_job(job_def=job, asset_selection=frozenset(first[0].asset_selection),
                                          tags=first[0].tags)
        data = tick(defs, instance)
        assert not data.run_requests and "copy in flight" in (data.skip_message or "")
        instance.report_run_canceled(run)
        assert tick(defs, instance).run_requests


@pytest.mark.parametrize("db_fixture", ["pg_db", "mariadb_db"])
def test_sync_runs_batches_in_worker_processes(request, db_fixture, tmp_path, capsys):
    """``sync --jobs 2`` runs a source's batches in two worker processes at once: one line per
    table in order, every table landed and merged, and a broken table failing alone."""
    from tests.helpers import run_cli

    db = request.getfixturevalue(db_fixture)
    create_tables(db)
    config = write_config(tmp_path, db, max_tables_per_run=3)
    code, out, err = run_cli(capsys, "--config", str(config), "discover")
    assert code == 0, err
    db.run("ALTER TABLE t05 RENAME COLUMN updated_at TO changed_at")  # its copy fails: column gone
    code, out, err = run_cli(capsys, "--config", str(config), "sync", "--jobs", "2")
    assert code == 1
    assert "t05" in err and "updated_at" in err
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_run_records(dg.RunsFilter(tags={"incremental_assets/source": "erp"}))
        pids = {r.dagster_run.tags["incremental_assets/process"].rsplit("-", 2)[1] for r in runs}
    assert len(runs) == 3 and len(pids) == 2  # 8 tables, 3 a run: the batches ran in two worker processes
    for i in range(N):
        if i == 5:
            continue
        name = f"t{i:02d}"
        lines = [line for line in out.splitlines() if line.startswith(f"{name}: ")]
        assert lines, name
        if i % 4 == 3:  # empty: nothing landed, nothing merged
            assert lines == [f"{name}: up to date"]
        else:
            assert replica_rows(tmp_path, name) == [(1, i), (2, i)], name
    assert f"{N} table(s): 8 copied, 3 up to date, 1 failed" in out
