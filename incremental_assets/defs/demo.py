"""The demo's activity: a row written into the demo source every minute, so copies keep coming."""


import dagster as dg

from ..demo import add_demo_row


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
