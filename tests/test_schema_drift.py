"""Schema changes at the source, end to end with ``incremental-assets sync`` on PostgreSQL and
MariaDB: a column added, dropped, renamed; types widened. After each change the landing still
reads as one table (every row, one schema) and the replica holds every row, checked row by row;
a replica that was not merging yet catches up over windows of every shape."""

from __future__ import annotations

import datetime as dt
import decimal
import glob
import time

import dagster as dg
import pyarrow as pa
import pytest
import sqlalchemy as sa
import yaml

from incremental_assets.defs import landing as landing_defs
from incremental_assets.landing.schema import landed_dataset, unified_schema
from tests.helpers import run_cli

pytestmark = pytest.mark.usefixtures("dagster_home")

UTC = dt.timezone.utc


class Model:
    """What the source holds, what landed (each row as it was copied) and what each replica must
    hold, kept alongside the real thing."""

    def __init__(self, columns: list[str]):
        self.columns = list(columns)
        self.landed: list[dict] = []  # every row version as landed, oldest first
        self.ever: list[str] = list(columns)  # every column the replica table has

    def add(self, column: str):
        self.columns.append(column)
        self.ever.append(column)

    def drop(self, column: str):
        self.columns.remove(column)

    def rename(self, old: str, new: str):
        self.columns[self.columns.index(old)] = new
        self.ever.append(new)

    def land(self, row: dict):
        assert set(row) == set(self.columns), row
        self.landed.append(dict(row))

    def replica(self) -> list[tuple]:
        """Each key's latest version; a column its data lacked keeps its stored value (NULL in a new row)."""
        rows: dict = {}
        for row in self.landed:
            stored = rows.setdefault(row["id"], dict.fromkeys(self.ever))
            stored.update(row)
        return sorted(tuple(norm(r.get(c)) for c in self.ever) for r in rows.values())

    def landing(self, names: list[str]) -> list[tuple]:
        return sorted(tuple(norm(r.get(c)) for c in names) for r in self.landed)


def norm(value):
    """Values compared as a user compares them: decimals by value, timestamps by UTC instant."""
    if isinstance(value, dt.datetime):
        return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value
    if isinstance(value, (decimal.Decimal, float)) and not isinstance(value, bool):
        return decimal.Decimal(value).normalize() if isinstance(value, decimal.Decimal) else value
    return value


class Source:
    def __init__(self, db, kind: str):
        self.db, self.kind = db, kind

    def ts_type(self):
        return "timestamp" if self.kind == "postgresql" else "datetime(6)"

    def widen_sql(self, table):
        if self.kind == "postgresql":
            return [f"ALTER TABLE {table} ALTER COLUMN n TYPE bigint", f"ALTER TABLE {table} ALTER COLUMN name TYPE varchar(100)",
                    f"ALTER TABLE {table} ALTER COLUMN amount TYPE numeric(12,4)"]
        return [f"ALTER TABLE {table} MODIFY n bigint", f"ALTER TABLE {table} MODIFY name varchar(100)",
                f"ALTER TABLE {table} MODIFY amount decimal(12,4)"]

    def zone_sql(self, table):
        if self.kind == "postgresql":
            return [f"ALTER TABLE {table} ALTER COLUMN updated_at TYPE timestamptz USING updated_at AT TIME ZONE 'UTC'"]
        return [f"ALTER TABLE {table} MODIFY updated_at timestamp(6) NULL"]

    def insert(self, table: str, model: Model, row: dict):
        cols = list(row)
        params = {c: (v.astimezone(UTC).replace(tzinfo=None) if isinstance(v, dt.datetime) and self.kind == "mariadb" else v)
                  for c, v in row.items()}
        self.db.run(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})", params=params)
        model.land(row)

    def update(self, table: str, model: Model, row: dict):
        current = next(r for r in reversed(model.landed) if r["id"] == row["id"])
        new = {c: current.get(c) for c in model.columns} | row
        sets = ", ".join(f"{c} = :{c}" for c in row if c != "id")
        self.db.run(f"UPDATE {table} SET {sets} WHERE id = :id", params=row)
        model.land(new)


def at(month: int, day: int = 5) -> dt.datetime:
    return dt.datetime(2024, month, day, 10, 0)


@pytest.fixture(params=["postgresql", "mariadb"])
def engine_db(request):
    return request.param, request.getfixturevalue({"postgresql": "pg_db", "mariadb": "mariadb_db"}[request.param])


def write_config(tmp_path, db, *, late_replicated: bool):
    def table(name, replica):
        return {"name": name, "source": "src", "table": name, "watermark_column": "updated_at", "primary_key": ["id"],
                "partitions": {"granularity": "monthly", "start": "2024-01-01"}, "replica": replica}

    config = {
        "sources": {"src": {"url": db.url, "retries": 0, "horizon_wait_seconds": 2}},
        "landing": {"url": str(tmp_path / "landing")},
        # the replica in the same database, under other names
        "replica": {"url": db.url},
        "tables": [table("live", {"table": "live_replica"}),
                   table("late", {"table": "late_replica"} if late_replicated else False)],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def sync(capsys, config, expect_code=0) -> str:
    """``sync`` again while rows wait behind the safe horizon (MariaDB's innodb_trx view can lag
    while other sessions of the shared test server read it); the output of every attempt."""
    said = ""
    for _ in range(20):
        landing_defs._DESCRIBED.clear()  # a new process would reflect the table again
        code, out, err = run_cli(capsys, "--config", str(config), "sync")
        said += out + err
        if "not copied yet" not in out:
            break
        time.sleep(0.5)
    assert code == expect_code, said
    return said


def landing_rows(tmp_path, table: str) -> tuple[list[str], list[tuple]]:
    files = sorted(glob.glob(str(tmp_path / "landing" / table / "*" / "*.parquet")))
    data = landed_dataset(files).to_table()
    # the plain recipe gives the same: pyarrow alone, the schemas unified by the documented rule
    assert data.schema == unified_schema(files)
    try:
        import polars as pl
    except ImportError:
        pass
    else:
        import pyarrow.dataset as ds

        frame = pl.scan_pyarrow_dataset(ds.dataset(files, schema=unified_schema(files))).collect()
        assert frame.height == data.num_rows and frame.columns == data.column_names
        assert sorted(frame.rows()) == sorted(zip(*(data.column(c).to_pylist() for c in data.column_names)))
    names = data.column_names
    return names, sorted(tuple(norm(v) for v in row) for row in zip(*(data.column(c).to_pylist() for c in names)))


def replica_rows(db, table: str, columns: list[str]) -> list[tuple]:
    q = (lambda c: f'"{c}"') if db.url.startswith("postgresql") else (lambda c: f"`{c}`")
    with db.engine.connect() as conn:
        actual = [c["name"] for c in sa.inspect(conn).get_columns(table)]
        assert sorted(actual) == sorted(columns), f"{table}: columns {actual}, expected {columns}"
        result = conn.execute(sa.text(f"SELECT {', '.join(q(c) for c in columns)} FROM {q(table)}"))
        return sorted(tuple(norm(v) for v in row) for row in result)


def check(tmp_path, db, models: dict[str, Model], replicated: set[str]):
    for name, model in models.items():
        names, rows = landing_rows(tmp_path, name)
        assert names == model.ever, name  # every column ever landed, oldest first
        assert rows == model.landing(names), name
        if name in replicated:
            assert replica_rows(db, f"{name}_replica", model.ever) == model.replica(), name


def last_metadata(key: str) -> dict:
    instance = dg.DagsterInstance.get()
    record = instance.fetch_materializations(dg.AssetKey(key.split("/")), limit=1).records[0]
    return {k: v.value for k, v in record.asset_materialization.metadata.items()}


def test_added_dropped_renamed_and_widened_columns_keep_landing_and_replica_whole(engine_db, tmp_path, capsys):
    kind, db = engine_db
    source = Source(db, kind)
    models = {}
    for name in ("live", "late"):
        db.run(f"CREATE TABLE {name} (id int PRIMARY KEY, name varchar(10), amount numeric(10,2), n int, gone int, "
               f"updated_at {source.ts_type()})")
        models[name] = Model(["id", "name", "amount", "n", "gone", "updated_at"])
    config = write_config(tmp_path, db, late_replicated=False)

    def each(action, *args):
        for name, model in models.items():
            action(name, model, *args)

    each(lambda t, m: source.insert(t, m, {"id": 1, "name": "a", "amount": decimal.Decimal("1.50"), "n": 1, "gone": 7,
                                           "updated_at": at(1)}))
    sync(capsys, config)
    check(tmp_path, db, models, {"live"})
    assert [c.name for c in last_metadata("landing/live")["dagster/column_schema"].columns] == models["live"].columns

    # added: the landing and the replica gain the column; rows landed before keep NULL there
    each(lambda t, m: (db.run(f"ALTER TABLE {t} ADD COLUMN extra text"), m.add("extra")))
    each(lambda t, m: source.insert(t, m, {"id": 2, "name": "b", "amount": decimal.Decimal("2.50"), "n": 2, "gone": 8,
                                           "updated_at": at(2), "extra": "x2"}))
    out = sync(capsys, config)
    assert last_metadata("landing/live")["schema_changes"] == {"added": ["extra"]}
    assert last_metadata("replica/live")["added_columns"] == ["extra"]
    check(tmp_path, db, models, {"live"})

    # dropped: the replica keeps the column, NULL for new rows; an updated row keeps its value
    each(lambda t, m: (db.run(f"ALTER TABLE {t} DROP COLUMN gone"), m.drop("gone")))
    each(lambda t, m: source.insert(t, m, {"id": 3, "name": "c", "amount": decimal.Decimal("3.50"), "n": 3,
                                           "updated_at": at(3), "extra": "x3"}))
    each(lambda t, m: source.update(t, m, {"id": 1, "name": "a2", "updated_at": at(3, 6)}))
    sync(capsys, config)
    assert last_metadata("landing/live")["schema_changes"] == {"dropped": ["gone"]}
    assert last_metadata("replica/live")["columns_not_in_source"] == ["gone"]
    check(tmp_path, db, models, {"live"})

    # renamed: dropped + added
    each(lambda t, m: (db.run(f"ALTER TABLE {t} RENAME COLUMN extra TO extra2"), m.rename("extra", "extra2")))
    each(lambda t, m: source.insert(t, m, {"id": 4, "name": "d", "amount": decimal.Decimal("4.50"), "n": 4,
                                           "updated_at": at(4), "extra2": "x4"}))
    sync(capsys, config)
    assert last_metadata("landing/live")["schema_changes"] == {"added": ["extra2"], "dropped": ["extra"]}
    # the asset's columns in Dagster follow the source; the replica's hold the kept ones too
    assert [c.name for c in last_metadata("landing/live")["dagster/column_schema"].columns] == models["live"].columns
    assert sorted(c.name for c in last_metadata("replica/live")["dagster/column_schema"].columns) == sorted(models["live"].ever)
    assert last_metadata("replica/live")["columns_not_in_source"] == ["gone", "extra"]
    check(tmp_path, db, models, {"live"})

    # the late table's replica starts now: windows of every shape merge, the oldest first
    config = write_config(tmp_path, db, late_replicated=True)
    out = sync(capsys, config)
    assert "late: merged 4 file(s) of 4 window(s)" in out, out
    check(tmp_path, db, models, {"live", "late"})

    # widened: int -> bigint, varchar(10) -> varchar(100), numeric(10,2) -> numeric(12,4)
    each(lambda t, m: db.run(*source.widen_sql(t)))
    each(lambda t, m: source.insert(t, m, {"id": 5, "name": "a much longer name", "amount": decimal.Decimal("12345678.1234"),
                                           "n": 5_000_000_000, "updated_at": at(5), "extra2": "x5"}))
    sync(capsys, config)
    assert "amount" in last_metadata("landing/live")["schema_changes"]["retyped"]
    check(tmp_path, db, models, {"live", "late"})

    # timestamp -> timestamptz: PostgreSQL's replica cannot tell the zone of its stored values:
    # the merge fails with the statement to run, and goes on once it has been run
    each(lambda t, m: db.run(*source.zone_sql(t)))
    each(lambda t, m: source.insert(t, m, {"id": 6, "name": "f", "amount": decimal.Decimal("6"), "n": 6,
                                           "updated_at": at(6).replace(tzinfo=UTC), "extra2": "x6"}))
    if kind == "postgresql":
        out = sync(capsys, config, expect_code=1)
        statements = []
        for name in models:
            statement = f'ALTER TABLE "{name}_replica" ALTER COLUMN "updated_at" TYPE timestamp with time zone USING "updated_at" AT TIME ZONE \'UTC\''
            assert f"change it by running: {statement}" in out, out
            statements.append(statement)
        db.run(*statements)
        out = sync(capsys, config)
        assert "late: merged 1 file(s)" in out and "live: merged 1 file(s)" in out, out
    else:  # DATETIME holds instants in UTC already
        sync(capsys, config)
    check(tmp_path, db, models, {"live", "late"})
    code, out, _ = run_cli(capsys, "--config", str(config), "status")
    assert code == 0 and "0 windows pending merge" in out, out


def test_landing_reads_as_one_table_across_each_change(tmp_path):
    """Files of one table as each change leaves them: one schema holds every row exactly."""
    import pyarrow.parquet as pq

    before = pa.table({"id": pa.array([1], pa.int32()), "amount": pa.array([decimal.Decimal("1.50")], pa.decimal128(10, 2)),
                       "gone": pa.array([7], pa.int32()), "at": pa.array([dt.datetime(2024, 1, 1)], pa.timestamp("us"))})
    after = pa.table({"id": pa.array([5_000_000_000], pa.int64()),
                      "amount": pa.array([decimal.Decimal("12345678.1234")], pa.decimal128(12, 4)),
                      "extra": ["x"], "at": pa.array([dt.datetime(2024, 2, 1, tzinfo=UTC)], pa.timestamp("us", tz="UTC"))})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pq.write_table(before, tmp_path / "a" / "1.parquet")
    pq.write_table(after, tmp_path / "b" / "2.parquet")
    files = [str(tmp_path / "a" / "1.parquet"), str(tmp_path / "b" / "2.parquet")]
    import pyarrow.dataset as ds

    with pytest.raises(pa.ArrowInvalid):  # what the default read does
        ds.dataset(files).to_table()
    data = landed_dataset(files).to_table()
    assert data.schema.names == ["id", "amount", "gone", "at", "extra"]
    assert data.schema.field("amount").type == pa.decimal128(12, 4)
    assert data.schema.field("at").type == pa.timestamp("us", tz="UTC")
    assert data.to_pylist() == [
        {"id": 1, "amount": decimal.Decimal("1.5000"), "gone": 7, "at": dt.datetime(2024, 1, 1, tzinfo=UTC), "extra": None},
        {"id": 5_000_000_000, "amount": decimal.Decimal("12345678.1234"), "gone": None,
         "at": dt.datetime(2024, 2, 1, tzinfo=UTC), "extra": "x"},
    ]
