"""A process killed while it copies or merges (SIGKILL: the OOM killer, a lost node, a deploy)
never wedges its table: the next ``sync`` ends the run it left STARTED, frees its pool slot,
removes its temporary files and copies again, with no row lost or doubled.

Real processes: the CLI in a subprocess, killed at moments found by watching for their signs
(a temporary file appearing, a file published, a merge query running), not by sleeping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml

from incremental_assets.landing import open_landing_store

ROOT = Path(__file__).resolve().parent.parent
ROWS = 200_000
TABLE = "big"


def _config(tmp_path: Path, db, replica_url: str | None = None) -> Path:
    config = {
        "sources": {"src": {"url": db.url}},
        "landing": {"url": str(tmp_path / "landing"), "format": "parquet"},
        "tables": [{
            "name": TABLE, "source": "src", "table": TABLE, "mode": "watermark", "watermark_column": "lm",
            "primary_key": ["id"], "partitions": {"granularity": "monthly", "start": "2017-01-01"},
        }],
    }
    if replica_url:
        config["replica"] = {"url": replica_url}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _big_table(db) -> None:
    db.run(
        f"CREATE TABLE {TABLE} (id int PRIMARY KEY, name text, lm timestamp)",
        f"CREATE INDEX ix_{TABLE}_lm ON {TABLE} (lm)",
        f"INSERT INTO {TABLE} SELECT g, md5(g::text), timestamp '2017-01-01' + g * interval '10 minutes' "
        f"FROM generate_series(1, {ROWS}) g",
        f"ANALYZE {TABLE}",
    )


def _sync(config: Path, home: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, DAGSTER_HOME=str(home), PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "incremental_assets.cli", "--config", str(config), "sync", *extra],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _wait_for(proc: subprocess.Popen, sign, what: str, timeout: float = 120):
    """Poll ``sign()`` until it is truthy; fail if the process ends (or time runs out) first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sign()
        if found:
            return found
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"sync ended (exit {proc.returncode}) before {what} was seen:\n{out}\n{err}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"{what} not seen within {timeout} s")


def _temps(landing: Path) -> list[Path]:
    return sorted(landing.glob(f"{TABLE}/*/.*.tmp"))


def _visible(landing: Path) -> list[Path]:
    return sorted(landing.glob(f"{TABLE}/*/*.parquet"))


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _runs(home: Path, monkeypatch) -> list[dg.DagsterRun]:
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        return [r.dagster_run for r in instance.get_run_records()]


def _in_flight(runs: list[dg.DagsterRun]) -> list[dg.DagsterRun]:
    return [r for r in runs if not r.is_finished]


def _assert_exactly_once(tmp_path: Path) -> None:
    store = open_landing_store(str(tmp_path / "landing"))
    ids = []
    for path in store.list_files(TABLE):
        ids.extend(store.read_arrow(path).column("id").to_pylist())
    assert len(ids) == ROWS, f"{len(ids) - ROWS:+d} row(s) landed against the source's {ROWS}"
    assert sorted(ids) == list(range(1, ROWS + 1))


def _second_sync_recovers(config: Path, home: Path, tmp_path: Path, monkeypatch, killed_run: dg.DagsterRun,
                          second: subprocess.Popen | None = None, said: str = "") -> str:
    code, out, err = _finish(second or _sync(config, home), timeout=240)
    err = said + err
    assert code == 0, out + err
    assert f"run {killed_run.run_id} was left STARTED" in err and "ended as failed" in err, err
    runs = {r.run_id: r for r in _runs(home, monkeypatch)}
    assert runs[killed_run.run_id].status == dg.DagsterRunStatus.FAILURE
    assert _in_flight(list(runs.values())) == []
    assert _temps(tmp_path / "landing") == [], (killed_run.tags, out, err)
    _assert_exactly_once(tmp_path)
    return out


def _the_killed_run(home: Path, monkeypatch) -> dg.DagsterRun:
    left = _in_flight(_runs(home, monkeypatch))
    assert [r.status for r in left] == [dg.DagsterRunStatus.STARTED], "the kill should leave the run STARTED"
    return left[0]


def test_killed_during_read_while_other_syncs_wait_for_it(pg_db, tmp_path, monkeypatch):
    _big_table(pg_db)
    config, home = _config(tmp_path, pg_db), tmp_path / "home"
    landing = tmp_path / "landing"
    first = _sync(config, home)
    _wait_for(first, lambda: _temps(landing), "a temporary file")
    # paused, not dead: a second sync must wait for it, say on what, and give up at its timeout
    os.kill(first.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        code, out, err = _finish(_sync(config, home, "--wait-timeout", "2"), timeout=120)
        assert code == 1
        assert f"{TABLE}: waiting for run" in err and f"process {first.pid} on this host" in err, err
        assert "FAILED: not copied, a copy is still in flight after 2 s" in err and "--wait-timeout" in err, err
        assert time.monotonic() - started < 60
        assert _temps(landing), "the temporary files of a live copy are left alone"
        # another sync waits for it, and goes on as soon as it dies
        second = _sync(config, home, "--wait-timeout", "200")
        said = ""
        while "waiting for run" not in said:
            line = second.stderr.readline()
            assert line, f"the second sync ended without waiting: {said}"
            said += line
        killed = _the_killed_run(home, monkeypatch)
    finally:
        _kill(first)  # now it dies mid-read
    assert _temps(landing)
    _second_sync_recovers(config, home, tmp_path, monkeypatch, killed, second, said)


def test_killed_after_publishing_files_before_recording_them(pg_db, tmp_path, monkeypatch):
    _big_table(pg_db)
    config, home = _config(tmp_path, pg_db), tmp_path / "home"
    landing = tmp_path / "landing"
    first = _sync(config, home)
    _wait_for(first, lambda: _visible(landing), "a published file")
    _kill(first)
    killed = _the_killed_run(home, monkeypatch)
    assert _visible(landing)  # published, but the watermark was never recorded: copied again, replaced
    _second_sync_recovers(config, home, tmp_path, monkeypatch, killed)


def test_killed_during_replica_merge(pg_db, tmp_path, monkeypatch):
    _big_table(pg_db)
    pg_db.run("CREATE SCHEMA replica")
    replica_url = sa.make_url(pg_db.url).set(query={"options": "-csearch_path=replica"}).render_as_string(hide_password=False)
    config, home = _config(tmp_path, pg_db, replica_url), tmp_path / "home"

    def merging():
        return pg_db.rows(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND state = 'active' AND (query ILIKE 'COPY%FROM STDIN%' OR query ILIKE 'INSERT%')"
        )

    first = _sync(config, home)
    _wait_for(first, merging, "a replica merge query")
    _kill(first)
    killed = _the_killed_run(home, monkeypatch)
    # one run lands and merges: its landing step was done, its merge step was killed
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        landed = instance.fetch_materializations(dg.AssetKey(["landing", TABLE]), limit=10).records
        assert landed and {r.run_id for r in landed} == {killed.run_id}
        assert not instance.fetch_materializations(dg.AssetKey(["replica", TABLE]), limit=10).records
    out = _second_sync_recovers(config, home, tmp_path, monkeypatch, killed)
    assert "merged" in out
    source = pg_db.rows(f"SELECT id, name, lm FROM public.{TABLE} ORDER BY id")
    assert pg_db.rows(f"SELECT id, name, lm FROM replica.{TABLE} ORDER BY id") == source


def test_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    """The next attempt on a table removes what a killed writer left, never what a live one writes."""
    import pyarrow as pa

    code = (
        "import sys, time, pyarrow as pa\n"
        "from incremental_assets.landing import open_landing_store\n"
        "store = open_landing_store(sys.argv[1])\n"
        "def batches():\n"
        "    yield pa.record_batch({'id': [1]})\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(600)\n"
        "store.write_slice(sys.argv[2], '2024-01-01', 'slice', pa.schema([('id', pa.int64())]), batches())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    landing = tmp_path / "landing"
    writers = {name: subprocess.Popen([sys.executable, "-c", code, str(landing), name], env=env, stdout=subprocess.PIPE, text=True)
               for name in ("dead", "live")}
    try:
        for proc in writers.values():
            assert proc.stdout.readline() == "writing\n"
        _kill(writers["dead"])
        store = open_landing_store(str(landing))
        dead_temps = sorted(landing.glob("dead/*/.*.tmp"))
        live_temps = sorted(landing.glob("live/*/.*.tmp"))
        assert len(dead_temps) == 1 and len(live_temps) == 1
        assert store.remove_dead_temps("live") == 0
        assert store.remove_dead_temps("dead") == 1
        assert sorted(landing.glob("dead/*/.*.tmp")) == [] and sorted(landing.glob("live/*/.*.tmp")) == live_temps
        # and the next write of the dead table's slice lands it whole
        store.write_slice("dead", "2024-01-01", "slice", pa.schema([("id", pa.int64())]), [pa.record_batch({"id": [1, 2]})])
        assert store.read_arrow("dead/2024-01-01/slice.parquet").column("id").to_pylist() == [1, 2]
    finally:
        for proc in writers.values():
            if proc.poll() is None:
                _kill(proc)


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2:].split()[1])


def test_killed_run_worker_under_the_daemon_is_ended_and_the_sensor_copies_again(pg_db, tmp_path, monkeypatch):
    """dagster-daemon with the project's instance settings: the run worker of a sensor's run is
    killed mid-copy (with its step process, as a lost node would); the next sensor tick ends
    the run as failed and requests the copy again, which lands every row once."""
    from incremental_assets.cli import INSTANCE_YAML
    from incremental_assets.config import CONFIG_ENV
    from incremental_assets.defs.liveness import PROCESS_TAG

    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to find the run worker")
    _big_table(pg_db)
    config, home = _config(tmp_path, pg_db), tmp_path / "home"
    settings = yaml.safe_load(config.read_text())
    settings["sensors"] = {"interval_seconds": 5}
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    home.mkdir()
    (home / "dagster.yaml").write_text(INSTANCE_YAML)
    landing = tmp_path / "landing"
    env = dict(os.environ, DAGSTER_HOME=str(home), PYTHONPATH=str(ROOT), **{CONFIG_ENV: str(config)})
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-m", "incremental_assets.definitions"],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    try:
        with dg.DagsterInstance.get() as instance:
            def copying():
                runs = [r for r in _in_flight([x.dagster_run for x in instance.get_run_records()]) if PROCESS_TAG in r.tags]
                return runs if runs and _temps(landing) else None

            (run,) = _wait_for(daemon, copying, "a sensor's run copying", timeout=150)
            step = int(run.tags[PROCESS_TAG].split("-")[1])
            worker = _parent(step)
            for pid in (worker, step):  # the whole run, as a lost node would
                os.kill(pid, signal.SIGKILL)
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED

            def recovered():
                runs = [x.dagster_run for x in instance.get_run_records()]
                ended = instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
                done = [r for r in runs if r.run_id != run.run_id and r.status == dg.DagsterRunStatus.SUCCESS]
                return ended and done and not _in_flight(runs)

            _wait_for(daemon, recovered, "the killed run ended and the copy done again", timeout=150)
            # ended by Dagster's code server (which launched the worker) or by the sensor (which
            # reads the process the run recorded), whichever saw it first
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
        log.close()
    assert _temps(landing) == []
    _assert_exactly_once(tmp_path)


def test_sensor_ends_a_run_whose_process_died_and_requests_the_copy(pg_db, tmp_path, monkeypatch):
    """Where nothing else notices (the whole host of a run went, or a sync was killed), the
    table's sensor does: it ends the run, frees its pool slot and removes its temporary files,
    and requests the copy instead of skipping forever behind it."""
    from incremental_assets.definitions import load_project
    from incremental_assets.defs.liveness import table_pools

    _big_table(pg_db)
    config, home = _config(tmp_path, pg_db), tmp_path / "home"
    landing = tmp_path / "landing"
    first = _sync(config, home)
    _wait_for(first, lambda: _temps(landing), "a temporary file")
    _kill(first)
    killed = _the_killed_run(home, monkeypatch)
    _, defs = load_project(str(config))
    sensor = defs.resolve_sensor_def("incremental_copy_src_sensor")
    with dg.DagsterInstance.get() as instance:
        assert instance.event_log_storage.get_concurrency_info(table_pools(TABLE)[0]).active_run_ids == {killed.run_id}
        with dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs) as context:
            data = sensor.evaluate_tick(context)
        assert data.skip_message is None and len(data.run_requests) == 1, data.skip_message
        assert instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.FAILURE
        assert instance.event_log_storage.get_concurrency_info(table_pools(TABLE)[0]).active_run_ids == set()
    assert _temps(landing) == []


def test_azure_scratch_files_of_dead_writers_are_removed(tmp_path):
    """An Azure store writes each file to local scratch space before uploading it: a killed
    writer's scratch files go at the next attempt (no call reaches the container), a live
    writer's stay, and a nameless one of an older version goes once it is a day old."""
    from azure.storage.blob import ContainerClient

    from incremental_assets.landing.azure import AzureLandingStore
    from incremental_assets.landing.base import new_temp_token
    from incremental_assets.processes import current_owner

    gone = subprocess.Popen([sys.executable, "-c", "import incremental_assets.processes as p; print(p.current_owner())"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    dead_owner = gone.communicate(timeout=60)[0].strip()
    assert dead_owner.split("-")[1] == str(gone.pid) and dead_owner != current_owner()
    client = ContainerClient("http://127.0.0.1:1/devstoreaccount1", "landing")  # never called
    store = AzureLandingStore(client, tmp_dir=tmp_path)
    dead = tmp_path / f"landing-{dead_owner}-abc123-0-x1y2z3.tmp"
    live = tmp_path / f"landing-{new_temp_token()}-0-a1b2c3.tmp"
    old, recent = tmp_path / "landing-0123456789ab-0-oldone.tmp", tmp_path / "landing-ba9876543210-0-newone.tmp"
    other = tmp_path / "unrelated.tmp"
    for path in (dead, live, old, recent, other):
        path.write_bytes(b"partial")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    assert store.remove_dead_temps("big") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, recent, other))
