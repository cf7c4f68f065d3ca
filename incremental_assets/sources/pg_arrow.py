"""PostgreSQL's columnar path, the Arrow side: ADBC's batches converted to the generic path's types.

ADBC (``adbc_driver_postgresql``) decodes ``COPY ... (FORMAT binary)`` into Arrow types of its own
(``numeric`` as text with an extension type, ``uuid`` as 16 bytes, ``int2`` as int16...). Every
column is converted here to exactly the Arrow type and values the generic SQLAlchemy path produces
(``info.schema``), chosen by the column's PostgreSQL type: the driver's field metadata where it has
some (newer drivers than the 1.8 the project pins), else the catalog's (the reader passes it in).
A column whose type has no exact conversion here (money, arrays of ``real``, ...) raises
:class:`NoFastPath`, which sends the whole read down the generic path. The one-value arrays that
bind a slice's bounds are built here too, from buffers (``pa.array`` imports pandas).

Apart from ``postgresql.py`` because it is pure Arrow: no connection, no SQL, testable on arrays.
"""

from __future__ import annotations

import array
import datetime as dt
import decimal
import json
import struct
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .types import _to_text


class NoFastPath(Exception):
    """The columnar path cannot reproduce the generic path exactly here (the reason says why)."""


_EPOCH = dt.datetime(1970, 1, 1)
_EPOCH_UTC = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_MICROSECOND = dt.timedelta(microseconds=1)


def _param_array(value: Any, name: str) -> pa.Array:
    """A one-value Arrow array typed so that ADBC binds it as the server type of the value.

    Built from buffers: ``pa.array`` on Python objects imports pandas (about 40 MB) on first use.
    """
    if isinstance(value, bool):
        return pa.Array.from_buffers(pa.bool_(), 1, [None, pa.py_buffer(b"\x01" if value else b"\x00")])
    if isinstance(value, int):
        return pa.Array.from_buffers(pa.int64(), 1, [None, pa.py_buffer(struct.pack("<q", value))])
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            micros, t = (value - _EPOCH) // _MICROSECOND, pa.timestamp("us")
        else:
            micros, t = (value - _EPOCH_UTC) // _MICROSECOND, pa.timestamp("us", tz="UTC")
        return pa.Array.from_buffers(t, 1, [None, pa.py_buffer(struct.pack("<q", micros))])
    if isinstance(value, dt.date):
        days = (value - _EPOCH.date()).days
        return pa.Array.from_buffers(pa.date32(), 1, [None, pa.py_buffer(struct.pack("<i", days))])
    if isinstance(value, str):
        return _string_array([value])
    if isinstance(value, (bytes, bytearray)):
        return _string_array([bytes(value)], pa.binary())
    raise NoFastPath(f"parameter {name} of type {type(value).__name__}")


def _string_array(values: list, type_: pa.DataType = pa.string()) -> pa.Array:
    """A string (or binary) array from Python values, without ``pa.array`` (see :func:`_param_array`)."""
    n = len(values)
    offsets = array.array("i", [0])
    validity = bytearray((n + 7) // 8)
    data = bytearray()
    nulls = 0
    for i, value in enumerate(values):
        if value is None:
            nulls += 1
        else:
            data += value.encode() if isinstance(value, str) else value
            validity[i >> 3] |= 1 << (i & 7)
        offsets.append(len(data))
    if len(data) >= 2**31 or offsets.itemsize != 4:
        return pa.array(values, type=type_)
    buffers = [pa.py_buffer(validity) if nulls else None, pa.py_buffer(offsets), pa.py_buffer(bytes(data))]
    return pa.Array.from_buffers(type_, n, buffers, null_count=nulls)


_INTEGERS = {"int2", "int4", "int8"}
_TEXTS = {"text", "varchar", "bpchar", "name", "enum"}
_SAME = {"bool", "float8", "date", "time", "timestamp", "timestamptz", "bytea"}


def batch_converter(
    source: pa.Schema, target: pa.Schema, text_columns: dict[str, str] | None = None,
    pg_types: dict[str, str] | None = None,
) -> Callable[[pa.RecordBatch], pa.RecordBatch]:
    """Per-column conversions from ADBC's Arrow (``source``) to ``target``; raises NoFastPath.

    ``pg_types`` (column -> PostgreSQL type name) stands in for field metadata the driver lacks.
    """
    if len(source) != len(target):
        raise NoFastPath(f"result has {len(source)} columns, expected {len(target)}")
    converters = [
        column_converter(s, t, text_columns or {}, (pg_types or {}).get(t.name, ""))
        for s, t in zip(source, target)
    ]

    def convert(batch: pa.RecordBatch) -> pa.RecordBatch:
        arrays = [conv(column) for conv, column in zip(converters, batch.columns)]
        return pa.RecordBatch.from_arrays(arrays, schema=target)

    return convert


def column_converter(
    source: pa.Field, target: pa.Field, text_columns: dict[str, str] | None = None, pg_type: str = ""
) -> Callable[[pa.Array], pa.Array]:
    """The conversion of one column, by its PostgreSQL type: the field's metadata, else ``pg_type``."""
    meta = source.metadata or {}
    as_text = (text_columns or {}).get(target.name)
    pg_type = meta.get(b"POSTGRESQL:type", b"").decode() or ("text" if as_text is not None else pg_type)
    st, tt = source.type, target.type
    if as_text is not None:  # selected as CAST(... AS TEXT): see as_text()
        if pg_type == "text" and pa.types.is_string(st):
            if as_text == "text" and pa.types.is_string(tt):
                return _same
            if as_text == "real" and pa.types.is_float64(tt):
                return lambda a: a.cast(pa.float64())  # float(text), as the generic path
            if as_text == "numeric":
                return _numeric_converter(tt)
        raise NoFastPath(f"column {target.name!r}: PostgreSQL {as_text} as {tt}")
    if pg_type.startswith("_") and pa.types.is_list(st) and pa.types.is_list(tt):
        item = column_converter(pa.field(target.name, st.value_type), pa.field(target.name, tt.value_type), None, pg_type[1:])
        return _list_converter(item, tt)
    if pg_type in _INTEGERS and pa.types.is_integer(st) and pa.types.is_integer(tt):
        return _same if st == tt else (lambda a: a.cast(tt, safe=True))
    if pg_type in _SAME and st == tt:
        return _same
    if pg_type in _TEXTS and pa.types.is_string(st) and pa.types.is_string(tt):
        return _same
    if pg_type == "numeric" and _storage_is_string(st):
        return _numeric_converter(tt)
    if pg_type == "uuid" and pa.types.is_string(tt) and _storage_width(st) == 16:
        return _uuid_text
    if pg_type == "uuid" and pa.types.is_string(tt) and _storage_is_binary(st):
        return lambda a: _uuid_text(_storage(a).cast(pa.binary(16)))
    if pg_type in ("json", "jsonb") and pa.types.is_string(tt) and _storage_is_string(st):
        return _json_text
    raise NoFastPath(f"column {target.name!r}: PostgreSQL {pg_type or st} as {tt}")


def _list_converter(item: Callable[[pa.Array], pa.Array], tt: pa.DataType) -> Callable[[pa.Array], pa.Array]:
    """A list column: its elements converted as a column of their own, the lists kept."""

    def convert(a: pa.Array) -> pa.Array:
        offsets = a.offsets  # of a slice: they point into the elements of the whole array
        start = offsets[0].as_py()
        values = item(a.values.slice(start, offsets[-1].as_py() - start))
        offsets = pc.subtract(offsets, pa.scalar(start, pa.int32())) if start else offsets
        return pa.ListArray.from_arrays(offsets, values, type=tt, mask=a.is_null() if a.null_count else None)

    return convert


def _numeric_converter(tt: pa.DataType) -> Callable[[pa.Array], pa.Array]:
    """numeric text -> the generic path's decimal (exact parse) or text (str(Decimal))."""
    if pa.types.is_decimal(tt) and 0 <= tt.scale <= tt.precision:
        return lambda a: _storage(a).cast(tt)
    if pa.types.is_string(tt):
        return _numeric_text
    raise NoFastPath(f"numeric as {tt}")


def _same(a: pa.Array) -> pa.Array:
    return a


def _storage(a: pa.Array) -> pa.Array:
    return a.storage if isinstance(a, pa.ExtensionArray) else a


def _storage_is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t.storage_type if isinstance(t, pa.BaseExtensionType) else t)


def _storage_is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t.storage_type if isinstance(t, pa.BaseExtensionType) else t)


def _storage_width(t: pa.DataType) -> int | None:
    t = t.storage_type if isinstance(t, pa.BaseExtensionType) else t
    return t.byte_width if pa.types.is_fixed_size_binary(t) else None


# unconstrained numeric: the generic path gives str(Decimal(text)), which differs from the
# server's text only below 1e-6 (scientific notation: 1.230E-7, 0E-8) and for NaN / infinities
_DECIMAL_SPECIAL = r"^-?0\.000000|^-?[A-Za-z]"
_SPECIAL_WORDS = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity", "infinity": "Infinity", "-infinity": "-Infinity"}


def _decimal_text(value: str | None) -> str | None:
    if value is None:
        return None
    word = _SPECIAL_WORDS.get(value.lower())
    return word if word is not None else str(decimal.Decimal(value))


def _numeric_text(a: pa.Array) -> pa.Array:
    text = _storage(a)
    special = pc.match_substring_regex(text, _DECIMAL_SPECIAL)
    if not pc.any(special).as_py():
        return text
    fixed = _string_array([_decimal_text(v) for v in text.to_pylist()])
    return pc.if_else(special, fixed, text)


def _json_text(a: pa.Array) -> pa.Array:
    # the generic path deserialises json/jsonb (json.loads) and renders the value with its
    # own text rule: exactly that, per value (no columnar equivalent)
    return _string_array([None if v is None else _to_text(json.loads(v)) for v in _storage(a).to_pylist()])


def _uuid_text(a: pa.Array) -> pa.Array:
    """16-byte UUIDs as lower-case 8-4-4-4-12 text, vectorised."""
    import numpy as np

    storage = _storage(a)
    n = len(storage)
    if n == 0:
        return pa.nulls(0, pa.string())
    data = storage.buffers()[1]
    raw = np.frombuffer(data, dtype=np.uint8, count=(storage.offset + n) * 16, offset=0)[storage.offset * 16:]
    raw = raw.reshape(n, 16)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    hexed = np.empty((n, 32), dtype=np.uint8)
    hexed[:, 0::2] = digits[raw >> 4]
    hexed[:, 1::2] = digits[raw & 0x0F]
    out = np.full((n, 36), ord("-"), dtype=np.uint8)
    out[:, 0:8] = hexed[:, 0:8]
    out[:, 9:13] = hexed[:, 8:12]
    out[:, 14:18] = hexed[:, 12:16]
    out[:, 19:23] = hexed[:, 16:20]
    out[:, 24:36] = hexed[:, 20:32]
    offsets = np.arange(0, 36 * (n + 1), 36, dtype=np.int32)
    text = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(out.tobytes()))
    if storage.null_count:
        text = pc.if_else(storage.is_valid(), text, pa.nulls(1, pa.string())[0])
    return text
