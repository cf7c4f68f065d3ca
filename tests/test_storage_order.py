"""Cutting one read in storage order (about the watermark's) into windows: every window gets
exactly its rows, or is marked dirty to be read again on its own. No database here: the reads
are Arrow batches laid out as tables stored about in watermark order are."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from incremental_assets.copying import StorageOrderSplit

DAY = 86_400_000_000  # microseconds
SCHEMA = pa.schema([("id", pa.int64()), ("at", pa.timestamp("us", tz="UTC"))])


def _batches(stamps: list[int], size: int) -> list[pa.RecordBatch]:
    return [
        pa.record_batch([pa.array(range(i, i + len(chunk)), pa.int64()), pa.array(chunk, SCHEMA.field("at").type)], schema=SCHEMA)
        for i in range(0, len(stamps), size)
        for chunk in [stamps[i:i + size]]
    ]


def _cut(stamps: list[int], windows: int, *, size: int = 100, hold: int | None = None, past: int | None = None,
         with_rows: list[bool] | None = None):
    """Run the split over ``stamps`` read in that order, in daily windows; returns what each window
    got (ids), the true rows of each window (ids) and the split."""
    bounds = [(k + 1) * DAY for k in range(windows - 1)]
    truth: dict[int, list[int]] = {k: [] for k in range(windows)}
    for i, at in enumerate(stamps):
        truth[min(at // DAY, windows - 1)].append(i)
    flags = with_rows if with_rows is not None else [bool(truth[k]) for k in range(windows)]
    split = StorageOrderSplit(_batches(stamps, size), "at", bounds, flags)
    if hold is not None:
        split.HOLD_BYTES = hold
    if past is not None:
        split.PAST_BYTES = past
    got: dict[int, list[int]] = {}
    for k in range(windows):
        if flags[k] and k not in split.dirty:
            got[k] = [i for b in split.rows(k) for i in b.column("id").to_pylist()]
    split.drain()
    split.close()
    return got, truth, split


def _check(got, truth, split) -> None:
    for k, ids in got.items():
        if k not in split.dirty:
            assert sorted(ids) == truth[k], f"window {k} is not dirty and lacks rows or has another's"
    missing = [k for k, ids in truth.items() if ids and k not in got and k not in split.dirty]
    assert not missing, f"windows with rows neither cut nor dirty: {missing}"


def _sorted(got):
    return {k: sorted(v) for k, v in got.items()}


def test_rows_in_order_are_cut_with_nothing_dirty():
    stamps = [k * DAY // 50 for k in range(500)]  # 50 rows a day, 10 days, in order
    got, truth, split = _cut(stamps, 10, size=64)
    _check(got, truth, split)
    assert split.dirty == set()
    assert _sorted(got) == truth


def test_empty_windows_between_are_skipped_without_holding_everything():
    # rows on days 0, 1, 5 and 9 only: the days between have no rows and take no turn
    stamps = [d * DAY + i for d in (0, 1, 5, 9) for i in range(300)]
    got, truth, split = _cut(stamps, 10, size=128, past=1)
    _check(got, truth, split)
    assert split.dirty == set() and set(got) == {0, 1, 5, 9}
    assert split.most_held <= 3 * _batches(stamps, 128)[0].nbytes


def test_rows_updated_in_place_come_early_and_are_held_for_their_window():
    """Rows moved to the last window by an update keep their place in the table: they come in
    clusters among the first windows' rows, and wait in memory for their window's turn."""
    stamps = [k * DAY // 100 for k in range(1000)]  # 10 days in order
    for start in (30, 250, 600):  # clusters of rows updated to day 9
        for i in range(start, start + 40):
            stamps[i] = 9 * DAY + i
    got, truth, split = _cut(stamps, 10, size=50)
    _check(got, truth, split)
    assert split.dirty == set()
    assert _sorted(got) == truth


def test_a_row_after_its_windows_turn_makes_that_window_dirty():
    """A row written late with an earlier watermark comes after its window's turn has ended:
    that window alone is read again."""
    stamps = [k * DAY // 100 for k in range(1000)]
    stamps.append(2 * DAY + 5)  # a late row of day 2, stored at the end
    got, truth, split = _cut(stamps, 10, size=50, past=1)
    _check(got, truth, split)
    assert split.dirty == {2}
    assert {k: v for k, v in _sorted(got).items() if k != 2} == {k: v for k, v in truth.items() if k != 2}


def test_rows_of_a_window_said_to_be_empty_make_it_dirty():
    stamps = [k * DAY // 100 for k in range(1000)]
    flags = [True] * 10
    flags[4] = False  # asked before the read: no rows (they came since, or the answer was stale)
    got, truth, split = _cut(stamps, 10, size=50, with_rows=flags)
    _check(got, truth, split)
    assert 4 in split.dirty and 4 not in got


def test_past_the_memory_limit_the_fullest_window_is_dirty_and_nothing_is_lost():
    stamps = [k * DAY // 100 for k in range(1000)]
    for i in range(0, 600, 3):  # a third of the first rows updated to day 9
        stamps[i] = 9 * DAY + i
    got, truth, split = _cut(stamps, 10, size=50, hold=4_000)
    _check(got, truth, split)
    assert 9 in split.dirty  # its held rows went over the limit: read again on its own
    assert split.most_held <= 4_000 + 2 * _batches(stamps, 50)[0].nbytes


def test_a_window_whose_rows_never_come_ends_at_the_memory_limit():
    stamps = [k * DAY // 100 for k in range(1000) if k // 100 != 3]  # day 3 has no rows (any more)
    flags = [True] * 10  # but the question before the read said it had
    got, truth, split = _cut(stamps, 10, size=50, hold=6_000, past=100, with_rows=flags)
    _check(got, truth, split)
    assert got[3] == [] and split.dirty == set()  # the turns went on, the rows held were released
    assert _sorted(got) == truth


@pytest.mark.parametrize("seed", range(40))
def test_any_order_gives_each_window_its_rows_or_marks_it_dirty(seed):
    """Random layouts about in watermark order: local swaps, clusters moved ahead, rows moved
    back, small limits. Whatever happens, no window that is not dirty lacks a row or has another's."""
    rnd = random.Random(seed)
    days = rnd.randint(2, 12)
    n = rnd.randint(50, 1500)
    stamps = sorted(rnd.randrange(days * DAY) for _ in range(n))
    for _ in range(rnd.randint(0, 20)):  # local disorder
        i = rnd.randrange(n)
        j = min(n - 1, i + rnd.randint(1, 30))
        stamps[i], stamps[j] = stamps[j], stamps[i]
    for _ in range(rnd.randint(0, 3)):  # clusters moved ahead (updated in place)
        i = rnd.randrange(n)
        for k in range(i, min(n, i + rnd.randint(1, 80))):
            stamps[k] = rnd.randrange(stamps[k], days * DAY)
    for _ in range(rnd.randint(0, 2)):  # rows moved back (written late)
        stamps[rnd.randrange(n)] = rnd.randrange(days * DAY)
    got, truth, split = _cut(
        stamps, days, size=rnd.choice([1, 7, 64, 500]),
        hold=rnd.choice([None, 2_000, 20_000]), past=rnd.choice([None, 1, 500]),
    )
    _check(got, truth, split)
    for k, ids in got.items():
        assert all(min(stamps[i] // DAY, days - 1) == k for i in ids)


def test_windows_take_their_turns_in_order():
    split = StorageOrderSplit(_batches([0, DAY], 1), "at", [DAY], [True, True])
    list(split.rows(1))
    with pytest.raises(ValueError, match="in order"):
        list(split.rows(0))
