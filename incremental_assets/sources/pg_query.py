"""PostgreSQL's columnar path, the SQL side: a slice's SELECT rewritten for ``COPY``.

``COPY`` takes no parameters, and ADBC loads the whole result of a parameterised query into
memory, so the slice's bounds are bound parameters of a ``set_config`` call instead (``SELECT
set_config('incremental_assets.p1', CAST($1 AS text), true)``, transaction-local) and the SELECT
reads them back with ``CAST(current_setting(...) AS <type>)``: values are never formatted into SQL.
The planner estimates with those values (stable functions are folded for estimation), so the plan
is the one the real bounds deserve; :class:`SliceQuery` also carries the same SELECT with the
bounds in scalar subqueries (evaluated once), for where that plan is a sequential scan (see
``pg_plans.py``). ``real`` columns are selected as text (the generic path parses the server's text
too; see :func:`as_text`).

Apart from ``postgresql.py`` because it only compiles SQLAlchemy statements: no connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.visitors import replacement_traverse

from .base import ORDER_OPTION, STORAGE_ORDER_OPTION
from .pg_arrow import NoFastPath, _param_array
from .types import base_type


def interval_iso(column: sa.ColumnElement) -> sa.ColumnElement:
    """An interval as ISO 8601 text with every field and its sign (``P0Y-1M2DT3H4M5.000006S``),
    whatever the session's IntervalStyle: exact (months, days and time kept apart, microseconds
    kept), and PostgreSQL reads it back as the same interval. NULL stays NULL."""
    text: sa.ColumnElement = sa.literal_column("'P'", sa.Text)
    for part, mark in (("year", "Y"), ("month", "M"), ("day", "D"), ("hour", "H"), ("minute", "M"), ("second", "S")):
        text = text + sa.cast(sa.extract(part, column), sa.Text) + sa.literal_column(f"'{mark}'", sa.Text)
        if part == "day":
            text = text + sa.literal_column("'T'", sa.Text)
    return text


_COMPILE_DIALECT: sa.Dialect | None = None


def _compile_dialect() -> sa.Dialect:
    global _COMPILE_DIALECT
    if _COMPILE_DIALECT is None:
        from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

        # the psycopg dialect renders a cast on every bound parameter ($1::TIMESTAMP WITH TIME
        # ZONE), so the server types them exactly as the generic path does
        _COMPILE_DIALECT = PGDialect_psycopg(paramstyle="numeric_dollar")
    return _COMPILE_DIALECT


def as_text(select: sa.Select) -> tuple[sa.Select, dict[str, str]]:
    """``real`` columns selected as ``CAST(col AS TEXT)``; returns which (name -> kind).

    The generic path parses the server's text of a real (``4.9910328e+07``, ``1.1``) into a
    double; the binary float4 widened to double would differ (``1.100000023841858``), and no
    client-side shortest-digits algorithm is guaranteed to print what the server prints.
    ``numeric`` travels in binary: the driver turns it into the text the server would print
    (checked against the generic path in the tests), and the server sends it for less than it
    costs to print it (measured: 2M rows COPY'd with 0.94 s of server CPU instead of 1.08 s).
    """
    columns: list[sa.ColumnElement] = []
    kinds: dict[str, str] = {}
    changed = False
    for column in select.selected_columns:
        kind = None
        if isinstance(column, sa.Label):
            t = column.type
            if isinstance(t, sa.REAL):
                kind = "real"
            elif not isinstance(column.element, sa.Column) and isinstance(t, sa.String):
                kinds[column.name] = "text"  # text the server renders (see PostgreSQLDialect.result_column)
            elif isinstance(column.element, sa.Column) and isinstance(base_type(t), sa.ARRAY):
                columns.append(_one_dimensional(column.element).label(column.name))
                changed = True
                continue
        if kind is None:
            columns.append(column)
        else:
            columns.append(sa.cast(column.element, sa.Text).label(column.name))
            kinds[column.name] = kind
            changed = True
    if not changed:
        return select, kinds
    return select.with_only_columns(*columns, maintain_column_froms=True), kinds


def _one_dimensional(column: sa.Column) -> sa.ColumnElement:
    """The array column, or an error naming it for a value of more than one dimension: ADBC
    would flatten such a value into one list without a word. The error is a cast of a text that
    is not an array literal, computed from the row (so never folded into a constant)."""
    name = column.name.replace("'", "''")
    message = sa.cast(sa.func.array_ndims(column), sa.Text) + sa.literal_column(
        f"' dimensions in column \"{name}\", declared with one: declare its dimensions to land it as JSON text'", sa.Text
    )
    return sa.case((sa.func.array_ndims(column) > 1, sa.cast(message, column.type)), else_=column)


SETTING_PREFIX = "incremental_assets.p"


@dataclass(frozen=True)
class SliceQuery:
    """A SELECT prepared for ``COPY``: its bound values travel through transaction-local settings."""

    #: the SELECT reading each value as ``CAST(current_setting('incremental_assets.pN') AS type)``
    direct: str
    #: the same with each of those in a scalar subquery: evaluated once, also in a sequential scan
    once: str
    #: ``SELECT set_config('incremental_assets.p1', CAST($1 AS TEXT), true), ...``, or None
    settings: str | None
    #: the values of ``$1, $2...`` as a one-row Arrow batch, or None
    params: pa.RecordBatch | None
    #: columns selected as text: name -> "real" (see :func:`as_text`)
    text_columns: dict[str, str] = field(default_factory=dict)
    #: the table read, as ``to_regclass`` takes it (quoted), or None
    relation: str | None = None
    #: result column -> the table column it reads (for its type in the catalog)
    table_columns: dict[str, str] = field(default_factory=dict)
    #: the column the SELECT is ordered by, for a read of several windows (see ``ORDER_OPTION``)
    order_column: str | None = None
    #: rows in the table's storage order, for a read of several windows (see ``STORAGE_ORDER_OPTION``)
    storage_order: bool = False


def slice_query(select: sa.Select) -> SliceQuery:
    """Compile ``select`` for the fast path; raises NoFastPath for parameters it cannot carry."""
    relation, table_columns = _table_columns(select)  # before as_text() wraps any column
    select, text_columns = as_text(select)
    dialect = _compile_dialect()
    binds: dict[str, tuple[int, BindParameter]] = {}

    def rewrite(once: bool) -> str:
        def replace(element):
            if not isinstance(element, BindParameter):
                return None
            if element.expanding or element.literal_execute:
                raise NoFastPath(f"parameter {element.key!r} is expanded into the SQL")
            number, _ = binds.setdefault(element.key, (len(binds) + 1, element))
            # the setting's name is this module's constant, never a value
            name = sa.literal_column(f"'{SETTING_PREFIX}{number}'")
            value = sa.cast(sa.func.current_setting(name), element.type)
            return sa.select(value).scalar_subquery() if once else value

        rewritten = replacement_traverse(select, {}, replace)  # type: ignore[call-overload]  # a Select is traversible
        compiled = rewritten.compile(dialect=dialect)
        if compiled.positiontup:
            raise NoFastPath("the statement still has bound parameters")
        return compiled.string

    direct = rewrite(False)
    once = rewrite(True)
    options = select.get_execution_options()
    order_column, storage_order = options.get(ORDER_OPTION), bool(options.get(STORAGE_ORDER_OPTION))
    if not binds:
        return SliceQuery(direct, once, None, None, text_columns, relation, table_columns, order_column, storage_order)
    arrays, calls = [], []
    for number, element in sorted(binds.values(), key=lambda b: b[0]):
        value = element.effective_value
        processor = element.type.dialect_impl(dialect).bind_processor(dialect)
        if processor is not None:
            value = processor(value)
        arrays.append(_param_array(value, element.key))
        calls.append(f"set_config('{SETTING_PREFIX}{number}', CAST(${number} AS TEXT), true)")
    params = pa.record_batch(arrays, names=[str(n + 1) for n in range(len(arrays))])
    return SliceQuery(
        direct, once, "SELECT " + ", ".join(calls), params, text_columns, relation, table_columns, order_column, storage_order
    )


def _table_columns(select: sa.Select) -> tuple[str | None, dict[str, str]]:
    """The one table ``select`` reads plain columns of (quoted for ``to_regclass``), and which."""
    relation, columns = None, {}
    for column in select.selected_columns:
        element = column.element if isinstance(column, sa.Label) else column
        if not (isinstance(element, sa.Column) and isinstance(element.table, sa.Table)):
            continue
        table = element.table
        quote = _compile_dialect().identifier_preparer.quote_identifier  # always quotes
        name = ".".join(quote(p) for p in (table.schema, table.name) if p)
        if relation not in (None, name):
            return None, {}
        relation = name
        columns[column.name] = element.name
    return relation, columns


