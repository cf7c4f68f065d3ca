"""Runs whose process died: told apart from live ones, ended, and their pool slots freed.

Each run records the process that executes it in a run tag (:data:`PROCESS_TAG`: host, boot,
process id and start time). A run that is still in flight while that process is gone was
killed (SIGKILL, out of memory, a lost node): nothing will ever end it, and it holds its
table's pool slot. The sensors and ``incremental-assets sync`` end such runs as failed through
the instance and free their slots, so that the table's next copy proceeds. Runs of another
host, or that name no process, are left to Dagster's run monitoring.
"""

from __future__ import annotations


import dagster as dg

from ..processes import current_owner, describe_owner, owner_alive

PROCESS_TAG = "incremental_assets/process"

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def process_tags() -> dict[str, str]:
    """The tag that names this process as the one executing a run started here."""
    return {PROCESS_TAG: current_owner()}


def record_process(context: dg.AssetExecutionContext) -> None:
    """Record the process executing the run (a run worker launched by the daemon, say)."""
    owner = current_owner()
    if context.run.tags.get(PROCESS_TAG) != owner:
        context.instance.add_run_tags(context.run.run_id, {PROCESS_TAG: owner})


def table_pools(table: str) -> list[str]:
    """The pools of a table's assets (landing, replica)."""
    return [f"incremental_assets/{table}", f"incremental_assets/replica/{table}"]


def end_if_dead(instance: dg.DagsterInstance, run: dg.DagsterRun, what: str) -> str | None:
    """End an in-flight ``run`` (of ``what``: a table, a source) as failed and free its pool slots
    when the process it recorded is gone; the message said, or None when the run may be alive."""
    owner = run.tags.get(PROCESS_TAG)
    if run.is_finished or owner_alive(owner) is not False:
        return None
    message = (
        f"{what}: run {run.run_id} was left {run.status.value} by {describe_owner(owner)}, which no longer "
        "runs (killed?): ended as failed, its pool slots freed; the next copy starts from the last "
        "recorded watermark"
    )
    instance.report_run_failed(run, message)
    if instance.event_log_storage.supports_global_concurrency_limits:
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
    return message
