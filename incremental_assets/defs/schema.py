"""The columns of an asset in Dagster (``dagster/column_schema``), and their changes.

Each materialization records the columns the table had when it ran, so the asset's column schema
in the UI follows the source; when they differ from the previous materialization's, the run logs
a warning naming the columns and records ``schema_changes`` (added, dropped, retyped).
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import pyarrow as pa

from ..landing.schema import describe_changes, schema_changes

COLUMN_SCHEMA = "dagster/column_schema"
SCHEMA_CHANGES = "schema_changes"


def column_schema(columns: dict[str, str]) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name, type_) for name, type_ in columns.items()])


def arrow_columns(schema: pa.Schema) -> dict[str, str]:
    return {f.name: str(f.type) for f in schema}


def recorded_columns(metadata: dict[str, Any] | None) -> dict[str, str] | None:
    """The columns a materialization's metadata (values, as ``latest_metadata`` gives them) records."""
    schema = (metadata or {}).get(COLUMN_SCHEMA)
    if not isinstance(schema, dg.TableSchema):
        return None
    return {c.name: c.type for c in schema.columns}


def columns_metadata(context, name: str, columns: dict[str, str], previous: dict[str, Any] | None) -> dict[str, Any]:
    """The column schema for a materialization's metadata, and ``schema_changes`` with a warning in
    the run's log when the columns differ from those of ``previous`` (the latest materialization's
    metadata)."""
    out: dict[str, Any] = {COLUMN_SCHEMA: column_schema(columns)}
    before = recorded_columns(previous)
    if before is not None and (changes := schema_changes(before, columns)):
        context.log.warning(f"{name}: the source's columns changed since the last copy: {describe_changes(changes)}")
        out[SCHEMA_CHANGES] = dg.MetadataValue.json(changes)
    return out
