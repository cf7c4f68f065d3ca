"""``incremental-assets check``: a good setup passes with exit 0; each broken thing gives its own
line and a non-zero exit, on real SQLite, PostgreSQL, MariaDB and Azurite."""

from __future__ import annotations

import re
import uuid

import pytest
import sqlalchemy as sa
import yaml

from tests.helpers import adf_table, create_adf_table, run_cli, write_config


def _check(capsys, config) -> tuple[int, list[str]]:
    code, out, err = run_cli(capsys, "--config", str(config), "check")
    assert not err.strip() or code != 0, err
    return code, out.splitlines()


def _line(lines: list[str], level: str, subject: str, check: str) -> str:
    found = [line for line in lines if re.match(rf"{level}\s+{re.escape(subject)}: {re.escape(check)}: ", line)]
    assert found, "\n".join(lines)
    return found[0]


def _levels(lines: list[str]) -> set[str]:
    return {line.split()[0] for line in lines if line.split() and line.split()[0] in ("OK", "WARN", "FAIL")}


def test_a_good_setup_passes(any_db, tmp_path, capsys, dagster_home):
    create_adf_table(any_db)
    config = write_config(tmp_path, any_db.url, [adf_table(primary_key=["PersonID"])],
                          replica={"url": f"sqlite:///{tmp_path / 'replica.db'}"})
    code, lines = _check(capsys, config)
    assert code == 0, "\n".join(lines)
    assert _levels(lines) == {"OK"}
    for subject, check in [("configuration", "load"), ("source src", "connection"), ("source src", "privileges"),
                           ("landing", "writable"), ("table data_source_table", "table"),
                           ("table data_source_table", "watermark"), ("table data_source_table", "index"),
                           ("replica", "connection"), ("replica data_source_table", "schema")]:
        _line(lines, "OK", subject, check)
    assert lines[-1].endswith("0 warning(s), 0 failed")
    assert list((tmp_path / "landing").iterdir()) == []  # the probe file is gone


def test_a_missing_table_and_a_missing_column(sqlite_db, tmp_path, capsys, dagster_home):
    create_adf_table(sqlite_db)
    config = write_config(tmp_path, sqlite_db.url, [
        adf_table(name="absent", table="no_such_table"),
        adf_table(name="misspelt", watermark_column="LastModified"),
        adf_table(),
    ])
    code, lines = _check(capsys, config)
    assert code == 1
    assert "no_such_table" in _line(lines, "FAIL", "table absent", "table")
    assert "LastModified" in _line(lines, "FAIL", "table misspelt", "watermark")
    _line(lines, "OK", "table data_source_table", "watermark")  # the others are still checked


def test_a_watermark_of_a_type_that_cannot_be_one(sqlite_db, tmp_path, capsys, dagster_home):
    create_adf_table(sqlite_db)
    config = write_config(tmp_path, sqlite_db.url, [adf_table(watermark_column="Name")])
    code, lines = _check(capsys, config)
    assert code == 1
    assert "cannot be a watermark" in _line(lines, "FAIL", "table data_source_table", "watermark")


def test_a_missing_index_gives_the_statement_that_creates_it(pg_db, tmp_path, capsys, dagster_home):
    create_adf_table(pg_db, index=False)
    config = write_config(tmp_path, pg_db.url, [adf_table()])
    code, lines = _check(capsys, config)
    assert code == 3  # a warning only: copies work, but scan the table
    line = _line(lines, "WARN", "table data_source_table", "index")
    statement = line.split("Create one, e.g. ", 1)[1]
    assert statement == 'CREATE INDEX "ix_data_source_table_LastModifytime" ON data_source_table ("LastModifytime")'
    pg_db.run(statement)  # as printed
    code, lines = _check(capsys, config)
    assert code == 0 and _levels(lines) == {"OK"}


def test_an_unreachable_source(pg_db, tmp_path, capsys, dagster_home):
    url = sa.make_url(pg_db.url).set(port=1).render_as_string(hide_password=False)
    config = write_config(tmp_path, url, [adf_table()])
    code, lines = _check(capsys, config)
    assert code == 1
    assert "unreachable" in _line(lines, "FAIL", "source src", "connection")
    assert "not reachable" in _line(lines, "FAIL", "table data_source_table", "table")


def test_a_missing_sqlite_file_is_not_created(tmp_path, capsys, dagster_home):
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'nowhere.db'}", [adf_table()])
    code, lines = _check(capsys, config)
    assert code == 1 and "does not exist" in _line(lines, "FAIL", "source src", "connection")
    assert not (tmp_path / "nowhere.db").exists()


def test_a_login_postgresql_refuses(pg_db, tmp_path, capsys, dagster_home, monkeypatch):
    """The test server trusts every role that exists, so the refused login here is an unknown role
    (SQLSTATE 28000, as a wrong password is 28P01): both are told as an authentication failure."""
    secret = "Pw-" + uuid.uuid4().hex[:12]
    monkeypatch.setenv("SRC_PASSWORD", secret)
    url = sa.make_url(pg_db.url).set(username=f"ia_nobody_{uuid.uuid4().hex[:8]}").render_as_string(hide_password=False)
    config = write_config(tmp_path, url.replace("@", ":${SRC_PASSWORD}@", 1), [adf_table()])
    code, out, _ = run_cli(capsys, "--config", str(config), "check")
    assert code == 1
    assert "authentication failed" in _line(out.splitlines(), "FAIL", "source src", "connection")
    assert secret not in out


@pytest.fixture
def mariadb_user(mariadb_db, mariadb_server):
    """A MariaDB user with a password, allowed into ``mariadb_db``'s database, without PROCESS."""
    user, password = f"ia_{uuid.uuid4().hex[:8]}", "Pw-" + uuid.uuid4().hex[:12]
    database = sa.make_url(mariadb_db.url).database
    with mariadb_server.begin() as conn:
        conn.exec_driver_sql(f"CREATE USER '{user}'@'%%' IDENTIFIED BY '{password}'")
        conn.exec_driver_sql(f"GRANT ALL ON `{database}`.* TO '{user}'@'%%'")
    yield user, password
    with mariadb_server.begin() as conn:
        conn.exec_driver_sql(f"DROP USER IF EXISTS '{user}'@'%%'")


def _user_config(tmp_path, mariadb_db, user):
    url = sa.make_url(mariadb_db.url).set(username=user).render_as_string(hide_password=False)
    return write_config(tmp_path, url.replace("@", ":${SRC_PASSWORD}@", 1), [adf_table()])


def test_a_wrong_password_on_mariadb(mariadb_db, mariadb_user, tmp_path, capsys, dagster_home, monkeypatch):
    user, password = mariadb_user
    create_adf_table(mariadb_db)
    config = _user_config(tmp_path, mariadb_db, user)
    monkeypatch.setenv("SRC_PASSWORD", "Wrong-" + password)
    code, out, _ = run_cli(capsys, "--config", str(config), "check")
    assert code == 1
    assert "authentication failed" in _line(out.splitlines(), "FAIL", "source src", "connection")
    assert password not in out


def test_the_horizons_privilege_is_named_with_its_grant(mariadb_db, mariadb_user, mariadb_server, tmp_path, capsys,
                                                        dagster_home, monkeypatch):
    user, password = mariadb_user
    create_adf_table(mariadb_db)
    config = _user_config(tmp_path, mariadb_db, user)
    monkeypatch.setenv("SRC_PASSWORD", password)
    code, lines = _check(capsys, config)
    assert code == 1
    line = _line(lines, "FAIL", "source src", "privileges")
    grant = line.split(": ")[-1]
    assert grant == f"GRANT PROCESS ON *.* TO '{user}'@'%';"
    _line(lines, "OK", "table data_source_table", "index")  # the rest is checked all the same
    with mariadb_server.begin() as conn:
        conn.exec_driver_sql(grant.rstrip(";").replace("%", "%%"))  # as printed
    code, lines = _check(capsys, config)
    assert code == 0, "\n".join(lines)


def test_an_unwritable_local_landing(sqlite_db, tmp_path, capsys, dagster_home):
    create_adf_table(sqlite_db)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = write_config(tmp_path, sqlite_db.url, [adf_table()], landing=str(blocker / "landing"))
    code, lines = _check(capsys, config)
    assert code == 1
    assert str(blocker) in _line(lines, "FAIL", "landing", "writable")
    _line(lines, "OK", "table data_source_table", "table")


def test_azure_landing_written_and_cleaned_or_missing(sqlite_db, azure_container, tmp_path, capsys, dagster_home,
                                                      monkeypatch):
    from azure.storage.blob import BlobServiceClient

    create_adf_table(sqlite_db)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azure_container.connection_string)
    config = write_config(tmp_path, sqlite_db.url, [adf_table()], landing=f"azure://{azure_container.name}/erp")
    code, lines = _check(capsys, config)
    assert code == 0, "\n".join(lines)
    _line(lines, "OK", "landing", "writable")
    service = BlobServiceClient.from_connection_string(azure_container.connection_string)
    assert list(service.get_container_client(azure_container.name).list_blobs()) == []  # the probe is deleted
    service.close()
    config = write_config(tmp_path, sqlite_db.url, [adf_table()], landing="azure://no-such-container/erp")
    code, lines = _check(capsys, config)
    assert code == 1
    assert "no-such-container" in _line(lines, "FAIL", "landing", "writable")


def test_change_tracking_not_installed(pg_db, tmp_path, capsys, dagster_home):
    pg_db.run("CREATE TABLE people (id int PRIMARY KEY, name text)")
    config = write_config(tmp_path, pg_db.url, [{"name": "people", "table": "people", "mode": "change_tracking"}])
    code, lines = _check(capsys, config)
    assert code == 1
    assert "enable-change-tracking --table people" in _line(lines, "FAIL", "table people", "change tracking")
    code, _, err = run_cli(capsys, "--config", str(config), "enable-change-tracking", "--table", "people")
    assert code == 0, err
    code, lines = _check(capsys, config)
    assert code == 0, "\n".join(lines)
    _line(lines, "OK", "table people", "change tracking")


def test_an_incompatible_replica_table(sqlite_db, tmp_path, capsys, dagster_home):
    create_adf_table(sqlite_db)
    replica = tmp_path / "replica.db"
    engine = sa.create_engine(f"sqlite:///{replica}")
    with engine.begin() as conn:  # the watermark as text, which cannot hold timestamps; an old column is kept
        conn.exec_driver_sql('CREATE TABLE data_source_table ("PersonID" integer PRIMARY KEY, "Name" text, '
                             '"LastModifytime" text, "Retired" text)')
    engine.dispose()
    config = write_config(tmp_path, sqlite_db.url, [adf_table(primary_key=["PersonID"])],
                          replica={"url": f"sqlite:///{replica}"})
    code, lines = _check(capsys, config)
    assert code == 1
    assert _line(lines, "FAIL", "replica data_source_table", "schema").endswith(
        "which cannot hold the data's timestamp[us]: convert the column, or drop the table to have it created again")


def test_a_table_without_a_merge_key(sqlite_db, tmp_path, capsys, dagster_home):
    create_adf_table(sqlite_db)
    config = write_config(tmp_path, sqlite_db.url, [adf_table()], replica={"url": f"sqlite:///{tmp_path / 'r.db'}"})
    code, lines = _check(capsys, config)
    assert code == 1
    assert "primary_key" in _line(lines, "FAIL", "replica data_source_table", "merge key")


def test_a_configuration_error(tmp_path, capsys, dagster_home):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"sources": {"src": {"url": "sqlite:///x.db"}},
                                    "tables": [{"name": "t", "source": "src", "table": "t", "watermark_colum": "x"}]}))
    code, lines = _check(capsys, path)
    assert code == 2
    assert "watermark_colum" in _line(lines, "FAIL", "configuration", "load")


def test_the_check_as_a_dagster_job(sqlite_db, tmp_path, dagster_home):
    """The same check from the UI: the job ``check_setup`` passes on a good setup and fails naming
    what is wrong; loading the definitions opens no connection."""
    import dagster as dg

    from incremental_assets.definitions import load_definitions

    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'later.db'}", [adf_table()])
    defs = load_definitions(config)  # the source does not exist yet: loading does not care
    assert not (tmp_path / "later.db").exists()
    job = defs.resolve_job_def("check_setup")
    with dg.DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
        assert not result.success
        failure = next(e for e in result.all_events if e.is_step_failure)
        assert "source src: connection" in failure.step_failure_data.user_failure_data.description
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'later.db'}")
        from tests.conftest import Database

        create_adf_table(Database(f"sqlite:///{tmp_path / 'later.db'}", engine))
        engine.dispose()
        result = job.execute_in_process(instance=instance)
        assert result.success
        outputs = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
        table = outputs[0].step_output_data.metadata["verdicts"].value
        assert "| OK | table data_source_table | index |" in table
