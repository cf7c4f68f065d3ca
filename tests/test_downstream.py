"""Downstream assets read what landed: an asset that declares ``landing/<table>`` as an input gets
the rows of the windows Dagster maps to its partition(s), as the type it annotates, in real runs."""

import datetime as dt
import decimal
import sys
import time

import dagster as dg
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from incremental_assets.definitions import load_definitions
from incremental_assets.landing import LandingError, open_landing_store
from incremental_assets.landing.reading import LandedRows, latest_state, read_windows
from tests.helpers import ADF_ROWS, adf_table, create_adf_table, insert_rows, run_cli, write_config

pytestmark = pytest.mark.usefixtures("dagster_home")

UTC = dt.timezone.utc
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def landing_key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["landing", name])


def materialize(defs: dg.Definitions, assets: list, **kwargs) -> dg.ExecuteInProcessResult:
    """Materialize ``assets`` (one's own, downstream of landing) with the project's definitions:
    the landing assets' IO manager reads their inputs."""
    merged = dg.Definitions.merge(defs, dg.Definitions(assets=assets))
    selected = [merged.resolve_assets_def(a.key) for a in assets]
    landings = [merged.resolve_assets_def(k) for k in defs.resolve_all_asset_keys() if k.path[0] == "landing"]
    with dg.DagsterInstance.get() as instance:
        return dg.materialize([*selected, *landings], selection=[a.key for a in assets], instance=instance, **kwargs)


def sync(capsys, config) -> str:
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, out + err
    return out


def sync_all(capsys, config, table: str, rows: int, *, env=None) -> None:
    """Sync until ``rows`` rows of ``table`` have landed: a transaction of someone else's on the
    shared server may hold the safe horizon back for a moment."""
    import yaml

    url = yaml.safe_load(config.read_text())["landing"]["url"]
    outputs = []
    for _ in range(20):
        outputs.append(sync(capsys, config))
        store = open_landing_store(url, "parquet", env=env)
        windows = sorted({path.split("/")[1] for path in store.list_files(table)})
        if read_windows(store, table, windows).to_table().num_rows >= rows:
            return
        time.sleep(0.5)
    raise AssertionError(f"{table}: {rows} rows never landed:\n" + "\n".join(outputs))


@pytest.fixture(params=["local", "azurite"])
def landing_url(request, tmp_path, monkeypatch):
    if request.param == "local":
        return str(tmp_path / "landing")
    container = request.getfixturevalue("azure_container")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", container.connection_string)
    return f"azure://{container.name}/landed"


# --------------------------------------------------------------------------- every input type, exact types

ORDERS = [
    (1, decimal.Decimal("10.10"), ["a", "b"], dt.datetime(2024, 1, 1, 9, 0, 0, 123456, tzinfo=UTC)),
    (2, None, [], dt.datetime(2024, 1, 1, 23, 59, 59, tzinfo=UTC)),
    (3, decimal.Decimal("-0.01"), None, dt.datetime(2024, 1, 2, 0, 0, tzinfo=UTC)),
    (4, decimal.Decimal("9999999999.99"), ["x", None], dt.datetime(2024, 1, 2, 18, 30, 0, 1, tzinfo=UTC)),
    (5, decimal.Decimal("1"), ["late"], dt.datetime(2024, 2, 10, 12, 0, tzinfo=UTC)),
]


def orders_source(pg_db, tmp_path, landing=None):
    pg_db.run("CREATE TABLE orders (id bigint PRIMARY KEY, amount numeric(12,2), tags text[], changed timestamptz NOT NULL)")
    for row in ORDERS:
        pg_db.run("INSERT INTO orders VALUES (:i, :a, :t, :c)", params=dict(zip("iatc", row)))
    return write_config(tmp_path, pg_db.url, [{"name": "orders", "table": "orders", "watermark_column": "changed",
                                               "partitions": {"start": "2024-01-01"}}], landing=landing)


def as_rows(records) -> list[tuple]:
    return sorted((r["id"], r["amount"], None if r["tags"] is None else list(r["tags"]), r["changed"]) for r in records)


@pytest.mark.postgres
def test_each_input_type_gets_the_window_rows_with_their_exact_types(pg_db, tmp_path, capsys, landing_url):
    config = orders_source(pg_db, tmp_path, landing_url)
    sync_all(capsys, config, "orders", len(ORDERS))
    defs = load_definitions(config)
    daily = dg.DailyPartitionsDefinition("2024-01-01", end_offset=1)
    seen: dict[str, object] = {}

    def downstream(name, annotation):
        @dg.asset(name=name, partitions_def=daily, ins={"orders": dg.AssetIn(landing_key("orders"))})
        def _asset(orders: annotation) -> None:  # type: ignore[valid-type]
            seen[name] = orders

        return _asset

    types = {"arrow": pa.Table, "pandas": pd.DataFrame, "polars": pl.DataFrame, "lazy": pl.LazyFrame,
             "reader": pa.RecordBatchReader, "dataset": ds.Dataset, "files": LandedRows}
    # a reader and a dataset are read inside the asset, as a user reads them
    def read_inside(name, annotation, read):
        @dg.asset(name=name, partitions_def=daily, ins={"orders": dg.AssetIn(landing_key("orders"))})
        def _asset(orders: annotation) -> None:  # type: ignore[valid-type]
            seen[name] = read(orders)

        return _asset

    assets = [downstream(n, t) for n, t in types.items() if n not in ("reader", "dataset", "lazy")]
    assets += [read_inside("reader", pa.RecordBatchReader, lambda r: r.read_all()),
               read_inside("dataset", ds.Dataset, lambda d: d.to_table()),
               read_inside("lazy", pl.LazyFrame, lambda f: f.collect())]
    assert materialize(defs, assets, partition_key="2024-01-02").success

    expected = [r for r in ORDERS if r[3].date() == dt.date(2024, 1, 2)]
    assert as_rows(seen["arrow"].to_pylist()) == sorted(expected)
    schema = seen["arrow"].schema
    assert schema.field("amount").type == pa.decimal128(12, 2)
    assert schema.field("changed").type == pa.timestamp("us", tz="UTC")
    assert schema.field("tags").type == pa.list_(pa.string())
    for name in ("reader", "dataset"):
        assert seen[name].equals(seen["arrow"]), name
    assert seen["files"].to_table().equals(seen["arrow"])

    frame = seen["pandas"]
    assert isinstance(frame, pd.DataFrame) and str(frame["changed"].dtype) == "datetime64[us, UTC]"
    assert str(frame["id"].dtype) == "Int64"
    assert sorted(frame["amount"].tolist()) == sorted(r[1] for r in expected)  # decimal.Decimal, exact
    assert sorted(ts.to_pydatetime() for ts in frame["changed"]) == sorted(r[3] for r in expected)

    polars_frame = seen["polars"]
    assert polars_frame.schema["amount"] == pl.Decimal(12, 2)
    assert polars_frame.schema["changed"] == pl.Datetime("us", "UTC")
    assert polars_frame.schema["tags"] == pl.List(pl.String)
    assert as_rows(polars_frame.to_dicts()) == as_rows(seen["arrow"].to_pylist())
    assert seen["lazy"].equals(polars_frame)


@pytest.mark.postgres
def test_a_range_run_reads_every_window_of_its_range_and_pandas_keeps_integers_with_nulls(pg_db, tmp_path, capsys):
    config = orders_source(pg_db, tmp_path)
    pg_db.run("ALTER TABLE orders ADD COLUMN qty int")
    pg_db.run("UPDATE orders SET qty = id * 10 WHERE id <> 3")
    sync_all(capsys, config, "orders", len(ORDERS))
    defs = load_definitions(config)
    seen = {}

    @dg.asset(partitions_def=dg.DailyPartitionsDefinition("2024-01-01", end_offset=1),
              backfill_policy=dg.BackfillPolicy.single_run(), ins={"orders": dg.AssetIn(landing_key("orders"))})
    def order_ids(context: dg.AssetExecutionContext, orders: pd.DataFrame) -> None:
        seen["keys"] = list(context.partition_keys)
        seen["frame"] = orders

    result = materialize(defs, [order_ids], tags={RANGE_START: "2024-01-01", RANGE_END: "2024-01-31"})
    assert result.success
    assert len(seen["keys"]) == 31
    frame = seen["frame"]
    assert sorted(frame["id"].tolist()) == [1, 2, 3, 4]  # not the February row
    # a NULL does not turn the integers into floats
    assert str(frame["qty"].dtype) in ("Int32", "Int64")  # pandas' nullable integers, not float64
    assert frame.set_index("id")["qty"].isna().to_dict() == {1: False, 2: False, 3: True, 4: False}


# --------------------------------------------------------------------------- partition mappings


def adf_source(sqlite_db, tmp_path, capsys):
    create_adf_table(sqlite_db)  # five rows in 2017-09
    insert_rows(sqlite_db, [(6, "ffff", dt.datetime(2017, 10, 1, 8, 0)), (7, "gggg", dt.datetime(2017, 11, 30, 23, 0))])
    config = write_config(tmp_path, sqlite_db.url, [adf_table(primary_key=["PersonID"])])
    sync(capsys, config)
    return load_definitions(config)


def test_a_daily_asset_over_monthly_landing_reads_the_month_and_an_unpartitioned_one_every_window(sqlite_db, tmp_path, capsys):
    defs = adf_source(sqlite_db, tmp_path, capsys)
    seen = {}

    @dg.asset(partitions_def=dg.DailyPartitionsDefinition("2017-09-01", end_offset=1),
              ins={"people": dg.AssetIn(landing_key("data_source_table"))})
    def people_daily(people: pa.Table) -> None:
        seen["daily"] = people

    @dg.asset(ins={"people": dg.AssetIn(landing_key("data_source_table"))})
    def people_summary(people: pl.DataFrame) -> None:
        seen["all"] = people

    assert materialize(defs, [people_daily], partition_key="2017-10-15").success
    assert seen["daily"].column("PersonID").to_pylist() == [6]  # October's window, by the monthly mapping
    assert materialize(defs, [people_daily], partition_key="2017-09-03").success
    assert sorted(seen["daily"].column("PersonID").to_pylist()) == [1, 2, 3, 4, 5]

    # the latest state of a table not copied by change tracking: a clear error
    @dg.asset(ins={"people": dg.AssetIn(landing_key("data_source_table"), metadata={"changes": "latest_state"})})
    def people_latest(people: pa.Table) -> None:
        pass

    result = materialize(defs, [people_latest], raise_on_error=False)
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "needs a table copied by change tracking" in str(failure.step_failure_data.error)

    assert materialize(defs, [people_summary]).success
    people = seen["all"]
    assert sorted(people["PersonID"].to_list()) == [1, 2, 3, 4, 5, 6, 7]
    assert sorted(people["Name"].to_list()) == sorted([r[1] for r in ADF_ROWS] + ["ffff", "gggg"])


def test_a_window_with_nothing_landed_gives_no_rows_with_the_tables_columns(sqlite_db, tmp_path, capsys):
    defs = adf_source(sqlite_db, tmp_path, capsys)
    seen = {}

    @dg.asset(partitions_def=dg.MonthlyPartitionsDefinition("2017-09-01", end_offset=1),
              ins={"people": dg.AssetIn(landing_key("data_source_table"))})
    def people_monthly(people: pd.DataFrame) -> None:
        seen["frame"] = people

    assert materialize(defs, [people_monthly], partition_key="2018-03-01").success
    assert seen["frame"].empty and list(seen["frame"].columns) == ["PersonID", "Name", "LastModifytime"]


def test_a_missing_extra_is_named(sqlite_db, tmp_path, capsys, monkeypatch):
    defs = adf_source(sqlite_db, tmp_path, capsys)

    @dg.asset(ins={"people": dg.AssetIn(landing_key("data_source_table"))})
    def people_polars(people: pl.DataFrame) -> None:
        pass

    monkeypatch.setitem(sys.modules, "polars", None)  # as where polars is not installed
    with pytest.raises(Exception) as failure:
        materialize(defs, [people_polars])
    messages = []
    error: BaseException | None = failure.value
    while error is not None:
        messages.append(str(error))
        error = error.__cause__
    assert any("pip install 'incremental-assets[polars]'" in m for m in messages), messages


# --------------------------------------------------------------------------- local and Azure, larger than a batch


def test_a_window_larger_than_a_batch_streams_in_batches(sqlite_db, tmp_path, capsys, landing_url):
    create_adf_table(sqlite_db, rows=[])
    start = dt.datetime(2017, 9, 1)
    insert_rows(sqlite_db, [(i, f"p{i}", start + dt.timedelta(minutes=i)) for i in range(1, 2501)])
    # a slice of 2,500 rows lands as three files of at most 1,000
    config = write_config(tmp_path, sqlite_db.url, [adf_table()], landing=landing_url)
    config.write_text(config.read_text().replace("format: parquet", "format: parquet\n  max_rows_per_file: 1000"))
    sync(capsys, config)
    defs = load_definitions(config)
    seen = {}

    @dg.asset(partitions_def=dg.MonthlyPartitionsDefinition("2017-09-01", end_offset=1),
              ins={"people": dg.AssetIn(landing_key("data_source_table"), metadata={"batch_size": 400})})
    def people_stream(people: pa.RecordBatchReader) -> None:
        sizes, ids = [], []
        for batch in people:
            sizes.append(batch.num_rows)
            ids.extend(batch.column("PersonID").to_pylist())
        seen["sizes"], seen["ids"] = sizes, ids

    @dg.asset(partitions_def=dg.MonthlyPartitionsDefinition("2017-09-01", end_offset=1),
              ins={"people": dg.AssetIn(landing_key("data_source_table"))})
    def people_filtered(people: ds.Dataset) -> None:
        seen["files"] = len(people.files)
        seen["filtered"] = people.to_table(columns=["PersonID"], filter=pc.field("PersonID") > 2400)

    assert materialize(defs, [people_stream, people_filtered], partition_key="2017-09-01").success
    assert seen["ids"] == list(range(1, 2501))  # in landed order: files in watermark order
    assert len(seen["sizes"]) >= 7 and max(seen["sizes"]) <= 400
    assert seen["files"] == 3
    assert sorted(seen["filtered"].column("PersonID").to_pylist()) == list(range(2401, 2501))


@pytest.mark.azurite
def test_a_blob_rewritten_while_it_is_read_fails_clearly(azure_container):
    store = open_landing_store(f"azure://{azure_container.name}/landed", "parquet",
                               env={"AZURE_STORAGE_CONNECTION_STRING": azure_container.connection_string})
    schema = pa.schema([("id", pa.int64())])
    store.write_slice("t", "2024-01-01", "a", schema, [pa.record_batch([pa.array([1, 2])], schema=schema)])
    rows = read_windows(store, "t", ["2024-01-01"])
    assert rows.to_table().column("id").to_pylist() == [1, 2]
    store.write_slice("t", "2024-01-01", "a", schema, [pa.record_batch([pa.array([3])], schema=schema)])
    with pytest.raises(LandingError, match="replaced since it was listed"):
        rows.to_table()
    assert read_windows(store, "t", ["2024-01-01"]).to_table().column("id").to_pylist() == [3]


# --------------------------------------------------------------------------- change tracking


def test_change_tracked_table_gives_its_change_log_or_its_latest_state(sqlite_db, tmp_path, capsys, landing_url):
    sqlite_db.run(
        'CREATE TABLE people ("PersonID" int NOT NULL PRIMARY KEY, "Name" varchar(255), "Age" int)',
        "INSERT INTO people VALUES (1, 'aaaa', 21), (2, 'bbbb', 24), (3, 'cccc', 20)",
    )
    config = write_config(tmp_path, sqlite_db.url, [{"name": "people", "table": "people", "mode": "change_tracking",
                                                      "partitions": {"start": "2026-01-01"}}], landing=landing_url)
    assert run_cli(capsys, "--config", str(config), "enable-change-tracking", "--table", "people")[0] == 0
    sync(capsys, config)
    sqlite_db.run("INSERT INTO people VALUES (4, 'new', 50)", 'UPDATE people SET "Age" = 10 WHERE "PersonID" = 1')
    sync(capsys, config)
    sqlite_db.run('DELETE FROM people WHERE "PersonID" = 2')
    sync(capsys, config)
    defs = load_definitions(config)
    seen = {}

    @dg.asset(ins={"people": dg.AssetIn(landing_key("people"))})
    def people_log(people: pa.Table) -> None:
        seen["log"] = people

    @dg.asset(ins={"people": dg.AssetIn(landing_key("people"), metadata={"changes": "latest_state"})})
    def people_now(people: pd.DataFrame) -> None:
        seen["now"] = people

    assert materialize(defs, [people_log, people_now]).success
    log = seen["log"]
    operations = sorted(zip(log.column("PersonID").to_pylist(), log.column("SYS_CHANGE_OPERATION").to_pylist()))
    assert operations == [(1, "I"), (1, "U"), (2, "D"), (2, "I"), (3, "I"), (4, "I")]
    assert log.column("SYS_CHANGE_VERSION").null_count == 0
    source = sorted(sqlite_db.rows('SELECT "PersonID", "Name", "Age" FROM people'))
    now = seen["now"]
    assert sorted(zip(now["PersonID"], now["Name"], now["Age"])) == source
    # the helper on the log as landed: the same state
    state = latest_state(log, ["PersonID"])
    assert sorted(zip(*(state.column(c).to_pylist() for c in ("PersonID", "Name", "Age")))) == source


def test_latest_state_takes_a_full_copy_as_the_whole_table():
    """A re-initialised table lands a full copy: a key absent from it was deleted meanwhile, even
    though no delete of it was landed."""
    schema = pa.schema([("id", pa.int64()), ("v", pa.string()), ("SYS_CHANGE_VERSION", pa.int64()),
                        ("SYS_CHANGE_OPERATION", pa.string())])
    log = pa.Table.from_pylist([
        {"id": 1, "v": "a", "SYS_CHANGE_VERSION": 1, "SYS_CHANGE_OPERATION": "I"},
        {"id": 2, "v": "b", "SYS_CHANGE_VERSION": 1, "SYS_CHANGE_OPERATION": "I"},
        {"id": 1, "v": "a2", "SYS_CHANGE_VERSION": 9, "SYS_CHANGE_OPERATION": "I"},  # the full copy at 9
        {"id": 3, "v": "c", "SYS_CHANGE_VERSION": 10, "SYS_CHANGE_OPERATION": "I"},
        {"id": 3, "v": None, "SYS_CHANGE_VERSION": 11, "SYS_CHANGE_OPERATION": "D"},
    ], schema=schema)
    assert sorted(latest_state(log, ["id"]).column("id").to_pylist()) == [1, 2]
    assert latest_state(log, ["id"], snapshot_version=9).to_pylist() == [
        {"id": 1, "v": "a2", "SYS_CHANGE_VERSION": 9, "SYS_CHANGE_OPERATION": "I"}]
    with pytest.raises(ValueError, match="no column"):
        latest_state(log, ["PersonID"])


def test_landed_rows_start_their_latest_state_at_the_last_full_copy(tmp_path):
    """Windows as a change-tracked table lands them: yesterday's changes, then today a full copy
    (the recorded version had expired), then a change; a key inserted yesterday and deleted while
    the version had expired is not in the full copy, and not in the latest state."""
    from incremental_assets.landing.local import LocalLandingStore

    store = LocalLandingStore(tmp_path / "landing", create=True)
    schema = pa.schema([("id", pa.int64()), ("v", pa.string()), ("SYS_CHANGE_VERSION", pa.int64()),
                        ("SYS_CHANGE_OPERATION", pa.string())])

    def land(window, stem, rows):
        store.write_slice("t", window, stem, schema, [pa.RecordBatch.from_pylist(
            [dict(zip(schema.names, r)) for r in rows], schema=schema)])

    land("2026-01-01", "start__00000000000000000003__full", [(1, "a", 3, "I")])
    land("2026-01-01", "00000000000000000003__00000000000000000005", [(2, "b", 5, "I")])
    land("2026-01-02", "start__00000000000000000020__full", [(1, "a2", 20, "I")])
    land("2026-01-02", "00000000000000000020__00000000000000000021", [(3, "c", 21, "I")])
    rows = read_windows(store, "t", ["2026-01-01", "2026-01-02"])
    assert rows.snapshot_version == 20
    assert rows.to_table().column("id").to_pylist() == [1, 2, 1, 3]  # the log as landed, in order
    assert rows.latest_state(["id"]).to_pylist() == [
        {"id": 1, "v": "a2", "SYS_CHANGE_VERSION": 20, "SYS_CHANGE_OPERATION": "I"},
        {"id": 3, "v": "c", "SYS_CHANGE_VERSION": 21, "SYS_CHANGE_OPERATION": "I"}]
    # yesterday alone: its own full copy and change
    assert sorted(read_windows(store, "t", ["2026-01-01"]).latest_state(["id"]).column("id").to_pylist()) == [1, 2]


# --------------------------------------------------------------------------- the demo


def test_demo_downstream_follows_landing(tmp_path, monkeypatch):
    monkeypatch.setenv("INCREMENTAL_ASSETS_DEMO_DIR", str(tmp_path / "demo"))
    monkeypatch.delenv("INCREMENTAL_ASSETS_CONFIG", raising=False)
    defs = load_definitions()
    from incremental_assets.defs.demo import ROWS_PER_DAY

    sensor = defs.resolve_sensor_def("demo_rows_per_day_follows_landing")
    landing = defs.resolve_assets_def(landing_key("data_source_table"))
    downstream = defs.resolve_assets_def(ROWS_PER_DAY)
    assert landing_key("data_source_table") in downstream.dependency_keys
    with dg.DagsterInstance.get() as instance:
        with dg.build_sensor_context(instance=instance, definitions=defs) as context:
            assert list(sensor(context) or []) == []  # nothing landed yet
        assert dg.materialize([landing], instance=instance, partition_key="2017-09-01").success
        with dg.build_sensor_context(instance=instance, definitions=defs) as context:
            requests = list(sensor(context))
            cursor = context.cursor
        assert [r.partition_key for r in requests] == ["2017-09-01"]
        with dg.build_sensor_context(instance=instance, definitions=defs, cursor=cursor) as context:
            assert list(sensor(context) or []) == []  # nothing new since
        assert dg.materialize([downstream, landing], selection=[ROWS_PER_DAY], instance=instance,
                              partition_key=requests[0].partition_key).success
        record = instance.fetch_materializations(ROWS_PER_DAY, limit=1).records[0]
        table = record.asset_materialization.metadata["rows_per_day"].value
        assert [(r.data["day"], r.data["rows"]) for r in table.records] == [
            ("2017-09-01", 1), ("2017-09-02", 1), ("2017-09-03", 1), ("2017-09-04", 1), ("2017-09-05", 1)]


def test_an_asset_of_ones_own_cannot_store_its_output_with_the_landing_io_manager(sqlite_db, tmp_path, capsys):
    defs = adf_source(sqlite_db, tmp_path, capsys)

    @dg.asset(io_manager_key="landing_io_manager")
    def misplaced() -> int:
        return 1

    result = materialize(defs, [misplaced], raise_on_error=False)
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "give misplaced another io_manager_key" in str(failure.step_failure_data.error)
