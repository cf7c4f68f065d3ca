"""Shared fixtures: real PostgreSQL, MariaDB and SQLite databases; Azurite lives in tests/azurite.py.

A test needing a service that is unreachable is skipped with the reason, except under CI=true,
where it fails: CI must never pass by skipping.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

from incremental_assets.sources import Source

pytest_plugins = ["tests.azurite"]

PG_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: services must be up)")
    pytest.skip(reason)


def _server(url: str, label: str) -> sa.Engine:
    engine = sa.create_engine(url, pool_pre_ping=True)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means the service is not usable
        engine.dispose()
        unavailable(f"{label} is unreachable at {engine.url.render_as_string(hide_password=True)}: {type(exc).__name__}")
    return engine


@pytest.fixture(scope="session")
def pg_server():
    engine = _server(PG_URL, "PostgreSQL")
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def mariadb_server():
    engine = _server(MARIADB_URL, "MariaDB")
    yield engine
    engine.dispose()


class Database:
    """A real database for one test: its URL, an engine, and a helper to run SQL."""

    def __init__(self, url: str, engine: sa.Engine, schema: str | None = None):
        self.url = url
        self.engine = engine
        self.schema = schema

    def run(self, *statements: str, params=None):
        with self.engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement), params or {})

    def rows(self, query: str):
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(query))]

    def end_other_sessions(self) -> int:
        """End every other session on this database (PostgreSQL, MariaDB), as a server restart or
        a failover does; returns how many."""
        with self.engine.connect() as conn:
            if self.engine.dialect.name == "postgresql":
                return conn.execute(sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
            ids = conn.execute(sa.text(
                "SELECT id FROM information_schema.processlist WHERE db = database() AND id <> connection_id()")).scalars().all()
            for session in ids:
                conn.execute(sa.text(f"KILL {int(session)}"))
            return len(ids)


@pytest.fixture
def sqlite_db(tmp_path):
    url = f"sqlite:///{tmp_path / 'source.db'}"
    engine = sa.create_engine(url)
    yield Database(url, engine)
    engine.dispose()


@pytest.fixture
def pg_db(pg_server):
    """A fresh PostgreSQL database per test (tables never collide between tests)."""
    name = f"ia_{uuid.uuid4().hex[:10]}"
    with pg_server.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = pg_server.url.set(database=name).render_as_string(hide_password=False)
    engine = sa.create_engine(url)
    yield Database(url, engine)
    engine.dispose()
    with pg_server.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextmanager
def _mariadb_database(server: sa.Engine, drivername: str | None = None):
    name = f"ia_{uuid.uuid4().hex[:10]}"
    with server.begin() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}`"))
    url = server.url.set(database=name, drivername=drivername or server.url.drivername)
    url = url.render_as_string(hide_password=False)
    engine = sa.create_engine(url)
    try:
        yield Database(url, engine)
    finally:
        engine.dispose()
        with server.begin() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))


@pytest.fixture
def mariadb_db(mariadb_server):
    """A fresh MariaDB database per test, through the server URL's driver (PyMySQL by default)."""
    with _mariadb_database(mariadb_server) as db:
        yield db


@pytest.fixture
def mariadb_mysqlclient_db(mariadb_server):
    """The same through mysqlclient (``mysql+mysqldb://``), the faster driver: the ``mysqlclient``
    extra, which builds against the MariaDB/MySQL client headers (Debian: libmariadb-dev)."""
    try:
        import MySQLdb  # noqa: F401
    except ImportError:
        unavailable("mysqlclient is not installed: pip install -e '.[mysqlclient]' (needs libmariadb-dev and pkg-config)")
    with _mariadb_database(mariadb_server, "mysql+mysqldb") as db:
        yield db


#: the fixture behind each engine parameter of the tests that run on every engine
ENGINE_FIXTURES = {"sqlite": "sqlite_db", "postgresql": "pg_db", "mariadb": "mariadb_db",
                   "mariadb_mysqlclient": "mariadb_mysqlclient_db"}


@pytest.fixture
def dagster_home(tmp_path, monkeypatch):
    """A fresh Dagster instance folder for the CLI and dg.DagsterInstance.get()."""
    from incremental_assets.config import CONFIG_ENV

    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv(CONFIG_ENV, "")  # the CLI sets it; monkeypatch restores it afterwards
    return home


@pytest.fixture(params=["sqlite", "postgresql", "mariadb", "mariadb_mysqlclient"])
def any_db(request):
    """The same test on each real engine (MariaDB through both drivers)."""
    return request.getfixturevalue(ENGINE_FIXTURES[request.param])


@pytest.fixture
def sources():
    """Build sources for a test and dispose of them afterwards."""
    made: list[Source] = []

    def make(db_or_url, name: str = "src", **options) -> Source:
        url = db_or_url if isinstance(db_or_url, str) else db_or_url.url
        source = Source(name, url, **options)
        made.append(source)
        return source

    yield make
    for source in made:
        source.dispose()


#: fixtures that need a server (PostgreSQL, MariaDB, Azurite), by name: a test using one, directly,
#: through a parameter naming it or an engine of ENGINE_FIXTURES, is an integration test
SERVER_FIXTURES = {"pg_server", "pg_db", "mariadb_server", "mariadb_db", "mariadb_mysqlclient_db", "azurite",
                   "azure_container"}
SERVER_MARKERS = {"postgres", "mariadb", "azurite", "mssql"}


def _needs_server(item: pytest.Item) -> bool:
    names = set(getattr(item, "fixturenames", ()))
    callspec = getattr(item, "callspec", None)
    for value in (callspec.params.values() if callspec else ()):
        if isinstance(value, str):
            names |= {value, ENGINE_FIXTURES.get(value.split("-")[0], "")}
    return bool(names & SERVER_FIXTURES) or any(item.get_closest_marker(m) for m in SERVER_MARKERS)


def pytest_collection_modifyitems(config, items):
    """``integration``: the tests against a real server; ``pytest -m "not integration"`` runs the
    fast tests alone (SQLite, golden SQL text, configuration)."""
    for item in items:
        if _needs_server(item):
            item.add_marker(pytest.mark.integration)
