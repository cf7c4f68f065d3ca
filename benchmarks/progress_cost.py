"""Benchmark: what reporting progress costs a copy (PostgreSQL -> Parquet, the engine, no Dagster).

    .venv/bin/python benchmarks/progress_cost.py                   # 1,000,000 rows, best of 5
    .venv/bin/python benchmarks/progress_cost.py --rows 2000000 --repeat 7

Builds ``bench_progress_<rows>`` in the database ``bench`` of the local PostgreSQL (created if
missing), then copies it as one slice into a local folder, alternating: without progress, with
the plain lines of ``sync`` (a :class:`Throttled` listener), and with the live display (rich,
drawn into memory as on a terminal, its refresh thread running). Each case is run ``--repeat``
times in turn, in this one process, after a warm-up; the best time of each is printed, with its
cost relative to the copy without progress, and saved to ``benchmarks/results/progress.md``.
A micro-benchmark gives the cost of one :meth:`Progress.add` (the call made per Arrow batch).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from incremental_assets import use_system_memory_pool  # noqa: E402
from incremental_assets.copying import PlannedSlice, copy_slice  # noqa: E402
from incremental_assets.display import LiveDisplay  # noqa: E402
from incremental_assets.landing import open_landing_store  # noqa: E402
from incremental_assets.progress import Progress, Throttled  # noqa: E402
from incremental_assets.sources import Source  # noqa: E402


def build_table(args) -> str:
    import psycopg

    base = f"host={args.host} port={args.port} user={args.user}"
    with psycopg.connect(f"{base} dbname=postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (args.database,)).fetchone():
            conn.execute(f'CREATE DATABASE "{args.database}"')
    table = f"bench_progress_{args.rows}"
    with psycopg.connect(f"{base} dbname={args.database}", autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, qty int, note text, modified timestamptz NOT NULL)")
        conn.execute(f"INSERT INTO {table} SELECT g, (g * 7919) % 100000, 'note ' || md5(g::text), "
                     f"timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second' "
                     f"FROM generate_series(1::bigint, {args.rows}) AS g")
        conn.execute(f"CREATE INDEX ON {table} (modified)")
        conn.execute(f"VACUUM ANALYZE {table}")
    return table


def copy_once(source, info, folder: Path, batch_size: int, progress: Progress | None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process, every thread) of one copy."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    store = open_landing_store(str(folder), "parquet")
    started, cpu = time.perf_counter(), time.process_time()
    copy = copy_slice(source, info, store, table="t", slice_=PlannedSlice("all", None, dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc)),
                      batch_size=batch_size, progress=progress)
    if progress is not None:
        progress.finish()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert copy.rows == info_rows[0], (copy.rows, info_rows[0])
    return seconds, cpu


info_rows = [0]


def add_cost(calls: int = 1_000_000) -> float:
    """Nanoseconds per Progress.add with a listener at sync's interval."""
    progress = Progress("t", [Throttled(lambda update: None, 10.0)])
    started = time.perf_counter()
    for _ in range(calls):
        progress.add(1)
    return (time.perf_counter() - started) / calls * 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5432)
    parser.add_argument("--user", default="postgres")
    parser.add_argument("--database", default="bench")
    parser.add_argument("--output", default=str(HERE / "results" / "progress.md"))
    args = parser.parse_args(argv)
    use_system_memory_pool()
    table = build_table(args)
    info_rows[0] = args.rows
    source = Source("bench", f"postgresql+psycopg://{args.user}@{args.host}:{args.port}/{args.database}")
    info = source.describe_table(table, watermark_column="modified")
    work = Path(tempfile.mkdtemp(prefix="progress-bench-"))
    sink = io.StringIO()

    def plain() -> Progress:
        return Progress("t", [Throttled(lambda update: print(update.describe(), file=sink), 10.0)])

    cases = {"no progress": lambda: None, "plain lines (sync, not a terminal)": plain}
    live = LiveDisplay(sink, force_terminal=True)
    cases["live display (sync, a terminal)"] = lambda: Progress("t", [live])
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    try:
        copy_once(source, info, work / "warm", args.batch_size, None)
        with live:
            for _ in range(args.repeat):
                for name, make in cases.items():
                    times[name].append(copy_once(source, info, work / "copy", args.batch_size, make()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        source.dispose()
    base = min(t for t, _ in times["no progress"])
    base_cpu = min(c for _, c in times["no progress"])
    lines = [
        f"# Progress cost, {dt.date.today()}",
        "",
        f"{args.rows:,} rows PostgreSQL -> Parquet (one slice, batches of {args.batch_size:,} rows), best of "
        f"{args.repeat}, in one process; {platform.machine()}, Python {platform.python_version()}.",
        "",
        "| case | best wall s | rows/s | wall vs no progress | best CPU s | CPU vs no progress |",
        "|---|---|---|---|---|---|",
    ]
    for name, values in times.items():
        best, cpu = min(t for t, _ in values), min(c for _, c in values)
        lines.append(f"| {name} | {best:.3f} | {args.rows / best:,.0f} | {100 * (best / base - 1):+.1f}% | {cpu:.3f} | "
                     f"{100 * (cpu / base_cpu - 1):+.1f}% |")
    ns = add_cost()
    batches = -(-args.rows // args.batch_size)
    lines += ["", f"One `Progress.add` (made once per Arrow batch): {ns:.0f} ns; {batches} batches: "
              f"{batches * ns / 1e3:.1f} us a copy, {100 * batches * ns / 1e9 / base:.4f}% of it. The live display's "
              "cost is its refresh thread (5 redraws a second), whatever the copy's size."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
