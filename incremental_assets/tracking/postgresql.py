"""PostgreSQL (13+): change tracking installed as statement triggers, versions are transaction ids.

**What is recorded.** Statement-level ``AFTER INSERT / UPDATE / DELETE`` triggers with transition
tables insert one row per changed key into ``<table>__ct``: the key, the writing transaction's id
(``pg_current_xact_id()``, a 64-bit xid8 that never wraps) as the version, a ``bigserial``
per-change sequence, the operation and the time. An update that changes a key records a delete of
the old key and an insert of the new one. An ``AFTER TRUNCATE`` trigger raises the minimum valid
version to the truncating transaction's id and empties the change table. The triggers are
``ENABLE ALWAYS`` (they also fire in logical-replication apply sessions) and run a ``SECURITY
DEFINER`` function, so writers need no privilege on the change table.

**Why transaction ids, and which are readable.** A sequence is handed out before commit, so a
sequence number below one already read can still commit later: reading up to the highest sequence
would skip it. A transaction id is handed out before commit too, but the snapshot tells which ids
are finished: every id below ``pg_snapshot_xmin(pg_current_snapshot())`` has committed or aborted,
and the committed ones are visible in that snapshot. So a read's ``new_version`` is ``xmin - 1``
and it returns the versions in ``(last, new_version]``; an id handed out later is at least the
snapshot's xmax, above it. ``xmin`` never goes back (no id below it can be handed out again), so
consecutive reads never overlap or leave a gap, and a late-committing transaction is read once it
has finished, never skipped. The xmin is the whole cluster's: a transaction left open in any
database of the server holds reads back until it ends (nothing is lost; set
``idle_in_transaction_session_timeout``). Changes committed with an id above ``new_version`` may already be in
the snapshot's rows: they are returned again by the next read (with the current row, which is
harmless), never lost.

**Commit order per key.** Transaction ids follow start order, not commit order: an older
transaction can change a key after a younger one did and committed, and a read may fall between
the two ids. The per-change sequence is taken while the row lock is held, so it does follow the
real order per key, and the read decides the operation from the row's presence in the snapshot
(D when it is gone, I when the range's first change of the key is an insert, else U), never from
the range's last change alone: a key is never reported deleted while it exists. The version of a
key is the highest id in the range, so a later read's version of a key is always higher.

**Reads** run in a ``REPEATABLE READ READ ONLY`` transaction that first takes ``ACCESS SHARE`` locks
on the table and the change table (before the snapshot), so a TRUNCATE cannot slip in between
the snapshot and the reads. The minimum valid version and xmin come from that snapshot.
"""

from __future__ import annotations

import sqlalchemy as sa

from .base import (
    META_TABLE,
    OPERATION,
    TIME,
    VERSION,
    ChangeTrackingError,
    InstalledTracker,
    Tracked,
    ddl,
    qualified,
    quoter,
    register,
)

#: all transactions below it are finished; minus one: the highest readable version
SNAPSHOT_VERSION = "pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text::bigint - 1"
TRANSACTION_VERSION = "pg_catalog.pg_current_xact_id()::text::bigint"
FIND_SCHEMA = sa.text(
    "SELECT n.nspname FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace "
    "WHERE c.oid = pg_catalog.to_regclass(:name)"
)
TRIGGERS = sa.text(
    "SELECT tgname, tgenabled FROM pg_catalog.pg_trigger WHERE tgrelid = pg_catalog.to_regclass(:name) AND NOT tgisinternal"
)
RELATION_EXISTS = sa.text("SELECT pg_catalog.to_regclass(:name) IS NOT NULL")


def trigger_function(conn: sa.Connection, tracked: Tracked, table: str) -> str:
    q = quoter(conn)
    ct = qualified(conn, tracked.schema, tracked.change_table)
    meta = qualified(conn, tracked.schema, META_TABLE)
    keys = tracked.primary_key
    columns = ", ".join([*(q(k) for k in keys), q(VERSION), q(OPERATION), q(TIME)])

    def of(alias: str) -> str:
        return ", ".join(f"{alias}.{q(k)}" for k in keys)

    same_key = " AND ".join(f"n.{q(k)} = o.{q(k)}" for k in keys)
    return f"""
DECLARE
  ia_ct_version bigint := {TRANSACTION_VERSION};
  ia_ct_time double precision := extract(epoch from pg_catalog.now());
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO {ct} ({columns}) SELECT {of('n')}, ia_ct_version, 'I', ia_ct_time FROM ia_new AS n;
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO {ct} ({columns}) SELECT {of('o')}, ia_ct_version, 'D', ia_ct_time FROM ia_old AS o;
  ELSIF TG_OP = 'UPDATE' THEN
    -- a changed key: a delete of the old key and an insert of the new one
    INSERT INTO {ct} ({columns}) SELECT {of('o')}, ia_ct_version, 'D', ia_ct_time FROM ia_old AS o
      WHERE NOT EXISTS (SELECT FROM ia_new AS n WHERE {same_key});
    INSERT INTO {ct} ({columns}) SELECT {of('n')}, ia_ct_version,
      CASE WHEN EXISTS (SELECT FROM ia_old AS o WHERE {same_key}) THEN 'U' ELSE 'I' END, ia_ct_time FROM ia_new AS n;
  ELSIF TG_OP = 'TRUNCATE' THEN
    -- every version up to this transaction's no longer describes the table: readers behind it re-initialise
    UPDATE {meta} SET min_valid_version = GREATEST(min_valid_version, ia_ct_version) WHERE id = {int(tracked.id)};
    TRUNCATE {ct};
  END IF;
  RETURN NULL;
END
"""


def dollar_quote(body: str) -> str:
    tag, n = "$ia_ct$", 0
    while tag in body:
        n += 1
        tag = f"$ia_ct{n}$"
    return f"{tag}{body}{tag}"


@register("postgresql")
class PostgreSQLTracker(InstalledTracker):
    separate_sequence = True

    def resolve_schema(self, conn: sa.Connection, ref) -> str | None:
        found = conn.execute(FIND_SCHEMA, {"name": qualified(conn, ref.schema, ref.name)}).scalar()
        return found if found is not None else (ref.schema or conn.execute(sa.text("SELECT current_schema()")).scalar())

    def begin(self, conn: sa.Connection) -> None:
        version = int(conn.execute(sa.text("SHOW server_version_num")).scalar())
        if version < 130000:
            raise ChangeTrackingError(f"change tracking needs PostgreSQL 13 or later (pg_current_xact_id); this server is {version}")

    def install(self, conn, tracked, info, names) -> None:
        q = quoter(conn)
        table = qualified(conn, tracked.schema, info.ref.name)
        function = qualified(conn, tracked.schema, names["function"])
        ddl(
            conn,
            f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
            f"SET search_path = pg_catalog, pg_temp AS {dollar_quote(trigger_function(conn, tracked, info.ref.name))}",
        )
        triggers = {
            "insert": "AFTER INSERT ON {t} REFERENCING NEW TABLE AS ia_new FOR EACH STATEMENT",
            "update": "AFTER UPDATE ON {t} REFERENCING OLD TABLE AS ia_old NEW TABLE AS ia_new FOR EACH STATEMENT",
            "delete": "AFTER DELETE ON {t} REFERENCING OLD TABLE AS ia_old FOR EACH STATEMENT",
            "truncate": "AFTER TRUNCATE ON {t} FOR EACH STATEMENT",
        }
        for event, spec in triggers.items():
            name = q(names[event])
            ddl(conn, f"DROP TRIGGER IF EXISTS {name} ON {table}")
            ddl(conn, f"CREATE TRIGGER {name} {spec.format(t=table)} EXECUTE FUNCTION {function}()")
            ddl(conn, f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {name}")

    def uninstall(self, conn, tracked, names, table_exists) -> None:
        q = quoter(conn)
        if table_exists:
            table = qualified(conn, tracked.schema, tracked.table)
            for event in ("insert", "update", "delete", "truncate"):
                ddl(conn, f"DROP TRIGGER IF EXISTS {q(names[event])} ON {table}")
        ddl(conn, f"DROP FUNCTION IF EXISTS {qualified(conn, tracked.schema, names['function'])}()")

    def installed(self, conn, tracked, names) -> list[str]:
        problems = []
        if not conn.execute(RELATION_EXISTS, {"name": qualified(conn, tracked.schema, tracked.change_table)}).scalar():
            problems.append(f"change table {tracked.change_table!r} is missing")
        found = dict(conn.execute(TRIGGERS, {"name": qualified(conn, tracked.schema, tracked.table)}).all())
        for event in ("insert", "update", "delete", "truncate"):
            state = found.get(names[event])
            if state is None:
                problems.append(f"trigger {names[event]!r} is missing")
            elif state == "D":
                problems.append(f"trigger {names[event]!r} is disabled")
            elif state == "R":
                problems.append(f"trigger {names[event]!r} fires only in replica sessions")
        return problems

    def restart_versions(self, conn, meta, tracked) -> None:
        conn.execute(
            meta.update()
            .where(meta.c.id == tracked.id)
            .values(min_valid_version=sa.func.greatest(meta.c.min_valid_version, sa.literal_column(TRANSACTION_VERSION)))
        )

    def begin_snapshot(self, conn, info, ct) -> None:
        conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        # locks first: LOCK takes no snapshot, so a TRUNCATE cannot commit between snapshot and reads
        tables = f"{qualified(conn, ct.schema, info.ref.name)}, {qualified(conn, ct.schema, ct.name)}"
        ddl(conn, f"LOCK TABLE {tables} IN ACCESS SHARE MODE")

    def versions(self, conn, meta, tracked) -> tuple[int, int]:
        current, min_valid = conn.execute(
            sa.select(sa.literal_column(SNAPSHOT_VERSION), meta.c.min_valid_version).where(meta.c.id == tracked.id)
        ).one()
        return int(current), int(min_valid)

    def now_epoch(self):
        return sa.literal_column("extract(epoch from pg_catalog.clock_timestamp())", sa.Float(53))

    def cleanup_horizon(self, conn) -> int | None:
        return int(conn.execute(sa.text(f"SELECT {SNAPSHOT_VERSION}")).scalar())
