"""The embedded demo: ADF's incremental-copy tutorial tables in a SQLite file."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from pathlib import Path

from ..config import DEMO_DIR_ENV, PROJECT_DIR

TABLES: dict[str, tuple[str, str, list[tuple]]] = {
    "data_source_table": (
        "CREATE TABLE data_source_table (PersonID int, Name varchar(255), LastModifytime datetime)",
        "CREATE INDEX ix_data_source_table_LastModifytime ON data_source_table (LastModifytime)",
        [
            (1, "aaaa", "2017-09-01 00:56:00"),
            (2, "bbbb", "2017-09-02 05:23:00"),
            (3, "cccc", "2017-09-03 02:36:00"),
            (4, "dddd", "2017-09-04 03:21:00"),
            (5, "eeee", "2017-09-05 08:06:00"),
        ],
    ),
    "customer_table": (
        "CREATE TABLE customer_table (PersonID int, Name varchar(255), LastModifytime datetime)",
        "CREATE INDEX ix_customer_table_LastModifytime ON customer_table (LastModifytime)",
        [
            (1, "John", "2017-09-01 00:56:00"),
            (2, "Mike", "2017-09-02 05:23:00"),
            (3, "Alice", "2017-09-03 02:36:00"),
            (4, "Andy", "2017-09-04 03:21:00"),
            (5, "Anny", "2017-09-05 08:06:00"),
        ],
    ),
    "project_table": (
        "CREATE TABLE project_table (Project varchar(255), Creationtime datetime)",
        "CREATE INDEX ix_project_table_Creationtime ON project_table (Creationtime)",
        [
            ("project1", "2015-01-01 00:00:00"),
            ("project2", "2016-02-02 01:23:00"),
            ("project3", "2017-03-04 05:16:00"),
        ],
    ),
}


def demo_dir() -> Path:
    """The demo's folder (source database and landing), created on first use."""
    path = Path(os.environ.setdefault(DEMO_DIR_ENV, str(PROJECT_DIR / ".demo")))
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_demo_database() -> Path:
    """Create the demo source with ADF's tutorial rows unless it exists already."""
    path = demo_dir() / "source.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        existing = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for name, (create, index, rows) in TABLES.items():
            if name in existing:
                continue
            conn.execute(create)
            conn.execute(index)
            marks = ",".join("?" * len(rows[0]))
            conn.executemany(f"INSERT INTO {name} VALUES ({marks})", rows)
    return path


def add_demo_row(path: Path | None = None) -> tuple[int, str]:
    """Insert one new row into data_source_table, as an application would (the demo's activity)."""
    path = path or ensure_demo_database()
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    with sqlite3.connect(path) as conn:
        next_id = conn.execute("SELECT COALESCE(MAX(PersonID), 0) + 1 FROM data_source_table").fetchone()[0]
        conn.execute("INSERT INTO data_source_table VALUES (?, ?, ?)", (next_id, f"person {next_id}", now))
    return next_id, now
