"""MySQL / MariaDB: change tracking installed as row triggers, versions from a locked counter.

**Versions in commit order.** Each tracked table has a counter (``current_version`` in its
``ia_change_tracking`` row). The ``AFTER INSERT / UPDATE / DELETE`` row triggers increment it and
write the change with the new value into ``<table>__ct``. The increment locks the counter row
until the writing transaction ends, so a transaction that writes the table holds the counter from
its first change to its commit: versions are handed out in commit order, and a committed counter
value ``V`` means every change up to ``V`` is committed (a rolled-back transaction gives its
numbers back). A read's ``new_version`` is the counter as its consistent snapshot
(``START TRANSACTION WITH CONSISTENT SNAPSHOT``, REPEATABLE READ) sees it, and the changes in
``(last, new_version]`` are all in that snapshot. The version doubles as the per-change sequence.

The price: transactions writing one tracked table are serialised from their first change until
they end, and two of them that change rows in opposite orders can deadlock (InnoDB rolls one back).
Keep writing transactions short.

**TRUNCATE** fires no trigger (and keeps the triggers). It re-creates the table under a new InnoDB
table id: the id is recorded at enable (``information_schema.INNODB_SYS_TABLES`` on MariaDB,
``INNODB_TABLES`` on MySQL 8; both need the PROCESS privilege, which the source already needs for
its safe horizon), and a read that finds another id first moves the counter and the minimum valid
version past every version handed out, so readers behind it re-initialise. Without the privilege
(or for names with non-ASCII characters) truncation cannot be detected: enable logs it.

Triggers need the TRIGGER privilege (and, with binary logging, SUPER or
``log_bin_trust_function_creators``); seeing them in ``information_schema.TRIGGERS`` at read time
needs it too.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa

from .base import OPERATION, TIME, VERSION, META_TABLE, InstalledTracker, Tracked, ddl, qualified, quoter, register

log = logging.getLogger("incremental_assets")

NOW_EPOCH = "UNIX_TIMESTAMP(NOW(6))"
TRIGGERS = sa.text(
    "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS "
    "WHERE EVENT_OBJECT_SCHEMA = COALESCE(:schema, DATABASE()) AND EVENT_OBJECT_TABLE = :table"
)
TABLE_IDS = (
    sa.text("SELECT TABLE_ID FROM information_schema.INNODB_SYS_TABLES WHERE NAME = :name"),  # MariaDB
    sa.text("SELECT TABLE_ID FROM information_schema.INNODB_TABLES WHERE NAME = :name"),  # MySQL 8
)


def filename(name: str) -> str | None:
    """InnoDB's name for an identifier (MySQL's filename encoding); None where it is not plain @XXXX."""
    out = []
    for ch in name:
        if ch.isascii() and (ch.isalnum() or ch == "_"):
            out.append(ch)
        elif ch.isascii():
            out.append(f"@{ord(ch):04x}")
        else:
            return None  # non-ASCII letters have their own short codes
    return "".join(out)


def trigger_statements(conn: sa.Connection, tracked: Tracked, table: str, names: dict[str, str]) -> dict[str, str]:
    """The three ``CREATE TRIGGER`` statements, by event."""
    q = quoter(conn)
    t = qualified(conn, tracked.schema, table)
    ct = qualified(conn, tracked.schema, tracked.change_table)
    meta = qualified(conn, tracked.schema, META_TABLE)
    keys = tracked.primary_key
    columns = ", ".join([*(q(k) for k in keys), q(VERSION), q(OPERATION), q(TIME)])
    old = ", ".join(f"OLD.{q(k)}" for k in keys)
    new = ", ".join(f"NEW.{q(k)}" for k in keys)
    key_changed = " OR ".join(f"NOT (OLD.{q(k)} <=> NEW.{q(k)})" for k in keys)
    row = int(tracked.id)

    def take(n: int) -> str:
        # the UPDATE locks the counter until this transaction ends: versions follow commit order
        return (
            f"UPDATE {meta} SET current_version = current_version + {n} WHERE id = {row}; "
            f"SELECT current_version INTO ia_ct_version FROM {meta} WHERE id = {row};"
        )

    head = "FOR EACH ROW BEGIN DECLARE ia_ct_version BIGINT; "
    return {
        "insert": f"CREATE TRIGGER {q(names['insert'])} AFTER INSERT ON {t} {head}{take(1)} "
        f"INSERT INTO {ct} ({columns}) VALUES ({new}, ia_ct_version, 'I', {NOW_EPOCH}); END",
        "update": f"CREATE TRIGGER {q(names['update'])} AFTER UPDATE ON {t} {head}"
        f"IF {key_changed} THEN {take(2)} "
        f"INSERT INTO {ct} ({columns}) VALUES ({old}, ia_ct_version - 1, 'D', {NOW_EPOCH}), "
        f"({new}, ia_ct_version, 'I', {NOW_EPOCH}); "
        f"ELSE {take(1)} INSERT INTO {ct} ({columns}) VALUES ({new}, ia_ct_version, 'U', {NOW_EPOCH}); END IF; END",
        "delete": f"CREATE TRIGGER {q(names['delete'])} AFTER DELETE ON {t} {head}{take(1)} "
        f"INSERT INTO {ct} ({columns}) VALUES ({old}, ia_ct_version, 'D', {NOW_EPOCH}); END",
    }


@register("mysql", "mariadb")
class MySQLTracker(InstalledTracker):
    def change_table_options(self, info) -> dict:
        # the table's default charset and collation: text keys of both tables must compare alike
        options = dict(info.table.kwargs)
        return {k: options[k] for k in ("mysql_default charset", "mysql_collate") if k in options}

    def install(self, conn, tracked, info, names) -> None:
        if tracked.identity is None:
            log.warning(
                "table %r: cannot read its InnoDB table id (grant PROCESS to the source user); "
                "a TRUNCATE of it will not be detected", str(info.ref),
            )
        super().install(conn, tracked, info, names)

    def trigger_statements(self, conn, tracked, table, names) -> dict[str, str]:
        return trigger_statements(conn, tracked, table, names)

    def installed(self, conn, tracked, names) -> list[str]:
        problems = []
        if not sa.inspect(conn).has_table(tracked.change_table, schema=tracked.schema):
            problems.append(f"change table {tracked.change_table!r} is missing")
        found = {r[0] for r in conn.execute(TRIGGERS, {"schema": tracked.schema, "table": tracked.table})}
        for event in ("insert", "update", "delete"):
            if names[event] not in found:
                problems.append(f"trigger {names[event]!r} is missing (or the source user lacks the TRIGGER privilege to see it)")
        return problems

    def _restart(self, meta: sa.Table, tracked: Tracked, **values) -> sa.Update:
        # MySQL assigns left to right: min_valid_version gets the incremented counter
        return (
            meta.update()
            .where(meta.c.id == tracked.id)
            .ordered_values(
                (meta.c.current_version, meta.c.current_version + 1),
                (meta.c.min_valid_version, meta.c.current_version),
                *((meta.c[name], value) for name, value in values.items()),
            )
        )

    def first_version(self) -> int:
        return self.clock_version()

    def restart_versions(self, conn, meta, tracked) -> None:
        conn.execute(self._restart(meta, tracked))

    def identity(self, conn, schema, table) -> str | None:
        database = schema or conn.execute(sa.text("SELECT DATABASE()")).scalar()
        encoded = (filename(database), filename(table))
        if None in encoded:
            return None
        for query in TABLE_IDS:
            try:  # a failed statement does not end a MySQL transaction
                found = conn.execute(query, {"name": "/".join(encoded)}).scalar()
            except sa.exc.DBAPIError:
                continue  # no such view on this server, or no PROCESS privilege
            if found is not None:
                return str(found)
        return None

    def before_snapshot(self, source, conn, meta, tracked) -> None:
        if tracked.identity is None:
            return
        now = self.identity(conn, tracked.schema, tracked.table)
        if now is None or now == tracked.identity:
            return
        log.warning(
            "table %r in source %r was truncated (InnoDB table id %s, was %s): every earlier version becomes invalid",
            tracked.table, source.name, now, tracked.identity,
        )
        conn.commit()
        conn.execute(self._restart(meta, tracked, table_identity=now))
        min_valid = conn.execute(sa.select(meta.c.min_valid_version).where(meta.c.id == tracked.id)).scalar()
        ct = sa.Table(tracked.change_table, sa.MetaData(), sa.Column(VERSION, sa.BigInteger), schema=tracked.schema)
        conn.execute(ct.delete().where(ct.c[VERSION] < min_valid))
        conn.commit()

    def begin_snapshot(self, conn, info, ct) -> None:
        conn.execution_options(isolation_level="REPEATABLE READ")
        ddl(conn, "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")

    def versions(self, conn, meta, tracked) -> tuple[int, int]:
        current, min_valid, identity = conn.execute(
            sa.select(meta.c.current_version, meta.c.min_valid_version, meta.c.table_identity).where(meta.c.id == tracked.id)
        ).one()
        if identity is not None and self.identity(conn, tracked.schema, tracked.table) not in (None, identity):
            # truncated since before_snapshot: nothing read now is valid beyond this read
            min_valid = max(int(min_valid), int(current) + 1)
        return int(current), int(min_valid)

    def now_epoch(self):
        return sa.literal_column(NOW_EPOCH, sa.Float(53))
