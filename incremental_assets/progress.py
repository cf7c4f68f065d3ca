"""Progress of long copies and merges, reported while they run (no Dagster here).

The copy loop (``copying.py``), the change reader and the merge call :meth:`Progress.add` with the
rows they have just handled; :class:`Progress` hands a :class:`ProgressUpdate` (rows so far, the
estimated total, rows per second, time left, phase) to its listeners at most every
:attr:`Progress.tick` seconds, and at every change of phase and at the end. Each listener decides
how often it shows one: the CLI's live display redraws a few times a second, its plain lines and
a Dagster run's log show one every ``interval`` seconds.

The cost on the copy loop is a counter and a clock reading per Arrow batch (tens of thousands of
rows); ``benchmarks/progress_cost.py`` measures it.

Listeners come from two places: those given to a :class:`Progress` (a Dagster run's log), and
those subscribed in this process (:func:`subscribe`) (the CLI's display, around the in-process runs of
``sync``), so that the engine never needs to know who shows its progress. A worker process of
``sync --jobs`` sends its updates to the parent (:func:`forward`), which hands them to its own
subscribers (:func:`publish`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

#: the phases a table goes through
READING = "reading"  # the query runs, no row has arrived yet
LANDING = "landing"  # rows arrive and are written to the landing store
MERGING = "merging"  # landed files are merged into the replica
CHECKING = "checking"  # the replica's rows are compared with the source's (keys and watermarks)

#: environment variable: seconds between two progress lines of a run's log (and of ``sync``'s
#: plain output, unless ``--progress-interval`` says otherwise)
INTERVAL_ENV = "INCREMENTAL_ASSETS_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 10.0

T = TypeVar("T")


def interval_seconds(default: float = DEFAULT_INTERVAL) -> float:
    """The interval between two progress lines: ``$INCREMENTAL_ASSETS_PROGRESS_SECONDS``, else ``default``."""
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV}={text!r}: expected a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{INTERVAL_ENV}={text!r}: expected a positive number of seconds")
    return value


@dataclass(frozen=True)
class ProgressUpdate:
    """Where one table's copy or merge stands."""

    table: str
    phase: str
    rows: int
    #: the rows expected in all, from the engine's statistics (None: unknown); an estimate
    total: int | None
    elapsed: float
    done: bool = False

    @property
    def rate(self) -> float:
        """Rows per second so far."""
        return self.rows / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def seconds_left(self) -> float | None:
        """Time left at the rate so far (None: no estimate, no rate yet, or past the estimate)."""
        if self.done:
            return 0.0
        if not self.total or self.rows <= 0 or self.rows >= self.total:
            return None
        return (self.total - self.rows) / self.rate

    @property
    def fraction(self) -> float | None:
        """The share done, per the estimate (at most 1; None: unknown)."""
        if self.done:
            return 1.0
        if not self.total:
            return None
        return min(1.0, self.rows / self.total)

    def describe(self) -> str:
        """One plain line, easy to grep: ``progress: <table> <phase> <rows> of ~<total> rows (estimate,
        <pct>%), <rate> rows/s, <time> left, <elapsed> elapsed``."""
        total = f" of ~{self.total:,}" if self.total else ""
        pct = f" (estimate, {100 * self.fraction:.0f}%)" if self.total and self.fraction is not None else ""
        left = self.seconds_left
        parts = [f"progress: {self.table} {self.phase}{' done' if self.done else ''}: {self.rows:,}{total} rows{pct}",
                 f"{self.rate:,.0f} rows/s"]
        if left is not None and not self.done:
            parts.append(f"about {format_seconds(left)} left")
        parts.append(f"{format_seconds(self.elapsed)} elapsed")
        return ", ".join(parts)


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


ProgressListener = Callable[[ProgressUpdate], None]

_subscribers: list[ProgressListener] = []
_lock = threading.Lock()


@contextmanager
def subscribe(listener: ProgressListener) -> Iterator[None]:
    """Give ``listener`` every update of every :class:`Progress` made in this process meanwhile."""
    with _lock:
        _subscribers.append(listener)
    try:
        yield
    finally:
        with _lock:
            _subscribers.remove(listener)


def forward(listener: ProgressListener) -> None:
    """Give ``listener`` every update of every :class:`Progress` made in this process from now on
    (a worker process sending its updates to the one that shows them)."""
    with _lock:
        _subscribers.append(listener)


def publish(update: ProgressUpdate) -> None:
    """Hand ``update``, made elsewhere (in a worker process), to this process's subscribers."""
    with _lock:
        listeners = list(_subscribers)
    for listener in listeners:
        listener(update)


class Progress:
    """One table's progress through its phases. :meth:`add` is the hot path: a counter, and a
    clock reading to decide whether :attr:`tick` has passed since the last update."""

    #: seconds between two updates handed to the listeners, at most (less when a listener's
    #: ``interval`` is shorter: half of it)
    tick = 0.1

    def __init__(self, table: str, listeners: Sequence[ProgressListener] = (), *, phase: str = READING,
                 total: int | None = None):
        self.table = table
        with _lock:
            self._listeners = [*listeners, *_subscribers]
        # an update at least twice per interval of the listener that shows them most often
        self._tick = min([self.tick, *(getattr(lis, "interval", self.tick) / 2 for lis in self._listeners)])
        self.phase = phase
        self.total = total
        self.rows = 0
        self.started = time.monotonic()
        self._next = self.started + self._tick
        self._finished = False
        if self._listeners:
            self._emit()

    def set_total(self, total: int | None) -> None:
        """The rows expected in all (an estimate; None: unknown)."""
        self.total = None if total is None else max(0, int(total))

    def start_phase(self, phase: str, total: int | None = None) -> None:
        """A new phase, counting its rows from zero (``total``: its estimate)."""
        self.phase, self.total, self.rows = phase, total, 0
        self.started = time.monotonic()
        self._emit()

    def add(self, rows: int) -> None:
        """``rows`` more rows handled."""
        self.rows += rows
        if self.phase == READING and rows:
            self.phase = LANDING
        now = time.monotonic()
        if now >= self._next:
            self._emit(now)

    def count(self, batches: Iterable[T]) -> Iterator[T]:
        """``batches`` (anything with ``num_rows``), counted as they pass."""
        for batch in batches:
            self.add(batch.num_rows)  # type: ignore[attr-defined]
            yield batch

    def finish(self) -> None:
        """The last update of this table's phase (its listeners see ``done``)."""
        if not self._finished:
            self._finished = True
            self._emit(done=True)

    def snapshot(self, now: float | None = None, *, done: bool = False) -> ProgressUpdate:
        now = time.monotonic() if now is None else now
        return ProgressUpdate(self.table, self.phase, self.rows, self.total, now - self.started, done)

    def _emit(self, now: float | None = None, *, done: bool = False) -> None:
        now = time.monotonic() if now is None else now
        self._next = now + self._tick
        if not self._listeners:
            return
        update = self.snapshot(now, done=done)
        for listener in self._listeners:
            listener(update)


class Throttled:
    """A listener that passes an update on to ``show`` once ``interval`` seconds have passed
    since the table's first update or the last one shown, and the table's last update if an
    earlier one was shown: a copy shorter than ``interval`` shows nothing."""

    def __init__(self, show: ProgressListener, interval: float):
        self.show, self.interval = show, interval
        self._due: dict[tuple[str, str], float] = {}
        self._shown: set[tuple[str, str]] = set()

    def __call__(self, update: ProgressUpdate) -> None:
        key = (update.table, update.phase if update.phase != READING else LANDING)
        now = time.monotonic()
        due = self._due.setdefault(key, now + self.interval)
        if update.done:
            self._due.pop(key, None)
            if key in self._shown:
                self._shown.discard(key)
                self.show(update)
            return
        if now >= due:
            self._due[key] = now + self.interval
            self._shown.add(key)
            self.show(update)
