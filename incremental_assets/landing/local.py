"""Landing store in a local folder (the embedded default)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from .base import (
    TEMP_SUFFIX,
    LandingError,
    LandingStore,
    is_data_file_name,
    validate_relative_path,
    validate_segment,
)
from .formats import read_table

__all__ = ["LocalLandingStore"]


class LocalLandingStore(LandingStore):
    """Files under ``root``: ``<root>/<table>/<partition>/<stem>.<ext>``.

    Atomic writes: each file is written to a hidden temp file in its final folder,
    flushed and fsync'ed, then renamed over the final name with ``os.replace``.
    Temp files are private (0600) while written; a published file gets the mode the process's
    umask gives new files (``0o666 & ~umask``: 0644 under the usual 022).
    The root folder must exist (``create=True`` creates it); table and partition
    folders are created on demand.
    """

    cheap_publish = True  # a rename in the same folder

    def __init__(self, root: str | os.PathLike[str], format: str = "parquet", *, create: bool = False) -> None:
        super().__init__(format)
        self.root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LandingError(f"cannot create landing folder: {exc.strerror or exc}", store=self.describe()) from None

    # ---- public -----------------------------------------------------------------------

    def describe(self) -> str:
        return self.root.as_uri()

    def uri_for(self, path: str) -> str:
        return (self.root / path).as_uri()

    def check_writable(self) -> None:
        if not self.root.exists():
            raise LandingError(
                "landing folder does not exist; create it first", store=self.describe()
            )
        if not self.root.is_dir():
            raise LandingError("landing location is not a folder", store=self.describe())
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-check-", suffix=TEMP_SUFFIX, dir=self.root)
            os.close(fd)
            os.remove(probe)
        except OSError as exc:
            raise LandingError(
                f"landing folder is not writable: {exc.strerror or exc}", store=self.describe()
            ) from exc

    def list_files(self, table: str, partition: str | None = None) -> list[str]:
        return sorted(path for path, _ in self._data_files(table, partition))

    def file_versions(self, table: str, partition: str | None = None) -> dict[str, str]:
        out = {}
        for path, entry in self._data_files(table, partition):
            try:
                info = entry.stat()
            except FileNotFoundError:  # replaced or removed meanwhile
                continue
            # a file is published by a rename: a rewrite is a new inode, even within the clock's step
            out[path] = f"{info.st_size}-{info.st_mtime_ns}-{info.st_ino}"
        return dict(sorted(out.items()))

    def _data_files(self, table: str, partition: str | None) -> list[tuple[str, os.DirEntry]]:
        validate_segment(table, "table")
        if partition is not None:
            validate_segment(partition, "partition")
        base = self.root / table
        folders: list[tuple[str, Path]]
        if partition is not None:
            folders = [(partition, base / partition)]
        elif base.is_dir():
            folders = [
                (entry.name, Path(entry.path))
                for entry in os.scandir(base)
                if entry.is_dir() and not entry.name.startswith(".")
            ]
        else:
            folders = []
        out: list[tuple[str, os.DirEntry]] = []
        for name, folder in folders:
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise LandingError(
                    f"cannot list files: {exc.strerror or exc}",
                    store=self.describe(),
                    table=table,
                    path=f"{table}/{name}",
                ) from exc
            out.extend((f"{table}/{name}/{e.name}", e) for e in entries if e.is_file() and is_data_file_name(e.name))
        return out

    def delete(self, paths: Iterable[str]) -> None:
        if isinstance(paths, str):
            paths = [paths]
        for path in paths:
            validate_relative_path(path)
            try:
                os.remove(self.root / path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise LandingError(
                    f"cannot delete file: {exc.strerror or exc}",
                    store=self.describe(),
                    table=path.split("/", 1)[0],
                    path=path,
                ) from exc

    # ---- primitives -------------------------------------------------------------------

    def _prepare_folder(self, table: str, folder: str) -> None:
        if not self.root.is_dir():
            raise LandingError(
                "landing folder does not exist; create it first",
                store=self.describe(),
                table=table,
                path=folder,
            )
        try:
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LandingError(
                f"cannot create folder: {exc.strerror or exc}",
                store=self.describe(),
                table=table,
                path=folder,
            ) from exc

    def _new_temp(self, table: str, folder: str, stem: str, token: str, index: int) -> Any:
        # hidden, in the final folder (same file system, so os.replace is atomic)
        fd, temp = tempfile.mkstemp(
            prefix=f".{stem}.{token}.{index}.", suffix=TEMP_SUFFIX, dir=self.root / folder
        )
        return temp, os.fdopen(fd, "wb")

    def _publish(self, temp: Any, path: str, table: str, rows: int) -> None:
        final = self.root / path
        try:
            os.chmod(temp, _published_mode())  # complete by now; so the file appears with its final mode
            os.replace(temp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            self._discard_temp(temp)
            raise LandingError(
                f"cannot publish file: {exc.strerror or exc}",
                store=self.describe(),
                table=table,
                path=path,
            ) from exc

    def _temps(self, table: str):
        # ".<stem>.<token>.<index>.<random>.tmp" in the table's partition folders
        try:
            folders = [e.path for e in os.scandir(self.root / table) if e.is_dir() and not e.name.startswith(".")]
        except OSError:
            return
        for folder in folders:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                name = entry.name
                if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
                    continue
                pieces = name[: -len(TEMP_SUFFIX)].rsplit(".", 3)
                if len(pieces) != 4:
                    continue
                try:
                    mtime = entry.stat().st_mtime
                except OSError:
                    continue
                yield entry.path, pieces[1], mtime

    def _discard_temp(self, temp: Any) -> None:
        try:
            os.remove(temp)
        except OSError:
            pass

    def _read(self, path: str, fmt: str, schema: pa.Schema | None) -> pa.Table:
        full = self.root / path
        table = path.split("/", 1)[0]
        if not full.is_file():
            raise LandingError("file not found", store=self.describe(), table=table, path=path)
        try:
            return read_table(str(full), fmt, schema)
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise LandingError(
                f"cannot read file: {exc}", store=self.describe(), table=table, path=path
            ) from exc


def _umask() -> int:
    """The process's umask, read without changing it where the system tells (Linux); else set and
    restored at once (os.umask has no read-only form)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _published_mode() -> int:
    """The mode of a published file: what ``open()`` would give a new file (tempfile.mkstemp makes 0600)."""
    return 0o666 & ~_umask()


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); silently unsupported elsewhere."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
