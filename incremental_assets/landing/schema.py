"""One schema for a table's landed files, whatever changed at the source between them.

Each landed Parquet file carries the schema its table had when it was copied. After a column is
added, dropped, renamed or widened at the source, a folder's files differ, and a reader that takes
the first file's schema (``pyarrow.dataset``'s default) drops the newer columns or fails
("Rescaling Decimal value would cause data loss"). The table's schema is the union of its files':

- every column of any file, in the order they first appear (files in window and name order, so
  the oldest first), a file without a column reading as NULL there;
- a column's type is the narrowest that holds every file's values: integers widen to the wider
  integer, decimals to the precision and scale that hold both (``numeric(10,2)`` and
  ``numeric(12,4)``: ``decimal(12,4)``), integers and decimals to a decimal, text and binary to
  their large variants when one file has them (``pyarrow.unify_schemas(...,
  promote_options="permissive")`` does all of this);
- a timestamp landed without a zone in some files and with one in others (``timestamp`` changed
  to ``timestamptz`` at the source) is read as UTC instants: wall-clock values are taken as UTC,
  as the replica and the watermark take them by default.

    import pyarrow.dataset as ds
    from incremental_assets.landing.schema import unified_schema
    files = sorted(glob.glob("landing/customers/*/*.parquet"))
    table = ds.dataset(files, schema=unified_schema(files)).to_table()

No Dagster here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def unify(schemas: Iterable[pa.Schema]) -> pa.Schema:
    """The schema that holds every row of files of ``schemas`` (oldest first), as the module says."""
    schemas = [s.remove_metadata() for s in schemas]
    if not schemas:
        return pa.schema([])
    zoned: dict[str, str] = {}
    for schema in schemas:
        for f in schema:
            if pa.types.is_timestamp(f.type) and f.type.tz is not None:
                zoned.setdefault(f.name, "UTC")
    if zoned:  # wall clock and instants in one column: instants (see the module)
        schemas = [pa.schema([_zoned(f) if f.name in zoned else f for f in s]) for s in schemas]
    return pa.unify_schemas(schemas, promote_options="permissive")


def _zoned(f: pa.Field) -> pa.Field:
    if pa.types.is_timestamp(f.type):
        return f.with_type(pa.timestamp(f.type.unit, tz="UTC"))
    return f


def unified_schema(paths: Sequence[str], filesystem: Any = None) -> pa.Schema:
    """The unified schema of Parquet files ``paths`` (read from their footers only)."""
    return unify(pq.read_schema(p, filesystem=filesystem) for p in paths)


def schema_changes(before: dict[str, str], after: dict[str, str]) -> dict[str, Any]:
    """What changed between two column lists (``{name: type}``, in order): columns added, dropped
    and retyped (``{name: "old -> new"}``); empty when nothing did. A renamed column is one dropped
    and one added."""
    out: dict[str, Any] = {}
    added = [c for c in after if c not in before]
    dropped = [c for c in before if c not in after]
    retyped = {c: f"{before[c]} -> {after[c]}" for c in after if c in before and before[c] != after[c]}
    if added:
        out["added"] = added
    if dropped:
        out["dropped"] = dropped
    if retyped:
        out["retyped"] = retyped
    return out


def describe_changes(changes: dict[str, Any]) -> str:
    """``schema_changes`` as a sentence for a log line."""
    parts = []
    if changes.get("added"):
        parts.append(f"added {changes['added']}")
    if changes.get("dropped"):
        parts.append(f"dropped (or renamed) {changes['dropped']}")
    if changes.get("retyped"):
        parts.append("retyped " + ", ".join(f"{c} ({t})" for c, t in changes["retyped"].items()))
    return "; ".join(parts)


def landed_dataset(paths: Sequence[str], filesystem: Any = None):
    """A ``pyarrow.dataset`` over Parquet files ``paths`` under their :func:`unified_schema`:
    every row of every file, each column in one type (``.to_table()``; Polars:
    ``polars.scan_pyarrow_dataset``)."""
    import pyarrow.dataset as ds

    paths = list(paths)
    return ds.dataset(paths, schema=unified_schema(paths, filesystem), format="parquet", filesystem=filesystem)
