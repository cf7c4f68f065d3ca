"""The watermark state and the frontier rule, alone (no database, no Dagster)."""

from __future__ import annotations

import datetime as dt

from incremental_assets.sources.watermarks import IntegerKind, RowversionKind, TimestampKind
from incremental_assets.state import OPEN, WatermarkState, next_frontier

UTC = dt.timezone.utc
T = dt.datetime(2017, 9, 5, 8, 6, tzinfo=UTC)
NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def test_frontier_stops_just_above_the_highest_value_copied_not_at_the_horizon():
    kind = TimestampKind()
    assert next_frontier(kind, None, T, NOW) == T + dt.timedelta(microseconds=1)
    # a column of whole seconds steps by a second (a finer bound is rounded by some engines)
    assert next_frontier(TimestampKind(fractional_digits=0), None, T, NOW) == T + dt.timedelta(seconds=1)
    assert next_frontier(TimestampKind(fractional_digits=3), None, T, NOW) == T + dt.timedelta(milliseconds=1)


def test_frontier_never_passes_the_horizon_nor_moves_back_nor_moves_without_rows():
    kind = TimestampKind()
    assert next_frontier(kind, None, NOW, NOW) == NOW  # a value at the horizon: the horizon caps it
    earlier = T - dt.timedelta(days=1)
    assert next_frontier(kind, T, earlier, NOW) == T  # a backfill of an older window: it stays
    assert next_frontier(kind, T, None, NOW) == T  # nothing copied: it stays
    assert next_frontier(kind, None, None, NOW) is None


def test_integer_and_rowversion_frontiers_step_by_one():
    assert next_frontier(IntegerKind(), 10, 41, 50) == 42
    assert next_frontier(IntegerKind(), 10, 49, 50) == 50
    assert next_frontier(RowversionKind(), None, 0x7D0, 0x900) == 0x7D1


def test_state_round_trips_through_metadata_text():
    kind = TimestampKind()
    state = WatermarkState(kind=kind, frontier=T + dt.timedelta(microseconds=1), previous=None, new=NOW,
                           max_copied=T, highest=T, horizon=NOW, horizon_note="database clock",
                           held_back=False, run_mode="initial")
    meta = state.to_metadata()
    assert meta["previous_watermark"] == OPEN
    assert meta["frontier"] == "2017-09-05T08:06:00.000001+00:00"
    assert meta["max_watermark_copied"] == "2017-09-05T08:06:00+00:00"
    assert WatermarkState.from_metadata(meta, kind) == state


def test_empty_metadata_is_nothing_copied_yet():
    state = WatermarkState.from_metadata(None, IntegerKind())
    assert state.frontier is None and state.highest is None and not state.held_back
    held = WatermarkState(kind=IntegerKind(), horizon_note="held back: transaction(s) 42", held_back=True)
    assert WatermarkState.from_metadata(held.to_metadata(), IntegerKind()).held_back
