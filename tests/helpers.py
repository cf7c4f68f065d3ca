"""Helpers for end-to-end tests: write a configuration, run the CLI, read what landed."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pyarrow as pa
import yaml

from incremental_assets import cli
from incremental_assets.landing import open_landing_store

ADF_ROWS = [
    (1, "aaaa", dt.datetime(2017, 9, 1, 0, 56)),
    (2, "bbbb", dt.datetime(2017, 9, 2, 5, 23)),
    (3, "cccc", dt.datetime(2017, 9, 3, 2, 36)),
    (4, "dddd", dt.datetime(2017, 9, 4, 3, 21)),
    (5, "eeee", dt.datetime(2017, 9, 5, 8, 6)),
]


def create_adf_table(db, rows=ADF_ROWS, *, name="data_source_table", index=True):
    """ADF tutorial 1's table, with its five rows."""
    q = (lambda c: f'"{c}"') if db.url.startswith("postgresql") else (lambda c: c)  # keep the tutorial's case
    db.run(f"CREATE TABLE {name} ({q('PersonID')} int, {q('Name')} varchar(255), {q('LastModifytime')} {timestamp_type(db)})")
    if index:
        db.run(f"CREATE INDEX ix_{name}_lm ON {name} ({q('LastModifytime')})")
    insert_rows(db, rows, name=name)


def timestamp_type(db) -> str:
    return "datetime(6)" if db.url.startswith("mysql") else ("timestamp" if db.url.startswith("postgresql") else "datetime")


def insert_rows(db, rows, *, name="data_source_table"):
    for person, who, when in rows:
        value = when.strftime("%Y-%m-%d %H:%M:%S") if db.url.startswith("sqlite") else when
        db.run(f"INSERT INTO {name} VALUES (:p, :n, :t)", params={"p": person, "n": who, "t": value})


def fresh_time() -> dt.datetime:
    """A naive UTC 'now' (whole seconds) as an application would stamp a new row, after the last
    copy's horizon; sleeps so the horizon (floored to seconds) will have passed it."""
    time.sleep(1.05)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)
    return now


def after_horizon() -> None:
    """Wait until the safe horizon (whole seconds, with the engines' one-second margin) passes rows stamped now."""
    time.sleep(2.1)


def write_config(tmp_path: Path, source_url: str, tables: list[dict], *, landing: str | None = None, fmt="parquet", **extra) -> Path:
    config = {
        "sources": {"src": {"url": source_url, "retries": 1, "retry_delay_seconds": 0.1, "horizon_wait_seconds": 2}},
        "landing": {"url": landing or str(tmp_path / "landing"), "format": fmt},
        "tables": [{"source": "src", "mode": "watermark", **t} for t in tables],
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def adf_table(**overrides) -> dict:
    return {
        "name": "data_source_table",
        "table": "data_source_table",
        "watermark_column": "LastModifytime",
        "partitions": {"granularity": "monthly", "start": "2017-09-01"},
        **overrides,
    }


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def landed(landing_url: str, table: str, fmt: str = "parquet", *, env=None) -> tuple[list[str], pa.Table | None]:
    """All files landed for ``table`` and their rows concatenated."""
    store = open_landing_store(landing_url, fmt, env=env)
    files = store.list_files(table)
    tables = [store.read_arrow(f) for f in files]
    return files, (pa.concat_tables(tables) if tables else None)


def landed_rows(landing_url: str, table: str, columns=("PersonID", "Name"), fmt="parquet", env=None) -> list[tuple]:
    _, data = landed(landing_url, table, fmt, env=env)
    if data is None:
        return []
    return sorted(zip(*(data.column(c).to_pylist() for c in columns)))


def local_publish_fails(monkeypatch, partition: str) -> None:
    """The local landing store cannot publish the files of ``partition`` (a full disk, say)."""
    from incremental_assets.landing import LandingError
    from incremental_assets.landing.local import LocalLandingStore

    publish = LocalLandingStore._publish

    def full(self, temp, path, table, rows):
        if f"/{partition}/" in path:
            raise LandingError("cannot publish file: No space left on device", store=self.describe(), table=table, path=path)
        return publish(self, temp, path, table, rows)

    monkeypatch.setattr(LocalLandingStore, "_publish", full)
