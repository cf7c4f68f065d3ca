"""Source databases: reflection, safe horizons and streaming watermark reads (no Dagster here)."""

from .base import Horizon, Source, SourceError, SourceUnavailable, TableInfo, TableRef, redact_url
from .watermarks import IntegerKind, RowversionKind, TimestampKind, WatermarkKind

__all__ = [
    "Horizon",
    "IntegerKind",
    "RowversionKind",
    "Source",
    "SourceError",
    "SourceUnavailable",
    "TableInfo",
    "TableRef",
    "TimestampKind",
    "WatermarkKind",
    "redact_url",
]
