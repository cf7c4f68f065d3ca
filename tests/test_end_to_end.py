"""End to end as a user runs it: a configuration file, `incremental-assets sync`, real databases,
a real Dagster instance in DAGSTER_HOME, and the landed files read back."""

from __future__ import annotations

import datetime as dt

import dagster as dg
import pytest
import sqlalchemy as sa

from tests.helpers import ADF_ROWS, after_horizon, fresh_time, adf_table, create_adf_table, insert_rows, landed, landed_rows, run_cli, write_config
from incremental_assets.config import load_config
from incremental_assets.defs.landing import landing_tables


pytestmark = pytest.mark.usefixtures("dagster_home")


def materializations(home, table="data_source_table"):
    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.fetch_materializations(dg.AssetKey(["landing", table]), limit=1000).records
        return [
            {k: v.value for k, v in r.asset_materialization.metadata.items()} | {"partition": r.partition_key}
            for r in reversed(records)
        ]


@pytest.mark.parametrize("db_fixture", ["sqlite_db", "pg_db", "mariadb_db", "mariadb_mysqlclient_db"])
def test_adf_tutorial_one_table_copies_only_new_rows(request, db_fixture, tmp_path, capsys, dagster_home):
    db = request.getfixturevalue(db_fixture)
    create_adf_table(db)
    config = write_config(tmp_path, db.url, [adf_table()])
    landing = str(tmp_path / "landing")

    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert "5 row(s)" in out
    assert landed_rows(landing, "data_source_table") == [(p, n) for p, n, _ in ADF_ROWS]
    first = materializations(dagster_home)[-1]
    assert first["previous_watermark"] == "(start)"
    assert first["rows_copied"] == first["dagster/partition_row_count"] == 5
    assert first["dagster/table_name"].endswith("/landing/data_source_table")
    assert [c.name for c in first["dagster/column_schema"].columns] == ["PersonID", "Name", "LastModifytime"]
    assert first["rows_ahead"] == 0 and first["lag_seconds"] == 0
    assert first["source_newest_watermark"] == "2017-09-05T08:06:00+00:00"
    assert first["max_watermark_copied"] == "2017-09-05T08:06:00+00:00"
    # the frontier stops just above the highest value copied, not at the window's end or the clock
    assert first["frontier"] == "2017-09-05T08:06:00.000001+00:00"
    assert first["new_watermark"] == "2017-10-01T00:00:00+00:00"

    # ADF's next step: new rows arrive; only they are copied
    now = fresh_time()
    insert_rows(db, [(6, "newdata", now), (7, "newdata", now)])
    after_horizon()
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert "2 row(s)" in out
    files, data = landed(landing, "data_source_table")
    assert sorted(data.column("PersonID").to_pylist()) == [1, 2, 3, 4, 5, 6, 7]  # nothing twice
    last = materializations(dagster_home)[-1]
    assert last["previous_watermark"] == first["frontier"]
    assert last["rows_copied"] == last["dagster/partition_row_count"] == 2
    assert last["partition"] == now.strftime("%Y-%m-01")
    # the months between hold no row: recorded as empty, so the table does not look mostly missing
    empty = [m for m in materializations(dagster_home) if m.get("empty_window")]
    assert empty and {m["dagster/partition_row_count"] for m in empty} == {0}
    assert empty[0]["partition"] == "2017-10-01" and empty[-1]["partition"] < last["partition"]
    assert len({m["partition"] for m in materializations(dagster_home)}) == len(
        landing_tables(load_config(config))[0].partitions_def.get_partition_keys())

    # nothing new: nothing runs
    code, out, _ = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0 and "up to date" in out
    code, out, _ = run_cli(capsys, "--config", str(config), "status")
    assert code == 0 and "data_source_table" in out and out.strip().endswith("0")


def test_landed_values_are_exact(pg_db, tmp_path, capsys):
    pg_db.run(
        "CREATE TABLE t (id int PRIMARY KEY, amount numeric(18,4), at timestamptz, note text, blob bytea, ok boolean)",
        "INSERT INTO t VALUES (1, 12345678901234.5678, '2026-10-31 01:59:59.123456+02', 'é, \"quoted\"', '\\x00ff', true),"
        " (2, NULL, '2026-10-31 02:00:00.000001+00', NULL, NULL, NULL)",
    )
    config = write_config(tmp_path, pg_db.url, [{"name": "t", "table": "t", "watermark_column": "at",
                                                  "partitions": {"granularity": "daily", "start": "2026-10-30"}}])
    code, _, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    _, data = landed(str(tmp_path / "landing"), "t")
    rows = sorted(data.to_pylist(), key=lambda r: r["id"])
    import decimal

    assert rows[0]["amount"] == decimal.Decimal("12345678901234.5678")
    assert rows[0]["at"] == dt.datetime(2026, 10, 30, 23, 59, 59, 123456, tzinfo=dt.timezone.utc)
    assert str(data.schema.field("at").type) == "timestamp[us, tz=UTC]"
    assert rows[0]["note"] == 'é, "quoted"' and rows[0]["blob"] == b"\x00\xff" and rows[0]["ok"] is True
    assert rows[1]["amount"] is None and rows[1]["at"].microsecond == 1
    # windows are over the watermark's own time: 2026-10-30 and 2026-10-31 (UTC)
    files, _ = landed(str(tmp_path / "landing"), "t")
    assert {f.split("/")[1] for f in files} == {"2026-10-30", "2026-10-31"}


def test_late_commit_on_postgresql_timestamp_and_id(pg_db, tmp_path, capsys):
    """A transaction that began before rows already copied commits afterwards: its rows still land, once."""
    pg_db.run(
        "CREATE TABLE events (id serial PRIMARY KEY, name text, modified timestamptz NOT NULL DEFAULT now())",
        "CREATE INDEX ON events (modified)",
    )
    config = write_config(tmp_path, pg_db.url, [
        {"name": "by_time", "table": "events", "watermark_column": "modified", "partitions": {"start": "2026-01-01"}},
        {"name": "by_id", "table": "events", "watermark_column": "id", "partitions": {"start": "2026-01-01"}},
    ])
    late = sa.create_engine(pg_db.url)
    conn = late.connect()
    trans = conn.begin()
    conn.execute(sa.text("INSERT INTO events (name) VALUES ('late')"))  # takes id 1 and now() = its start
    pg_db.run("INSERT INTO events (name) VALUES ('early')")  # id 2, committed first
    try:
        code, out, err = run_cli(capsys, "--config", str(config), "sync")
        assert code == 0, err
        landing = str(tmp_path / "landing")
        # neither watermark may move past the open transaction's row, and sync says what holds it
        assert "by_time: not copied yet: rows of events wait behind the safe horizon: held back by" in out, out
        assert landed_rows(landing, "by_time", ("id", "name")) == []
        assert landed_rows(landing, "by_id", ("id", "name")) == []
    finally:
        trans.commit()
        conn.close()
        late.dispose()
    after_horizon()  # the rows carry the transaction's start, a moment ago
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    for table in ("by_time", "by_id"):
        assert landed_rows(landing, table, ("id", "name")) == [(1, "late"), (2, "early")], (table, out)


def test_backfill_replaces_window_files(sqlite_db, tmp_path, capsys, dagster_home):
    create_adf_table(sqlite_db)
    config = write_config(tmp_path, sqlite_db.url, [adf_table()])  # monthly windows from 2017-09
    assert run_cli(capsys, "--config", str(config), "sync")[0] == 0
    landing = str(tmp_path / "landing")
    files_before, _ = landed(landing, "data_source_table")
    # a row is corrected inside an old window; a backfill of that window re-copies it and replaces its files
    sqlite_db.run("UPDATE data_source_table SET Name = 'BBBB', LastModifytime = '2017-09-02 06:00:00' WHERE PersonID = 2")
    from incremental_assets.definitions import load_definitions

    defs = load_definitions(config)
    with dg.DagsterInstance.get() as instance:
        asset = defs.resolve_assets_def(dg.AssetKey(["landing", "data_source_table"]))
        result = dg.materialize([asset], instance=instance, partition_key="2017-09-01", tags={"dagster/backfill": "manual"})
        assert result.success
    files_after, data = landed(landing, "data_source_table")
    window_files = [f for f in files_after if "/2017-09-01/" in f]
    assert len(window_files) == 1 and window_files[0].split("/")[-1].startswith("start__")
    assert sorted(zip(data.column("PersonID").to_pylist(), data.column("Name").to_pylist())) == [
        (1, "aaaa"), (2, "BBBB"), (3, "cccc"), (4, "dddd"), (5, "eeee")]
    assert len(files_after) == len(files_before)
    assert materializations(dagster_home)[-1]["run_mode"] == "refresh"


def test_integer_watermark_capture_windows_and_replay(pg_db, tmp_path, capsys, dagster_home):
    pg_db.run("CREATE TABLE orders (id bigserial PRIMARY KEY, item text)",
              "INSERT INTO orders (item) SELECT 'item ' || g FROM generate_series(1, 100) g")
    config = write_config(tmp_path, pg_db.url, [{"name": "orders", "table": "orders", "watermark_column": "id",
                                                  "partitions": {"start": "2026-01-01"}}])
    assert run_cli(capsys, "--config", str(config), "sync")[0] == 0
    pg_db.run("INSERT INTO orders (item) VALUES ('a'), ('b')")
    code, out, _ = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0 and "2 row(s)" in out
    mats = materializations(dagster_home, "orders")
    assert [m["previous_watermark"] for m in mats] == ["(start)", "101"]
    assert [m["new_watermark"] for m in mats] == ["101", "103"]
    landing = str(tmp_path / "landing")
    files, data = landed(landing, "orders")
    assert len(files) == 2 and data.num_rows == 102
    today = mats[-1]["partition"]
    # replaying the window re-copies the ranges its materializations recorded, as one file
    from incremental_assets.definitions import load_definitions

    defs = load_definitions(config)
    with dg.DagsterInstance.get() as instance:
        asset = defs.resolve_assets_def(dg.AssetKey(["landing", "orders"]))
        assert dg.materialize([asset], instance=instance, partition_key=today, tags={"dagster/backfill": "x"}).success
    files, data = landed(landing, "orders")
    assert len(files) == 1 and sorted(data.column("id").to_pylist()) == list(range(1, 103))
    assert materializations(dagster_home, "orders")[-1]["run_mode"] == "replay"


def test_null_watermarks_fail_by_default_and_warn_when_asked(sqlite_db, tmp_path, capsys):
    create_adf_table(sqlite_db)
    sqlite_db.run("INSERT INTO data_source_table VALUES (9, 'no time', NULL)")
    config = write_config(tmp_path, sqlite_db.url, [adf_table()])
    code, _, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 1
    assert "NULL" in err and "LastModifytime" in err and "data_source_table" in err and "null_watermark" in err
    assert landed_rows(str(tmp_path / "landing"), "data_source_table") == []  # nothing recorded, nothing landed
    config = write_config(tmp_path, sqlite_db.url, [adf_table(null_watermark="warn")])
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert len(landed_rows(str(tmp_path / "landing"), "data_source_table")) == 5


def test_failed_write_then_retry_loses_and_doubles_nothing(sqlite_db, tmp_path, capsys):
    create_adf_table(sqlite_db)
    landing = tmp_path / "landing"
    (landing).mkdir()
    (landing / "data_source_table").write_text("a file where the table's folder should be")
    config = write_config(tmp_path, sqlite_db.url, [adf_table()])
    code, _, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 1 and "data_source_table" in err
    (landing / "data_source_table").unlink()
    code, _, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert landed_rows(str(landing), "data_source_table") == [(p, n) for p, n, _ in ADF_ROWS]


def test_orphan_file_of_an_unrecorded_attempt_is_replaced(sqlite_db, tmp_path, capsys):
    create_adf_table(sqlite_db)
    config = write_config(tmp_path, sqlite_db.url, [adf_table()])
    assert run_cli(capsys, "--config", str(config), "sync")[0] == 0
    landing = tmp_path / "landing"
    # an attempt that landed a file and died before recording its watermark
    now = fresh_time()
    insert_rows(sqlite_db, [(6, "x", now)])
    after_horizon()
    orphan_dir = landing / "data_source_table" / now.strftime("%Y-%m-01")
    orphan_dir.mkdir(parents=True, exist_ok=True)
    import shutil

    first = next((landing / "data_source_table").rglob("*.parquet"))
    frontier_token = "20990101T000000000000Z"
    shutil.copy(first, orphan_dir / f"{frontier_token}__20990102T000000000000Z.parquet")
    assert run_cli(capsys, "--config", str(config), "sync")[0] == 0
    ids = [p for p, _ in landed_rows(str(landing), "data_source_table")]
    assert ids == [1, 2, 3, 4, 5, 6]


def test_secrets_never_reach_output_or_metadata(pg_db, tmp_path, capsys, monkeypatch, dagster_home):
    create_adf_table(pg_db)
    secret = "s3cr3t-Pa55"
    url = sa.make_url(pg_db.url).set(password=secret).render_as_string(hide_password=False)
    monkeypatch.setenv("SOURCE_URL", url)
    config = write_config(tmp_path, "${SOURCE_URL}", [adf_table()])
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert secret not in out + err
    assert secret not in str(materializations(dagster_home))
    # a source that is down: retried, then a failure naming the source and never the password
    monkeypatch.setenv("SOURCE_URL", sa.make_url(url).set(port=1).render_as_string(hide_password=False))
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 1
    assert "'src'" in err and "unreachable" in err and secret not in out + err
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        runs = instance.get_runs()
        all_text = " ".join(str(e) for run in runs for e in instance.all_logs(run.run_id))
    assert runs and secret not in all_text


def test_landing_into_azurite(sqlite_db, tmp_path, capsys, azure_container, monkeypatch):
    create_adf_table(sqlite_db)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azure_container.connection_string)
    landing = f"azure://{azure_container.name}/adf"
    config = write_config(tmp_path, sqlite_db.url, [adf_table()], landing=landing)
    code, _, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    files, data = landed(landing, "data_source_table")
    assert files and all(f.startswith("data_source_table/") for f in files)
    assert sorted(data.column("PersonID").to_pylist()) == [1, 2, 3, 4, 5]


def test_landing_into_azurite_through_dagster_azure_with_account_url_and_key(sqlite_db, tmp_path, capsys, azure_container, azurite, monkeypatch):
    create_adf_table(sqlite_db)
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_URL", azurite.blob_endpoint)
    monkeypatch.setenv("AZURE_STORAGE_KEY", azurite.account_key)
    landing = f"azure://{azure_container.name}"
    config = write_config(tmp_path, sqlite_db.url, [adf_table()], landing=landing)
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert azurite.account_key not in out + err
    files, data = landed(landing, "data_source_table", env={"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string})
    assert sorted(data.column("PersonID").to_pylist()) == [1, 2, 3, 4, 5]


def test_missing_azure_container_fails_clearly(sqlite_db, tmp_path, capsys, azurite, monkeypatch):
    create_adf_table(sqlite_db)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    config = write_config(tmp_path, sqlite_db.url, [adf_table()], landing="azure://no-such-container/x")
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 1
    assert "no-such-container" in err and azurite.account_key not in out + err


def test_sensor_requests_initial_load_then_only_new_windows(sqlite_db, tmp_path, monkeypatch):
    create_adf_table(sqlite_db)  # one row on each day from 2017-09-01 to 2017-09-05
    config = write_config(tmp_path, sqlite_db.url, [adf_table(partitions={"granularity": "daily", "start": "2017-01-01"})])
    from incremental_assets.definitions import load_definitions

    defs = load_definitions(config)
    sensor = defs.resolve_sensor_def("incremental_copy_src_sensor")
    with dg.DagsterInstance.get() as instance:
        def tick():
            with dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs) as ctx:
                data = sensor.evaluate_tick(ctx)
                return data.run_requests[0] if data.run_requests else data.skip_message

        request = tick()
        assert isinstance(request, dg.RunRequest)
        # the initial load is one run over the windows holding rows, not one run per window, nor
        # a run over every window from the configured start to now
        assert request.tags["dagster/asset_partition_range_start"] == "2017-09-01"
        assert request.tags["dagster/asset_partition_range_end"] == "2017-09-05"
        assert request.partition_key is None
        assert list(request.asset_selection) == [dg.AssetKey(["landing", "data_source_table"])]
        asset = defs.resolve_assets_def(dg.AssetKey(["landing", "data_source_table"]))
        assert dg.materialize([asset], instance=instance, tags=request.tags).success
        assert "no new rows" in tick()
        now = fresh_time()
        insert_rows(sqlite_db, [(6, "new", now)])
        after_horizon()
        request = tick()
        assert isinstance(request, dg.RunRequest)
        assert request.partition_key == now.strftime("%Y-%m-%d")  # not the empty windows since 2017-09-05


def test_a_run_spans_the_windows_holding_rows_not_every_window_since_the_start(sqlite_db, tmp_path, capsys, dagster_home):
    """Daily windows from 2017-01-01 to today are over 3000; the rows are in five of them. The
    initial load runs over those five (each window of a run costs Dagster bookkeeping), the next
    over today's alone; no row is lost or copied twice, and a row that appears between the frontier
    and the run's first window after the run was planned keeps the frontier where it was, so the
    next sync takes it."""
    from incremental_assets.definitions import load_definitions
    from incremental_assets.defs.sensors import plan_copy
    from incremental_assets.defs.landing import landing_tables
    from incremental_assets.config import load_config

    create_adf_table(sqlite_db)  # one row on each day from 2017-09-01 to 2017-09-05
    config = write_config(tmp_path, sqlite_db.url, [adf_table(partitions={"granularity": "daily", "start": "2017-01-01"})])
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert "[2017-09-01...2017-09-05] 5 row(s)" in out
    done = [m for m in materializations(dagster_home) if not m.get("empty_window")]
    assert sorted(m["partition"] for m in done) == [f"2017-09-0{d}" for d in range(1, 6)]
    # the 243 daily windows before the first row are more than a run records as empty (120):
    # they stay unmaterialized, and cost no event (docs/metadata.md, "Empty windows")
    before = [k for k in landing_tables(load_config(config))[0].partitions_def.get_partition_keys() if k < "2017-09-01"]
    assert len(before) == 243
    assert [m for m in materializations(dagster_home) if m.get("empty_window")] == []
    # each window's materialization shows its own row and file, the watermarks are the run's
    assert all(m["dagster/partition_row_count"] == 1 and m["rows_copied"] == 1 and m["file_count"] == 1 for m in done)
    assert all(len(m["files"]) == 1 and f"/{m['partition']}/" in m["files"][0] for m in done)
    assert {m["frontier"] for m in done} == {"2017-09-05T08:06:00.000001+00:00"}  # just above the highest copied
    assert done[-1]["previous_watermark"] == "(start)"

    # planned over today's window; then a row stamped yesterday commits before the run starts
    now = fresh_time()
    insert_rows(sqlite_db, [(6, "new", now)])
    after_horizon()
    defs = load_definitions(config)
    table = landing_tables(load_config(config))[0]
    with dg.DagsterInstance.get() as instance:
        request = plan_copy(table, defs.resources[table.source_key].get(), instance).request
        assert request.partition_key == f"{now:%Y-%m-%d}"
        yesterday = now - dt.timedelta(days=1)
        insert_rows(sqlite_db, [(7, "late", yesterday)])
        asset = defs.resolve_assets_def(dg.AssetKey(["landing", "data_source_table"]))
        assert dg.materialize([asset], instance=instance, partition_key=request.partition_key, tags=request.tags).success
    kept = materializations(dagster_home)[-1]
    assert kept["partition"] == f"{now:%Y-%m-%d}" and kept["rows_copied"] == 1
    assert kept["frontier"] == "2017-09-05T08:06:00.000001+00:00"  # row 7 lies between it and the run's window

    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert f"[{yesterday:%Y-%m-%d}...{now:%Y-%m-%d}] 2 row(s), watermark 2017-09-05T08:06:00.000001+00:00 -> " in out
    assert landed_rows(str(tmp_path / "landing"), "data_source_table") == (
        [(p, n) for p, n, _ in ADF_ROWS] + [(6, "new"), (7, "late")]  # today's window re-copied, not doubled
    )
    assert materializations(dagster_home)[-1]["frontier"] > now.isoformat()
    code, out, _ = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0 and "up to date" in out


def test_rows_far_apart_are_copied_in_a_run_each_not_one_over_the_empty_windows(sqlite_db, tmp_path, capsys, dagster_home):
    create_adf_table(sqlite_db)  # one row on each day from 2017-09-01 to 2017-09-05
    insert_rows(sqlite_db, [(6, "later", dt.datetime(2017, 11, 20, 12)), (7, "later", dt.datetime(2017, 11, 22, 12))])
    # 92 windows before the first row, 75 in the gap: each under what a run records as empty (120)
    config = write_config(tmp_path, sqlite_db.url, [adf_table(partitions={"granularity": "daily", "start": "2017-06-01"})])
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("data_source_table: [2017-09-01...2017-09-05] 5 row(s), watermark (start) -> 2017-09-06T00:00:00")
    assert lines[1].startswith("data_source_table: [2017-11-20...2017-11-22] 2 row(s), watermark 2017-09-05T08:06:00.000001+00:00 -> ")
    everything = materializations(dagster_home)
    done = [m for m in everything if not m.get("empty_window")]
    assert sorted(m["partition"] for m in done) == [f"2017-09-0{d}" for d in range(1, 6)] + ["2017-11-20", "2017-11-21", "2017-11-22"]
    assert done[-1]["frontier"] == "2017-11-22T12:00:00.000001+00:00"
    # the windows before the first row and in the gap are recorded as empty; none after the last row
    empty = sorted(m["partition"] for m in everything if m.get("empty_window"))
    keys = landing_tables(load_config(config))[0].partitions_def.get_partition_keys()
    assert empty == [k for k in keys if k < "2017-09-01" or "2017-09-05" < k < "2017-11-20"]
    assert landed_rows(str(tmp_path / "landing"), "data_source_table") == [(p, n) for p, n, _ in ADF_ROWS] + [(6, "later"), (7, "later")]
    assert "up to date" in run_cli(capsys, "--config", str(config), "sync")[1]


def test_sync_says_when_the_watermark_has_no_index(pg_db, tmp_path, capsys):
    create_adf_table(pg_db, index=False)
    config = write_config(tmp_path, pg_db.url, [adf_table(partitions={"granularity": "daily", "start": "2017-09-01"})])
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert "no index leads with 'LastModifytime' on 'data_source_table'" in err
    assert 'CREATE INDEX "ix_data_source_table_LastModifytime" ON data_source_table ("LastModifytime")' in err
    assert landed_rows(str(tmp_path / "landing"), "data_source_table") == [(p, n) for p, n, _ in ADF_ROWS]
    pg_db.run('CREATE INDEX ON data_source_table ("LastModifytime")')
    from incremental_assets.defs import landing as landing_defs

    landing_defs._DESCRIBED.clear()  # the reflection a new process would make (a running one: within seconds)
    insert_rows(pg_db, [(6, "new", fresh_time())])
    after_horizon()
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0 and "1 row(s)" in out and "no index" not in err


def test_the_missing_index_hint_quotes_every_name(pg_db, tmp_path, capsys):
    """The hint is SQL a user may paste: a hostile table name stays a name."""
    name = "x; DROP TABLE victim; --"
    pg_db.run("CREATE TABLE victim (id int)", f'CREATE TABLE "{name}" (id int, "Ts" timestamp)',
              f"INSERT INTO \"{name}\" VALUES (1, '2017-09-01 00:00:00')")
    config = write_config(tmp_path, pg_db.url, [{"name": "hostile", "table": name, "watermark_column": "Ts",
                                                  "partitions": {"start": "2017-09-01"}}])
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    hint = err.split("Create one, e.g. ", 1)[1].splitlines()[0]
    pg_db.run(hint)  # runs as printed: creates the index, drops nothing
    assert pg_db.rows("SELECT count(*) FROM victim") == [(0,)]
    assert pg_db.rows(f"SELECT count(*) FROM pg_indexes WHERE tablename = '{name}'") == [(1,)]


def test_watermark_going_backwards_is_said_out_loud(pg_db, tmp_path, capsys):
    pg_db.run("CREATE TABLE orders (id bigint PRIMARY KEY, item text)",
              "INSERT INTO orders SELECT g, 'item' FROM generate_series(1, 10) g")
    config = write_config(tmp_path, pg_db.url, [{"name": "orders", "table": "orders", "watermark_column": "id",
                                                  "partitions": {"start": "2026-01-01"}}])
    assert run_cli(capsys, "--config", str(config), "sync")[0] == 0
    # the table is reset and refilled with ids below those already copied
    pg_db.run("TRUNCATE orders", "INSERT INTO orders SELECT g, 'again' FROM generate_series(1, 3) g")
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert "watermark went backwards" in err and "MAX(id) = 3" in err and "wipe its materializations" in err
    code, out, err = run_cli(capsys, "--config", str(config), "status")
    assert "watermark went backwards" in out


def test_csv_landing_is_adf_delimited_text(sqlite_db, tmp_path, capsys):
    create_adf_table(sqlite_db)
    config = write_config(tmp_path, sqlite_db.url, [adf_table()], fmt="csv")
    assert run_cli(capsys, "--config", str(config), "sync")[0] == 0
    files = sorted((tmp_path / "landing" / "data_source_table").rglob("*.csv"))
    assert len(files) == 1
    lines = files[0].read_text(encoding="utf-8").splitlines()
    assert lines[0].replace('"', "") == "PersonID,Name,LastModifytime"
    assert len(lines) == 6 and lines[1].startswith('1,"aaaa",')


def test_sync_records_its_runs_logs_and_output_for_the_ui(sqlite_db, tmp_path, capsys, dagster_home):
    """A sync's runs are runs like the UI's: their events and logs in the instance, their
    stdout/stderr captured where the instance keeps compute logs (Dagster's default)."""
    create_adf_table(sqlite_db)
    config = write_config(tmp_path, sqlite_db.url, [adf_table()])
    code, _, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        record = instance.fetch_materializations(dg.AssetKey(["landing", "data_source_table"]), limit=1).records[0]
        messages = [e.user_message for e in instance.all_logs(record.run_id)]
    assert any("copied 5 row(s)" in m for m in messages)  # the UI shows the run's logs
    captured = [p for p in (dagster_home / "storage").rglob("*") if p.is_file() and p.suffix in (".out", ".err", ".complete")]
    assert captured  # and its output


def test_a_run_of_many_windows_logs_its_progress_in_a_few_lines(sqlite_db, tmp_path, monkeypatch, dagster_home):
    from incremental_assets.defs import landing as landing_defs
    from incremental_assets.definitions import load_definitions

    create_adf_table(sqlite_db)  # one row on each day from 2017-09-01 to 2017-09-05
    config = write_config(tmp_path, sqlite_db.url, [adf_table(partitions={"granularity": "daily", "start": "2017-09-01"})])
    defs = load_definitions(config)
    asset = defs.resolve_assets_def(dg.AssetKey(["landing", "data_source_table"]))
    job = dg.Definitions(assets=[asset]).resolve_implicit_global_asset_job_def()  # resources come bound

    def copy_lines(first, last):
        with dg.DagsterInstance.get() as instance:
            result = job.execute_in_process(instance=instance, tags={
                "dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last})
            assert result.success
            return [e.user_message for e in instance.all_logs(result.run_id) if " copied " in e.user_message]

    # a quick run of three windows: one line for the three
    (line,) = copy_lines("2017-09-01", "2017-09-03")
    assert line.startswith(
        "data_source_table [2017-09-01 ... 2017-09-03]: copied 3 row(s) in 3 windows with LastModifytime "
        "in [(start), 2017-09-04T00:00:00+00:00) into 3 file(s) in "
    )
    # windows that take their time (here: any) have a line each
    monkeypatch.setattr(landing_defs._CopyProgress, "EVERY_SECONDS", 0.0)
    lines = copy_lines("2017-09-04", "2017-09-05")
    assert [m.split(":")[0] for m in lines] == ["data_source_table [2017-09-04]", "data_source_table [2017-09-05]"]
    assert all("copied 1 row(s) with LastModifytime" in m for m in lines)
    assert landed_rows(str(tmp_path / "landing"), "data_source_table") == [(p, n) for p, n, _ in ADF_ROWS]


def test_the_installed_command_delivers_its_output_and_exit_code(pg_db, tmp_path, dagster_home):
    """The console script's output reaches a pipe (block-buffered) and its exit code is kept."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    command = Path(sys.executable).with_name("incremental-assets")
    if not command.exists():
        pytest.skip(f"the console script is not installed next to {sys.executable}")
    create_adf_table(pg_db)
    config = write_config(tmp_path, pg_db.url, [adf_table()])
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home)}

    done = subprocess.run([str(command), "--config", str(config), "sync"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "data_source_table: [" in done.stdout and "5 row(s)" in done.stdout
    assert landed_rows(str(tmp_path / "landing"), "data_source_table") == [(p, n) for p, n, _ in ADF_ROWS]

    bad = write_config(tmp_path, pg_db.url, [adf_table(table="no_such_table")])
    done = subprocess.run([str(command), "--config", str(bad), "sync"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "no_such_table" in done.stderr and "not found" in done.stderr


@pytest.mark.parametrize("gap_days", [40, 29, 0], ids=["gap", "shorter-gap", "no-gap"])
def test_a_run_stops_before_a_gap_of_empty_windows(sqlite_db, monkeypatch, gap_days):
    """Rows on the first ten days, then none for ``gap_days`` days, then rows again for a month:
    the run planned from the first row ends before a gap of 30 empty daily windows (the next run
    starts after it) and spans a shorter one. With no empty window, the windows are asked about
    a block of 15 at a time, not one by one."""
    from incremental_assets.defs import sensors
    from incremental_assets.sources import Source

    start = dt.datetime(2020, 1, 1, 12)
    days = list(range(10)) + list(range(10 + gap_days, 10 + gap_days + 30))
    create_adf_table(sqlite_db, rows=[(k, f"p{k}", start + dt.timedelta(days=d)) for k, d in enumerate(days)])
    source = Source("src", sqlite_db.url)
    info = source.describe_table("data_source_table", watermark_column="LastModifytime")
    assert info.watermark_indexed
    asked = []
    original = Source.windows_with_rows
    monkeypatch.setattr(Source, "windows_with_rows", lambda self, i, bounds: asked.append(len(bounds)) or original(self, i, bounds))
    pdef = dg.DailyPartitionsDefinition(start_date="2019-12-01", end_offset=1)
    last = (start + dt.timedelta(days=days[-1])).strftime("%Y-%m-%d")
    hi = dt.datetime(2020, 12, 1, tzinfo=dt.timezone.utc)
    end = sensors.stretch_end(pdef, source, info, "2020-01-01", last, hi)
    source.dispose()
    assert end == ("2020-01-10" if gap_days >= sensors.GAP_WINDOWS else last)
    if gap_days == 0:
        assert asked == [-(-len(days) // (sensors.GAP_WINDOWS // 2))]  # 40 windows: 3 blocks, no window alone
