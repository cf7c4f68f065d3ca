"""Mapping reflected SQLAlchemy column types to Arrow types that keep values exact."""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import json
import uuid
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import sqlalchemy as sa


def is_binary_type(sa_type) -> bool:
    """A SQLAlchemy type whose values are bytes (BLOB, BYTEA, VARBINARY, MySQL's TINYBLOB, SQL
    Server's ROWVERSION, ...): told by its Python type, as not all of them derive from LargeBinary."""
    try:
        return sa_type.python_type is bytes
    except NotImplementedError:  # a type without one (MySQL BIT, ...) is no binary type
        return False


def arrow_type(sa_type: sa.types.TypeEngine) -> pa.DataType:
    """The Arrow type that holds every value of ``sa_type`` without loss.

    Unknown types fall back to text, so nothing is ever dropped (see :func:`text_fallback`).
    A domain maps as its base type; a one-dimensional array as an Arrow list of its element's
    type; an array declared with more dimensions as JSON text.
    """
    sa_type = base_type(sa_type)
    name = type(sa_type).__name__.upper()
    if isinstance(sa_type, sa.ARRAY):
        if (sa_type.dimensions or 1) > 1:
            return pa.string()  # JSON text: nested lists of a fixed depth cannot be promised
        return pa.list_(arrow_type(sa_type.item_type))
    if name == "YEAR":
        return pa.int16()
    if name == "BIT" and getattr(sa_type, "length", None) is not None:
        return pa.uint64() if sa_type.length >= 64 else pa.int64()  # type: ignore[attr-defined]  # MySQL BIT(n): the driver gives ints
    if name in {"ROWVERSION", "TIMESTAMP"} and not isinstance(sa_type, sa.DateTime):
        return pa.binary()
    if isinstance(sa_type, sa.Boolean):
        return pa.bool_()
    if isinstance(sa_type, sa.Integer):
        if isinstance(sa_type, sa.SmallInteger):
            return pa.int16()
        if isinstance(sa_type, sa.BigInteger) and getattr(sa_type, "unsigned", False):
            return pa.uint64()  # MySQL BIGINT UNSIGNED: beyond int64
        return pa.int64()
    if isinstance(sa_type, sa.Float) or name in {"REAL", "DOUBLE", "DOUBLE_PRECISION", "FLOAT"}:
        return pa.float64()
    if isinstance(sa_type, sa.Numeric):
        precision, scale = sa_type.precision, sa_type.scale
        if precision is None:
            # unconstrained NUMERIC: no fixed scale can hold every value exactly
            return pa.string()
        scale = scale or 0
        return pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(precision, scale)
    if isinstance(sa_type, sa.DateTime):
        return pa.timestamp("us", tz="UTC" if getattr(sa_type, "timezone", False) else None)
    if name == "DATETIMEOFFSET":
        return pa.timestamp("us", tz="UTC")
    if isinstance(sa_type, sa.Date):
        return pa.date32()
    if isinstance(sa_type, sa.Time):
        return pa.time64("us")
    if isinstance(sa_type, sa.Interval):
        return pa.duration("us")
    if is_binary_type(sa_type):
        return pa.binary()
    return pa.string()


def base_type(sa_type: sa.types.TypeEngine) -> sa.types.TypeEngine:
    """A domain's base type (domains over domains included); any other type as it is."""
    while isinstance(getattr(sa_type, "data_type", None), sa.types.TypeEngine) and type(sa_type).__name__.upper() == "DOMAIN":
        sa_type = sa_type.data_type  # type: ignore[attr-defined]
    return sa_type


#: types whose values are text at the source: landing them as text is exact, not a fallback
_TEXT_NAMES = {"UUID", "JSON", "JSONB", "SET", "ENUM", "CITEXT", "XML"}


def text_fallback(sa_type: sa.types.TypeEngine, arrow_t: pa.DataType) -> str | None:
    """How a column of ``sa_type`` that lands as ``arrow_t`` lands as the text of a value that is
    not text at the source (a range, a tsvector, a composite, a multi-dimensional array...), or
    None: such columns are named in the log when a table is described."""
    sa_type = base_type(sa_type)
    if isinstance(sa_type, sa.ARRAY):
        if pa.types.is_list(arrow_t):
            return text_fallback(sa_type.item_type, arrow_t.value_type)
        return "JSON text (an array of more than one dimension)"
    if not pa.types.is_string(arrow_t):
        return None
    if isinstance(sa_type, (sa.String, sa.JSON, sa.Uuid)) or type(sa_type).__name__.upper() in _TEXT_NAMES:
        return None
    if isinstance(sa_type, sa.Numeric):
        return None  # unconstrained NUMERIC: its exact decimal text
    if type(sa_type).__name__.upper() == "INTERVAL":
        return "ISO 8601 text"
    return "text"


def is_timezone_aware(sa_type: sa.types.TypeEngine) -> bool:
    sa_type = base_type(sa_type)
    return bool(getattr(sa_type, "timezone", False)) or type(sa_type).__name__.upper() == "DATETIMEOFFSET"


def _to_text(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=_json_default)
    if isinstance(value, (set, frozenset)):  # MySQL SET, as the server writes it
        return ",".join(sorted(map(str, value)))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return str(value)  # exact, as text
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    return _to_text(value)


def _to_timestamp(value: Any, aware: bool) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if aware:
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)
    return value


def _to_decimal(value: Any) -> Any:
    if value is None or isinstance(value, decimal.Decimal):
        return value
    return decimal.Decimal(str(value))


def column_converter(arrow_t: pa.DataType):
    """A per-value converter from a driver value to one ``pa.array`` accepts for ``arrow_t``.

    Returns ``None`` where drivers already hand over acceptable values.
    """
    if pa.types.is_list(arrow_t):
        return _list_converter(column_converter(arrow_t.value_type))
    if pa.types.is_string(arrow_t):
        return _to_text
    if pa.types.is_timestamp(arrow_t):
        aware = arrow_t.tz is not None
        return lambda v: _to_timestamp(v, aware)
    if pa.types.is_decimal(arrow_t):
        return _to_decimal
    if pa.types.is_binary(arrow_t):
        return lambda v: None if v is None else bytes(v)
    if pa.types.is_boolean(arrow_t):
        return lambda v: None if v is None else bool(v)
    if pa.types.is_date(arrow_t):
        return lambda v: dt.date.fromisoformat(v) if isinstance(v, str) else (v.date() if isinstance(v, dt.datetime) else v)
    return None


def _list_converter(element):
    def convert(value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected an array, got {type(value).__name__}")
        if any(isinstance(v, (list, tuple)) for v in value):
            raise ValueError(
                "holds a multi-dimensional array in a column declared one-dimensional "
                "(declare its dimensions, e.g. integer[][], to land it as JSON text)"
            )
        return value if element is None else [element(v) for v in value]

    return convert


@functools.cache  # asked once per column of every block
def _taken_as_is(arrow_t: pa.DataType) -> frozenset:
    """The Python types that :func:`column_converter`'s converter for ``arrow_t`` returns unchanged
    and ``pa.array`` takes as they are (a naive datetime into a zoned timestamp counts as UTC,
    as the converter would make it)."""
    if pa.types.is_string(arrow_t):
        return frozenset({str})
    if pa.types.is_timestamp(arrow_t):
        return frozenset({dt.datetime})
    if pa.types.is_decimal(arrow_t):
        return frozenset({decimal.Decimal})
    if pa.types.is_binary(arrow_t):
        return frozenset({bytes})
    if pa.types.is_boolean(arrow_t):
        return frozenset({bool})
    if pa.types.is_date(arrow_t):
        return frozenset({dt.date})
    return frozenset()


_NONE = type(None)


def rows_to_batch(rows: Sequence, schema: pa.Schema, converters: list) -> pa.RecordBatch:
    """Columnar conversion of a fetched block of rows (the fallback path for drivers without Arrow).

    A column whose values the driver already handed over as ``pa.array`` takes them (every value
    a ``str`` for text, a ``Decimal`` for decimals…) skips its per-value converter: one pass over
    the types instead of a Python call per value."""
    columns: list[Any] = list(zip(*rows)) if rows else [[] for _ in schema]
    arrays = []
    for values, field, conv in zip(columns, schema, converters):
        if conv is not None:
            kinds = set(map(type, values))
            kinds.discard(_NONE)
            if not kinds <= _taken_as_is(field.type):
                try:
                    values = [conv(v) for v in values]
                except (ValueError, TypeError) as exc:
                    raise ValueError(f"column {field.name!r}: {exc}") from None
        arrays.append(pa.array(values, type=field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
