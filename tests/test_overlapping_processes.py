"""Processes that overlap on one instance and one configuration: commands starting at once on a
new ``DAGSTER_HOME``, two ``sync`` at once, a sensor's run planned before a ``sync`` copied its
rows, and ``dagster-daemon``, ``sync`` and ``dagster asset materialize`` all at work together.
Nothing is doubled, lost, or recorded wrongly."""

from __future__ import annotations

import collections
import datetime as dt
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
import yaml

from incremental_assets.definitions import load_definitions
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent


def _env(home: Path, config: Path | None = None) -> dict:
    from incremental_assets.config import CONFIG_ENV

    env = dict(os.environ, DAGSTER_HOME=str(home), PYTHONPATH=str(ROOT))
    if config is not None:
        env[CONFIG_ENV] = str(config)
    return env


def _cli(config: Path, home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "incremental_assets.cli", "--config", str(config), *args],
                            env=_env(home), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _config(tmp_path: Path, url: str, *, replica: str | None = None, granularity="daily", start="2024-01-01",
            interval=30) -> Path:
    config = {
        "sources": {"src": {"url": url, "retries": 0, "horizon_wait_seconds": 2}},
        "landing": {"url": str(tmp_path / "landing")},
        "sensors": {"interval_seconds": interval},
        "tables": [{"name": "t", "source": "src", "table": "t", "watermark_column": "updated_at", "primary_key": ["id"],
                    "partitions": {"granularity": granularity, "start": start}}],
    }
    if replica:
        config["replica"] = {"url": replica}
        config["tables"][0]["replica"] = {"table": "t_replica"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_commands_starting_at_once_on_a_new_dagster_home_share_one_instance(tmp_path):
    """Four commands open a new DAGSTER_HOME at the same moment: each works, and the instance's
    databases hold one schema version each (not two heads, not a half-made table)."""
    db = tmp_path / "src.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, updated_at datetime)")
    config = _config(tmp_path, f"sqlite:///{db}")
    for attempt in range(3):
        home = tmp_path / f"home{attempt}"
        procs = [_cli(config, home, "status") for _ in range(4)]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, "\n".join(o[-2000:] for o in outputs)
        databases = sorted(home.rglob("*.db"))
        assert databases
        for database in databases:
            with sqlite3.connect(database) as conn:
                assert len(conn.execute("SELECT * FROM alembic_version").fetchall()) == 1, database
        again = _cli(config, home, "status")
        assert again.wait(timeout=300) == 0, again.stdout.read()


def _source_table(db, first: int, last: int, *, create: bool):
    if create:
        db.run("CREATE TABLE t (id int PRIMARY KEY, v text, updated_at timestamp)", "CREATE INDEX ix_t ON t (updated_at)")
    db.run(f"INSERT INTO t SELECT g, 'v' || g, timestamp '2024-01-01' + g * interval '5 hours' "
           f"FROM generate_series({first}, {last}) g")


def _landed_ids(tmp_path: Path) -> collections.Counter:
    ids: collections.Counter = collections.Counter()
    for path in (tmp_path / "landing" / "t").glob("*/*.parquet"):
        ids.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return ids


def _windows_tell_the_truth(instance: dg.DagsterInstance, tmp_path: Path) -> int:
    """Every window holding landed rows has a latest materialization that counts the rows its
    files hold, and names only files of it that exist; returns how many windows were checked."""
    key = dg.AssetKey(["landing", "t"])
    latest = instance.get_latest_storage_id_by_partition(key, dg.DagsterEventType.ASSET_MATERIALIZATION)
    records = {r.partition_key: r for r in instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, storage_ids=list(latest.values())), limit=len(latest)).records}
    folders = [p for p in (tmp_path / "landing" / "t").iterdir() if any(p.glob("*.parquet"))]
    for folder in folders:
        rows_in_folder = sum(pq.read_metadata(f).num_rows for f in folder.glob("*.parquet"))
        record = records.get(folder.name)
        assert record is not None, f"window {folder.name} has files but no materialization"
        meta = {k: v.value for k, v in record.asset_materialization.metadata.items()}
        assert meta["dagster/partition_row_count"] == rows_in_folder, (folder.name, rows_in_folder, meta)
        named = [Path(uri.removeprefix("file://")) for uri in meta["files"]]
        assert all(p.exists() and p.parent == folder for p in named), (folder.name, named)
        assert sum(pq.read_metadata(p).num_rows for p in named) == meta["rows_copied"], (folder.name, meta)
    return len(folders)


def test_two_syncs_at_once_double_nothing(pg_db, tmp_path, dagster_home):
    _source_table(pg_db, 1, 1500, create=True)
    config = _config(tmp_path, pg_db.url, replica=pg_db.url)
    for first, last in [(0, 0), (1501, 1800)]:
        if first:
            _source_table(pg_db, first, last, create=False)
        procs = [_cli(config, dagster_home, "sync") for _ in range(2)]
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
        copied = [o for o in outputs if " row(s), watermark" in o]
        # the other one waited for the copy in flight, saying so, or planned after it had ended
        assert len(copied) >= 1, outputs
    ids = _landed_ids(tmp_path)
    assert len(ids) == 1800 and set(ids.values()) == {1}
    assert pg_db.rows("SELECT count(*), count(DISTINCT id), sum(id) FROM t_replica") == [(1800, 1800, sum(range(1, 1801)))]
    with dg.DagsterInstance.get() as instance:
        assert _windows_tell_the_truth(instance, tmp_path) > 300


def test_a_run_planned_before_a_sync_copied_its_rows_records_no_empty_window(pg_db, tmp_path, dagster_home, capsys):
    """A sensor's tick plans a run; a ``sync`` copies the same rows before that run starts (the
    table had no run in flight for either to wait for). The run then copies nothing new, and the
    windows keep what their records said: the rows and files that landed there."""
    _source_table(pg_db, 1, 300, create=True)
    config = _config(tmp_path, pg_db.url, replica=pg_db.url)
    defs = load_definitions(config)
    with dg.DagsterInstance.get() as instance:
        sensor = defs.resolve_sensor_def("incremental_copy_src_sensor")
        with dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs) as ctx:
            (request,) = sensor.evaluate_tick(ctx).run_requests
        code, out, err = run_cli(capsys, "--config", str(config), "sync")
        assert code == 0 and "300 row(s)" in out, out + err
        before = _windows_tell_the_truth(instance, tmp_path)
        job = defs.resolve_job_def(request.job_name)
        result = job.execute_in_process(instance=instance, asset_selection=list(request.asset_selection),
                                        partition_key=request.partition_key, tags=request.tags, raise_on_error=False)
        assert result.success
        ids = _landed_ids(tmp_path)
        assert len(ids) == 300 and set(ids.values()) == {1}
        assert _windows_tell_the_truth(instance, tmp_path) == before > 50
    assert pg_db.rows("SELECT count(*) FROM t_replica") == [(300,)]


@pytest.mark.integration
def test_daemon_sync_and_a_command_line_materialization_together(pg_db, tmp_path, monkeypatch):
    """``dagster-daemon`` with its sensor running, ``sync`` in another process and ``dagster asset
    materialize`` in a third, while rows keep arriving: the replica ends equal to the source,
    every row landed once, and every window's latest materialization tells the truth."""
    from incremental_assets.cli import INSTANCE_YAML

    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)
    pg_db.run("CREATE TABLE t (id int PRIMARY KEY, v text, updated_at timestamp)", "CREATE INDEX ix_t ON t (updated_at)",
              "INSERT INTO t SELECT g, 'v' || g, :start + g * interval '1 minute' FROM generate_series(1, 600) g",
              params={"start": now - dt.timedelta(days=2)})
    config = _config(tmp_path, pg_db.url, replica=pg_db.url, start=(now - dt.timedelta(days=3)).strftime("%Y-%m-%d"),
                     interval=5)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(INSTANCE_YAML)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    # the instance made first, as the docs say: Dagster's own commands (the daemon's) do not
    # take the project's lock around its creation
    status = _cli(config, home, "status")
    assert status.wait(timeout=300) == 0, status.communicate()[0]
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-m", "incremental_assets.definitions"],
        env=_env(home, config), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        sync = _cli(config, home, "sync")
        today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
        materialize = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "incremental_assets.definitions",
             "--select", "landing/t", "--partition", today],
            env=_env(home, config), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(601, 661):  # rows keep arriving, stamped now, while all three work
            pg_db.run("INSERT INTO t VALUES (:i, :v, now() AT TIME ZONE 'UTC')", params={"i": i, "v": f"v{i}"})
            time.sleep(0.1)
        sync_out = sync.communicate(timeout=600)[0]
        assert sync.returncode == 0, sync_out
        materialize_out = materialize.communicate(timeout=600)[0]
        assert materialize.returncode == 0, materialize_out[-3000:]
        # rows only the sensor can copy now
        pg_db.run("INSERT INTO t SELECT g, 'v' || g, now() AT TIME ZONE 'UTC' FROM generate_series(661, 700) g")

        with dg.DagsterInstance.get() as instance:
            def settled() -> bool:
                landed = _landed_ids(tmp_path)
                replica = pg_db.rows("SELECT count(*) FROM t_replica") if _has_replica(pg_db) else [(0,)]
                runs = instance.get_run_records(dg.RunsFilter(statuses=[
                    dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                    dg.DagsterRunStatus.STARTED]))
                return len(landed) == 700 and replica == [(700,)] and not runs

            deadline = time.monotonic() + 240
            while not settled():
                assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()[-3000:]
                time.sleep(2)
            ids = _landed_ids(tmp_path)
            assert set(ids.values()) == {1}
            assert _windows_tell_the_truth(instance, tmp_path) >= 3
            failed = instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
            assert not failed, [r.dagster_run.run_id for r in failed]
            runs = [r.dagster_run for r in instance.get_run_records()]
            assert any("dagster/sensor_name" in r.tags for r in runs)  # the daemon's sensor copied and merged
            assert any(r.tags.get("incremental_assets/source") is None for r in runs)  # the command line's run
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
        log.close()
    src = pg_db.rows("SELECT id, v, updated_at FROM t ORDER BY id")
    assert pg_db.rows("SELECT id, v, updated_at FROM t_replica ORDER BY id") == src


def _has_replica(db) -> bool:
    with db.engine.connect() as conn:
        return sa.inspect(conn).has_table("t_replica")
