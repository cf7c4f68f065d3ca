"""Benchmark: many tables under the daemon, PostgreSQL source and replica, side by side for N tables.

    .venv/bin/python benchmarks/many_tables.py                  # N = 10, 100, 300
    .venv/bin/python benchmarks/many_tables.py --tables 10,100  # fewer

For each N: a schema ``many_<N>`` in the database ``bench`` of the local PostgreSQL holds N tables
of ~1,000 rows (``id`` primary key, ``val``, ``note``, ``updated_at`` timestamptz, indexed: the
watermark), found by discovery (``include: ["many_<N>.*"]``) and merged into the schema
``many_<N>_rep`` of the same database. Measured, each in processes of its own:

- definitions load: ``load_definitions()`` in a fresh interpreter (imports included);
- ``sync`` initial and idle: the console script on a fresh ``DAGSTER_HOME`` (the instance made
  first by ``status``, untimed);
- one idle evaluation of every sensor: each sensor of the definitions evaluated through
  ``dg.build_sensor_context`` on that instance, after everything was copied, twice: the second
  tick is the figure (a code server's first tick also reflects every table, shown beside it);
- the daemon: ``dagster-daemon run`` on a fresh ``DAGSTER_HOME`` with the project's
  ``dagster.yaml``: the time until every table's initial load is landed and merged (``replica/*``
  materialized), then its CPU (daemon, code server and runs) over ``--idle-seconds`` while nothing
  changes, then the time one updated row takes to reach the replica.

Targets (issue "hundreds of tables"), at N = 300 on a 2-core machine: load <= 5 s, idle sensor
evaluation <= 5 s, idle daemon CPU <= 10% of a core, daemon initial load <= 120 s, sync initial
<= 60 s and idle <= 5 s, one changed row in the replica within 60 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
PYTHON = sys.executable
VENV_BIN = Path(sys.executable).parent


def sa_url(args) -> str:
    return f"postgresql+psycopg://{args.user}@{args.host}:{args.port}/{args.database}"


def build(args, n: int) -> None:
    import psycopg

    with psycopg.connect(f"host={args.host} port={args.port} user={args.user} dbname=postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (args.database,)).fetchone():
            conn.execute(f'CREATE DATABASE "{args.database}"')
    with psycopg.connect(f"host={args.host} port={args.port} user={args.user} dbname={args.database}", autocommit=True) as conn:
        for schema in (f"many_{n}", f"many_{n}_rep"):
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.execute(f"CREATE SCHEMA many_{n}")
        conn.execute(f"CREATE SCHEMA many_{n}_rep")
        for i in range(1, n + 1):
            t = f"many_{n}.t{i:04d}"
            conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, val int NOT NULL, note text, updated_at timestamptz NOT NULL)")
            conn.execute(
                f"INSERT INTO {t} SELECT g, g % 97, 'note ' || g, now() - interval '1 hour' + g * interval '1 second' "
                "FROM generate_series(1, 1000) g"
            )
            conn.execute(f"CREATE INDEX ON {t} (updated_at)")
        conn.execute("ANALYZE")


def write_config(args, n: int, folder: Path) -> Path:
    import yaml

    config = {
        "sources": {"src": {"url": sa_url(args), "discover": {
            "include": [f"many_{n}.*"],
            "watermark_columns": ["updated_at"],
            "defaults": {"partitions": {"granularity": "daily", "start": "2026-01-01"}},
        }}},
        "landing": {"url": str(folder / "landing")},
        "replica": {"url": sa_url(args), "schema": f"many_{n}_rep"},
        "sensors": {"interval_seconds": 30},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def env_for(config: Path, home: Path) -> dict[str, str]:
    return {**os.environ, "INCREMENTAL_ASSETS_CONFIG": str(config), "DAGSTER_HOME": str(home),
            "PYTHONPATH": str(PROJECT)}


def new_home(folder: Path, name: str, args=None) -> Path:
    """A fresh ``DAGSTER_HOME`` with the project's ``dagster.yaml``; with ``--storage postgres``,
    its storage in a fresh PostgreSQL database of its own instead of SQLite files (the setting the
    docs give for production), every other setting kept."""
    import yaml

    home = folder / name
    home.mkdir()
    settings = yaml.safe_load((PROJECT / "dagster_home" / "dagster.yaml").read_text())
    if args is not None and args.storage_now == "postgres":
        import psycopg

        database = f"{args.database}_dagster_{name}"
        with psycopg.connect(f"host={args.host} port={args.port} user={args.user} dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{database}"')
        settings["storage"] = {"postgres": {"postgres_url": f"postgresql://{args.user}@{args.host}:{args.port}/{database}"}}
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    return home


def timed(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[float | None, str]:
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=PROJECT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"not done after {timeout:.0f} s"
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        return None, f"failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
    return seconds, proc.stdout


LOAD = "import time; t = time.perf_counter(); from incremental_assets.definitions import load_definitions; " \
       "d = load_definitions(); print(f'{time.perf_counter() - t:.3f}')"

SENSORS = textwrap.dedent("""
    import time
    import dagster as dg
    from incremental_assets.definitions import load_definitions
    defs = load_definitions()
    with dg.DagsterInstance.get() as instance:
        sensors = list(defs.sensors or [])
        spent = []
        for _ in range(2):  # the first tick of a code server reflects the tables; later ones reuse it
            t = time.perf_counter()
            for sensor in sensors:
                with dg.build_sensor_context(instance=instance, definitions=defs, sensor_name=sensor.name,
                                             resources=defs.resources) as context:
                    sensor.evaluate_tick(context)
            spent.append(time.perf_counter() - t)
        print(f"{spent[0]:.3f} {spent[1]:.3f} {len(sensors)}")
""")


def replica_done(home: Path, n: int) -> int:
    """How many replica/* assets have a materialization in the instance at ``home``."""
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.get() as instance:
        keys = [k for k in instance.get_asset_keys() if k.path[0] == "replica"]
        return sum(1 for r in instance.get_asset_records(keys) if r.asset_entry.last_materialization_storage_id)


def tree_cpu(proc) -> float:
    """CPU seconds of a process and its descendants, with its waited-for children's."""
    import psutil

    total = 0.0
    procs = [proc, *proc.children(recursive=True)]
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + getattr(t, "children_user", 0) + getattr(t, "children_system", 0)
        except psutil.Error:
            pass
    return total


def daemon_case(args, n: int, config: Path, folder: Path) -> dict[str, str]:
    import psutil
    import sqlalchemy as sa

    out: dict[str, str] = {}
    home = new_home(folder, "daemon_home", args)
    workspace = folder / "workspace.yaml"
    workspace.write_text(textwrap.dedent(f"""
        load_from:
          - python_module:
              module_name: incremental_assets.definitions
              location_name: incremental_assets
              working_directory: {PROJECT}
    """))
    # the instance's databases are made before the daemon starts: two processes creating them at
    # once (the daemon, and this one polling) can leave Dagster's SQLite storage unusable
    subprocess.run([str(VENV_BIN / "incremental-assets"), "status"], env=env_for(config, home), cwd=PROJECT,
                   capture_output=True)
    log = open(folder / "daemon.log", "w")
    started = time.perf_counter()
    daemon = subprocess.Popen([str(VENV_BIN / "dagster-daemon"), "run", "-w", str(workspace)], env=env_for(config, home),
                              cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        done = 0
        while time.perf_counter() - started < args.daemon_timeout:
            time.sleep(2)
            done = replica_done(home, n)
            if done >= n:
                break
        seconds = time.perf_counter() - started
        out["daemon initial load"] = f"{seconds:.1f} s" if done >= n else f"not done: {done}/{n} after {seconds:.0f} s"
        if done < n:
            return out
        time.sleep(args.settle_seconds)
        watched = psutil.Process(daemon.pid)
        cpu0, t0 = tree_cpu(watched), time.perf_counter()
        time.sleep(args.idle_seconds)
        share = (tree_cpu(watched) - cpu0) / (time.perf_counter() - t0)
        out["daemon CPU, idle"] = f"{100 * share:.1f}% of a core"
        engine = sa.create_engine(sa_url(args))
        with engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE many_{n}.t0001 SET val = -1, updated_at = clock_timestamp() WHERE id = 1"))
        changed = time.perf_counter()
        arrived = None
        while time.perf_counter() - changed < args.change_timeout:
            time.sleep(1)
            with engine.connect() as conn:
                value = conn.execute(sa.text(f"SELECT val FROM many_{n}_rep.t0001 WHERE id = 1")).scalar()
            if value == -1:
                arrived = time.perf_counter() - changed
                break
        engine.dispose()
        out["one change to the replica"] = f"{arrived:.1f} s" if arrived is not None else f"not after {args.change_timeout:.0f} s"
        return out
    finally:
        try:
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait(30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(daemon.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


def one(args, n: int) -> dict[str, str]:
    build(args, n)
    folder = Path(tempfile.mkdtemp(prefix=f"ia-many-{n}-"))
    try:
        config = write_config(args, n, folder)
        home = new_home(folder, "sync_home", args)
        env = env_for(config, home)
        cli = str(VENV_BIN / "incremental-assets")
        subprocess.run([cli, "discover"], env=env, cwd=PROJECT, check=True, capture_output=True)
        subprocess.run([cli, "status"], env=env, cwd=PROJECT, capture_output=True)  # makes the instance
        out: dict[str, str] = {}
        seconds, text = timed([PYTHON, "-c", LOAD], env, 300)
        out["definitions load"] = f"{seconds:.1f} s" if seconds is not None else text
        seconds, text = timed([cli, "sync"], env, args.sync_timeout)
        out["sync initial"] = f"{seconds:.1f} s" if seconds is not None else text
        seconds, text = timed([cli, "sync"], env, args.sync_timeout)
        out["sync idle"] = f"{seconds:.1f} s" if seconds is not None else text
        seconds, text = timed([PYTHON, "-c", SENSORS], env, 600)
        if seconds is not None:
            first, later, count = text.split()[-3:]
            out["idle evaluation of all sensors"] = f"{float(later):.1f} s ({count} sensor(s); first tick {float(first):.1f} s)"
        else:
            out["idle evaluation of all sensors"] = text
        if not args.no_daemon:
            out.update(daemon_case(args, n, config, folder))
        return out
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default="10,100,300", help="comma-separated table counts (default 10,100,300)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default="5432")
    parser.add_argument("--user", default="postgres")
    parser.add_argument("--database", default="bench")
    parser.add_argument("--sync-timeout", type=float, default=600)
    parser.add_argument("--daemon-timeout", type=float, default=300, help="cap on the daemon's initial load (s)")
    parser.add_argument("--settle-seconds", type=float, default=20, help="after the initial load, before the CPU reading")
    parser.add_argument("--idle-seconds", type=float, default=60, help="how long the idle CPU is read")
    parser.add_argument("--change-timeout", type=float, default=180)
    parser.add_argument("--no-daemon", action="store_true", help="skip the daemon cases")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders (logs, landing, instances)")
    parser.add_argument("--storage", choices=["sqlite", "postgres", "both"], default="both",
                        help="the Dagster instance's storage: the project's SQLite files, PostgreSQL (the "
                             "production setting, a fresh database per instance), or both side by side (default)")
    args = parser.parse_args()
    counts = [int(x) for x in args.tables.split(",") if x.strip()]
    storages = ["sqlite", "postgres"] if args.storage == "both" else [args.storage]
    results = {}
    for n in counts:
        for storage in storages:
            args.storage_now = storage
            column = f"N = {n}" + (f", {storage} storage" if len(storages) > 1 else "")
            print(f"{column} ...", file=sys.stderr, flush=True)
            results[column] = one(args, n)
            print(f"{column}: {results[column]}", file=sys.stderr, flush=True)
    rows = list(dict.fromkeys(k for r in results.values() for k in r))
    targets = {"definitions load": "<= 5 s", "sync initial": "<= 60 s", "sync idle": "<= 5 s",
               "idle evaluation of all sensors": "<= 5 s", "daemon initial load": "<= 120 s",
               "daemon CPU, idle": "<= 10%", "one change to the replica": "<= 60 s"}
    head = "| measure | " + " | ".join(results) + " | target at N = 300 |"
    print(head)
    print("|" + "---|" * (len(results) + 2))
    for row in rows:
        print(f"| {row} | " + " | ".join(r.get(row, "-") for r in results.values()) + f" | {targets.get(row, '')} |")


if __name__ == "__main__":
    main()
