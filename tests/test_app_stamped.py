"""Watermarks stamped by an application, as Azure Data Factory's tutorials stamp them: values
written later may lie anywhere above the highest value copied — far below the database's clock —
and must still be copied, once. Replayed literally on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from tests.helpers import landed, run_cli, write_config

pytestmark = pytest.mark.usefixtures("dagster_home")

ENGINES = ["sqlite_db", "pg_db", "mariadb_db"]


def q(db, name: str) -> str:
    """The tutorial's mixed-case names, quoted as each engine quotes them."""
    if db.url.startswith("mysql"):
        return f"`{name}`"
    return f'"{name}"'


def ts_type(db) -> str:
    # MariaDB's plain DATETIME holds whole seconds: the frontier (highest + 1 microsecond) must
    # still compare right against it
    return "timestamp" if db.url.startswith("postgresql") else "datetime"


def create_tutorial_table(db):
    db.run(
        f"CREATE TABLE data_source_table ({q(db, 'PersonID')} int, {q(db, 'Name')} varchar(255), "
        f"{q(db, 'LastModifytime')} {ts_type(db)})",
        f"CREATE INDEX ix_lm ON data_source_table ({q(db, 'LastModifytime')})",
        # ADF tutorial 1, step "Create a data source table", literally
        "INSERT INTO data_source_table VALUES (1, 'aaaa', '2017-09-01 00:56:00'), (2, 'bbbb', '2017-09-02 05:23:00'),"
        " (3, 'cccc', '2017-09-03 02:36:00'), (4, 'dddd', '2017-09-04 03:21:00'), (5, 'eeee', '2017-09-05 08:06:00')",
    )


TABLE = {"name": "data_source_table", "table": "data_source_table", "watermark_column": "LastModifytime",
         "partitions": {"granularity": "daily", "start": "2017-09-01"}}


def landed_versions(tmp_path, table="data_source_table", columns=("PersonID", "Name")):
    _, data = landed(str(tmp_path / "landing"), table)
    return sorted(zip(*(data.column(c).to_pylist() for c in columns))) if data is not None else []


def status_ahead(capsys, config) -> str:
    code, out, err = run_cli(capsys, "--config", str(config), "status")
    assert code == 0, out + err
    line = next(line for line in out.splitlines() if line.startswith("data_source_table"))
    return line.split()[-1]


@pytest.mark.parametrize("db_fixture", ENGINES)
def test_adf_tutorial_one_replayed_literally(request, db_fixture, tmp_path, capsys):
    db = request.getfixturevalue(db_fixture)
    create_tutorial_table(db)
    config = write_config(tmp_path, db.url, [TABLE])

    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert len(landed_versions(tmp_path)) == 5

    # ADF tutorial 1, "Add more data to the source data store", literally: the application stamps
    # the rows with values long before today's clock, above the highest one copied
    db.run("INSERT INTO data_source_table VALUES (6, 'newdata', '2017-09-06 02:23:00')",
           "INSERT INTO data_source_table VALUES (7, 'newdata', '2017-09-07 09:01:00')")
    assert status_ahead(capsys, config) == "2"  # status sees them before they are copied

    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert "2 row(s)" in out
    assert landed_versions(tmp_path) == [(1, "aaaa"), (2, "bbbb"), (3, "cccc"), (4, "dddd"), (5, "eeee"),
                                         (6, "newdata"), (7, "newdata")]
    assert status_ahead(capsys, config) == "0"
    code, out, _ = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0 and "up to date" in out


@pytest.mark.parametrize("db_fixture", ENGINES)
def test_application_stamped_bulk_update_lands_every_row_once(request, db_fixture, tmp_path, capsys):
    """Every value of a bulk update lies above the previous maximum, below the clock: each updated
    row lands once more (its new version), none twice, none lost."""
    db = request.getfixturevalue(db_fixture)
    create_tutorial_table(db)
    config = write_config(tmp_path, db.url, [TABLE])
    assert run_cli(capsys, "--config", str(config), "sync")[0] == 0

    # the application stamps rows one minute apart from 2017-09-05 09:00, one batch after another,
    # with a copy in between: each copy must pick up exactly what is new since the last one
    for batch, ids in enumerate(([1, 2], [3], [4, 5])):
        for person in ids:
            stamp = dt.datetime(2017, 9, 5, 9, 0) + dt.timedelta(minutes=10 * batch + person)
            db.run(f"UPDATE data_source_table SET {q(db, 'Name')} = :name, {q(db, 'LastModifytime')} = :t "
                   f"WHERE {q(db, 'PersonID')} = :p",
                   params={"name": f"v{batch}", "t": stamp.strftime("%Y-%m-%d %H:%M:%S"), "p": person})
        code, out, err = run_cli(capsys, "--config", str(config), "sync")
        assert code == 0, err
        assert f"{len(ids)} row(s)" in out, out

    versions = landed_versions(tmp_path)
    assert versions == sorted([(1, "aaaa"), (2, "bbbb"), (3, "cccc"), (4, "dddd"), (5, "eeee"),
                               (1, "v0"), (2, "v0"), (3, "v1"), (4, "v2"), (5, "v2")])


def create_multi_table_tutorial(db):
    db.run(
        f"CREATE TABLE customer_table ({q(db, 'PersonID')} int, {q(db, 'Name')} varchar(255), "
        f"{q(db, 'LastModifytime')} {ts_type(db)})",
        f"CREATE TABLE project_table ({q(db, 'Project')} varchar(255), {q(db, 'Creationtime')} {ts_type(db)})",
        "INSERT INTO customer_table VALUES (1, 'John', '2017-09-01 00:56:00'), (2, 'Mike', '2017-09-02 05:23:00'),"
        " (3, 'Alice', '2017-09-03 02:36:00'), (4, 'Andy', '2017-09-04 03:21:00'), (5, 'Anny', '2017-09-05 08:06:00')",
        "INSERT INTO project_table VALUES ('project1', '2015-01-01 00:00:00'), ('project2', '2016-02-02 01:23:00'),"
        " ('project3', '2017-03-04 05:16:00')",
    )


MULTI = [
    {"name": "customer_table", "table": "customer_table", "watermark_column": "LastModifytime",
     "primary_key": ["PersonID"], "partitions": {"granularity": "monthly", "start": "2017-09-01"}},
    {"name": "project_table", "table": "project_table", "watermark_column": "Creationtime",
     "primary_key": ["Project"], "partitions": {"granularity": "monthly", "start": "2015-01-01"}},
]


@pytest.mark.parametrize("db_fixture", ENGINES)
def test_adf_multi_table_tutorial_update_reaches_replica(request, db_fixture, tmp_path, capsys):
    db = request.getfixturevalue(db_fixture)
    create_multi_table_tutorial(db)
    replica = f"sqlite:///{tmp_path / 'replica.db'}"
    config = write_config(tmp_path, db.url, MULTI, replica={"url": replica})
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err

    # ADF's multi-table tutorial, "Add new data to the source tables", literally
    db.run("INSERT INTO project_table VALUES ('NewProject', '2017-10-01 00:00:00')",
           f"UPDATE customer_table SET {q(db, 'LastModifytime')} = '2017-09-08 00:00:00', {q(db, 'Name')} = 'NewName' "
           f"WHERE {q(db, 'PersonID')} = 3")
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err

    engine = sa.create_engine(replica)
    try:
        with engine.connect() as conn:
            customers = conn.execute(sa.text('SELECT "PersonID", "Name" FROM customer_table ORDER BY 1')).all()
            projects = conn.execute(sa.text('SELECT "Project" FROM project_table ORDER BY 1')).scalars().all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in customers] == [(1, "John"), (2, "Mike"), (3, "NewName"), (4, "Andy"), (5, "Anny")]
    assert projects == ["NewProject", "project1", "project2", "project3"]
