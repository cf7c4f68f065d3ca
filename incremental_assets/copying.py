"""Copying slices from a source into a landing store (no Dagster here).

A slice is the half-open watermark range ``[lo, hi)`` of one table, landed as one file (or a few,
when large) under ``<table>/<partition>/`` with a name made from its bounds, so a retry writes
the same name again instead of a second copy.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .landing import LandedFile, LandingStore, StagedSlice
from .progress import Progress
from .sources import Source, SourceError, TableInfo, TimestampKind
from .sources.base import RunRead
from .sources.watermarks import WatermarkKind

log = logging.getLogger("incremental_assets")

START_TOKEN = "start"


def slice_stem(kind: WatermarkKind, lo: Any, hi: Any) -> str:
    """``<lo>__<hi>``: sorts in watermark order; ``start`` marks an open lower bound."""
    return f"{START_TOKEN if lo is None else kind.file_token(lo)}__{kind.file_token(hi)}"


def _stem_lo(path: str) -> str:
    return path.rsplit("/", 1)[-1].split("__", 1)[0]


@dataclass(frozen=True)
class Window:
    """One partition's watermark window ``[start, end)``; ``open_start`` for the first partition."""

    key: str
    start: Any
    end: Any
    open_start: bool = False


@dataclass(frozen=True)
class PlannedSlice:
    partition: str
    lo: Any  # None: no lower bound (the first partition takes everything before it)
    hi: Any


@dataclass
class SliceCopy:
    partition: str
    lo: Any
    hi: Any
    rows: int = 0
    files: list[LandedFile] = field(default_factory=list)
    max_watermark: Any = None
    seconds: float = 0.0


def plan_window_slices(
    windows: Sequence[Window], frontier: Any, horizon: Any, *, refresh: bool = False
) -> list[PlannedSlice]:
    """Slices for time windows over the watermark's own time.

    Incremental (default): everything below ``frontier`` is landed already, so each window is
    copied from ``max(frontier, start)`` up to ``min(end, horizon)``. Refresh re-copies whole
    windows (up to the horizon). Windows with nothing to copy yield no slice.
    """
    if horizon is None:
        return []  # no safe upper bound yet: copy nothing rather than risk a late commit
    planned = []
    for w in windows:
        lo = None if w.open_start else w.start
        if not refresh and frontier is not None and (lo is None or frontier > lo):
            lo = frontier
        hi = min(w.end, horizon)
        if lo is not None and lo >= hi:
            continue
        planned.append(PlannedSlice(w.key, lo, hi))
    return planned


_EPOCH = dt.datetime(1970, 1, 1)
_EPOCH_UTC = _EPOCH.replace(tzinfo=dt.timezone.utc)
_UNITS = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 0.001}


def _scalar_value(scalar: pa.Scalar) -> Any:
    """A scalar as Python, without pyarrow's pandas-backed path for zoned timestamps (slow to import)."""
    if pa.types.is_timestamp(scalar.type):
        micros = scalar.value * _UNITS[scalar.type.unit]
        value = _EPOCH + dt.timedelta(microseconds=int(micros))
        return value.replace(tzinfo=dt.timezone.utc) if scalar.type.tz else value
    return scalar.as_py()


def _track_max(batches: Iterable[pa.RecordBatch], column: str, out: SliceCopy, kind: WatermarkKind,
               progress: Progress | None = None) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        out.rows += batch.num_rows
        if progress is not None:
            progress.add(batch.num_rows)
        if batch.num_rows:
            top = pc.max(batch.column(column))
            if top.is_valid:
                value = kind.from_db(_scalar_value(top))
                if out.max_watermark is None or value > out.max_watermark:
                    out.max_watermark = value
        yield batch


def remove_orphans(store: LandingStore, table: str, partition: str, kind: WatermarkKind, lo: Any) -> list[str]:
    """Delete files of ``partition`` starting at or after ``lo``: left by a run that landed them
    but died before recording its watermark, they would overlap the slice about to be written."""
    token = None if lo is None else kind.file_token(lo)
    orphans = [
        p for p in store.list_files(table, partition)
        if token is None or (_stem_lo(p) != START_TOKEN and _stem_lo(p) >= token)
    ]
    if orphans:
        log.warning("%s/%s: removing %d file(s) of an unrecorded earlier attempt: %s", table, partition, len(orphans), orphans)
        store.delete(orphans)
    return orphans


def copy_slice(
    source: Source,
    info: TableInfo,
    store: LandingStore,
    *,
    table: str,
    slice_: PlannedSlice,
    batch_size: int = 100_000,
    max_rows_per_file: int | None = None,
    replace: bool = False,
    batches: Iterable[pa.RecordBatch] | None = None,
    progress: Progress | None = None,
) -> SliceCopy:
    """Land one slice. With ``replace`` every other file of the partition is deleted afterwards
    (a refresh); otherwise orphans of unrecorded attempts at or after ``lo`` are deleted first.
    ``batches``: the slice's read, when it was started ahead (see :class:`ReadAhead`); ``progress``
    is told of the rows as they pass."""
    if batches is None:
        batches = source.read_slice(info, slice_.lo, slice_.hi, batch_size=batch_size)
    copy, staged = _stage_slice(info, store, table=table, slice_=slice_, batches=batches,
                                max_rows_per_file=max_rows_per_file, replace=replace, progress=progress)
    _publish_slice(store, copy, staged, table=table, replace=replace)
    return copy


def _stage_slice(info: TableInfo, store: LandingStore, *, table: str, slice_: PlannedSlice,
                 batches: Iterable[pa.RecordBatch], max_rows_per_file: int | None, replace: bool,
                 durable: bool = True, progress: Progress | None = None) -> tuple[SliceCopy, StagedSlice]:
    """:func:`copy_slice` up to the publication of its files (``durable``: see :meth:`LandingStore.stage_slice`)."""
    kind = info.kind
    result = SliceCopy(slice_.partition, slice_.lo, slice_.hi)
    started = time.perf_counter()
    if not replace:
        remove_orphans(store, table, slice_.partition, kind, slice_.lo)
    tracked = _track_max(batches, info.watermark_column, result, kind, progress)
    staged = store.stage_slice(
        table, slice_.partition, slice_stem(kind, slice_.lo, slice_.hi), info.schema, tracked,
        max_rows_per_file=max_rows_per_file, durable=durable,
    )
    result.seconds = time.perf_counter() - started
    return result, staged


def _publish_slice(store: LandingStore, copy: SliceCopy, staged: StagedSlice, *, table: str, replace: bool) -> None:
    started = time.perf_counter()
    copy.files = staged.publish()
    if replace:
        keep = {f.path for f in copy.files}
        stale = [p for p in store.list_files(table, copy.partition) if p not in keep]
        if stale:
            store.delete(stale)
    copy.seconds += time.perf_counter() - started


class Publisher:
    """Publishes the staged slices of a run, in order, on a thread of its own, while the caller
    writes the next ones: a slice's files are made durable and visible there (locally an fsync of
    each file, a rename and an fsync of its folder, most of a millisecond of waiting on the disk;
    on Azure, the upload). At most :attr:`AHEAD` slices wait for it; :meth:`submit` waits for the
    oldest beyond that. ``landed`` is called in the caller's thread, in order, once a slice is
    published. Once a publication fails, the later slices are discarded, and the error is raised by
    the next :meth:`submit` or by :meth:`finish`. :meth:`close` (after a failure of the caller)
    waits for the slice being published and discards the others."""

    #: staged slices waiting for the thread or being published, at most
    AHEAD = 4

    def __init__(self, store: LandingStore, *, table: str, replace: bool, landed: Callable[[SliceCopy], None] | None):
        self._store, self._table, self._replace, self._landed = store, table, replace, landed
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="incremental_assets-publish")
        self._pending: deque[tuple[SliceCopy, StagedSlice, Future]] = deque()
        self._failed = False
        self.copies: list[SliceCopy] = []

    def submit(self, copy: SliceCopy, stage: StagedSlice) -> None:
        try:
            self._collect(len(self._pending) + 1 - self.AHEAD)  # an earlier failure is raised here
        except BaseException:
            stage.discard()
            raise
        self._pending.append((copy, stage, self._pool.submit(self._publish, copy, stage)))

    def finish(self) -> list[SliceCopy]:
        """Wait for every slice to be published; the copies, in order."""
        self._collect(len(self._pending))
        self._pool.shutdown()
        return self.copies

    def close(self) -> None:
        for _, stage, future in self._pending:
            if future.cancel():
                stage.discard()
        self._pool.shutdown()  # waits for the one being published
        try:
            self._collect(len(self._pending))  # what was published, as such
        except Exception:  # noqa: BLE001 - the caller's own error is the one raised
            pass

    def _publish(self, copy: SliceCopy, stage: StagedSlice) -> None:
        if self._failed:
            stage.discard()
            raise RuntimeError(f"{self._table}: window {copy.partition} not published: an earlier one failed")
        seconds = copy.seconds
        try:
            _publish_slice(self._store, copy, stage, table=self._table, replace=self._replace)
        except BaseException:
            self._failed = True
            raise
        # it overlapped the caller's writing of the next windows: the caller's wait for it is what
        # the window's seconds count (see _collect), so that a run's windows add up to its time
        copy.seconds = seconds

    def _collect(self, at_least: int) -> None:
        """Take the published slices off the front: ``at_least`` of them (waiting for them),
        and any other whose publication is done."""
        while self._pending and (at_least > 0 or self._pending[0][2].done()):
            copy, _, future = self._pending.popleft()
            at_least -= 1
            waited = time.perf_counter()
            future.result()  # the publication's error, in the caller's thread
            copy.seconds += time.perf_counter() - waited
            self.copies.append(copy)
            if self._landed is not None:
                self._landed(copy)


class ReadAhead:
    """A slice read started before its turn: a thread takes its first batch (the query runs, the
    first rows arrive) while the previous slice is still being written; iterating it then goes on
    in the caller's thread. Holds at most the read's own buffers until then."""

    #: how long :meth:`close` waits for a read still starting before leaving it to end by itself
    CLOSE_WAIT_SECONDS = 5.0

    def __init__(self, batches: Iterator[pa.RecordBatch]):
        self._batches = batches
        self._first: pa.RecordBatch | None = None
        self._empty = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, name="incremental_assets-read-ahead", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            self._first = next(self._batches)
        except StopIteration:
            self._empty = True
        except BaseException as exc:  # noqa: BLE001 - raised in the consumer's thread
            self._error = exc

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._empty:
            return
        first, self._first = self._first, None
        yield first
        yield from self._batches

    def close(self) -> None:
        """Stop the read (its connection closes) if it was not consumed."""
        self._thread.join(self.CLOSE_WAIT_SECONDS)
        if not self._thread.is_alive():
            close = getattr(self._batches, "close", None)
            if close is not None:
                close()


class OrderedSplit:
    """One read in watermark order, cut into consecutive windows at their upper bounds (integers
    of the watermark's Arrow timestamp type, see :func:`ordered_read_bounds`): each :meth:`below`
    yields the rows under its bound that the windows before it left."""

    def __init__(self, batches: Iterable[pa.RecordBatch], column: str):
        self._batches = iter(batches)
        self._column = column
        self._head: pa.RecordBatch | None = None

    def _peek(self) -> pa.RecordBatch | None:
        while self._head is None or not self._head.num_rows:
            self._head = next(self._batches, None)
            if self._head is None:
                return None
        return self._head

    def _count_below(self, batch: pa.RecordBatch, hi: int | None) -> int:
        if hi is None:
            return batch.num_rows
        return int(np.count_nonzero(_int64_values(batch.column(self._column)) < hi))

    def has_rows_below(self, hi: int | None) -> bool:
        head = self._peek()
        return head is not None and self._count_below(head, hi) > 0

    def below(self, hi: int | None) -> Iterator[pa.RecordBatch]:
        """The next rows with a watermark below ``hi`` (None: all the rest)."""
        while (head := self._peek()) is not None:
            n = self._count_below(head, hi)
            if n == 0:
                return
            if n == head.num_rows:
                self._head = None
                yield head
            else:
                self._head = head.slice(n)
                yield head.slice(0, n)
                return

    def close(self) -> None:
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()


class StorageOrderSplit:
    """One read of a run of windows in the table's storage order, which is about the watermark's
    order (the planner's statistics say so), cut into the windows: :meth:`rows` yields each
    window's rows in turn. Rows out of order are sorted out, so that every window gets exactly
    its rows or is marked :attr:`dirty`, to be read again on its own:

    - a row of a window whose turn is to come is held in memory until then: a row updated in
      place takes a later watermark but keeps its place, so it comes early. At most
      :attr:`HOLD_BYTES` are held; past that, the window holding the most is marked dirty and
      its rows are dropped;
    - a row of a window whose turn has passed (written late with an earlier watermark, near a
      bound) marks that window dirty.

    A window's turn ends when :attr:`PAST_BYTES` of the read have come after its latest row, or
    at the end of the read. Only windows that ``with_rows`` says have rows (asked before the read)
    take a turn; rows of any other window mark it dirty. :meth:`drain` reads the rest once every
    window has had its turn: only then is :attr:`dirty` complete.
    """

    #: bytes of rows held for later windows, at most
    HOLD_BYTES = 48 * 1024 * 1024
    #: bytes of the read after a window's latest row that end its turn
    PAST_BYTES = 8 * 1024 * 1024

    def __init__(self, batches: Iterable[pa.RecordBatch], column: str, bounds: Sequence[int], with_rows: Sequence[bool]):
        if len(with_rows) != len(bounds) + 1:
            raise ValueError(f"{len(bounds)} bounds make {len(bounds) + 1} windows, not {len(with_rows)}")
        self._batches = iter(batches)
        self._column = column
        self._bounds = np.asarray(bounds, dtype=np.int64)  # the windows' upper bounds but the last's
        self._with_rows = [bool(f) for f in with_rows]
        self._current = -1
        self._pos = 0.0  # bytes of the read so far
        self._last: dict[int, float] = {}  # window -> the read's position after its latest row
        self._held: dict[int, list[tuple[pa.RecordBatch, int]]] = {}  # window -> (rows, key of their batch)
        self._owners: dict[int, list] = {}  # key -> [a batch rows are held of, how many]
        self._held_bytes = 0
        self._gone_past = -1  # a window whose turn ends now, whatever came after its rows
        self._ended = False
        #: windows whose rows from this read are not all theirs (see the class)
        self.dirty: set[int] = set()
        #: the most bytes held at once
        self.most_held = 0

    def rows(self, window: int) -> Iterator[pa.RecordBatch]:
        """The rows of ``window``: those held for it, then the read's until its turn ends."""
        if window <= self._current:
            raise ValueError(f"window {window} after window {self._current}: windows take their turns in order")
        self._current = window
        yield from self._release(window)
        while not self._ended and not self._passed(window):
            batch = next(self._batches, None)
            if batch is None:
                self._ended = True
            elif batch.num_rows:
                yield from self._route(batch)

    def drain(self) -> None:
        """Read the rest, after the last window's turn: any row left marks its window dirty."""
        self._current = len(self._with_rows)
        while not self._ended:
            batch = next(self._batches, None)
            if batch is None:
                self._ended = True
            elif batch.num_rows:
                self._route(batch)
        for window in list(self._held):
            self._mark_dirty(window)

    def close(self) -> None:
        self._held.clear()
        self._owners.clear()
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()

    def _passed(self, window: int) -> bool:
        last = self._last.get(window)
        return self._gone_past == window or (last is not None and self._pos - last >= self.PAST_BYTES)

    def _route(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        """Sort out one batch of the read: the current window's rows are returned, the others
        held or dropped."""
        n, size, start = batch.num_rows, batch.nbytes, self._pos
        self._pos += size
        values = _int64_values(batch.column(self._column))
        current, bounds = self._current, self._bounds
        lo = bounds[current - 1] if 0 < current <= len(bounds) else None  # the current window's bounds
        hi = bounds[current] if current < len(bounds) else None
        if current <= len(bounds) and (lo is None or values.min() >= lo) and (hi is None or values.max() < hi):
            self._last[current] = self._pos
            return [batch]  # all the current window's: the usual case
        windows = np.searchsorted(bounds, values, side="right")
        order = None
        if n > 1 and bool((windows[1:] < windows[:-1]).any()):
            order = np.argsort(windows, kind="stable")
            windows = windows[order]
            batch = batch.take(pa.array(order))
        cuts = [0, *(np.flatnonzero(windows[1:] != windows[:-1]) + 1).tolist(), n]
        mine = []
        for begin, end in zip(cuts, cuts[1:]):
            window = int(windows[begin])
            latest = int(order[end - 1]) if order is not None else end - 1  # in the read's order
            self._last[window] = max(self._last.get(window, 0.0), start + size * (latest + 1) / n)
            piece = batch if end - begin == n else batch.slice(begin, end - begin)
            if window == current:
                mine.append(piece)
            elif window < current or not self._with_rows[window] or window in self.dirty:
                self._mark_dirty(window)
            else:
                self._hold(window, piece, batch)
        self._trim()
        return mine

    def _hold(self, window: int, piece: pa.RecordBatch, batch: pa.RecordBatch) -> None:
        # a slice keeps its whole batch in memory: the batch's bytes are counted, once
        key = id(batch)
        owner = self._owners.get(key)
        if owner is None:
            owner = self._owners[key] = [batch, 0]
            self._held_bytes += batch.nbytes
            self.most_held = max(self.most_held, self._held_bytes)
        owner[1] += 1
        self._held.setdefault(window, []).append((piece, key))

    def _release(self, window: int) -> Iterator[pa.RecordBatch]:
        for piece, key in self._held.pop(window, ()):
            owner = self._owners[key]
            owner[1] -= 1
            if owner[1] == 0:
                del self._owners[key]
                self._held_bytes -= owner[0].nbytes
            yield piece

    def _mark_dirty(self, window: int) -> None:
        self.dirty.add(window)
        for _ in self._release(window):
            pass

    def _trim(self) -> None:
        while self._held_bytes > self.HOLD_BYTES and self._held:
            if self._current not in self._last and self._gone_past != self._current:
                # none of the current window's rows has come yet: taken as gone (if any comes
                # later, the window is read again), so the turns go on and release what is held
                self._gone_past = self._current
                return
            fullest = max(self._held, key=lambda w: sum(p.nbytes for p, _ in self._held[w]))
            self._mark_dirty(fullest)


def _int64_values(array: pa.Array) -> np.ndarray:
    """A timestamp array's integers, without a copy (``to_numpy`` imports pandas where it is
    installed). A range read has no NULL watermark."""
    if array.null_count:
        raise ValueError(f"{array.null_count} NULL watermark(s) in a range read")
    return np.frombuffer(array.buffers()[1], dtype=np.int64, count=array.offset + len(array))[array.offset:]


def ordered_read_bounds(source: Source, info: TableInfo, planned: Sequence[PlannedSlice]) -> tuple[list[int], RunRead] | None:
    """The upper bounds of all but the last of ``planned``, as integers of the watermark's Arrow
    type (its unit since the epoch), and how, when one read in watermark order should serve them
    all: the slices follow each other, the engine compares timestamps as Arrow does, and either
    the watermark has no index (a read per window would scan the table once per window; one
    ordered read scans it once and sorts) or the engine says how one read would do better than a
    read per window (:meth:`Source.one_ordered_read`: one query, not a query, a connection turn
    and a reading thread per window; a 2M-row load over 718 daily windows landed in 2.5 s instead
    of 4.9 s)."""
    if len(planned) < 2 or not source.dialect.splits_ordered_reads:
        return None
    if any(b.lo != a.hi for a, b in zip(planned, planned[1:])):
        return None
    kind, arrow = info.kind, info.schema.field(info.watermark_column).type
    if not isinstance(kind, TimestampKind) or not pa.types.is_timestamp(arrow) or (arrow.tz is not None) != kind.timezone_aware:
        return None
    run = source.one_ordered_read(info, planned[0].lo, planned[-1].hi) if info.watermark_indexed else RunRead("no index")
    if run is None:
        return None
    return [_bound_count(kind.to_column_value(p.hi), arrow) for p in planned[:-1]], run


def _bound_count(value: dt.datetime, arrow: pa.TimestampType) -> int:
    """An upper bound as an integer of the column's Arrow type, rounded up to its unit (``v <
    bound`` holds for the same values)."""
    micros = (value - (_EPOCH_UTC if value.tzinfo else _EPOCH)) // dt.timedelta(microseconds=1)
    return micros * 1_000 if arrow.unit == "ns" else int(-(-micros // _UNITS[arrow.unit]))


def _copy_ordered_read(source, info, store, planned, counts, how, *, table, batch_size, max_rows_per_file, replace, landed,
                       progress):
    log.info("%s: %d windows from one read in watermark order (%r: %s)", table, len(planned), info.watermark_column, how)
    split = OrderedSplit(
        source.read_slice(info, planned[0].lo, planned[-1].hi, batch_size=batch_size, ordered=True), info.watermark_column
    )
    publisher = Publisher(store, table=table, replace=replace, landed=landed)
    try:
        for slice_, hi in zip(planned, [*counts, None]):
            has_rows = split.has_rows_below(hi)
            if not has_rows and not replace:
                continue
            publisher.submit(*_stage_slice(
                info, store, table=table, slice_=slice_, batches=split.below(hi) if has_rows else iter(()),
                max_rows_per_file=max_rows_per_file, replace=replace, durable=False, progress=progress,
            ))
        return publisher.finish()
    finally:
        publisher.close()
        split.close()


def _copy_storage_order(source, info, store, planned, counts, *, table, batch_size, max_rows_per_file, replace, landed,
                        progress):
    """The windows from one read in storage order (:class:`StorageOrderSplit`). Their files stay
    staged until the read has ended: only then is it known which windows got all their rows.
    Dirty windows are read again, each on its own; then the files are published in window order."""
    flags = source.windows_with_rows(info, [(p.lo, p.hi) for p in planned])
    if not any(flags) and not replace:
        return []
    log.info("%s: %d windows from one read in storage order, about the watermark's (%r)", table, len(planned), info.watermark_column)
    split = StorageOrderSplit(
        source.read_slice(info, planned[0].lo, planned[-1].hi, batch_size=batch_size, storage_order=True),
        info.watermark_column, counts, flags,
    )
    options = {"table": table, "max_rows_per_file": max_rows_per_file, "replace": replace, "progress": progress}
    staged: dict[int, tuple[SliceCopy, StagedSlice]] = {}
    try:
        try:
            for i, slice_ in enumerate(planned):
                if i in split.dirty or not (flags[i] or replace):
                    continue
                staged[i] = _stage_slice(info, store, slice_=slice_, batches=split.rows(i) if flags[i] else iter(()), **options)
            split.drain()
        finally:
            split.close()
        if split.dirty:
            log.info("%s: %d window(s) read again on their own (rows out of watermark order): %s",
                     table, len(split.dirty), ", ".join(planned[i].partition for i in sorted(split.dirty)))
        for i in sorted(split.dirty):
            if i in staged:
                dropped, stage = staged.pop(i)
                stage.discard()
                if progress is not None:
                    progress.add(-dropped.rows)  # counted again by its own read
            slice_ = planned[i]
            copy, stage = staged[i] = _stage_slice(
                info, store, slice_=slice_, batches=source.read_slice(info, slice_.lo, slice_.hi, batch_size=batch_size), **options
            )
            if not stage.rows and not replace:
                staged.pop(i)
                stage.discard()
        publisher = Publisher(store, table=table, replace=replace, landed=landed)
        try:
            for i in sorted(staged):
                publisher.submit(*staged.pop(i))
            return publisher.finish()
        finally:
            publisher.close()
    finally:
        for _, stage in staged.values():  # after a failure: nothing of these was visible
            stage.discard()


#: rows per window (the planner's estimate for the run) from which a run of windows of a table
#: stored about in watermark order is read in storage order rather than from the index in order.
#: With windows this large the server's scan bounds the copy, and its cheapest scan takes less
#: time (2M rows in 3 windows: 1.13-1.16 s instead of 1.24-1.33 s); with smaller ones the work
#: per window does, and the index's order is no dearer (71 windows: the same time), or cheaper
#: (731 windows of 2,700 rows: 2.2-2.4 s instead of 2.4-2.7 s)
STORAGE_ORDER_WINDOW_ROWS = 100_000


def copy_window_slices(
    source: Source,
    info: TableInfo,
    store: LandingStore,
    planned: Sequence[PlannedSlice],
    *,
    table: str,
    batch_size: int = 100_000,
    max_rows_per_file: int | None = None,
    replace: bool = False,
    landed: Callable[[SliceCopy], None] | None = None,
    progress: Progress | None = None,
) -> list[SliceCopy]:
    """Land ``planned`` slices in order, skipping empty ones (found up front with one statement per
    hundred windows, not one read each), and starting each slice's read while the one before is
    written: the next query is under way when a file closes. Each slice's files are published while
    the next slice is written (:class:`Publisher`); ``landed`` is called once a slice is published.
    With ``replace`` (a refresh) an empty window is not skipped but emptied: its files go.
    Without an index on the watermark, or where the server reads them from the index in order,
    the slices come from one read instead (:func:`ordered_read_bounds`). ``progress`` is told
    of the rows as they pass."""
    ordered = ordered_read_bounds(source, info, planned)
    if ordered is not None:
        counts, run = ordered
        options = {"table": table, "batch_size": batch_size, "max_rows_per_file": max_rows_per_file,
                   "replace": replace, "landed": landed, "progress": progress}
        if run.storage_order and store.cheap_publish and (run.rows or 0) >= STORAGE_ORDER_WINDOW_ROWS * len(planned):
            return _copy_storage_order(source, info, store, planned, counts, **options)
        return _copy_ordered_read(source, info, store, planned, counts, run.how, **options)
    flags = source.windows_with_rows(info, [(p.lo, p.hi) for p in planned]) if len(planned) > 1 else [True] * len(planned)
    todo = [(p, has_rows) for p, has_rows in zip(planned, flags) if has_rows or replace]
    with_rows = [p for p, has_rows in todo if has_rows]

    publisher = Publisher(store, table=table, replace=replace, landed=landed)
    current: ReadAhead | None = None
    ahead: ReadAhead | None = None
    reads = 0  # slices of with_rows whose read has started
    try:
        for slice_, has_rows in todo:
            batches: Iterable[pa.RecordBatch] = iter(())
            if has_rows:
                current, ahead = ahead, None
                reads += 1
                if reads < len(with_rows):
                    nxt = with_rows[reads]
                    ahead = ReadAhead(iter(source.read_slice(info, nxt.lo, nxt.hi, batch_size=batch_size)))
                batches = current if current is not None else source.read_slice(info, slice_.lo, slice_.hi, batch_size=batch_size)
            publisher.submit(*_stage_slice(
                info, store, table=table, slice_=slice_, batches=batches,
                max_rows_per_file=max_rows_per_file, replace=replace, durable=False, progress=progress,
            ))
        return publisher.finish()
    finally:
        publisher.close()
        for read in (current, ahead):  # after a failure: reads started and not finished stop too
            if read is not None:
                read.close()


def check_null_watermarks(source: Source, info: TableInfo, policy: str, table: str) -> int:
    """Apply the NULL-watermark policy: ``fail`` raises, ``warn`` logs; returns the count."""
    count = source.null_watermark_count(info)
    if count and policy == "fail":
        raise SourceError(
            f"table {table!r}: {count} row(s) have a NULL watermark column {info.watermark_column!r} and would never "
            "be copied; fix the data, or set null_watermark: warn in the table's configuration to copy the other rows"
        )
    if count:
        log.warning("table %r: %d row(s) with NULL %r are not copied (null_watermark: warn)", table, count, info.watermark_column)
    return count

