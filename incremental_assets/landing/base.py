"""Landing store contract: where copied slices are written as files.

A landing store holds one file (or a few numbered parts) per copied slice under
``<table>/<partition>/<stem>.<ext>``. Writes are atomic (no reader ever sees a partial
file), deterministic (a retry with the same stem replaces, never duplicates) and
streamed (bounded memory). This module is Dagster-free on purpose.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ..processes import OWNER_PATTERN, current_owner, owner_alive
from .formats import FORMATS, SliceWriter, extension_for, format_for_path, make_writer

__all__ = [
    "StagedSlice",
    "LandingError",
    "LandedFile",
    "LandingStore",
    "open_landing_store",
    "redact",
]

# --------------------------------------------------------------------------- redaction

_SECRET_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # connection-string style: AccountKey=...; SharedAccessSignature=...; Password=...
    (
        re.compile(
            r"(?i)\b(AccountKey|SharedAccessSignature|SharedAccessKey|Password|Pwd|"
            r"client_secret|ClientSecret)\s*=\s*[^;&\s'\"]*"
        ),
        r"\1=***",
    ),
    # SAS query parameters: sig= is the secret; se/sp/... are harmless but noisy
    (re.compile(r"(?i)([?&]sig=)[^&\s'\"]*"), r"\1***"),
    # user:password@host in URLs
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/:@\s]+:)[^@/\s]+@"), r"\1***@"),
    # Authorization headers / SharedKey signatures
    (re.compile(r"(?i)(SharedKey\s+[^:\s]+:)[A-Za-z0-9+/=]+"), r"\1***"),
]


def redact(text: str) -> str:
    """Remove credentials (account keys, SAS signatures, passwords) from ``text``."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


# --------------------------------------------------------------------------- errors / results


class LandingError(Exception):
    """A landing-store operation failed.

    The message names the store (redacted), and the table / path when known; it never
    contains an account key, a SAS token or a password.
    """

    def __init__(
        self,
        message: str,
        *,
        store: str | None = None,
        table: str | None = None,
        path: str | None = None,
    ) -> None:
        self.store = redact(store) if store else None
        self.table = table
        self.path = path
        details = []
        if self.store:
            details.append(f"store: {self.store}")
        if table:
            details.append(f"table: {table}")
        if path:
            details.append(f"path: {path}")
        full = redact(message)
        if details:
            full = f"{full} [{'; '.join(details)}]"
        super().__init__(full)


@dataclass(frozen=True)
class LandedFile:
    """One file written to a landing store."""

    path: str  # store-relative POSIX path "<table>/<partition>/<stem>.<ext>"
    uri: str  # full, redacted URI of the file
    rows: int
    bytes: int


# --------------------------------------------------------------------------- naming helpers

TEMP_SUFFIX = ".tmp"
DATA_EXTENSIONS = tuple(f".{extension_for(f)}" for f in FORMATS)


def validate_segment(value: str, what: str) -> str:
    """A table / partition / stem must be one safe path segment."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if value in (".", "..") or value.startswith("."):
        raise ValueError(f"{what} must not start with '.': {value!r}")
    if "/" in value or "\\" in value:
        raise ValueError(f"{what} must not contain '/' or '\\': {value!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{what} must not contain control characters: {value!r}")
    if value.endswith(TEMP_SUFFIX):
        raise ValueError(f"{what} must not end with {TEMP_SUFFIX!r}: {value!r}")
    return value


def validate_relative_path(path: str) -> str:
    """A store-relative POSIX path (no absolute paths, no '..')."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"path must be a non-empty string, got {path!r}")
    if path.startswith("/") or "\\" in path:
        raise ValueError(f"path must be a store-relative POSIX path: {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"path must not contain empty, '.' or '..' segments: {path!r}")
    return path


def is_data_file_name(name: str) -> bool:
    """A visible landed data file (not hidden, not a temp file, known extension)."""
    return (
        not name.startswith(".")
        and not name.endswith(TEMP_SUFFIX)
        and name.endswith(DATA_EXTENSIONS)
    )


def is_stem_file(name: str, stem: str, ext: str) -> bool:
    """Whether ``name`` is ``<stem>.<ext>`` or ``<stem>.part-NNNNN.<ext>`` (five digits or more).
    String tests, not a regular expression: each window's stem would compile one of its own
    (0.8 ms a window)."""
    suffix = f".{ext}"
    if len(name) < len(stem) + len(suffix) or not name.startswith(stem) or not name.endswith(suffix):
        return False
    middle = name[len(stem):len(name) - len(suffix)]
    digits = middle[len(".part-"):]
    return not middle or (middle.startswith(".part-") and len(digits) >= 5 and digits.isdecimal())


def new_temp_token() -> str:
    """A temp file's token: its writer (:func:`~incremental_assets.processes.current_owner`), so
    that the next attempt can tell the temp files of a dead writer from those of a live one,
    and a random part."""
    return f"{current_owner()}-{uuid.uuid4().hex[:6]}"


#: a temp file of a previous version names no writer: it is taken for dead after this long
UNOWNED_TEMP_SECONDS = 24 * 3600
_TOKEN_OWNER = re.compile(rf"({OWNER_PATTERN})-[0-9a-f]+$")


def temp_owner(token: str) -> str | None:
    """The writer named in a temp file's token, None when it names none."""
    match = _TOKEN_OWNER.match(token)
    return match.group(1) if match else None


# --------------------------------------------------------------------------- the store


@dataclass
class _Part:
    """A part being written / written to a local temp file."""

    temp: Any  # store-specific handle (local temp path)
    writer: SliceWriter
    fileobj: Any
    schema: pa.Schema | None = None
    rows: int = 0
    bytes: int = 0


class StagedSlice:
    """A slice's files, written but not yet visible (see :meth:`LandingStore.stage_slice`)."""

    def __init__(self, store: LandingStore, table: str, partition: str, stem: str, parts: list[_Part], *, durable: bool = True):
        self.store, self.table, self.partition, self.stem = store, table, partition, stem
        self.parts = parts
        self.rows = sum(p.rows for p in parts)
        self.durable = durable
        self._done = False

    def publish(self) -> list[LandedFile]:
        """Make the files durable if they are not yet, then visible under their names (atomically,
        file by file), and remove other files of the same stem; if that fails, the files not yet
        published are removed."""
        if self._done:
            raise RuntimeError(f"{self.table}/{self.partition}/{self.stem}: already published or discarded")
        self._done = True
        if not self.durable:
            try:
                for part in self.parts:
                    self.store._sync_temp(part.temp, self.table, f"{self.table}/{self.partition}")
            except BaseException:
                self._remove()
                raise
            self.durable = True
        return self.store._publish_staged(self)

    def discard(self) -> None:
        """Remove the files; nothing of them was ever visible."""
        if not self._done:
            self._done = True
            self._remove()

    def _remove(self) -> None:
        for part in self.parts:
            self.store._abort_part(part)


class LandingStore(ABC):
    """Where slices land. Subclasses implement the storage primitives."""

    format: str

    def __init__(self, format: str = "parquet") -> None:
        if format not in FORMATS:
            raise ValueError(
                f"unknown landing format {format!r}; expected one of {sorted(FORMATS)}"
            )
        self.format = format
        self._learned: dict[tuple[str, pa.Schema], dict[str, Any]] = {}

    #: tables (with their schemas) whose writer options are remembered, newest kept
    LEARNED_LIMIT = 64

    @property
    def extension(self) -> str:
        return extension_for(self.format)

    # ---- public API -------------------------------------------------------------------

    @abstractmethod
    def describe(self) -> str:
        """Redacted location, for logs and metadata."""

    @abstractmethod
    def check_writable(self) -> None:
        """Raise LandingError when the store does not exist or refuses writes."""

    #: publishing a staged file is quick and local (a rename), so a copy may keep the files of
    #: several slices staged until it knows they are whole (see :meth:`stage_slice`); a store
    #: that uploads keeps them in local scratch space meanwhile
    cheap_publish: bool = False

    def write_slice(
        self,
        table: str,
        partition: str,
        stem: str,
        schema: pa.Schema,
        batches: Iterable[pa.RecordBatch],
        *,
        max_rows_per_file: int | None = None,
    ) -> list[LandedFile]:
        """Stream ``batches`` into ``<table>/<partition>/<stem>.<ext>``.

        When ``max_rows_per_file`` is exceeded the slice is split into
        ``<stem>.part-00000.<ext>``, ``<stem>.part-00001.<ext>``, ... Nothing is visible
        until every batch has been written; then the files are published atomically
        and any other file of the same stem left by an earlier attempt (e.g. a
        different number of parts) is removed, so a retry replaces, never duplicates.
        With 0 rows nothing is written (and earlier files of the stem are removed).
        If ``batches`` raises, temp files are removed and the exception propagates.
        """
        return self.stage_slice(
            table, partition, stem, schema, batches, max_rows_per_file=max_rows_per_file
        ).publish()

    def stage_slice(
        self,
        table: str,
        partition: str,
        stem: str,
        schema: pa.Schema,
        batches: Iterable[pa.RecordBatch],
        *,
        max_rows_per_file: int | None = None,
        durable: bool = True,
    ) -> StagedSlice:
        """:meth:`write_slice` up to its files' publication: they are written and made durable
        where no reader sees them, and :meth:`StagedSlice.publish` (or ``discard``) does the rest.
        With ``durable=False`` they are only written, and made durable by ``publish``: on another
        thread, say, while the next slice is written."""
        validate_segment(table, "table")
        validate_segment(partition, "partition")
        validate_segment(stem, "stem")
        if max_rows_per_file is not None and (
            not isinstance(max_rows_per_file, int) or max_rows_per_file < 1
        ):
            raise ValueError(f"max_rows_per_file must be a positive integer, got {max_rows_per_file!r}")
        if not isinstance(schema, pa.Schema):
            raise TypeError(f"schema must be a pyarrow.Schema, got {type(schema).__name__}")

        folder = f"{table}/{partition}"
        self._prepare_folder(table, folder)
        token = new_temp_token()
        parts: list[_Part] = []
        current: _Part | None = None
        try:
            for batch in _iter_batches(batches):
                batch = _conform(batch, schema, table)
                offset = 0
                while offset < batch.num_rows:
                    if (
                        current is not None
                        and max_rows_per_file is not None
                        and current.rows >= max_rows_per_file
                    ):
                        self._finish_part(current, table, folder, durable)
                        current = None
                    if current is None:
                        current = self._start_part(table, folder, stem, token, len(parts), schema)
                        parts.append(current)
                    take = batch.num_rows - offset
                    if max_rows_per_file is not None:
                        take = min(take, max_rows_per_file - current.rows)
                    chunk = batch.slice(offset, take) if take != batch.num_rows else batch
                    self._write_chunk(current, chunk, table, folder)
                    offset += take
            if current is not None:
                self._finish_part(current, table, folder, durable)
                current = None
        except BaseException:
            for part in parts:
                self._abort_part(part)
            raise
        return StagedSlice(self, table, partition, stem, parts, durable=durable)

    def _publish_staged(self, staged: StagedSlice) -> list[LandedFile]:
        table, folder, stem, parts = staged.table, f"{staged.table}/{staged.partition}", staged.stem, staged.parts
        if len(parts) == 1:
            names = [f"{stem}.{self.extension}"]
        else:
            names = [f"{stem}.part-{i:05d}.{self.extension}" for i in range(len(parts))]
        landed: list[LandedFile] = []
        try:
            for part, name in zip(parts, names):
                path = f"{folder}/{name}"
                self._publish(part.temp, path, table, part.rows)
                part.temp = None
                landed.append(LandedFile(path=path, uri=self.uri_for(path), rows=part.rows, bytes=part.bytes))
        except BaseException:
            for part in parts:
                self._abort_part(part)
            raise

        # Remove files of the same stem written by an earlier attempt (other part count).
        keep = {f.path for f in landed}
        stale = [
            p
            for p in self.list_files(table, staged.partition)
            if p not in keep and is_stem_file(p.rsplit("/", 1)[-1], stem, self.extension)
        ]
        if stale:
            self.delete(stale)
        return landed

    def remove_dead_temps(self, table: str) -> int:
        """Remove the temporary files of writes to ``table`` whose process died (a killed copy):
        those of a live process, here or on another host, are left alone. Returns how many
        were removed."""
        validate_segment(table, "table")
        removed = 0
        now = time.time()
        for temp, token, mtime in self._temps(table):
            owner = temp_owner(token)
            dead = owner_alive(owner) is False if owner else now - mtime > UNOWNED_TEMP_SECONDS
            if dead:
                self._discard_temp(temp)
                removed += 1
        return removed

    def _temps(self, table: str) -> Iterator[tuple[Any, str, float]]:
        """The temporary files that writes to ``table`` may have left: (handle, token, mtime)."""
        return iter(())

    @abstractmethod
    def list_files(self, table: str, partition: str | None = None) -> list[str]:
        """Store-relative data file paths, sorted, excluding temp/hidden files."""

    @abstractmethod
    def file_versions(self, table: str, partition: str | None = None) -> dict[str, str]:
        """The data files of :meth:`list_files`, each with a token that changes whenever the file
        is written again (size, modification time and inode locally, the ETag on Azure): what was
        merged is told from what was not by comparing tokens, not clocks."""

    @abstractmethod
    def delete(self, paths: Iterable[str]) -> None:
        """Delete files; missing files are ignored."""

    def read_arrow(self, path: str, *, schema: pa.Schema | None = None) -> pa.Table:
        """Read one landed file back.

        Parquet files carry their exact Arrow schema. CSV files are parsed with
        ``schema`` when given (exact column types), else with type inference.
        """
        validate_relative_path(path)
        fmt = format_for_path(path)
        if fmt is None:
            raise LandingError(
                "not a landed data file (expected a .parquet or .csv file)",
                store=self.describe(),
                path=path,
            )
        return self._read(path, fmt, schema)

    @abstractmethod
    def uri_for(self, path: str) -> str:
        """Full redacted URI of a store-relative path."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r}, format={self.format!r})"

    # ---- storage primitives -----------------------------------------------------------

    def _prepare_folder(self, table: str, folder: str) -> None:  # noqa: B027 - optional hook
        """Called before writing a slice (e.g. create the local folder)."""

    @abstractmethod
    def _new_temp(self, table: str, folder: str, stem: str, token: str, index: int) -> Any:
        """Create a temp file; return ``(handle, binary file object)``."""

    @abstractmethod
    def _publish(self, temp: Any, path: str, table: str, rows: int) -> None:
        """Atomically make the finished temp file visible at ``path`` (overwrite)."""

    @abstractmethod
    def _discard_temp(self, temp: Any) -> None:
        """Remove a temp file (best effort, never raises)."""

    @abstractmethod
    def _read(self, path: str, fmt: str, schema: pa.Schema | None) -> pa.Table:
        """Read one file."""

    def _sync(self, fileobj: Any) -> None:
        """Flush a finished temp file to stable storage."""
        fileobj.flush()
        os.fsync(fileobj.fileno())

    def _sync_temp(self, temp: Any, table: str, folder: str) -> None:
        """Flush a finished and closed temp file to stable storage (:meth:`_sync` when it was
        finished with ``durable=False``)."""
        try:
            fd = os.open(temp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise LandingError(
                f"writing failed: {exc.strerror or exc}", store=self.describe(), table=table, path=folder
            ) from exc

    # ---- part lifecycle ------------------------------------------------------------------

    def _start_part(
        self, table: str, folder: str, stem: str, token: str, index: int, schema: pa.Schema
    ) -> _Part:
        try:
            temp, fileobj = self._new_temp(table, folder, stem, token, index)
        except OSError as exc:
            raise LandingError(
                f"cannot create a temporary file: {exc.strerror or exc}",
                store=self.describe(),
                table=table,
                path=folder,
            ) from exc
        try:
            writer = make_writer(self.format, **self._learned.get((table, schema), {}))
            writer.open(fileobj, schema)
        except BaseException:
            fileobj.close()
            self._discard_temp(temp)
            raise
        return _Part(temp=temp, writer=writer, fileobj=fileobj, schema=schema)

    def _write_chunk(self, part: _Part, batch: pa.RecordBatch, table: str, folder: str) -> None:
        try:
            part.writer.write_batch(batch)
        except OSError as exc:
            raise LandingError(
                f"writing failed: {exc.strerror or exc}",
                store=self.describe(),
                table=table,
                path=folder,
            ) from exc
        part.rows += batch.num_rows

    def _finish_part(self, part: _Part, table: str, folder: str, durable: bool = True) -> None:
        try:
            rows, nbytes = part.writer.close()
            if learned := part.writer.learned():
                self._remember(table, part.schema, learned)
            if durable:
                self._sync(part.fileobj)
            else:
                part.fileobj.flush()
            part.fileobj.close()
        except OSError as exc:
            raise LandingError(
                f"writing failed: {exc.strerror or exc}",
                store=self.describe(),
                table=table,
                path=folder,
            ) from exc
        part.rows, part.bytes = rows, nbytes

    def _remember(self, table: str, schema: pa.Schema, options: dict[str, Any]) -> None:
        """Writer options chosen from a file's data, used for the table's next files."""
        self._learned.pop((table, schema), None)
        self._learned[(table, schema)] = options
        while len(self._learned) > self.LEARNED_LIMIT:
            self._learned.pop(next(iter(self._learned)))

    def _abort_part(self, part: _Part) -> None:
        try:
            part.writer.abort()
        except Exception:
            pass
        try:
            if not part.fileobj.closed:
                part.fileobj.close()
        except Exception:
            pass
        if part.temp is not None:
            self._discard_temp(part.temp)
            part.temp = None


def _iter_batches(batches: Iterable[pa.RecordBatch] | pa.Table) -> Iterator[pa.RecordBatch]:
    if isinstance(batches, pa.Table):
        yield from batches.to_batches()
        return
    if isinstance(batches, pa.RecordBatch):
        yield batches
        return
    for batch in batches:
        if isinstance(batch, pa.Table):
            yield from batch.to_batches()
        else:
            yield batch


def _conform(batch: pa.RecordBatch, schema: pa.Schema, table: str) -> pa.RecordBatch:
    """Batches must have the slice's schema; safe casts only (never lose values)."""
    if not isinstance(batch, pa.RecordBatch):
        raise TypeError(f"expected pyarrow.RecordBatch, got {type(batch).__name__}")
    if batch.schema.equals(schema, check_metadata=False):
        return batch
    if batch.schema.names != schema.names:
        raise ValueError(
            f"batch columns {batch.schema.names} do not match the slice schema "
            f"{schema.names} (table {table})"
        )
    try:
        return batch.cast(schema, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(
            f"batch of table {table} does not match the slice schema: {exc}"
        ) from exc


# --------------------------------------------------------------------------- factory


def open_landing_store(
    url: str,
    format: str = "parquet",
    *,
    env: Mapping[str, str] | None = None,
    service_client: Any = None,
) -> LandingStore:
    """Open a landing store from a URL.

    ``url`` is a folder path (relative or absolute), a ``file://`` URL, or
    ``azure://<container>[/<prefix>]``. Azure credentials come from ``env``
    (default ``os.environ``) unless ``service_client`` (an
    ``azure.storage.blob.BlobServiceClient``) is given.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown landing format {format!r}; expected one of {sorted(FORMATS)}")
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"landing store URL must be a non-empty string, got {url!r}")
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    if not sep or (len(scheme) == 1 and scheme.isalpha()):
        # a plain folder path (a Windows drive letter is not a scheme)
        from .local import LocalLandingStore

        return LocalLandingStore(url, format, create=True)
    scheme = scheme.lower()
    if scheme == "file":
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URL with a remote host is not supported: {url!r}")
        from .local import LocalLandingStore

        return LocalLandingStore(unquote(parts.path), format, create=True)
    if scheme == "azure":
        container, _, prefix = rest.partition("/")
        if not container:
            raise ValueError(f"azure:// URL must name a container: {redact(url)!r}")
        from .azure import AzureLandingStore, container_client_from_env

        client = container_client_from_env(container, env=env, service_client=service_client)
        return AzureLandingStore(client, prefix, format)
    raise ValueError(
        f"unknown landing store URL scheme {scheme!r} in {redact(url)!r}; "
        "expected a folder path, file://... or azure://<container>[/<prefix>]"
    )
