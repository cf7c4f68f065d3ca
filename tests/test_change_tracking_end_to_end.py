"""ADF's third scenario end to end: change tracking installed by the CLI, a full copy, then net
inserts, updates and deletes landed with their versions and applied to the replica."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.helpers import landed, run_cli, write_config


pytestmark = pytest.mark.usefixtures("dagster_home")


TABLE = {"name": "data_source_table", "table": "data_source_table", "mode": "change_tracking",
         "partitions": {"start": "2026-01-01"}}


def replica_rows(url):
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = sorted(tuple(r) for r in conn.execute(sa.text('SELECT "PersonID", "Name", "Age" FROM data_source_table')))
    engine.dispose()
    return rows


def source_rows(db):
    return sorted(db.rows('SELECT "PersonID", "Name", "Age" FROM data_source_table'))


@pytest.mark.parametrize("db_fixture", ["sqlite_db", "pg_db"])
def test_adf_change_tracking_tutorial(request, db_fixture, tmp_path, capsys):
    db = request.getfixturevalue(db_fixture)
    db.run(
        'CREATE TABLE data_source_table ("PersonID" int NOT NULL PRIMARY KEY, "Name" varchar(255), "Age" int)',
        "INSERT INTO data_source_table VALUES (1, 'aaaa', 21), (2, 'bbbb', 24), (3, 'cccc', 20), (4, 'dddd', 26), (5, 'eeee', 22)",
    )
    replica_url = f"sqlite:///{tmp_path / 'replica.db'}"
    config = write_config(tmp_path, db.url, [{**TABLE, "mode": "change_tracking"}], replica={"url": replica_url})
    # not enabled yet: the error says which command enables it
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 1 and "enable-change-tracking --table data_source_table" in err
    code, out, err = run_cli(capsys, "--config", str(config), "enable-change-tracking", "--table", "data_source_table")
    assert code == 0, err
    assert "enabled" in out

    # the full copy
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert "5 row(s)" in out and "5 inserted" in out
    assert replica_rows(replica_url) == source_rows(db)

    # ADF's next step: an insert and an update land as one I and one U row with their versions
    db.run("INSERT INTO data_source_table VALUES (6, 'new', 50)", "UPDATE data_source_table SET \"Age\" = 10 WHERE \"PersonID\" = 1")
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    data = landed_file(tmp_path, latest_delta(tmp_path))
    by_key = {r["PersonID"]: r for r in data.to_pylist()}
    assert set(by_key) == {1, 6}
    assert by_key[6]["SYS_CHANGE_OPERATION"] == "I" and by_key[1]["SYS_CHANGE_OPERATION"] == "U"
    assert by_key[1]["Age"] == 10 and all(r["SYS_CHANGE_VERSION"] is not None for r in by_key.values())
    assert replica_rows(replica_url) == source_rows(db)

    # a delete lands as a D row with its key, and the replica loses the row
    db.run('DELETE FROM data_source_table WHERE "PersonID" = 2')
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    rows = landed_file(tmp_path, latest_delta(tmp_path)).to_pylist()
    assert [(r["PersonID"], r["SYS_CHANGE_OPERATION"]) for r in rows] == [(2, "D")]
    assert replica_rows(replica_url) == source_rows(db)
    assert "reconciles with the source" in out

    code, out, _ = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0 and "up to date" in out
    code, out, err = run_cli(capsys, "--config", str(config), "disable-change-tracking", "--table", "data_source_table")
    assert code == 0, err


def test_status_warns_when_the_last_copy_nears_the_retention(sqlite_db, tmp_path, capsys):
    from incremental_assets.sources import Source
    from incremental_assets.tracking import enable_change_tracking

    sqlite_db.run('CREATE TABLE data_source_table ("PersonID" int NOT NULL PRIMARY KEY, "Name" varchar(255), "Age" int)',
                  "INSERT INTO data_source_table VALUES (1, 'aaaa', 21)")
    import datetime as dt
    import time

    enable_change_tracking(Source("src", sqlite_db.url), "data_source_table", retention=dt.timedelta(seconds=2))
    config = write_config(tmp_path, sqlite_db.url, [TABLE])
    assert run_cli(capsys, "--config", str(config), "sync")[0] == 0
    code, out, _ = run_cli(capsys, "--config", str(config), "status")
    assert "retention" not in out
    time.sleep(1.8)
    code, out, _ = run_cli(capsys, "--config", str(config), "status")
    assert "close to the change retention" in out


def latest_delta(tmp_path) -> str:
    """The newest change slice (not the full copy, whose name starts with 'start')."""
    files, _ = landed(str(tmp_path / "landing"), "data_source_table")
    return sorted(f for f in files if not f.rsplit("/", 1)[-1].startswith("start"))[-1]


def landed_file(tmp_path, path):
    from incremental_assets.landing import open_landing_store

    return open_landing_store(str(tmp_path / "landing")).read_arrow(path)


def test_forced_reinitialisation_replaces_the_replica(sqlite_db, tmp_path, capsys):
    """Rows deleted while change tracking could not serve them vanish from the replica after the full copy."""
    from incremental_assets.sources import Source
    from incremental_assets.tracking import cleanup_change_tracking

    db = sqlite_db
    db.run('CREATE TABLE data_source_table ("PersonID" int NOT NULL PRIMARY KEY, "Name" varchar(255), "Age" int)',
           "INSERT INTO data_source_table VALUES (1, 'aaaa', 21), (2, 'bbbb', 24), (3, 'cccc', 20)")
    replica_url = f"sqlite:///{tmp_path / 'replica.db'}"
    config = write_config(tmp_path, db.url, [TABLE], replica={"url": replica_url})
    assert run_cli(capsys, "--config", str(config), "enable-change-tracking", "--table", "data_source_table")[0] == 0
    assert run_cli(capsys, "--config", str(config), "sync")[0] == 0
    db.run('DELETE FROM data_source_table WHERE "PersonID" = 3', "INSERT INTO data_source_table VALUES (4, 'dddd', 30)")
    # the retained changes are cleaned up: the recorded version is now below the minimum valid one
    import datetime as dt

    cleanup_change_tracking(Source("src", db.url), "data_source_table", retention=dt.timedelta(0))
    code, out, err = run_cli(capsys, "--config", str(config), "status")
    assert "below the minimum valid version" in out
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert replica_rows(replica_url) == source_rows(db)
    # with on_expired: fail the run stops instead, naming the table
    db.run('DELETE FROM data_source_table WHERE "PersonID" = 4')
    cleanup_change_tracking(Source("src", db.url), "data_source_table", retention=dt.timedelta(0))
    config = write_config(tmp_path, db.url, [{**TABLE, "on_expired": "fail"}], replica={"url": replica_url})
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 1 and "data_source_table" in err and "minimum valid version" in err
