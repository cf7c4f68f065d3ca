"""PostgreSQL's columnar path, the planner: the plan of a slice's read, and the settings that steer it.

A read EXPLAINs its statement (with its real bounds, see ``pg_query.py``) before the ``COPY``: a
sequential or bitmap heap scan would compute the bounds again for every row, so the reader keeps
that scan and switches to the statement that computes them once (:func:`per_row_scan`,
``_KEEP_SCAN``); a read of several windows checks whether the table is stored in the order it
reads (the planner's correlation, :func:`_stored_in_order`) and whether the plan sorts. The
statements run on the read's own ADBC connection, in its transaction.

Apart from ``postgresql.py`` because it only reads what the planner says (and runs the few statements
that ask it), whether for one read or for a run of windows (``PostgreSQLDialect.one_ordered_read``).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from .pg_arrow import _string_array


# the planner's correlation of a column with the table's storage order (no statistics: no row)
CORRELATION = (
    "SELECT s.correlation FROM pg_catalog.pg_stats AS s "
    "JOIN pg_catalog.pg_class AS c ON c.relname = s.tablename "
    "JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace AND n.nspname = s.schemaname "
    "WHERE c.oid = to_regclass($1) AND s.attname = $2"
)


# statements on an ADBC connection (the reader in postgresql.py runs its own through these too)
def _run_query(conn, sql: str, params: pa.RecordBatch | None = None) -> pa.Table:
    import adbc_driver_manager

    statement = adbc_driver_manager.AdbcStatement(conn)
    try:
        statement.set_options(**{"adbc.postgresql.use_copy": "false"})
        statement.set_sql_query(sql)
        if params is not None:
            statement.bind(params)
        handle, _ = statement.execute_query()
        with pa.RecordBatchReader.from_stream(handle) as reader:
            return reader.read_all()
    finally:
        statement.close()


def _run_update(conn, sql: str) -> None:
    import adbc_driver_manager

    statement = adbc_driver_manager.AdbcStatement(conn)
    try:
        statement.set_sql_query(sql)
        statement.execute_update()
    finally:
        statement.close()


_KEEP_SCAN = {
    "Seq Scan": ("enable_indexscan", "enable_indexonlyscan", "enable_bitmapscan", "enable_tidscan"),
    "Bitmap Heap Scan": ("enable_seqscan", "enable_indexscan", "enable_indexonlyscan", "enable_tidscan"),
}


_STORAGE_ORDER = ("SET LOCAL synchronize_seqscans = off", "SET LOCAL max_parallel_workers_per_gather = 0")
_SORTS = {"Sort", "Incremental Sort"}
#: the planner's correlation of a column with the table's storage order from which an index read
#: in the column's order reads the table about in storage order (1: exactly)
IN_ORDER_CORRELATION = 0.9


def _explain(conn, sql: str) -> Any:
    plan = _run_query(conn, "EXPLAIN (FORMAT JSON) " + sql).column(0)[0].as_py()
    return json.loads(plan) if isinstance(plan, (str, bytes)) else plan


def _plan_top(plan: Any) -> dict:
    """The top node of an EXPLAIN (FORMAT JSON) plan ({} if none)."""
    top = plan[0] if isinstance(plan, list) and plan else plan
    node = top.get("Plan", {}) if isinstance(top, dict) else {}
    return node if isinstance(node, dict) else {}


def _plan_bytes(plan: Any) -> float | None:
    """The planner's estimate of the bytes a plan returns: its rows times their width."""
    node = _plan_top(plan)
    rows, width = node.get("Plan Rows"), node.get("Plan Width")
    if not isinstance(rows, (int, float)) or not isinstance(width, (int, float)):
        return None
    return rows * width


def _stored_in_order(conn, relation: str, column: str) -> bool:
    """Whether the planner's statistics say the table is stored about in ``column``'s order
    (no statistics: no)."""
    params = pa.record_batch([_string_array([relation]), _string_array([column])], names=["1", "2"])
    correlations = _run_query(conn, CORRELATION, params).column(0).to_pylist()
    return bool(correlations) and all(c is not None and abs(c) >= IN_ORDER_CORRELATION for c in correlations)


def _plan_nodes(plan: Any, kinds: set[str]) -> list[dict]:
    """The nodes of an EXPLAIN (FORMAT JSON) plan whose type is one of ``kinds``."""
    found = []
    nodes = list(plan) if isinstance(plan, list) else [plan]
    while nodes:
        node = nodes.pop()
        if not isinstance(node, dict):
            continue
        if node.get("Node Type") in kinds:
            found.append(node)
        for value in node.values():
            if isinstance(value, dict):
                nodes.append(value)
            elif isinstance(value, list):
                nodes.extend(value)
    return found


def per_row_scan(plan: Any) -> str | None:
    """The scan of an EXPLAIN (FORMAT JSON) plan that would read the settings for every row:
    ``"Seq Scan"``, ``"Bitmap Heap Scan"``, or None (index scans compute their bounds once)."""
    found = None
    for node in _plan_nodes(plan, set(_KEEP_SCAN)):
        if "current_setting" in str(node.get("Filter", "")) + str(node.get("Recheck Cond", "")):
            if node["Node Type"] == "Seq Scan" or found is None:
                found = node["Node Type"]
    return found
