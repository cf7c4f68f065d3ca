"""``check_setup``: the preflight check (``incremental_assets/preflight.py``) as a job, so that the
setup can be checked from the UI (Launchpad) where the runs execute, with their environment.

Nothing connects when the definitions load: the checks run when the job runs.
"""

import dagster as dg

from ..config import ProjectConfig
from ..preflight import FAIL, WARN, check_project


def build_check_setup_job(config: ProjectConfig, namespace: str | None = None) -> dg.JobDefinition:
    """The job ``check_setup`` (``check_setup_<namespace>`` for a component instance, so that
    several instances of one project each have theirs)."""
    suffix = "_" + "".join(ch if ch.isalnum() else "_" for ch in namespace) if namespace else ""

    @dg.op(name=f"preflight_check{suffix}", description="Check the sources, privileges, tables, indexes, change tracking, landing "
                                           "and replica without copying; fails when a copy or merge would fail.")
    def _check(context: dg.OpExecutionContext) -> dg.Output[None]:
        verdicts = []
        for verdict in check_project(config):
            verdicts.append(verdict)
            log = context.log.error if verdict.level == FAIL else context.log.warning if verdict.level == WARN else context.log.info
            log(verdict.line())
        table = "| level | subject | check | found |\n|---|---|---|---|\n" + "\n".join(
            f"| {v.level.upper()} | {v.subject} | {v.check} | {v.message.replace('|', '/')} |" for v in verdicts
        )
        failed = [v for v in verdicts if v.level == FAIL]
        if failed:
            raise dg.Failure(
                description=f"{len(failed)} check(s) failed: " + "; ".join(f"{v.subject}: {v.check}" for v in failed),
                metadata={"verdicts": dg.MetadataValue.md(table)},
                allow_retries=False,
            )
        return dg.Output(None, metadata={"verdicts": dg.MetadataValue.md(table),
                                         "warnings": sum(v.level == WARN for v in verdicts)})

    @dg.job(name=f"check_setup{suffix}", description="The preflight check of `incremental-assets check`, run where the runs run.")
    def _job():
        _check()

    return _job
