"""The watermark state of a table: what one copy run records, and where the next one starts.

Dagster's materialization metadata is the system of record; this module (free of Dagster) owns
its keys, their text form and the rule that moves the frontier:

- ``frontier``: every row whose watermark is below it has landed; the next copy starts there.
- The frontier never passes what was proven copied. After a run that copied rows up to ``top``
  (its highest watermark value), the frontier becomes ``min(horizon, top + step)``, where ``step``
  is the column's smallest step (one microsecond, or 1 for integers and rowversions), and never
  moves backwards. A run that copied nothing leaves it where it was, even though it read up to
  the horizon.

Why not the horizon, as long as nothing commits below it? Because that holds only for values the
database stamps when a row is written (its clock, an identity). An application that stamps
``LastModifytime`` itself, as Azure Data Factory's tutorials do, may later write a row whose value
lies between the highest value copied and the horizon; with the frontier at the horizon that row
would be behind it forever. At ``top + step`` it is the next copy's first row. What no watermark
can catch is a value stamped at or below one already copied: the reconciliation check (row
counts and checksums against the source) reveals it, and change tracking copies it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from .sources.watermarks import WatermarkKind

#: metadata keys of a landing materialization (the watermark part)
PREVIOUS = "previous_watermark"
NEW = "new_watermark"
FRONTIER = "frontier"
MAX_COPIED = "max_watermark_copied"
HIGHEST = "highest_watermark"
HORIZON = "horizon"
HORIZON_NOTE = "horizon_note"
HELD_BACK = "held_back"
RUN_MODE = "run_mode"
KIND = "watermark_kind"

#: numeric metadata of a landing materialization, to plot (the watermarks above stay text)
#: how far the copy is behind the source's newest row after the run: seconds (timestamps) ...
LAG_SECONDS = "lag_seconds"
#: ... or watermark units (integers, rowversions; change versions for change tracking)
WATERMARK_LAG = "watermark_lag"
#: rows at or above the frontier when the run ended (not copied yet: held back, or new)
ROWS_AHEAD = "rows_ahead"
#: rows copied per second of copying
ROWS_PER_SECOND = "rows_per_second"
#: the source's newest watermark when the run ended (text, beside the lag)
SOURCE_NEWEST = "source_newest_watermark"
#: a window recorded without a copy: it holds no row (docs/metadata.md, "Empty windows")
EMPTY_WINDOW = "empty_window"

#: the text of an open lower bound
OPEN = "(start)"


def lag(kind: WatermarkKind, newest: Any, highest: Any) -> dict[str, float]:
    """How far ``highest`` (the highest value copied) is behind ``newest`` (the source's newest
    value), as :data:`LAG_SECONDS` for timestamps or :data:`WATERMARK_LAG` otherwise; zero when
    nothing newer exists; nothing when nothing was copied yet."""
    if highest is None:
        return {}
    timestamps = isinstance(highest, dt.datetime)
    if newest is None or newest <= highest:
        return {LAG_SECONDS if timestamps else WATERMARK_LAG: 0.0}
    if timestamps:
        return {LAG_SECONDS: round((newest - highest).total_seconds(), 3)}
    return {WATERMARK_LAG: float(newest - highest)}



def next_frontier(kind: WatermarkKind, frontier: Any, top: Any, horizon: Any) -> Any:
    """Where the next copy starts after a run that copied rows up to ``top`` (None: none) below
    ``horizon``, from ``frontier`` (see the module's docstring)."""
    if top is None:
        return frontier
    reached = top + kind.step
    if horizon is not None and horizon < reached:
        reached = horizon
    return reached if frontier is None or reached > frontier else frontier


@dataclass(frozen=True)
class WatermarkState:
    """What one run of a watermark table recorded (or, read back, the table's latest record).

    ``previous``/``new`` bound the half-open range ``[previous, new)`` the run read (``previous``
    None: no lower bound; ``new`` None: nothing read); ``max_copied`` is the highest value it
    copied, ``highest`` the highest value ever copied."""

    kind: WatermarkKind
    frontier: Any = None
    previous: Any = None
    new: Any = None
    max_copied: Any = None
    highest: Any = None
    horizon: Any = None
    horizon_note: str = ""
    held_back: bool = False
    run_mode: str = "incremental"

    def _text(self, value: Any) -> str:
        return "" if value is None else self.kind.to_text(value)

    def to_metadata(self) -> dict[str, Any]:
        """The metadata entries (text, readable in the UI; values exact)."""
        return {
            PREVIOUS: OPEN if self.previous is None else self.kind.to_text(self.previous),
            NEW: self._text(self.new),
            FRONTIER: self._text(self.frontier),
            MAX_COPIED: self._text(self.max_copied),
            HIGHEST: self._text(self.highest),
            HORIZON: self._text(self.horizon),
            HORIZON_NOTE: self.horizon_note,
            HELD_BACK: self.held_back,
            RUN_MODE: self.run_mode,
            KIND: self.kind.name,
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any] | None, kind: WatermarkKind) -> WatermarkState:
        """A recorded state (the empty state for no metadata: nothing copied yet)."""
        meta = metadata or {}

        def value(key: str) -> Any:
            text = meta.get(key)
            return kind.from_text(text) if text not in (None, "", OPEN) else None

        return cls(
            kind=kind,
            frontier=value(FRONTIER),
            previous=value(PREVIOUS),
            new=value(NEW),
            max_copied=value(MAX_COPIED),
            highest=value(HIGHEST),
            horizon=value(HORIZON),
            horizon_note=str(meta.get(HORIZON_NOTE) or ""),
            held_back=bool(meta.get(HELD_BACK)),
            run_mode=str(meta.get(RUN_MODE) or "incremental"),
        )
