"""The whole promise under fire: several writers (long and rolled-back transactions, updates,
deletes) while `incremental-assets sync` processes are killed with SIGKILL at random moments, then
one sync to the end. Afterwards the replica equals the source, every landed row version is there
once, no temporary file is left and no run is left STARTED — without a human step.

A watermark table (updates restamp it with the database clock; a watermark sees no deletes) and a
change-tracked table (inserts, updates, deletes) on PostgreSQL and on MariaDB, each with a replica
in another database of the same server."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parent.parent

WRITE_SECONDS = 20
KILLS = 6


def _ddl(engine_name: str) -> list[str]:
    if engine_name == "postgresql":
        return [
            "CREATE TABLE wm (id int PRIMARY KEY, val int NOT NULL, modified timestamptz(6) NOT NULL DEFAULT clock_timestamp())",
            "CREATE INDEX ix_wm_modified ON wm (modified)",
            "CREATE TABLE ct (id int PRIMARY KEY, val int NOT NULL)",
        ]
    return [
        "CREATE TABLE wm (id int PRIMARY KEY, val int NOT NULL, modified datetime(6) NOT NULL DEFAULT now(6))",
        "CREATE INDEX ix_wm_modified ON wm (modified)",
        "CREATE TABLE ct (id int PRIMARY KEY, val int NOT NULL)",
    ]


def _now(engine_name: str) -> str:
    return "clock_timestamp()" if engine_name == "postgresql" else "now(6)"


class Writers:
    """Threads writing to both tables until stopped: short and long transactions, a fifth of them
    rolled back; deletes on the change-tracked table only."""

    def __init__(self, url: str, engine_name: str, threads: int = 3):
        self.engine = sa.create_engine(url, pool_size=threads + 1)
        self.now = _now(engine_name)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        self.next_id = [i * 1_000_000 for i in range(threads)]

    def start(self):
        for t in self.threads:
            t.start()

    def join(self):
        self.stop.set()
        for t in self.threads:
            t.join(60)
        self.engine.dispose()
        if self.errors:
            raise self.errors[0]

    def _run(self, me: int):
        rnd = random.Random(me)
        try:
            while not self.stop.is_set():
                with self.engine.connect() as conn:
                    trans = conn.begin()
                    for _ in range(rnd.randint(1, 20)):
                        self._one(conn, me, rnd)
                    if rnd.random() < 0.15:
                        time.sleep(rnd.uniform(0.5, 2.0))  # a long transaction holds the horizon back
                    if rnd.random() < 0.2:
                        trans.rollback()
                    else:
                        trans.commit()
                time.sleep(rnd.uniform(0, 0.05))
        except BaseException as exc:  # noqa: BLE001 - reported by join
            self.errors.append(exc)

    def _one(self, conn, me: int, rnd: random.Random):
        action = rnd.random()
        if action < 0.5 or self.next_id[me] % 1_000_000 < 20:
            self.next_id[me] += 1
            key = self.next_id[me]
            conn.execute(sa.text(f"INSERT INTO wm (id, val, modified) VALUES (:k, 0, {self.now})"), {"k": key})
            conn.execute(sa.text("INSERT INTO ct (id, val) VALUES (:k, 0)"), {"k": key})
            return
        key = rnd.randint(me * 1_000_000 + 1, self.next_id[me])
        if action < 0.85:
            conn.execute(sa.text(f"UPDATE wm SET val = val + 1, modified = {self.now} WHERE id = :k"), {"k": key})
            conn.execute(sa.text("UPDATE ct SET val = val + 1 WHERE id = :k"), {"k": key})
        else:
            conn.execute(sa.text("DELETE FROM ct WHERE id = :k"), {"k": key})


def _replica_database(server: sa.Engine, engine_name: str) -> tuple[str, callable]:
    name = f"rep_{uuid.uuid4().hex[:10]}"
    if engine_name == "postgresql":
        with server.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        drop = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
    else:
        with server.begin() as conn:
            conn.execute(sa.text(f"CREATE DATABASE `{name}`"))
        drop = f"DROP DATABASE IF EXISTS `{name}`"

    def cleanup():
        with server.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(drop))

    return server.url.set(database=name).render_as_string(hide_password=False), cleanup


def _cli(config: Path, home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "incremental_assets.cli", "--config", str(config), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _sync_to_the_end(config: Path, home: Path) -> str:
    proc = _cli(config, home, "sync")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def _rows(url: str, query: str) -> list[tuple]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return sorted(tuple(r) for r in conn.execute(sa.text(query)))
    finally:
        engine.dispose()


@pytest.mark.parametrize("db_fixture,server_fixture", [("pg_db", "pg_server"), ("mariadb_db", "mariadb_server")])
def test_writers_and_sigkilled_syncs_end_with_replica_equal_to_source(request, db_fixture, server_fixture, tmp_path):
    db = request.getfixturevalue(db_fixture)
    server = request.getfixturevalue(server_fixture)
    engine_name = db.engine.dialect.name
    db.run(*_ddl(engine_name))
    replica_url, drop_replica = _replica_database(server, engine_name)
    request.addfinalizer(drop_replica)
    home = tmp_path / "dagster_home"
    home.mkdir()
    landing = tmp_path / "landing"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "sources": {"src": {"url": db.url, "retries": 1, "retry_delay_seconds": 0.1, "horizon_wait_seconds": 5}},
        "landing": {"url": str(landing), "format": "parquet"},
        "replica": {"url": replica_url},
        "tables": [
            {"name": "wm", "source": "src", "table": "wm", "watermark_column": "modified",
             "partitions": {"granularity": "daily", "start": "2026-01-01"}},
            {"name": "ct", "source": "src", "table": "ct", "mode": "change_tracking",
             "partitions": {"granularity": "daily", "start": "2026-01-01"}},
        ],
    }, sort_keys=False))
    enable = _cli(config, home, "enable-change-tracking", "--table", "ct")
    assert enable.wait(120) == 0, enable.stdout.read()

    writers = Writers(db.url, engine_name)
    writers.start()
    rnd = random.Random(19)
    deadline = time.monotonic() + WRITE_SECONDS
    kills = 0
    try:
        while time.monotonic() < deadline or kills < KILLS:
            proc = _cli(config, home, "sync")
            try:
                proc.wait(timeout=rnd.uniform(1.0, 8.0))  # a sync may also finish before its kill
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                kills += 1
            proc.stdout.close()
    finally:
        writers.join()

    _sync_to_the_end(config, home)
    time.sleep(2.5)  # the horizon (whole seconds, a second's margin) passes the last writes
    _sync_to_the_end(config, home)
    out = _sync_to_the_end(config, home)
    assert "FAILED" not in out, out

    # the replica equals the source
    assert _rows(replica_url, "SELECT id, val FROM wm") == _rows(db.url, "SELECT id, val FROM wm")
    assert _rows(replica_url, "SELECT id, val FROM ct") == _rows(db.url, "SELECT id, val FROM ct")

    # every landed version of a watermark row is there once; nothing half-written is visible
    files = [p for p in landing.rglob("*") if p.is_file()]
    hidden = [p for p in files if p.name.startswith(".")]
    assert hidden == [], hidden  # no temporary file of a killed attempt is left
    versions = [(r["id"], r["modified"]) for p in files if p.parts[-3] == "wm"
                for r in pq.read_table(p).to_pylist()]
    assert len(versions) == len(set(versions)), "a row version landed twice"
    latest = {}
    for key, modified in versions:
        latest[key] = max(latest.get(key, modified), modified)
    assert sorted(latest) == [k for k, _ in _rows(db.url, "SELECT id, val FROM wm")]

    # no run is left behind as if it were still going
    with dg.DagsterInstance.from_config(str(home)) as instance:
        stuck = instance.get_run_records(dg.RunsFilter(statuses=[
            dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.QUEUED,
            dg.DagsterRunStatus.NOT_STARTED]))
    assert stuck == [], [r.dagster_run.run_id for r in stuck]
