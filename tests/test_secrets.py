"""Credentials: never written in the configuration, never in anything Dagster stores, and a
refused login fails at once instead of being retried as an outage."""

from __future__ import annotations

import sqlite3
import time
import uuid
import zlib
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from incremental_assets.config import ConfigError, parse_config
from incremental_assets.replica import Replica, ReplicaError, ReplicaUnavailable
from incremental_assets.sources import Source, SourceError, SourceUnavailable
from tests.helpers import adf_table, create_adf_table, landed_rows, run_cli, write_config


def _config(url: str, replica_url: str | None = None) -> str:
    text = f"sources:\n  erp: {{url: '{url}'}}\ntables: []\n"
    return text + (f"replica: {{url: '{replica_url}'}}\n" if replica_url else "")


@pytest.mark.parametrize("url, where, what", [
    ("postgresql+psycopg://copier:hunter2@db.example.com/erp", "source 'erp': key 'url'", "the password"),
    ("postgresql+psycopg://copier:${ERP_PW:-hunter2}@db.example.com/erp", "source 'erp': key 'url'", "the password"),
    ("postgresql+psycopg://copier@db.example.com/erp?password=hunter2", "source 'erp': key 'url'", "query parameter 'password'"),
    ("mssql+pyodbc:///?odbc_connect=DRIVER%3D%7BODBC+Driver+18%7D%3BUID%3Dsa%3BPWD%3Dhunter2", "source 'erp': key 'url'",
     "query parameter 'odbc_connect' (PWD=)"),
])
def test_a_password_written_in_the_file_is_refused_showing_the_var_form(url, where, what):
    with pytest.raises(ConfigError) as caught:
        parse_config(_config(url), "config.yaml")
    message = str(caught.value)
    assert f"config.yaml: {where}: {what} is written in the file" in message
    assert "${DB_PASSWORD}" in message and "hunter2" not in message


def test_a_password_written_in_the_replica_url_is_refused(monkeypatch):
    monkeypatch.setenv("ERP_PW", "x")
    with pytest.raises(ConfigError, match=r"key 'replica.url': the password is written in the file.*"
                                          r"postgresql\+psycopg://loader:\$\{DB_PASSWORD\}@replica\.example\.com/wh"):
        parse_config(_config("postgresql+psycopg://c:${ERP_PW}@h/erp", "postgresql+psycopg://loader:hunter2@replica.example.com/wh"),
                     "config.yaml")


def test_every_url_holding_a_credential_is_named_at_once():
    text = _config("postgresql+psycopg://c:hunter2@h/erp", "mysql+pymysql://loader:hunter3@r/wh")
    text += "landing: {url: 'azure://landing/erp?sv=2024-01-01&sig=hunter4'}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "config.yaml")
    lines = str(caught.value).splitlines()
    assert [line.split(" is written")[0] for line in lines] == [
        "config.yaml: source 'erp': key 'url': the password",
        "config.yaml: key 'landing.url': query parameter 'sig'",
        "config.yaml: key 'replica.url': the password",
    ]
    assert not any(secret in str(caught.value) for secret in ("hunter2", "hunter3", "hunter4"))


def test_passwords_from_the_environment_are_accepted(monkeypatch):
    monkeypatch.setenv("ERP_PW", "x")
    monkeypatch.setenv("REPLICA_URL", "postgresql+psycopg://loader:hunter2@replica.example.com/wh")
    config = parse_config(_config("postgresql+psycopg://c:${ERP_PW}@h/erp?sslmode=require", "${REPLICA_URL}"), "config.yaml")
    assert config.sources["erp"].url.endswith("c:${ERP_PW}@h/erp?sslmode=require")


# -- a MariaDB account with a real password -------------------------------------------------------


@pytest.fixture
def mariadb_account(mariadb_db, mariadb_server):
    """A MariaDB user that logs in with a password, allowed into ``mariadb_db``'s database."""
    user, password = f"ia_{uuid.uuid4().hex[:8]}", "Pw-" + uuid.uuid4().hex[:12]
    database = sa.make_url(mariadb_db.url).database
    with mariadb_server.begin() as conn:
        conn.exec_driver_sql(f"CREATE USER '{user}'@'%%' IDENTIFIED BY '{password}'")
        conn.exec_driver_sql(f"GRANT ALL ON `{database}`.* TO '{user}'@'%%'")
        conn.exec_driver_sql(f"GRANT PROCESS ON *.* TO '{user}'@'%%'")  # safe horizons read innodb_trx
    yield user, password, database
    with mariadb_server.begin() as conn:
        conn.exec_driver_sql(f"DROP USER IF EXISTS '{user}'@'%%'")


def _account_url(mariadb_db, user: str, password: str) -> str:
    return sa.make_url(mariadb_db.url).set(username=user, password=password).render_as_string(hide_password=False)


def test_a_wrong_password_fails_at_once_naming_the_source_not_retried(mariadb_db, mariadb_account):
    user, password, _ = mariadb_account
    wrong = "Wrong-" + password
    url = _account_url(mariadb_db, user, wrong)
    for driver in ("mysql+pymysql", "mysql+mysqldb"):
        source = Source("erp", sa.make_url(url).set(drivername=driver).render_as_string(hide_password=False),
                        retries=3, retry_delay=5.0)
        started = time.monotonic()
        with pytest.raises(SourceError) as caught:
            source.connect()
        source.dispose()
        assert time.monotonic() - started < 4  # three retries would take 5 + 10 + 20 s
        assert not isinstance(caught.value, SourceUnavailable)  # so Dagster does not retry the run either
        message = str(caught.value)
        assert "source 'erp'" in message and "authentication failed" in message and "Access denied" in message
        assert wrong not in message and password not in message
    # the right password connects (the account is real)
    source = Source("erp", _account_url(mariadb_db, user, password))
    with source.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    source.dispose()


def test_a_wrong_replica_password_fails_at_once(mariadb_db, mariadb_account):
    user, password, _ = mariadb_account
    wrong = "Wrong-" + password
    replica = Replica(_account_url(mariadb_db, user, wrong), retries=3, retry_delay=5.0)
    started = time.monotonic()
    with pytest.raises(ReplicaError) as caught:
        replica.reconcile("t", ["id"])
    replica.dispose()
    assert time.monotonic() - started < 4
    assert not isinstance(caught.value, ReplicaUnavailable)
    assert "authentication failed" in str(caught.value) and wrong not in str(caught.value)


@pytest.mark.parametrize("role", ["ia_no_such_role", "ia_nologin_role"])
def test_a_login_postgresql_refuses_fails_at_once(request, pg_db, role):
    """The server here trusts every known login role, so its refusals are an unknown role and a
    role without LOGIN (both SQLSTATE 28000, as a wrong password is 28P01)."""
    role = f"{role}_{uuid.uuid4().hex[:8]}"
    if role.startswith("ia_nologin_role"):
        pg_db.run(f"CREATE ROLE {role} NOLOGIN")
        request.addfinalizer(lambda: pg_db.run(f"DROP ROLE {role}"))
    secret = "Pw-" + uuid.uuid4().hex[:12]
    url = sa.make_url(pg_db.url).set(username=role, password=secret).render_as_string(hide_password=False)
    source = Source("erp", url, retries=3, retry_delay=5.0)
    replica = Replica(url, retries=3, retry_delay=5.0)
    started = time.monotonic()
    with pytest.raises(SourceError) as from_source:
        source.connect()
    with pytest.raises(ReplicaError) as from_replica:
        replica.reconcile("t", ["id"])
    source.dispose()
    replica.dispose()
    assert time.monotonic() - started < 4
    assert not isinstance(from_source.value, SourceUnavailable) and not isinstance(from_replica.value, ReplicaUnavailable)
    for message in (str(from_source.value), str(from_replica.value)):
        assert "authentication failed" in message and role in message and secret not in message
    assert "source 'erp'" in str(from_source.value)


def test_an_unreachable_source_is_still_retried(pg_db):
    source = Source("erp", sa.make_url(pg_db.url).set(port=1).render_as_string(hide_password=False), retries=2, retry_delay=0.2)
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="source 'erp'.*unreachable after 3 attempts"):
        source.connect()
    assert time.monotonic() - started >= 0.6


# -- nothing Dagster stores holds a password ------------------------------------------------------


def _texts(path: Path, seen_blobs: list[bytes]):
    """Every piece of text in a file: its bytes, and for a SQLite database every value of every
    table, zlib-compressed blobs (Dagster's snapshots) decompressed."""
    data = path.read_bytes()
    yield data
    if not data.startswith(b"SQLite format 3\x00"):
        return
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    if isinstance(value, bytes):
                        yield value
                        try:
                            value = zlib.decompress(value)
                        except zlib.error:
                            continue
                        seen_blobs.append(value)
                        yield value
                    elif isinstance(value, str):
                        yield value.encode()
    finally:
        conn.close()


def assert_nowhere(secrets: list[str], *folders: Path) -> list[bytes]:
    """No file under ``folders`` holds any of ``secrets`` (as written or percent-encoded)."""
    from urllib.parse import quote

    needles = {s.encode() for s in secrets} | {quote(s, safe="").encode() for s in secrets}
    blobs: list[bytes] = []
    files = [p for folder in folders for p in folder.rglob("*") if p.is_file()]
    assert files
    for path in files:
        for text in _texts(path, blobs):
            for needle in needles:
                assert needle not in text, f"a password is stored in {path}"
    return blobs


def test_no_password_reaches_dagster_storage_or_the_landing(mariadb_db, mariadb_account, pg_db, tmp_path, capsys,
                                                            monkeypatch, dagster_home):
    """A source password in a ``${VAR}`` template, a replica URL with its password as one
    ``${VAR}``: a sync, a materialization and failing runs leave no password in DAGSTER_HOME
    (run and event storage, snapshots decompressed, compute logs) or in the landing."""
    user, password, _ = mariadb_account
    create_adf_table(mariadb_db)
    replica_password = "Rp-" + uuid.uuid4().hex[:12]  # trust authentication ignores it, Dagster must still not keep it
    replica_url = sa.make_url(pg_db.url).set(password=replica_password).render_as_string(hide_password=False)
    monkeypatch.setenv("SRC_PASSWORD", password)
    monkeypatch.setenv("REPLICA_URL", replica_url)
    source_url = sa.make_url(mariadb_db.url).set(username=user).render_as_string(hide_password=False)
    source_url = source_url.replace(f"{user}@", f"{user}:${{SRC_PASSWORD}}@", 1)
    config = write_config(tmp_path, source_url, [adf_table(primary_key=["PersonID"])], replica={"url": "${REPLICA_URL}", "retries": 0},
                          run_retries={"max_retries": 0})
    landing = tmp_path / "landing"

    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert [p for p, _ in landed_rows(str(landing), "data_source_table")] == [1, 2, 3, 4, 5]
    with sa.create_engine(pg_db.url).connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM data_source_table").scalar() == 5

    # a materialization from the definitions, as the UI launches it
    from incremental_assets.definitions import load_definitions

    defs = load_definitions(config)
    with dg.DagsterInstance.get() as instance:
        asset = defs.resolve_assets_def(dg.AssetKey(["landing", "data_source_table"]))
        assert dg.materialize([asset], instance=instance, partition_key="2017-09-01",
                              tags={"dagster/backfill": "manual"}).success

    # failing runs: a wrong password, then a replica that is down
    monkeypatch.setenv("SRC_PASSWORD", "Wrong-" + password)
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 1 and "authentication failed" in err and password not in out + err
    monkeypatch.setenv("SRC_PASSWORD", password)
    monkeypatch.setenv("REPLICA_URL", sa.make_url(replica_url).set(port=1).render_as_string(hide_password=False))
    with dg.DagsterInstance.get() as instance:
        replica_asset = load_definitions(config).resolve_assets_def(dg.AssetKey(["replica", "data_source_table"]))
        result = dg.materialize([replica_asset], instance=instance, partition_key="2017-09-01", raise_on_error=False)
        assert not result.success

    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert any(r.status == dg.DagsterRunStatus.FAILURE for r in runs) and len(runs) >= 3
    blobs = assert_nowhere([password, "Wrong-" + password, replica_password], dagster_home, landing)
    # the scan did read the run snapshots, resource configuration included
    assert any(b"SRC_PASSWORD" in blob for blob in blobs) and any(b"REPLICA_URL" in blob for blob in blobs)
