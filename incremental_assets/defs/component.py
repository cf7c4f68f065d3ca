"""``incremental_assets.IncrementalCopyComponent``: the project's configuration as a Dagster
component (docs/component.md).

Its attributes are the keys of the standalone configuration file (``sources``, ``landing``,
``tables``, ``replica``, ``sensors``, ``run_retries``, ``freshness``), validated by the same
code (config.py), so an error names the ``defs.yaml``, the table and the key; and it builds the
same definitions (definitions.py). ``translation`` changes each asset's key, group, tags, owners,
kinds, description or metadata, as in Dagster's own integrations; ``post_processing`` in
``defs.yaml`` is Dagster's and applies to the built assets.
"""


import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import dagster as dg

# the resolver Dagster's integrations (dagster-sling, dagster-dlt, dagster-dbt) give their
# ``translation``: the same YAML, template scope and merge rules (tags and metadata merge)
from dagster.components.utils.translation import TranslationFn, TranslationFnResolver

from ..config import ProjectConfig, validate_config, with_discovery
from .specs import TableAsset

#: the attributes that are keys of the configuration file
CONFIG_KEYS = ("sources", "landing", "tables", "replica", "sensors", "run_retries", "freshness")


class IncrementalCopyScaffolder(dg.Scaffolder):
    """``dg scaffold defs incremental_assets.IncrementalCopyComponent <path>``: a ``defs.yaml``
    with one source, one table and every other key commented, to edit."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        if request.scaffold_format != "yaml":
            dg.scaffold_component(request, {"sources": {"erp": {"url": "${ERP_URL}"}}, "tables": []})
            return
        source = re.sub(r"\W", "_", request.target_path.name) or "erp"
        (request.target_path / "defs.yaml").write_text(
            SCAFFOLD_YAML.format(type=request.type_name, source=source, upper=source.upper()))


SCAFFOLD_YAML = textwrap.dedent("""\
    # Incremental copies of the tables of one or more SQL databases (docs/component.md of
    # incremental_assets). The attributes are those of the standalone configuration file.
    type: {type}

    attributes:
      sources:
        {source}:
          # a SQLAlchemy URL; the password comes from the environment, never from this file:
          # postgresql+psycopg://copier:${{DB_PASSWORD}}@db.example.com:5432/{source}
          url: ${{{upper}_URL}}
          # discover:                    # or find tables by pattern instead of listing them
          #   include: ["sales.*"]
      landing:
        url: ./landing                   # a folder (relative to this file) or azure://container/prefix
        format: parquet                  # or csv
      tables:
        - name: customers                # asset landing/customers (and replica/customers)
          source: {source}
          table: customers               # table or schema.table
          mode: watermark                # or change_tracking
          watermark_column: updated_at
          primary_key: [id]              # the replica's merge key when the table declares none
          partitions: {{granularity: daily, start: "2024-01-01"}}
      # replica:                         # merge every landed slice into a SQL database
      #   url: ${{REPLICA_URL}}
      # sensors: {{interval_seconds: 30, max_tables_per_run: 50}}
      # freshness: {{fail_window_minutes: 1440, warn_window_minutes: 360}}
      # translation:                     # per table: key, group_name, tags, owners, kinds, description
      #   group_name: {source}
      #   key: "{source}/{{{{ layer }}}}/{{{{ table.name }}}}"
      #   owners: ["team:data"]

    # post_processing:                   # Dagster's: attributes of the built assets, by selection
    #   assets:
    #     - target: "*"
    #       attributes:
    #         tags: {{system: {source}}}
    """)


def _described(description: str) -> dg.Resolver:
    return dg.Resolver.default(description=description)


#: a translation: ``spec`` and the table's data -> the asset's spec
TableTranslation = Annotated[
    TranslationFn[TableAsset],
    TranslationFnResolver[TableAsset](lambda data: {"table": data.table, "layer": data.layer}),
]


@dg.scaffold_with(IncrementalCopyScaffolder)
@dataclass
class IncrementalCopyComponent(dg.Component, dg.Resolvable):
    """Incremental copies of SQL tables (by a watermark column or change tracking) into a landing
    store, optionally merged into a SQL replica: a partitioned asset per table and layer, one
    sensor per source.

    Attributes are the keys of incremental_assets' configuration file: ``sources``, ``landing``,
    ``tables``, ``replica``, ``sensors``, ``run_retries``, ``freshness``; ``translation`` sets
    each asset's key, group_name, tags, owners, kinds, description or metadata, with
    ``{{ table.name }}``, ``{{ table.source }}``, ``{{ layer }}`` (landing or replica) and
    ``{{ spec }}`` in scope.
    """

    # typed loosely here: config.py validates them, as it does a configuration file
    sources: Annotated[dict[str, Any], _described(
        "Source databases by name: url (SQLAlchemy; ${VAR} for passwords), retries, discover, ...")]
    tables: Annotated[list[Any] | None, _described(
        "The tables to copy: name, source, table, mode, watermark_column, primary_key, partitions, ...")] = None
    landing: Annotated[dict[str, Any] | None, _described(
        "Where slices land: url (a folder, relative to this file, or azure://container/prefix), format")] = None
    replica: Annotated[dict[str, Any] | None, _described(
        "The SQL database every landed slice is merged into: url, schema, on_schema_change")] = None
    sensors: Annotated[dict[str, Any] | None, _described(
        "The sources' sensors: enabled, interval_seconds, max_tables_per_run")] = None
    run_retries: Annotated[dict[str, Any] | None, _described(
        "Dagster's retry policy for transient failures: max_retries, delay_seconds")] = None
    freshness: Annotated[dict[str, Any] | None, _described(
        "Every table's freshness policy: fail_window_minutes, warn_window_minutes")] = None
    translation: TableTranslation | None = None

    def config(self, path: Path | None = None) -> ProjectConfig:
        """The configuration these attributes make (validated as a configuration file is; errors
        name ``path``, the instance's ``defs.yaml``)."""
        raw = {key: getattr(self, key) for key in CONFIG_KEYS if getattr(self, key) is not None}
        return with_discovery(validate_config(raw, str(path or "<component>"), path))

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        from ..definitions import build_definitions, prepare_demo

        path = context.path / "defs.yaml"  # errors name it; relative folders resolve beside it
        if not path.exists():  # built in Python (a component.py, a test)
            path = context.path / "component.py"
        prepare_demo(path)
        return build_definitions(self.config(path), translate=self.translation, namespace=_namespace(context))


def _namespace(context: dg.ComponentLoadContext) -> str:
    """The instance's path under the defs folder, as a resource-key suffix (``erp``, ``sales_erp``):
    two instances never share a landing or replica resource key."""
    try:
        parts = context.path.resolve().relative_to(context.defs_module_path.resolve()).parts
    except ValueError:
        parts = ()
    return re.sub(r"\W", "_", "_".join(parts) or context.path.name)
