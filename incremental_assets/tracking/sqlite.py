"""SQLite: change tracking installed as row triggers, versions from a counter.

SQLite has one writer at a time, so any counter follows commit order: the ``AFTER INSERT /
UPDATE / DELETE`` triggers increment ``current_version`` in the table's ``ia_change_tracking`` row
and write the change with it into ``<table>__ct`` (the version doubles as the per-change
sequence; an update of a key is a delete of the old key and an insert of the new one). A read is
one transaction: its first statement takes the snapshot (in rollback-journal mode writers wait
until the read ends; in WAL mode they do not).

SQLite has no TRUNCATE: ``DELETE FROM t`` fires the delete trigger for every row (SQLite turns its
truncate optimisation off when there are triggers), so it is recorded as deletes. Cleanup
(:func:`~incremental_assets.tracking.cleanup_change_tracking`) raises the minimum valid version.
"""

from __future__ import annotations

import sqlalchemy as sa

from .base import META_TABLE, OPERATION, TIME, VERSION, InstalledTracker, Tracked, ddl, qualified, quoter, register

NOW_EPOCH = "((julianday('now') - 2440587.5) * 86400.0)"


def trigger_statements(conn: sa.Connection, tracked: Tracked, table: str, names: dict[str, str]) -> dict[str, str]:
    """The three ``CREATE TRIGGER`` statements, by event (the body names tables of the trigger's schema)."""
    q = quoter(conn)
    ct, meta = q(tracked.change_table), q(META_TABLE)
    keys = tracked.primary_key
    columns = ", ".join([*(q(k) for k in keys), q(VERSION), q(OPERATION), q(TIME)])
    old = ", ".join(f"OLD.{q(k)}" for k in keys)
    new = ", ".join(f"NEW.{q(k)}" for k in keys)
    key_changed = "(" + " OR ".join(f"OLD.{q(k)} IS NOT NEW.{q(k)}" for k in keys) + ")"
    row = int(tracked.id)

    def record(keys_sql: str, operation: str, when: str = "") -> str:
        condition = f" AND {when}" if when else ""
        return (
            f"UPDATE {meta} SET current_version = current_version + 1 WHERE id = {row}{condition}; "
            f"INSERT INTO {ct} ({columns}) SELECT {keys_sql}, current_version, {operation}, {NOW_EPOCH} "
            f"FROM {meta} WHERE id = {row}{condition}; "
        )

    def create(event: str, timing: str, body: str) -> str:
        return f"CREATE TRIGGER {qualified(conn, tracked.schema, names[event])} AFTER {timing} ON {q(table)} FOR EACH ROW BEGIN {body}END"

    return {
        "insert": create("insert", "INSERT", record(new, "'I'")),
        "update": create(
            "update",
            "UPDATE",
            record(old, "'D'", key_changed) + record(new, f"CASE WHEN {key_changed} THEN 'I' ELSE 'U' END"),
        ),
        "delete": create("delete", "DELETE", record(old, "'D'")),
    }


@register("sqlite")
class SQLiteTracker(InstalledTracker):
    def begin(self, conn: sa.Connection) -> None:
        ddl(conn, "BEGIN IMMEDIATE")  # one transaction for everything enable/disable does

    def trigger_statements(self, conn, tracked, table, names) -> dict[str, str]:
        return trigger_statements(conn, tracked, table, names)

    def installed(self, conn, tracked, names) -> list[str]:
        problems = []
        if not sa.inspect(conn).has_table(tracked.change_table, schema=tracked.schema):
            problems.append(f"change table {tracked.change_table!r} is missing")
        master = sa.table("sqlite_master", sa.column("name"), sa.column("type"), sa.column("tbl_name"), schema=tracked.schema)
        query = sa.select(master.c.name).where(master.c.type == "trigger", master.c.tbl_name == tracked.table)
        found = {r[0] for r in conn.execute(query)}
        for event in ("insert", "update", "delete"):
            if names[event] not in found:
                problems.append(f"trigger {names[event]!r} is missing")
        return problems

    def first_version(self) -> int:
        return self.clock_version()

    def restart_versions(self, conn, meta, tracked) -> None:
        conn.execute(
            meta.update()
            .where(meta.c.id == tracked.id)
            .values(current_version=meta.c.current_version + 1, min_valid_version=meta.c.current_version + 1)
        )

    def begin_snapshot(self, conn, info, ct) -> None:
        ddl(conn, "BEGIN")  # the first read takes the snapshot; everything after reads the same

    def versions(self, conn, meta, tracked) -> tuple[int, int]:
        current, min_valid = conn.execute(
            sa.select(meta.c.current_version, meta.c.min_valid_version).where(meta.c.id == tracked.id)
        ).one()
        return int(current), int(min_valid)

    def now_epoch(self):
        return sa.literal_column(NOW_EPOCH, sa.Float(53))
