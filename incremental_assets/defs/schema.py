"""Changes of a table's columns between its materializations.

Each materialization records the columns the table had when it ran (``dagster/column_schema``,
see metadata.py), so the asset's column schema in the UI follows the source; when they differ
from the previous materialization's, the run logs a warning naming the columns and records
``schema_changes`` (added, dropped, retyped).
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import pyarrow as pa

from ..landing.schema import describe_changes, schema_changes
from .metadata import COLUMN_SCHEMA

SCHEMA_CHANGES = "schema_changes"


def column_schema(columns: dict[str, str]) -> dg.TableSchema:
    """Columns as a database shows them (name: type)."""
    return dg.TableSchema(columns=[dg.TableColumn(name, type_) for name, type_ in columns.items()])


def recorded_columns(metadata: dict[str, Any] | None) -> dict[str, str] | None:
    """The columns a materialization's metadata (values, as ``latest_metadata`` gives them) records."""
    schema = (metadata or {}).get(COLUMN_SCHEMA)
    if not isinstance(schema, dg.TableSchema):
        return None
    return {c.name: c.type for c in schema.columns}


def columns_metadata(context, name: str, schema: pa.Schema, previous: dict[str, Any] | None) -> dict[str, Any]:
    """``schema_changes``, with a warning in the run's log, when the columns of ``schema`` differ
    from those ``previous`` (the latest materialization's metadata) records; else nothing."""
    before = recorded_columns(previous)
    columns = {f.name: str(f.type) for f in schema}
    if before is None or not (changes := schema_changes(before, columns)):
        return {}
    context.log.warning(f"{name}: the source's columns changed since the last copy: {describe_changes(changes)}")
    return {SCHEMA_CHANGES: dg.MetadataValue.json(changes)}
