"""The demo's activity: a row written into the demo source every minute, so copies keep coming."""


import dagster as dg

from ..demo import add_demo_row
from .io import windows_landed_since


@dg.op
def insert_demo_row(context: dg.OpExecutionContext) -> None:
    person_id, when = add_demo_row()
    context.log.info(f"inserted PersonID {person_id} with LastModifytime {when} into data_source_table")


@dg.job(description="Demo only: writes one row into the demo source's data_source_table.")
def demo_writer():
    insert_demo_row()


def demo_activity():
    schedule = dg.ScheduleDefinition(
        job=demo_writer, cron_schedule="* * * * *", default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Demo only: a new source row every minute, picked up by the landing sensor.",
    )
    return [demo_writer], [schedule]


# --------------------------------------------------------------------------- downstream

#: the demo's downstream asset: rows per day of the landed data_source_table
ROWS_PER_DAY = dg.AssetKey(["demo", "data_source_table_rows_per_day"])


def demo_downstream(landing: dg.AssetKey, partitions_def: dg.PartitionsDefinition, day_column: str):
    """An asset of one's own downstream of a landing asset (it declares it as an input: the IO
    manager of the landing assets reads the window's files), and the sensor that materializes
    each window of it once the window has landed (see docs/downstream.md, "Following landing")."""
    import pyarrow as pa
    import pyarrow.compute as pc

    @dg.asset(
        key=ROWS_PER_DAY,
        partitions_def=partitions_def,
        ins={"rows": dg.AssetIn(landing)},
        group_name="demo",
        kinds={"python"},
        description=f"Demo only: how many rows of `{landing.to_user_string()}` fall on each day of a window "
                    f"(by `{day_column}`); materialized after each landing of the window.",
    )
    def rows_per_day(context: dg.AssetExecutionContext, rows: pa.Table) -> dg.MaterializeResult:
        days = pc.strftime(pc.floor_temporal(rows.column(day_column), unit="day"), format="%Y-%m-%d")
        counts = pa.table({"day": days}).group_by("day").aggregate([("day", "count")]).sort_by("day")
        records = [dg.TableRecord({"day": d, "rows": n}) for d, n in zip(counts.column("day").to_pylist(),
                                                                       counts.column("day_count").to_pylist())]
        context.log.info(f"{context.partition_key}: {rows.num_rows} row(s) on {len(records)} day(s)")
        return dg.MaterializeResult(metadata={
            "dagster/row_count": dg.MetadataValue.int(len(records)),
            "rows": dg.MetadataValue.int(rows.num_rows),
            "rows_per_day": dg.MetadataValue.table(
                records, schema=dg.TableSchema([dg.TableColumn("day", "string"), dg.TableColumn("rows", "int")])),
        })

    @dg.sensor(
        name="demo_rows_per_day_follows_landing",
        target=[ROWS_PER_DAY],
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Demo only: materializes each window of {ROWS_PER_DAY.to_user_string()} that "
                    f"{landing.to_user_string()} has landed since the last tick.",
    )
    def follows_landing(context: dg.SensorEvaluationContext):
        yield from windows_landed_since(context, landing)

    return rows_per_day, follows_landing
