"""Dagster definitions built from the configuration (``INCREMENTAL_ASSETS_CONFIG`` or the demo)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import dagster as dg

from . import use_system_memory_pool

# the code server's entry point, and that of the runs it starts: before the modules that load pyarrow
use_system_memory_pool()

from .config import (  # noqa: E402
    CONFIG_ENV, DEMO_CONFIG, DEMO_DIR_ENV, PROJECT_DIR, ProjectConfig, config_path, env_var_name, load_config,
)
from .defs.automation import build_source_sensor, copy_jobs  # noqa: E402
from .defs.io import io_manager_key, landing_io_manager  # noqa: E402
from .defs.landing import build_landing_asset, landing_tables  # noqa: E402
from .defs.replica import build_replica_asset, replica_tables  # noqa: E402
from .defs.resources import LandingResource, ReplicaResource, SourceResource, source_resource_key  # noqa: E402
from .defs.specs import Translate, translated  # noqa: E402


# single-run backfills are what keeps an initial load one run; Dagster still labels them beta
warnings.filterwarnings("ignore", message=r".*`backfill_policy`.*beta", category=Warning)


def _secret_or_template(value: str):
    """A value that is exactly ``${VAR}`` becomes a Dagster EnvVar; others stay templates."""
    name = env_var_name(value)
    return dg.EnvVar(name) if name else value


def build_definitions(config: ProjectConfig, *, translate: Translate | None = None,
                      namespace: str | None = None) -> dg.Definitions:
    """The definitions of one configuration: a standalone file, or a component instance's
    attributes (``translate``: its translation; ``namespace``: what keeps its landing and replica
    resource keys apart from other instances')."""
    landing_key = f"landing_{namespace}" if namespace else "landing"
    replica_key = f"replica_{namespace}" if namespace else "replica"
    defaults = landing_tables(config)
    tables, replica_list = translated(config, defaults, replica_tables(config, defaults), translate,
                                      landing_key=landing_key, replica_key=replica_key)
    assets, sensors = [], []
    for table in tables:
        asset = build_landing_asset(table, config)
        assets.append(asset)
    replicas = {}
    for rt in replica_list:
        asset = build_replica_asset(rt, config)
        assets.append(asset)
        replicas[rt.landing.config.name] = rt
    jobs: list = []
    for source in config.sources:  # one sensor per source, not per table (defs/automation.py)
        mine = [t for t in tables if t.config.source == source]
        if mine:
            by_table = copy_jobs(source, mine, {name: rt.key for name, rt in replicas.items()})
            jobs.extend({job.name: job for job in by_table.values()}.values())
            sensors.append(build_source_sensor(source, mine, by_table, replicas, config))
    resources: dict[str, object] = {
        source_resource_key(name): SourceResource(
            name=name,
            url=_secret_or_template(src.url),
            retries=src.retries,
            retry_delay_seconds=src.retry_delay_seconds,
            horizon_wait_seconds=src.horizon_wait_seconds,
        )
        for name, src in config.sources.items()
    }
    landing = {
        "url": _secret_or_template(config.landing.url),
        "format": config.landing.format,
        "max_rows_per_file": config.landing.max_rows_per_file,
        "base_dir": str(config.path.parent) if config.path else None,
    }
    azure = None
    if config.landing.url.startswith("azure://"):
        from .defs.azure import AzureLandingResource, azure_blob_resource

        azure = azure_blob_resource(os.environ)
    resources[landing_key] = AzureLandingResource(**landing, azure=azure) if azure else LandingResource(**landing)
    # downstream assets that declare a landing asset as an input read its windows' files
    resources[io_manager_key(landing_key)] = landing_io_manager({t.name: t.primary_key for t in config.tables}, landing_key)
    if config.replica is not None:
        resources[replica_key] = ReplicaResource(
            url=_secret_or_template(config.replica.url),
            schema_name=config.replica.schema_name,
            retries=config.replica.retries,
            retry_delay_seconds=config.replica.retry_delay_seconds,
        )
    from .defs.preflight import build_check_setup_job

    jobs.append(build_check_setup_job(config, namespace))  # the preflight check, from the UI
    schedules = []
    if config.path == DEMO_CONFIG:
        from .defs.demo import demo_activity, demo_downstream

        demo_jobs, schedules = demo_activity()
        jobs += demo_jobs
        demo_table = next(t for t in tables if t.config.name == "data_source_table")
        downstream, follows = demo_downstream(demo_table.key, demo_table.partitions_def, "LastModifytime")
        assets.append(downstream)
        sensors.append(follows)
    # a run copies (and merges) a batch of tables, a step each, in its own process: a process per
    # step would cost more than most incremental copies (see defs/automation.py)
    return dg.Definitions(assets=assets, sensors=sensors, resources=resources, jobs=jobs, schedules=schedules,
                          executor=dg.in_process_executor)


def prepare_demo(path: Path) -> None:
    """When ``path`` is the demo's configuration: its folder's default, and its source database
    (created on first use)."""
    if Path(path).resolve() == DEMO_CONFIG:
        from .demo import ensure_demo_database

        os.environ.setdefault(DEMO_DIR_ENV, str(PROJECT_DIR / ".demo"))
        ensure_demo_database()


def load_project(config_file=None) -> tuple[ProjectConfig, dg.Definitions]:
    """The configuration and its definitions, as the command line reads them: a standalone file
    (or a component's ``defs.yaml``, without its translation)."""
    prepare_demo(config_path(config_file))
    config = load_config(config_file)
    return config, build_definitions(config)


def load_definitions(config_file=None) -> dg.Definitions:
    return load_project(config_file)[1]


@dg.definitions
def defs() -> dg.Definitions:
    """The file named by ``INCREMENTAL_ASSETS_CONFIG``; else the project's defs folder
    (``incremental_assets/demo/defs``: the demo, an :class:`IncrementalCopyComponent` instance)."""
    if os.environ.get(CONFIG_ENV):
        return load_definitions()
    return dg.load_from_defs_folder(path_within_project=Path(__file__).resolve().parent)
