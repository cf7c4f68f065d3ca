"""Progress of long copies: ``sync``'s live display on a terminal and its plain lines otherwise, and
the progress lines of a run's log, on real PostgreSQL and MariaDB tables.

The interval between two lines is made small (``--progress-interval``,
``$INCREMENTAL_ASSETS_PROGRESS_SECONDS``) so that a load of a few hundred thousand rows shows
several updates."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from incremental_assets.progress import INTERVAL_ENV, Progress, ProgressUpdate, Throttled
from tests.helpers import adf_table, create_adf_table, run_cli, write_config

ROOT = Path(__file__).resolve().parent.parent
#: rows of the loads: a few updates at the tests' intervals, a few seconds of copying
ROWS = {"pg_db": 1_000_000, "mariadb_db": 300_000}
#: the live display redraws 5 times a second: a load that lasts a second or two
LIVE_ROWS = {"pg_db": 2_000_000, "mariadb_db": 300_000}
BATCH = 20_000
LINE = re.compile(r"^progress: big (reading|landing)( done)?: ([\d,]+)( of ~([\d,]+) rows \(estimate, \d+%\)| rows), "
                  r"([\d,]+) rows/s", re.M)


def _big_table(db, rows: int) -> None:
    """``big``: ``rows`` rows a second apart from 2026-01-01, indexed on ``updated_at``, analyzed."""
    if db.url.startswith("postgresql"):
        db.run("CREATE TABLE big (id bigint PRIMARY KEY, name text, updated_at timestamp NOT NULL)",
               f"INSERT INTO big SELECT g, md5(g::text), timestamp '2026-01-01' + g * interval '1 second' "
               f"FROM generate_series(1, {rows}) g",
               "CREATE INDEX ix_big_updated ON big (updated_at)", "ANALYZE big")
    else:
        db.run("CREATE TABLE big (id bigint PRIMARY KEY, name varchar(40), updated_at datetime(6) NOT NULL)",
               f"INSERT INTO big SELECT seq, md5(seq), TIMESTAMP '2026-01-01 00:00:00' + INTERVAL seq SECOND "
               f"FROM seq_1_to_{rows}",
               "CREATE INDEX ix_big_updated ON big (updated_at)", "ANALYZE TABLE big")


def _config(tmp_path, db) -> Path:
    return write_config(tmp_path, db.url, [{"name": "big", "table": "big", "watermark_column": "updated_at",
                                            "batch_size": BATCH,
                                            "partitions": {"granularity": "monthly", "start": "2026-01-01"}}])


def _figures(out: str) -> list[tuple[int, int | None, bool]]:
    """(rows, estimated total, done) of each plain progress line."""
    return [(int(m[3].replace(",", "")), int(m[5].replace(",", "")) if m[5] else None, bool(m[2]))
            for m in LINE.finditer(out)]


@pytest.mark.parametrize("engine", ["pg_db", "mariadb_db"])
def test_plain_progress_lines_and_the_runs_log(engine, request, tmp_path, capsys, dagster_home, monkeypatch):
    db = request.getfixturevalue(engine)
    rows = ROWS[engine]
    _big_table(db, rows)
    monkeypatch.setenv(INTERVAL_ENV, "0.05")  # the run log's lines
    code, out, err = run_cli(capsys, "--config", str(_config(tmp_path, db)), "sync", "--progress", "plain",
                             "--progress-interval", "0.05")
    assert code == 0, err
    assert f"big: [2026-01-01] {rows} row(s)" in out
    figures = _figures(out)
    assert len(figures) >= 3, out  # several updates during the load
    counts = [r for r, _, _ in figures]
    assert counts == sorted(counts) and counts[0] < rows and len(set(counts)) >= 3
    assert figures[-1] == (rows, figures[-1][1], True)  # the last line: all rows, done
    # the total is the engine's estimate, not a count: close to the rows, labelled as an estimate
    estimates = {t for r, t, _ in figures if r}  # (while the run plans, before its first row: no estimate yet)
    assert len(estimates) == 1 and None not in estimates
    assert 0.5 * rows <= estimates.pop() <= 2 * rows
    # the Dagster run's log holds the same lines (the UI shows them while the run goes on)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        record = instance.fetch_materializations(dg.AssetKey(["landing", "big"]), limit=1).records[0]
        messages = [e.user_message for e in instance.all_logs(record.run_id)]
    logged = _figures("\n".join(m for m in messages if m.startswith("progress: ")))
    assert len(logged) >= 3 and logged[-1][0] == rows


def test_quiet_prints_only_the_summary(pg_db, tmp_path, capsys, dagster_home):
    _big_table(pg_db, 50_000)
    code, out, err = run_cli(capsys, "--config", str(_config(tmp_path, pg_db)), "sync", "--quiet",
                             "--progress-interval", "0.01")
    assert code == 0, err
    assert out.strip() == "1 table(s): 1 copied"


def test_a_short_copy_shows_no_progress(tmp_path, capsys, dagster_home, sqlite_db):
    """Low volume: a copy shorter than the interval shows, and logs, no progress line."""
    create_adf_table(sqlite_db)
    config = write_config(tmp_path, sqlite_db.url, [adf_table()])
    code, out, err = run_cli(capsys, "--config", str(config), "sync", "--progress", "plain")
    assert code == 0, err
    assert "progress:" not in out and "5 row(s)" in out
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        record = instance.fetch_materializations(dg.AssetKey(["landing", "data_source_table"]), limit=1).records[0]
        assert not [e for e in instance.all_logs(record.run_id) if e.user_message.startswith("progress:")]


def _read_pty(command: list[str], env: dict[str, str], timeout: float = 240) -> str:
    """Run ``command`` on a pseudo-terminal (so that its output is a terminal) and return what it
    wrote, control sequences included."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the other side closed
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        proc.kill() if proc.poll() is None else None
        proc.wait()
        os.close(master)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("engine", ["pg_db", "mariadb_db"])
def test_the_live_display_moves_on_a_terminal(engine, request, tmp_path, dagster_home):
    db = request.getfixturevalue(engine)
    rows = LIVE_ROWS[engine]
    _big_table(db, rows)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DAGSTER_HOME": str(dagster_home), "COLUMNS": "160"}
    output = _read_pty([sys.executable, "-m", "incremental_assets.cli", "--config", str(_config(tmp_path, db)), "sync"],
                       env)
    assert "\x1b[" in output  # redrawn in place, not printed line after line
    output = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    assert f"big: [2026-01-01] {rows} row(s)" in output, output[-2000:]
    # frames of the display: the table's line redrawn with growing counts against the estimate
    frames = re.findall(r"big\s+(?:reading|landing)\s.*?([\d,]+) / ~([\d,]+) rows \(estimate\)\s+([\d,]+) rows/s", output)
    counts = [int(done.replace(",", "")) for done, _, _ in frames]
    assert len(set(counts)) >= 2, output[-3000:]  # it moved
    assert counts == sorted(counts)
    assert "progress: big" not in output  # not the plain lines


def test_throttled_lines_for_long_phases_only():
    """A listener at an interval shows nothing for a phase shorter than it, and for a longer one
    a line per interval and a last line."""
    shown: list[ProgressUpdate] = []
    listener = Throttled(shown.append, 0.05)
    quick = Progress("quick", [listener])
    quick.add(10)
    quick.finish()
    assert shown == []
    slow = Progress("slow", [listener], total=1000)
    for _ in range(10):
        time.sleep(0.02)
        slow.add(100)
    slow.finish()
    assert 2 <= len(shown) <= 6
    assert shown[-1].done and shown[-1].rows == 1000 and shown[-1].fraction == 1.0
    assert all(u.table == "slow" for u in shown)
    assert "slow landing" in shown[0].describe() and "of ~1,000 rows (estimate" in shown[0].describe()


def test_plain_lines_keep_coming_while_no_row_arrives():
    """A read whose first row takes long (a server sorting a large range) still gets its plain
    line every interval, its time elapsed brought up to date."""
    import io

    from incremental_assets.display import PlainLines

    out = io.StringIO()
    with PlainLines(out, 0.1) as lines:
        progress = Progress("slow", [lines], total=500)
        time.sleep(0.55)
        progress.add(500)
        progress.finish()
    shown = out.getvalue().splitlines()
    waiting = [line for line in shown if line.startswith("progress: slow reading: 0 of ~500 rows")]
    assert len(waiting) >= 3, shown
    assert shown[-1].startswith("progress: slow landing done: 500 of ~500 rows")


def test_progress_of_batches_run_by_worker_processes(pg_db, tmp_path, capsys, dagster_home):
    """``sync --jobs 2`` runs batches in worker processes: their progress is shown all the same."""
    _big_table(pg_db, ROWS["pg_db"])
    pg_db.run("CREATE TABLE big_b AS SELECT * FROM big", "CREATE INDEX ix_big_b ON big_b (updated_at)", "ANALYZE big_b")
    config = write_config(tmp_path, pg_db.url, [
        {"name": "big", "table": "big", "watermark_column": "updated_at", "batch_size": BATCH,
         "partitions": {"granularity": "monthly", "start": "2026-01-01"}},
        {"name": "big_b", "table": "big_b", "watermark_column": "updated_at", "batch_size": BATCH,
         "partitions": {"granularity": "weekly", "start": "2026-01-01"}},  # another job: another batch
    ])
    code, out, err = run_cli(capsys, "--config", str(config), "sync", "--jobs", "2", "--progress", "plain",
                             "--progress-interval", "0.05")
    assert code == 0, err
    for table in ("big", "big_b"):
        lines = [line for line in out.splitlines() if line.startswith(f"progress: {table} ")]
        assert len(lines) >= 2, out
        assert lines[-1].startswith(f"progress: {table} landing done: {ROWS['pg_db']:,} of ~")
