"""The project instance's storage (defs/storage.py): a run over many partitions writes its asset
events in a few transactions, and what it writes reads exactly as Dagster's own SQLite storage's."""

import sqlite3

import pytest
import sqlalchemy as sa
import yaml

import dagster as dg
from incremental_assets import cli

PARTITIONS = dg.DailyPartitionsDefinition(start_date="2024-01-01")
KEYS = PARTITIONS.get_partition_keys()[:30]
PLAIN_YAML = "storage:\n  sqlite:\n    base_dir: {home}\n"


@pytest.fixture(autouse=True)
def _batch_size_restored(monkeypatch):
    """The storage turns Dagster's batching on in the environment; other tests see it as it was."""
    monkeypatch.delenv("DAGSTER_EVENT_BATCH_SIZE", raising=False)


def _asset(fail: bool = False):
    @dg.asset(partitions_def=PARTITIONS, backfill_policy=dg.BackfillPolicy.single_run(),
              check_specs=[dg.AssetCheckSpec("rows_positive", asset="daily")])
    def daily(context: dg.AssetExecutionContext):
        if fail:
            raise RuntimeError("source went away")
        for key in context.partition_keys:
            context.add_asset_metadata({"rows": int(key[-2:])}, partition_key=key)
        yield dg.MaterializeResult(check_results=[dg.AssetCheckResult(check_name="rows_positive", passed=True)])

    return daily


def _instance(home, storage_yaml: str, monkeypatch) -> dg.DagsterInstance:
    """The instance of ``home`` as DAGSTER_HOME (the project's dagster.yaml stores there)."""
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    (home / "dagster.yaml").write_text(storage_yaml.format(home=home))
    return dg.DagsterInstance.from_config(str(home))


def _run(instance, fail: bool = False) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [_asset(fail)], instance=instance, raise_on_error=False,
        tags={"dagster/asset_partition_range_start": KEYS[0], "dagster/asset_partition_range_end": KEYS[-1]},
    )


def _commits(run) -> int:
    """Transactions committed on any SQLAlchemy engine (the instance's SQLite databases) by run()."""
    count = 0

    def on_commit(conn):
        nonlocal count
        count += 1

    sa.event.listen(sa.engine.Engine, "commit", on_commit)
    try:
        run()
    finally:
        sa.event.remove(sa.engine.Engine, "commit", on_commit)
    return count


def _schema(database) -> tuple:
    """A SQLite database's tables, indexes and alembic revision."""
    conn = sqlite3.connect(database)
    try:
        return (sorted(conn.execute("SELECT type, name, sql FROM sqlite_master")),
                conn.execute("SELECT version_num FROM alembic_version").fetchall(),
                conn.execute("PRAGMA journal_mode").fetchall())
    finally:
        conn.close()


def _event_rows(database, run_id) -> list[tuple]:
    """A run's rows of a SQLite database's event log, in order, but for their ids and times."""
    conn = sqlite3.connect(database)
    try:
        return conn.execute(
            "SELECT dagster_event_type, step_key, asset_key, partition, run_id FROM event_logs WHERE run_id = ? ORDER BY id",
            (run_id,),
        ).fetchall()
    finally:
        conn.close()


def _partitions(records) -> list[str]:
    return sorted(r.partition_key for r in records.records)


def test_project_instance_is_the_batching_storage(dagster_home):
    cli._prepare_environment(None)
    assert yaml.safe_load((dagster_home / "dagster.yaml").read_text()) == yaml.safe_load(
        (cli.DEFAULT_DAGSTER_HOME / "dagster.yaml").read_text()
    ), "the CLI writes the project's dagster.yaml into a new DAGSTER_HOME"
    with cli._instance() as instance:
        assert type(instance.event_log_storage).__name__ == "FastSqliteEventLogStorage"
        assert instance.event_log_storage._base_dir == str(dagster_home / "history" / "runs")
        assert _run(instance).success
        assert instance.get_materialized_partitions(dg.AssetKey("daily")) == set(KEYS)


def test_a_run_over_many_partitions_commits_its_events_together(tmp_path, monkeypatch):
    with _instance(tmp_path / "plain", PLAIN_YAML, monkeypatch) as plain:
        plain_commits = _commits(lambda: _run(plain))
    with _instance(tmp_path / "batched", cli.INSTANCE_YAML, monkeypatch) as batched:
        batched_commits = _commits(lambda: _run(batched))
    # Dagster's storage: two transactions per event, a planned event and a materialization per partition
    assert plain_commits >= 4 * len(KEYS)
    assert batched_commits <= plain_commits - 3 * len(KEYS), (plain_commits, batched_commits)


@pytest.mark.parametrize("fail", [False, True], ids=["success", "failure"])
def test_batched_events_read_alike_through_dagsters_own_storage(tmp_path, monkeypatch, fail):
    seen = {}
    for name, storage_yaml in (("plain", PLAIN_YAML), ("batched", cli.INSTANCE_YAML)):
        with _instance(tmp_path / name, storage_yaml, monkeypatch) as instance:
            result = _run(instance, fail)
            assert result.success is not fail
        # read back through Dagster's own storage, as a UI with `storage: sqlite` would
        with _instance(tmp_path / f"{name}-reader", PLAIN_YAML.format(home=tmp_path / name), monkeypatch) as reader:
            key = dg.AssetKey("daily")
            materializations = reader.fetch_materializations(key, limit=1000).records
            latest = reader.get_latest_materialization_event(key)
            seen[name] = {
                "run log": [r.event_log_entry.dagster_event.event_type_value
                            for r in reader.get_records_for_run(result.run_id).records if r.event_log_entry.is_dagster_event],
                "planned": sorted(reader.event_log_storage.get_latest_storage_id_by_partition(
                    key, dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED)),
                "materialized": sorted(reader.get_materialized_partitions(key)),
                "rows": sorted((r.partition_key, r.asset_materialization.metadata["rows"].value) for r in materializations),
                "failed": _partitions(reader.fetch_failed_materializations(key, limit=1000)),
                # what the UI's partition status reads as failed (or in progress) partitions
                "attempted": sorted(reader.event_log_storage.get_latest_asset_partition_materialization_attempts_without_materializations(key)),
                "latest": latest and latest.dagster_event.partition,
                "last run": [r.asset_entry.last_run_id == result.run_id for r in reader.get_asset_records([key])],
                "run database": _schema(tmp_path / name / "history" / "runs" / f"{result.run_id}.db"),
            }
        runs = tmp_path / name / "history" / "runs"
        # the rows themselves, in both databases (the run ids differ: compared by position)
        seen[name]["rows in the run's database"] = [r[:4] for r in _event_rows(runs / f"{result.run_id}.db", result.run_id)]
        seen[name]["rows in the index database"] = [r[:4] for r in _event_rows(runs / "index.db", result.run_id)]
    assert seen["batched"] == seen["plain"]
    batched = seen["batched"]
    assert batched["planned"] == sorted(KEYS) and batched["last run"] == [True]
    materialized = [r for r in batched["rows in the index database"] if r[0] == "ASSET_MATERIALIZATION"]
    assert [r[3] for r in materialized] == ([] if fail else KEYS), "one row per partition, in order, in the index"
    assert [r for r in batched["rows in the run's database"] if r[0] == "ASSET_MATERIALIZATION"] == materialized
    # the run's database was a copy of the template Dagster made, and is what Dagster makes
    assert list((tmp_path / "batched" / "history" / "runs").glob(".run-template-*.sqlite"))
    assert batched["run database"][1] and ("table", "event_logs") in {t[:2] for t in batched["run database"][0]}
    if fail:
        assert batched["attempted"] == sorted(KEYS) and batched["materialized"] == [] and batched["latest"] is None
    else:
        assert batched["materialized"] == sorted(KEYS) and batched["latest"] == KEYS[-1] and batched["attempted"] == []
        assert batched["rows"] == sorted((k, int(k[-2:])) for k in KEYS)
        assert "ASSET_CHECK_EVALUATION" in batched["run log"]


def test_a_run_database_made_elsewhere_is_left_as_it_is(tmp_path, monkeypatch):
    """A run's database that appeared before the run wrote to it (another process reading the run)
    is opened as Dagster opens it, not replaced by the template."""
    with _instance(tmp_path / "home", cli.INSTANCE_YAML, monkeypatch) as instance:
        assert _run(instance).success  # the template exists from here on
        storage = instance.event_log_storage
        with dg.DagsterInstance.from_config(str(tmp_path / "home")) as other:
            other.report_engine_event("made by another process", job_name="reader", run_id="elsewhere")
        assert [r.event_log_entry.dagster_event.message for r in storage.get_records_for_run("elsewhere").records] == [
            "made by another process"]


def test_opening_the_instance_makes_the_run_template_once(tmp_path, monkeypatch):
    """The template is made when the instance opens (not by the first run, which would wait for
    it), and runs copy it without remaking it."""
    runs = tmp_path / "home" / "history" / "runs"
    with _instance(tmp_path / "home", cli.INSTANCE_YAML, monkeypatch) as instance:
        templates = list(runs.glob(".run-template-*.sqlite"))
        assert [t.name for t in templates] == [f".run-template-{dg.__version__}.sqlite"]
        made = templates[0].stat().st_mtime_ns
        result = _run(instance)
        assert result.success
    assert _schema(runs / f"{result.run_id}.db")[:2] == _schema(templates[0])[:2]
    with _instance(tmp_path / "home", cli.INSTANCE_YAML, monkeypatch) as again:
        assert _run(again).success
    assert templates[0].stat().st_mtime_ns == made and not list(runs.glob("*.partial"))


def test_an_instance_opens_and_runs_when_the_template_cannot_be_made(tmp_path, monkeypatch):
    """The template is an optimisation: when making it fails, whatever the error, the instance
    opens and a run's database is created by Dagster's own code."""
    from incremental_assets.defs import storage

    def refuse(self, template):
        raise RuntimeError("no template here")

    monkeypatch.setattr(storage.FastSqliteEventLogStorage, "_make_template", refuse)
    runs = tmp_path / "home" / "history" / "runs"
    with _instance(tmp_path / "home", cli.INSTANCE_YAML, monkeypatch) as instance:
        result = _run(instance)
        assert result.success
    assert not list(runs.glob(".run-template-*")) and (runs / f"{result.run_id}.db").exists()
