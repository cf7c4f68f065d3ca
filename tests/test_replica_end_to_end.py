"""ADF's second scenario end to end: many tables with their own watermarks, no declared keys,
copied and upserted into a SQL replica, automatically, for new slices and backfilled windows."""

from __future__ import annotations

import datetime as dt

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml

from tests.helpers import after_horizon, fresh_time, run_cli, write_config


pytestmark = pytest.mark.usefixtures("dagster_home")


def create_adf_tables(db):
    """customer_table and project_table as ADF's tutorial creates them: no primary key."""
    db.run(
        'CREATE TABLE customer_table ("PersonID" int, "Name" varchar(255), "LastModifytime" timestamp)',
        'CREATE TABLE project_table ("Project" varchar(255), "Creationtime" timestamp)',
        "INSERT INTO customer_table VALUES (1, 'John', '2017-09-01 00:56:00'), (2, 'Mike', '2017-09-02 05:23:00'),"
        " (3, 'Alice', '2017-09-03 02:36:00'), (4, 'Andy', '2017-09-04 03:21:00'), (5, 'Anny', '2017-09-05 08:06:00')",
        "INSERT INTO project_table VALUES ('project1', '2015-01-01 00:00:00'), ('project2', '2016-02-02 01:23:00'),"
        " ('project3', '2017-03-04 05:16:00')",
    )


TABLES = [
    {"name": "customer_table", "table": "customer_table", "watermark_column": "LastModifytime",
     "primary_key": ["PersonID"], "partitions": {"granularity": "monthly", "start": "2017-09-01"}},
    {"name": "project_table", "table": "project_table", "watermark_column": "Creationtime",
     "primary_key": ["Project"], "partitions": {"granularity": "monthly", "start": "2015-01-01"}},
]


def rows(engine: sa.Engine, query: str):
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(query))]


def norm(value):
    """A value as a user compares it: timestamps by instant, whatever the engine's text form."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None) if value.tzinfo is None else value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def same_rows(source, replica_engine):
    for table, key in (("customer_table", "PersonID"), ("project_table", "Project")):
        q = f'SELECT * FROM {table} ORDER BY "{key}"'
        src = [tuple(norm(v) for v in r) for r in rows(source.engine, q)]
        rep = [tuple(norm(v) for v in r) for r in rows(replica_engine, q)]
        assert rep == src, table


@pytest.mark.parametrize("replica_kind", ["sqlite", "postgresql"])
def test_adf_multi_table_tutorial_into_replica(pg_db, replica_kind, tmp_path, capsys, pg_server):
    create_adf_tables(pg_db)
    if replica_kind == "sqlite":
        replica_url = f"sqlite:///{tmp_path / 'replica.db'}"
    else:
        replica_url = pg_server.url.render_as_string(hide_password=False)
        schema = f"rep_{tmp_path.name[-8:].replace('-', '_').lower()}"
        with pg_server.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        replica_url = pg_server.url.set(query={"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    config = write_config(tmp_path, pg_db.url, TABLES, replica={"url": replica_url})
    replica_engine = sa.create_engine(replica_url)

    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert "5 inserted" in out and "3 inserted" in out and "reconciles with the source" in out
    same_rows(pg_db, replica_engine)

    # ADF's next step: an update and an insert
    now = fresh_time()
    pg_db.run(
        "UPDATE customer_table SET \"Name\" = 'Mike Updated', \"LastModifytime\" = :t WHERE \"PersonID\" = 2",
        "INSERT INTO project_table VALUES ('NewProject', :t)",
        params={"t": now},
    )
    after_horizon()
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert "0 inserted, 1 updated" in out and "1 inserted, 0 updated" in out
    same_rows(pg_db, replica_engine)
    replica_engine.dispose()


def test_replaying_and_reordering_merges_converges(sqlite_db, tmp_path, capsys):
    sqlite_db.run(
        "CREATE TABLE customer_table (PersonID int, Name varchar(255), LastModifytime datetime)",
        "INSERT INTO customer_table VALUES (1, 'John', '2017-09-01 00:56:00'), (2, 'Mike', '2017-09-02 05:23:00')",
    )
    replica_url = f"sqlite:///{tmp_path / 'replica.db'}"
    config = write_config(tmp_path, sqlite_db.url, TABLES[:1], replica={"url": replica_url})
    assert run_cli(capsys, "--config", str(config), "sync")[0] == 0
    now = fresh_time()
    sqlite_db.run("UPDATE customer_table SET Name = 'Mike v2', LastModifytime = :t WHERE PersonID = 2",
                  params={"t": now.strftime("%Y-%m-%d %H:%M:%S")})
    after_horizon()
    assert run_cli(capsys, "--config", str(config), "sync")[0] == 0
    engine = sa.create_engine(replica_url)
    assert rows(engine, "SELECT Name FROM customer_table WHERE PersonID = 2") == [("Mike v2",)]

    # replay the old window (holding Mike's first version) after the newer one: nothing goes back
    from incremental_assets.definitions import load_definitions

    defs = load_definitions(config)
    with dg.DagsterInstance.get() as instance:
        replica_asset = defs.resolve_assets_def(dg.AssetKey(["replica", "customer_table"]))
        # forget what was merged: a full replay of every window, in reverse order of windows
        instance.wipe_assets([dg.AssetKey(["replica", "customer_table"])])
        pdef = replica_asset.partitions_def
        for key in reversed(pdef.get_partition_keys()[:1] + pdef.get_partition_keys()[-1:]):
            result = dg.materialize([replica_asset], instance=instance, partition_key=key)
            assert result.success
            assert all(c.passed for c in result.get_asset_check_evaluations())
    assert rows(engine, "SELECT PersonID, Name FROM customer_table ORDER BY PersonID") == [(1, "John"), (2, "Mike v2")]
    engine.dispose()


def test_table_without_any_key_fails_clearly(sqlite_db, tmp_path, capsys):
    sqlite_db.run("CREATE TABLE project_table (Project varchar(255), Creationtime datetime)",
                  "INSERT INTO project_table VALUES ('project1', '2015-01-01 00:00:00')")
    table = {**TABLES[1]}
    table.pop("primary_key")
    config = write_config(tmp_path, sqlite_db.url, [table], replica={"url": f"sqlite:///{tmp_path / 'r.db'}"})
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 1
    assert "no merge key" in err and "project_table" in err and "primary_key" in err
    # the landing stays; the merge can be re-run once the key is configured
    assert "1 row(s)" in out
    config.write_text(config.read_text().replace("watermark_column: Creationtime", "watermark_column: Creationtime\n  primary_key: [Project]"))
    assert yaml.safe_load(config.read_text())["tables"][0]["primary_key"] == ["Project"]
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert "1 inserted" in out


def test_replica_down_keeps_landing_and_merge_reruns(sqlite_db, tmp_path, capsys, monkeypatch):
    sqlite_db.run("CREATE TABLE customer_table (PersonID int, Name varchar(255), LastModifytime datetime)",
                  "INSERT INTO customer_table VALUES (1, 'John', '2017-09-01 00:56:00')")
    monkeypatch.setenv("REPLICA_URL", "postgresql+psycopg://u:hunter2@127.0.0.1:1/x")
    daily = [{**TABLES[0], "partitions": {"granularity": "daily", "start": "2017-06-01"}}]  # 92 empty windows
    config = write_config(tmp_path, sqlite_db.url, daily,
                          replica={"url": "${REPLICA_URL}", "retries": 1, "retry_delay_seconds": 0.1},
                          run_retries={"max_retries": 0})
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 1 and "hunter2" not in out + err
    assert "1 row(s)" in out  # landed
    monkeypatch.setenv("REPLICA_URL", f"sqlite:///{tmp_path / 'r.db'}")
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert "1 inserted" in out
    # the merge read the window that was landed; the windows before the first row, recorded as
    # empty by the copy (docs/metadata.md), are recorded merged with no file
    with dg.DagsterInstance.get() as instance:
        merged = instance.fetch_materializations(dg.AssetKey(["replica", "customer_table"]), limit=1000).records
        empty = {r.partition_key for r in instance.fetch_materializations(
            dg.AssetKey(["landing", "customer_table"]), limit=1000).records
            if r.asset_materialization.metadata.get("empty_window")}
    with_files = [r.partition_key for r in merged if r.asset_materialization.metadata["files_merged"].value]
    assert with_files == ["2017-09-01"]
    assert {r.partition_key for r in merged} - {"2017-09-01"} == empty and "2017-08-31" in empty


def test_sensor_merges_new_slices_and_backfilled_windows(sqlite_db, tmp_path):
    sqlite_db.run("CREATE TABLE customer_table (PersonID int, Name varchar(255), LastModifytime datetime)",
                  "INSERT INTO customer_table VALUES (1, 'John', '2017-09-01 00:56:00')")
    config = write_config(tmp_path, sqlite_db.url, TABLES[:1], replica={"url": f"sqlite:///{tmp_path / 'r.db'}"})
    from incremental_assets.definitions import load_definitions

    defs = load_definitions(config)
    landing = defs.resolve_assets_def(dg.AssetKey(["landing", "customer_table"]))
    sensor = defs.resolve_sensor_def("incremental_copy_src_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    merge = defs.resolve_assets_def(dg.AssetKey(["replica", "customer_table"]))
    with dg.DagsterInstance.get() as instance:
        def tick():
            with dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs) as ctx:
                return sensor.evaluate_tick(ctx).run_requests

        def run(request):
            assert dg.materialize([merge], instance=instance, partition_key=request.partition_key, tags=request.tags).success

        # the initial load: one run that lands the window and merges it
        (request,) = tick()
        assert request.asset_selection == [dg.AssetKey(["landing", "customer_table"]), dg.AssetKey(["replica", "customer_table"])]
        assert request.partition_key == "2017-09-01"
        job = defs.resolve_job_def(request.job_name)
        assert job.execute_in_process(instance=instance, asset_selection=request.asset_selection,
                                      partition_key=request.partition_key, tags=request.tags).success
        assert tick() == []  # landed and merged: nothing pending
        # a window landed by hand (the UI, say) is merged by the next tick, alone
        sqlite_db.run("UPDATE customer_table SET Name = 'Johnny'")
        assert dg.materialize([landing], instance=instance, partition_key="2017-09-01", tags={"dagster/backfill": "b0"}).success
        (request,) = tick()
        assert request.asset_selection == [dg.AssetKey(["replica", "customer_table"])]
        assert request.partition_key == "2017-09-01"
        run(request)
        assert tick() == []  # merged: nothing pending
        # a backfilled (old) window triggers the merge too, not only the latest window
        assert dg.materialize([landing], instance=instance, partition_key="2017-10-01", tags={"dagster/backfill": "b1"}).success
        (request,) = tick()
        assert request.partition_key == "2017-10-01"
        run(request)
        # a range run (initial load) becomes one merge run over the same range
        assert dg.materialize([landing], instance=instance, tags={"dagster/asset_partition_range_start": "2018-01-01",
                                                                   "dagster/asset_partition_range_end": "2018-03-01"}).success
        (request,) = tick()
        assert request.tags["dagster/asset_partition_range_start"] == "2018-01-01"
        assert request.tags["dagster/asset_partition_range_end"] == "2018-03-01"
        run(request)
        assert tick() == []
