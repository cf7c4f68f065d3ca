"""Reading what landed, as a downstream asset's input does: the engine beside pyarrow's own reader.

    .venv/bin/python benchmarks/downstream.py                      # 2,000,000 rows in 10 windows
    .venv/bin/python benchmarks/downstream.py --rows 500000 --windows 4

Lands ``--rows`` rows of 9 columns (the types of ``run.py``'s table: bigint, int, decimal(12,2),
float, two texts, bool, timestamp with zone, date) as Parquet into a local landing folder, spread
over ``--windows`` daily windows (files of at most 1,000,000 rows, as the landing's default), then
reads every window in one subprocess per case and prints wall time, rows/s and peak RSS (from
``wait4``; the first case only imports what the others do, the floor of every figure):

- pyarrow ``pq.read_table`` of the files: the baseline, one table in memory;
- ``read_windows(...).to_table()``: what a ``pyarrow.Table`` input gets;
- ``to_reader()`` summed batch by batch: a ``RecordBatchReader`` input, in bounded memory;
- ``to_dataset()`` scanned for two columns with a filter;
- ``to_pandas()`` and ``to_polars()`` (when installed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ["imports only (the floor)", "pyarrow read_table", "engine to_table", "engine to_reader (sum)", "engine to_dataset (filter)",
         "engine to_pandas", "engine to_polars"]


def land(folder: Path, rows: int, windows: int) -> list[str]:
    import numpy as np
    import pyarrow as pa

    from incremental_assets.landing.local import LocalLandingStore

    store = LocalLandingStore(folder, create=True)
    schema = pa.schema([
        ("id", pa.int64()), ("qty", pa.int32()), ("amount", pa.decimal128(12, 2)), ("score", pa.float64()),
        ("note", pa.string()), ("code", pa.string()), ("active", pa.bool_()),
        ("modified", pa.timestamp("us", tz="UTC")), ("day", pa.date32()),
    ])
    keys = []
    per_window = rows // windows
    start = dt.datetime(2024, 1, 1)
    for w in range(windows):
        key = (start + dt.timedelta(days=w)).strftime("%Y-%m-%d")
        keys.append(key)
        done = 0
        batches = []
        while done < per_window:
            n = min(100_000, per_window - done)
            ids = np.arange(w * per_window + done, w * per_window + done + n, dtype=np.int64)
            batches.append(pa.record_batch([
                pa.array(ids), pa.array((ids % 100).astype(np.int32)),
                pa.array(ids % 100_000, pa.int64()).cast(pa.decimal128(21, 2)).cast(pa.decimal128(12, 2)),
                pa.array(ids / 7.0), pa.array([f"note {i}" for i in ids % 1000]), pa.array([f"C{i % 50}" for i in ids]),
                pa.array(ids % 2 == 0),
                pa.array(ids * 3_000_000 + 1_704_067_200_000_000, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
                pa.array((ids // 28_800 + 19_723).astype(np.int32)).cast(pa.date32()),
            ], schema=schema))
            done += n
        store.write_slice("t", key, "slice", schema, batches, max_rows_per_file=1_000_000)
    return keys


def run_case(case: str, folder: str, keys: list[str]) -> int:
    from incremental_assets import use_system_memory_pool

    use_system_memory_pool()  # as the project's entry points do, before pyarrow loads
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from incremental_assets.landing.local import LocalLandingStore
    from incremental_assets.landing.reading import read_windows

    store = LocalLandingStore(folder)
    if case == "imports only (the floor)":
        return 0
    if case == "pyarrow read_table":
        files = [str(Path(folder) / p) for p in store.list_files("t")]
        return pq.read_table(files).num_rows
    rows = read_windows(store, "t", keys)
    if case == "engine to_table":
        return rows.to_table().num_rows
    if case == "engine to_reader (sum)":
        total = 0
        for batch in rows.to_reader():
            total += batch.num_rows
            pc.sum(batch.column("amount"))
        return total
    if case == "engine to_dataset (filter)":
        return rows.to_dataset().to_table(columns=["id", "amount"], filter=pc.field("qty") < 10).num_rows
    if case == "engine to_pandas":
        return len(rows.to_pandas())
    if case == "engine to_polars":
        return rows.to_polars().height
    raise ValueError(case)


def measure(case: str, folder: str, keys: list[str]) -> tuple[float, int, float] | str:
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, "--case", case, "--folder", folder, "--keys", ",".join(keys)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    out, err = process.stdout.read().decode(), process.stderr.read().decode()
    if status != 0:
        last = (err.strip().splitlines() or ["failed"])[-1]
        return "not installed" if "ImportError" in last or "ModuleNotFound" in last else last
    return seconds, int(out.strip() or 0), usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--case")
    parser.add_argument("--folder")
    parser.add_argument("--keys")
    args = parser.parse_args()
    if args.case:
        print(run_case(args.case, args.folder, args.keys.split(",")))
        return
    if args.folder:
        print(",".join(land(Path(args.folder), args.rows, args.windows)))
        return
    with tempfile.TemporaryDirectory() as folder:
        # landed by a process of its own: a case's process starts as a fork of this one, whose
        # memory would count in the case's peak if it held the data
        landed = subprocess.run([sys.executable, __file__, "--folder", folder, "--rows", str(args.rows),
                                 "--windows", str(args.windows)], capture_output=True, text=True, check=True,
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        keys = landed.stdout.strip().split(",")
        print(f"{args.rows:,} rows x 9 columns in {args.windows} windows, Parquet, local folder")
        print(f"{'case':32} {'seconds':>8} {'rows/s':>12} {'peak RSS MB':>12}  rows")
        for case in CASES:
            result = measure(case, folder, keys)
            if isinstance(result, str):
                print(f"{case:32} {result}")
                continue
            seconds, rows, rss = result
            rate = f"{rows / seconds:12,.0f}" if rows else f"{'':12}"
            print(f"{case:32} {seconds:8.2f} {rate} {rss:12.0f}  {rows:,}")


if __name__ == "__main__":
    main()
