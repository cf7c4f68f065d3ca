"""Watermark kinds: how a watermark value is compared, bound, stored in metadata and shown.

Every slice is half-open, ``[lo, hi)``: ``lo`` is the previous slice's ``hi``, so boundary ties
belong to exactly one slice whatever the values' uniqueness. Integer watermarks store ``hi`` as
``max + 1``; rowversions store ``MIN_ACTIVE_ROWVERSION()`` which is already exclusive.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

UTC = dt.timezone.utc


class WatermarkKind:
    """Base class; subclasses convert between Python values, metadata text and database values."""

    name: str = ""

    @property
    def step(self) -> Any:
        """The smallest step between two values of the column: ``top + step`` is the lowest value
        above ``top`` that a later row can hold (a finer step than the column's is still exact)."""
        return 1

    def to_text(self, value: Any) -> str:
        raise NotImplementedError

    def from_text(self, text: str) -> Any:
        raise NotImplementedError

    def from_db(self, value: Any) -> Any:
        return value

    def file_token(self, value: Any) -> str:
        """A filename-safe, order-preserving rendering of a bound."""
        raise NotImplementedError


@dataclass(frozen=True)
class TimestampKind(WatermarkKind):
    """A timestamp watermark. Values are handled as aware UTC datetimes internally.

    ``timezone_aware`` says whether the column stores a zone (timestamptz, datetimeoffset);
    naive columns are interpreted in ``column_timezone`` (default UTC).
    """

    timezone_aware: bool = False
    column_timezone: str = "UTC"
    name: str = "timestamp"
    #: the fractional second digits the column holds (0 for whole seconds, at most 6)
    fractional_digits: int = 6

    @property
    def step(self) -> dt.timedelta:
        # the column's own step: a bound finer than the column is compared right by the engines,
        # except in MariaDB's MIN/MAX index shortcut, which rounds it to the column first
        return dt.timedelta(microseconds=10 ** (6 - max(0, min(6, self.fractional_digits))))

    @property
    def zone(self) -> dt.tzinfo:
        return UTC if self.column_timezone.upper() == "UTC" else ZoneInfo(self.column_timezone)

    def normalize(self, value: Any) -> dt.datetime:
        """A database value (naive or aware datetime, or SQLite text) as an aware UTC datetime."""
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        elif isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            value = dt.datetime(value.year, value.month, value.day)
        if value.tzinfo is None:
            value = value.replace(tzinfo=self.zone)
        return value.astimezone(UTC)

    def from_db(self, value: Any) -> dt.datetime:
        return self.normalize(value)

    def to_column_value(self, value: dt.datetime) -> dt.datetime:
        """An aware UTC bound as the column would hold it (naive in the column's zone, or aware)."""
        if self.timezone_aware:
            return value.astimezone(UTC)
        return value.astimezone(self.zone).replace(tzinfo=None)

    def to_text(self, value: dt.datetime) -> str:
        return value.astimezone(UTC).isoformat()

    def from_text(self, text: str) -> dt.datetime:
        return self.normalize(text)

    def file_token(self, value: dt.datetime) -> str:
        return value.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")


@dataclass(frozen=True)
class IntegerKind(WatermarkKind):
    name: str = "integer"

    def to_text(self, value: int) -> str:
        return str(int(value))

    def from_text(self, text: str) -> int:
        return int(text)

    def from_db(self, value: Any) -> int:
        return int(value)

    def file_token(self, value: int) -> str:
        # zero-padded so that names sort in watermark order; negative ids keep a sign
        return ("n" if value < 0 else "") + f"{abs(int(value)):020d}"


@dataclass(frozen=True)
class RowversionKind(WatermarkKind):
    """SQL Server ``rowversion``/``timestamp``: 8 bytes, compared as a big-endian unsigned integer."""

    name: str = "rowversion"

    def from_db(self, value: Any) -> int:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return int.from_bytes(bytes(value), "big")
        return int(value)

    def to_column_value(self, value: int) -> bytes:
        return int(value).to_bytes(8, "big")

    def to_text(self, value: int) -> str:
        return "0x" + int(value).to_bytes(8, "big").hex().upper()

    def from_text(self, text: str) -> int:
        text = text.strip()
        return int(text, 16) if text.lower().startswith("0x") else int(text)

    def file_token(self, value: int) -> str:
        return int(value).to_bytes(8, "big").hex()
