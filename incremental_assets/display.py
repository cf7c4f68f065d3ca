"""How ``sync`` shows the progress of its copies and merges (the CLI's side of ``progress.py``).

- ``live`` (a terminal): a line per table being copied or merged, redrawn a few times a second:
  phase, a bar, rows so far and the estimated total, rows per second, time left;
- ``plain`` (output to a file or a pipe): a line ``progress: <table> <phase>: ...`` every
  ``interval`` seconds per table, and a last one when it ends, for copies that take longer;
- ``off``: nothing; ``--quiet`` also keeps the table lines back, leaving the summary and errors.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, redirect_stdout
from typing import Any, TextIO

from .progress import ProgressUpdate, format_seconds, subscribe

MODES = ("auto", "live", "plain", "off")


def figures(update: ProgressUpdate) -> str:
    """``1,234,567 / ~2,000,000 rows (estimate)  150,000 rows/s  about 5s left``."""
    total = f" / ~{update.total:,}" if update.total else ""
    text = f"{update.rows:,}{total} rows{' (estimate)' if update.total else ''}  {update.rate:,.0f} rows/s"
    left = update.seconds_left
    if left is not None:
        text += f"  about {format_seconds(left)} left"
    return text


class LiveDisplay:
    """A rich progress display: one task per table while it is copied or merged."""

    def __init__(self, file: TextIO | None = None, *, force_terminal: bool | None = None):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        console = Console(file=file, force_terminal=force_terminal)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            TextColumn("{task.fields[phase]:<8}"),
            BarColumn(),
            TextColumn("{task.fields[figures]}"),
            TimeElapsedColumn(),
            console=console,
            refresh_per_second=5,
        )
        self._tasks: dict[str, Any] = {}  # rich's TaskID, by table

    def __enter__(self) -> LiveDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, update: ProgressUpdate) -> None:
        task = self._tasks.get(update.table)
        if update.done:
            if task is not None:
                self.progress.remove_task(self._tasks.pop(update.table))
            return
        total = float(max(update.total, update.rows)) if update.total else None
        if task is None:
            self._tasks[update.table] = self.progress.add_task(
                update.table, total=total, completed=update.rows, phase=update.phase, figures=figures(update))
        else:
            self.progress.update(task, total=total, completed=update.rows, phase=update.phase, figures=figures(update))

    def clear(self) -> None:
        """Remove what is left of a failed run's tables."""
        for task in self._tasks.values():
            self.progress.remove_task(task)
        self._tasks.clear()


class PlainLines:
    """A line per table every ``interval`` seconds while it is copied or merged (the first once
    ``interval`` has passed: a shorter copy prints none), and a last line when it is done. A
    table whose read sends no row for a while (a server sorting a large range before the first
    row) still gets its line on time: a thread repeats its latest figures, with the time elapsed
    brought up to date."""

    def __init__(self, file: TextIO, interval: float):
        self.file, self.interval = file, interval
        self._lock = threading.Lock()
        self._latest: dict[str, tuple[ProgressUpdate, float]] = {}  # the update, when it came
        self._due: dict[str, float] = {}
        self._shown: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="incremental_assets-progress", daemon=True)

    def __enter__(self) -> PlainLines:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def __call__(self, update: ProgressUpdate) -> None:
        now = time.monotonic()
        with self._lock:
            table = update.table
            if update.done:
                self._latest.pop(table, None)
                self._due.pop(table, None)
                if table in self._shown:
                    self._shown.discard(table)
                    self._print(update)
                return
            self._latest[table] = (update, now)
            due = self._due.setdefault(table, now + self.interval)
            if now >= due:
                self._show(table, update)

    def _show(self, table: str, update: ProgressUpdate) -> None:
        self._due[table] = time.monotonic() + self.interval
        self._shown.add(table)
        self._print(update)

    def _print(self, update: ProgressUpdate) -> None:
        print(update.describe(), file=self.file, flush=True)

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.interval / 2)):
            now = time.monotonic()
            with self._lock:
                for table, (update, at) in list(self._latest.items()):
                    if now >= self._due.get(table, now):
                        self._show(table, dataclasses.replace(update, elapsed=update.elapsed + now - at))


def _own_stdout(stack: ExitStack) -> TextIO:
    """Standard output through a descriptor of its own: while a run executes in this process,
    Dagster sends descriptors 1 and 2 to the run's captured logs (and mirrors them to the
    terminal a little later); the display writes to the terminal directly."""
    try:
        fd = os.dup(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture)
        return sys.stdout
    own = os.fdopen(fd, "w", buffering=1, encoding=getattr(sys.stdout, "encoding", None) or "utf-8")
    stack.callback(own.close)
    return own


@contextmanager
def progress_display(mode: str = "auto", *, interval: float, quiet: bool = False,
                     file: TextIO | None = None) -> Iterator[LiveDisplay | None]:
    """Show the progress of the copies and merges run in this process meanwhile, as ``mode``
    says (``auto``: live on a terminal, plain otherwise); ``quiet`` shows nothing and keeps back
    what is printed to standard output meanwhile."""
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r}: expected one of {list(MODES)}")
    with ExitStack() as stack:
        if quiet:
            stack.enter_context(redirect_stdout(io.StringIO()))
            yield None
            return
        out = file or _own_stdout(stack)
        if mode == "auto":
            mode = "live" if out.isatty() else "plain"
        if mode == "live":
            live = stack.enter_context(LiveDisplay(out, force_terminal=True if file is not None else None))
            stack.enter_context(subscribe(live))
            yield live
        elif mode == "plain":
            stack.enter_context(subscribe(stack.enter_context(PlainLines(out, interval))))
            yield None
        else:
            yield None
