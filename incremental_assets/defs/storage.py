"""The project instance's storage: Dagster's SQLite storage, with two costs per run taken out.

- **A run's batch of asset events in one transaction per database.** A run over a range of
  partitions (a backfill, or ``incremental-assets sync`` catching up on daily windows) records one
  ``ASSET_MATERIALIZATION_PLANNED`` and one ``ASSET_MATERIALIZATION`` per partition. Dagster hands
  these to the storage as batches when ``DAGSTER_EVENT_BATCH_SIZE`` is set, but its SQLite storage
  writes a batch one event at a time: for each, a transaction on the run's database and one on the
  index database, each with a connection and an fsync of its own, about 10 ms an event.
- **A new run's database copied from an empty one.** Dagster creates each run's database by
  creating its tables and stamping its schema version with alembic, which loads every migration
  script: 60 to 80 ms a run. Here that is done once per Dagster version, when the instance is
  first opened with it, into a template beside the runs' databases
  (``.run-template-<dagster version>.sqlite``), and every run copies it.

The files are Dagster's own, written with Dagster's own statements, so an instance configured
with plain ``storage: sqlite`` over the same folder reads them alike. ``dagster_home/dagster.yaml``
configures it (``storage: custom:``, this module's :class:`SqliteStorage`, ``base_dir`` from
``DAGSTER_HOME``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from dagster._core.events import ASSET_CHECK_EVENTS, ASSET_EVENTS, EVENT_TYPE_TO_PIPELINE_RUN_STATUS
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.base_storage import DagsterStorage
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import SqliteScheduleStorage
from dagster._core.storage.sqlite_storage import (
    DagsterSqliteStorage,
    _event_logs_directory,
    _runs_directory,
    _schedule_directory,
)
from dagster._serdes import ConfigurableClassData
from dagster.version import __version__ as DAGSTER_VERSION

#: events buffered per batch before Dagster hands them over; a batch also ends with its step
EVENT_BATCH_SIZE = "1000"


def _batchable(event: EventLogEntry) -> bool:
    """An event whose storage is exactly: a row in the run's database, its mirror in the index
    database, its tags and the asset's entry (what ``SqliteEventLogStorage.store_event`` does for it)."""
    dagster_event = event.dagster_event
    if dagster_event is None or dagster_event.asset_key is None:
        return False
    kind = dagster_event.event_type
    return kind in ASSET_EVENTS and kind not in ASSET_CHECK_EVENTS and kind not in EVENT_TYPE_TO_PIPELINE_RUN_STATUS


def _entry_kind(event: EventLogEntry) -> tuple:
    return event.dagster_event.asset_key, event.dagster_event.event_type


class FastSqliteEventLogStorage(SqliteEventLogStorage):
    """``SqliteEventLogStorage`` whose ``store_event_batch`` writes a run of asset events in one
    transaction on the run's database and one on the index database, and whose new run databases
    are copies of an empty one."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        super().__init__(base_dir, inst_data)
        # Dagster reads the batch size from the environment only, at every event: a process whose
        # instance has this storage batches (runs started from it inherit the setting); a value
        # already set is kept, 0 turns batching off
        os.environ.setdefault("DAGSTER_EVENT_BATCH_SIZE", EVENT_BATCH_SIZE)
        # the template is made when the instance is opened (by `dagster dev`, `incremental-assets
        # status`, ...), once per Dagster version, as Dagster makes the index database: not by the
        # first run, which would wait for it (about 0.1 s)
        try:
            if not os.path.exists(self._template):
                self._make_template(self._template)
        except Exception:  # noqa: BLE001 - opening the instance never fails for want of a template
            pass  # the first run tries again, and if it cannot either, Dagster creates its database

    @property
    def _template(self) -> str:
        return os.path.join(self._base_dir, f".run-template-{DAGSTER_VERSION}.sqlite")

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        group: list[EventLogEntry] = []
        for event in events:  # in order: a run's event log keeps the order events came in
            if _batchable(event) and (not group or event.run_id == group[0].run_id):
                group.append(event)
                continue
            self._store_group(group)
            group = [event] if _batchable(event) else []
            if not group:
                self.store_event(event)
        self._store_group(group)

    def _store_group(self, events: list[EventLogEntry]) -> None:
        if len(events) <= 1:
            for event in events:
                self.store_event(event)
            return
        # the rows of Dagster's own statement (prepare_insert_event), through one compiled INSERT:
        # a statement built per event costs more to build and to compile than to run (731 events:
        # 0.1 s of each database's transaction)
        rows = [self._event_to_row(event) for event in events]
        insert = SqlEventLogStorageTable.insert()
        with self.run_connection(events[0].run_id) as conn:
            conn.execute(insert, rows)
        with self.index_transaction() as conn:
            event_ids = [conn.execute(insert, row).inserted_primary_key[0] for row in rows]
            self._store_asset_event_tags(conn, events, event_ids)
            # consecutive events of one asset and one kind set the same columns of the asset's
            # entry (its last run, materialization, timestamp): the last one's values are what the
            # entry ends with, so only it is written (70 planned events: one update, not 70)
            for i, (event, event_id) in enumerate(zip(events, event_ids)):
                if i + 1 == len(events) or _entry_kind(events[i + 1]) != _entry_kind(event):
                    self._store_asset_event(conn, event, event_id)

    def _initdb(self, engine: Engine, for_index_shard: bool = False) -> None:
        path = engine.url.database
        if for_index_shard or not os.path.isabs(path or "") or os.path.exists(path) or not self._copy_template(path):
            super()._initdb(engine, for_index_shard=for_index_shard)  # Dagster's own, checks versions

    def _copy_template(self, path: str) -> bool:
        """Create the run database ``path`` as a copy of the template; False where that cannot be
        done (the caller then lets Dagster create it): the file appeared meanwhile, the folder
        refuses hard links, the template could not be made or copied."""
        template = self._template
        partial = f"{path}.{os.getpid()}.partial"  # not *.db: never taken for a run's database
        try:
            if not os.path.exists(template) and not self._make_template(template):
                return False
            shutil.copyfile(template, partial)
            try:
                os.link(partial, path)  # whole, and only if no one created it meanwhile
            finally:
                os.unlink(partial)
        except Exception:  # noqa: BLE001 - the template only saves time: Dagster's own init takes over
            return False
        return True

    def _make_template(self, template: str) -> bool:
        """An empty run database made by Dagster itself, in place at once or not at all."""
        partial = f"{template}.{os.getpid()}.partial"
        engine = sa.create_engine(f"sqlite:///{partial}", poolclass=NullPool)
        try:
            super()._initdb(engine)
            engine.dispose()  # the last connection closed folds the write-ahead log into the file
            if os.path.exists(f"{partial}-wal"):
                return False
            os.replace(partial, template)
            return True
        finally:
            engine.dispose()
            for leftover in (partial, f"{partial}-wal", f"{partial}-shm"):
                if os.path.exists(leftover):
                    os.unlink(leftover)


class SqliteStorage(DagsterSqliteStorage):
    """Dagster's SQLite storage (``storage: sqlite``), its event log a
    :class:`FastSqliteEventLogStorage`: the same folders and files."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        self.base_dir = base_dir
        self._run_storage = SqliteRunStorage.from_local(_runs_directory(base_dir))
        self._event_log_storage = FastSqliteEventLogStorage(_event_logs_directory(base_dir))
        self._schedule_storage = SqliteScheduleStorage.from_local(_schedule_directory(base_dir))
        self._inst_data = inst_data
        DagsterStorage.__init__(self)

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value) -> SqliteStorage:
        return cls.from_local(inst_data=inst_data, **config_value)
