"""Reading what landed: the rows of some windows of a landed table, as Arrow.

    rows = read_windows(store, "orders", ["2024-01-01", "2024-01-02"])
    rows.to_table()          # one pyarrow.Table
    rows.to_reader()         # a pyarrow.RecordBatchReader: file by file, batch by batch
    rows.to_dataset()        # a pyarrow.dataset.Dataset over the files (lazy, filterable)
    latest_state(rows, ["id"])  # change-tracked tables: each key's latest row, deletes applied

A window's rows are the rows of its data files, ``<table>/<window>/<stem>.<ext>`` (a slice per
file, or numbered parts of one): windows in the order given, a window's files in the order of
their names (slice stems sort in watermark order; an open lower bound, ``start__...``, first).
The files are listed once, with their version tokens (:meth:`LandingStore.file_versions`); on
Azure every read is conditional on the listed version, so a file rewritten meanwhile (a window
refreshed while it is read) fails the read with a clear error instead of mixing two versions.

Parquet files carry their exact Arrow types (decimals, time-zone-aware timestamps, lists); the
windows' schemas are unified (a column added at the source is null in earlier files). CSV
files are parsed with ``schema`` when given, else with Arrow's type inference.

Dagster-free: the Dagster layer (``defs/io.py``) turns a run's partition keys into windows.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .base import LandingError, LandingStore
from .formats import format_for_path

__all__ = [
    "CHANGE_OPERATION",
    "CHANGE_VERSION",
    "DEFAULT_BATCH_SIZE",
    "FULL_SNAPSHOT_SUFFIX",
    "LandedRows",
    "latest_state",
    "read_windows",
]

#: rows per batch of :meth:`LandedRows.to_reader` unless told
DEFAULT_BATCH_SIZE = 65_536
#: the change log's columns (the names of ``incremental_assets.tracking``, kept here so the
#: reader does not import the tracking engine)
CHANGE_VERSION = "SYS_CHANGE_VERSION"
CHANGE_OPERATION = "SYS_CHANGE_OPERATION"
#: a change-tracked table's full copy (first run, or a re-initialisation): ``<stem>__full.<ext>``
FULL_SNAPSHOT_SUFFIX = "__full"
#: past this many windows, the table's files are listed in one call rather than window by window
_LIST_WHOLE_TABLE = 8


def read_windows(
    store: LandingStore,
    table: str,
    windows: Iterable[str],
    *,
    schema: pa.Schema | None = None,
) -> LandedRows:
    """The landed rows of ``table`` in ``windows`` (partition keys, e.g. ``2024-01-01``).

    Lists the files now; reads them when the result is read. A window with no file has no
    rows. ``schema``: the columns' types where the files do not carry them (CSV), and the
    schema of a result without any file; Parquet files keep their own."""
    keys = list(dict.fromkeys(windows))
    if len(keys) > _LIST_WHOLE_TABLE:
        everything = store.file_versions(table)
        by_window: dict[str, dict[str, str]] = {}
        for path, version in everything.items():
            by_window.setdefault(path.split("/")[1], {})[path] = version
        listed = [by_window.get(k, {}) for k in keys]
    else:
        listed = [store.file_versions(table, k) for k in keys]
    files = []
    for key, versions in zip(keys, listed):
        for path in sorted(versions, key=_file_order):
            files.append(LandedFileVersion(path=path, window=key, version=versions[path]))
    rows = LandedRows(store, table, keys, files, schema)
    if not files and schema is None:
        # no rows: the columns of the table's latest file elsewhere, so an empty result has them
        latest = max(store.file_versions(table).items(), key=lambda item: (item[0].split("/")[1], _file_order(item[0])), default=None)
        if latest is not None:
            path, version = latest
            rows.given_schema = rows._file_schema(LandedFileVersion(path, path.split("/")[1], version))
    return rows


def _file_order(path: str) -> tuple[int, str]:
    name = path.rsplit("/", 1)[-1]
    return (0 if name.startswith("start__") else 1, name)


@dataclass(frozen=True)
class LandedFileVersion:
    """One data file as listed: its store-relative path, its window and its version token."""

    path: str
    window: str
    version: str

    @property
    def format(self) -> str:
        fmt = format_for_path(self.path)
        if fmt is None:  # pragma: no cover - listings hold data files only
            raise ValueError(f"not a landed data file: {self.path!r}")
        return fmt

    @property
    def full_snapshot(self) -> bool:
        """A change-tracked table's full copy: every row of the table at one version."""
        return self.path.rsplit("/", 1)[-1].split(".", 1)[0].endswith(FULL_SNAPSHOT_SUFFIX)


@dataclass
class LandedRows:
    """The rows of some windows of a landed table (see :func:`read_windows`)."""

    store: LandingStore
    table: str
    windows: list[str]
    files: list[LandedFileVersion]
    given_schema: pa.Schema | None = None
    _schemas: dict[str, pa.Schema] = field(default_factory=dict, repr=False)

    # ---- what it holds ------------------------------------------------------------------

    @property
    def schema(self) -> pa.Schema:
        """The windows' unified schema: each file's columns, in the order they first appear;
        a column's type widened where files differ (safe casts only)."""
        schemas = [self._file_schema(f) for f in self.files]
        if not schemas:
            return self.given_schema if self.given_schema is not None else pa.schema([])
        if len(schemas) == 1 or all(s.equals(schemas[0]) for s in schemas[1:]):
            return schemas[0]
        try:
            return pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise LandingError(
                f"the files of windows {self.windows[0]} .. {self.windows[-1]} have columns of "
                f"incompatible types: {exc}", store=self.store.describe(), table=self.table,
            ) from None

    @property
    def is_change_log(self) -> bool:
        names = set(self.schema.names)
        return CHANGE_VERSION in names and CHANGE_OPERATION in names

    @property
    def snapshot_version(self) -> int | None:
        """The version of the latest full copy among the files (change-tracked tables), None
        when the windows hold none: the table as it was then, whole."""
        snapshots = [f for f in self.files if f.full_snapshot]
        if not snapshots:
            return None
        last = snapshots[-1]
        if last.format == "parquet":
            with self._open(last) as handle:
                versions = pq.ParquetFile(handle).read(columns=[CHANGE_VERSION]).column(CHANGE_VERSION)
        else:
            versions = self._read_file(last).column(CHANGE_VERSION)
        top = pc.max(versions)
        return top.as_py() if top.is_valid else None

    # ---- reading ------------------------------------------------------------------------

    def to_table(self) -> pa.Table:
        """Every row, in one table."""
        tables = []
        for f in self.files:  # each file read once; its schema comes with it
            data = self._read_file(f)
            self._schemas.setdefault(f.path, data.schema)
            tables.append(data)
        schema = self.schema
        batches = [_conform(b, schema) for data in tables for b in data.to_batches()]
        return pa.Table.from_batches(batches, schema=schema)

    def to_batches(self, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[pa.RecordBatch]:
        """Batches of at most ``batch_size`` rows, file by file: memory holds one batch (and a
        Parquet row group), not the windows."""
        return self._batches(self.schema, batch_size)

    def to_reader(self, batch_size: int = DEFAULT_BATCH_SIZE) -> pa.RecordBatchReader:
        """A stream of the rows (see :meth:`to_batches`), for windows larger than memory."""
        schema = self.schema
        return pa.RecordBatchReader.from_batches(schema, self._batches(schema, batch_size))

    def to_dataset(self) -> Any:
        """A ``pyarrow.dataset.Dataset`` over the files: nothing is read until it is scanned
        (``dataset.to_batches(columns=..., filter=...)``, DuckDB, Polars' ``scan_pyarrow_dataset``).
        Local files are read where they are; blobs with ranged reads of the listed versions."""
        import pyarrow.dataset as ds

        schema = self.schema
        formats = {f.format for f in self.files} or {"parquet"}
        if formats != {"parquet"}:
            # CSV: its types come from the schema; each file is read whole
            return ds.dataset(self.to_table())
        filesystem, paths = self._filesystem()
        return ds.dataset(paths, schema=schema, format="parquet", filesystem=filesystem)

    def to_pandas(self, dtype_backend: str = "numpy_nullable") -> Any:
        """A ``pandas.DataFrame`` (see :func:`to_pandas`)."""
        return to_pandas(self.to_table(), dtype_backend)

    def to_polars(self) -> Any:
        """A ``polars.DataFrame`` (exact types: decimals, zoned datetimes, lists)."""
        return to_polars(self.to_table())

    def latest_state(self, key: Sequence[str]) -> pa.Table:
        """Change-tracked tables: each key's latest row in these windows, deletes applied (see
        :func:`latest_state`); a full copy among the files is taken as the whole table then."""
        return latest_state(self.to_table(), key, snapshot_version=self.snapshot_version)

    # ---- files ------------------------------------------------------------------------

    def _file_schema(self, f: LandedFileVersion) -> pa.Schema:
        schema = self._schemas.get(f.path)
        if schema is None:
            if f.format == "parquet":
                with self._open(f) as handle:
                    schema = pq.ParquetFile(handle).schema_arrow
            else:
                schema = self._read_file(f).schema
            self._schemas[f.path] = schema
        return schema

    def _read_file(self, f: LandedFileVersion) -> pa.Table:
        if f.format == "parquet":
            with self._open(f) as handle:
                return pq.ParquetFile(handle, pre_buffer=True).read()
        return self.store.read_arrow(f.path, schema=self.given_schema)

    def _batches(self, schema: pa.Schema, batch_size: int) -> Iterator[pa.RecordBatch]:
        for f in self.files:
            if f.format == "parquet":
                with self._open(f) as handle:
                    parquet = pq.ParquetFile(handle, pre_buffer=True)
                    # a row group at a time: pre-buffering (coalesced ranged reads) covers the row
                    # groups of one call, and one is what memory should hold
                    for group in range(parquet.num_row_groups):
                        for batch in parquet.iter_batches(batch_size=batch_size, row_groups=[group]):
                            yield _conform(batch, schema)
            else:
                data = self._read_file(f)
                for batch in data.to_batches(max_chunksize=batch_size):
                    yield _conform(batch, schema)

    def _open(self, f: LandedFileVersion) -> Any:
        """A random-access file of one listed file."""
        from .local import LocalLandingStore

        if isinstance(self.store, LocalLandingStore):
            try:
                return pa.OSFile(str(self.store.root / f.path), "rb")
            except (FileNotFoundError, pa.ArrowException, OSError) as exc:
                raise LandingError(
                    f"cannot read file (removed or replaced since it was listed; read again): {exc}",
                    store=self.store.describe(), table=self.table, path=f.path,
                ) from None
        from .azure import AzureLandingStore

        if isinstance(self.store, AzureLandingStore):
            return pa.PythonFile(_BlobFile(self.store, f.path, f.version), mode="r")
        raise TypeError(f"no ranged reads for a {type(self.store).__name__}")

    def _filesystem(self) -> tuple[pafs.FileSystem, list[str]]:
        from .local import LocalLandingStore

        if isinstance(self.store, LocalLandingStore):
            return pafs.LocalFileSystem(), [str(self.store.root / f.path) for f in self.files]
        versions = {f.path: f.version for f in self.files}
        return pafs.PyFileSystem(_ListedFiles(self, versions)), [f.path for f in self.files]


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """A file's batch in the windows' unified schema: columns in its order, a column the file
    lacks as nulls, a narrower type widened."""
    if batch.schema.equals(schema):
        return batch
    columns = []
    for target in schema:
        index = batch.schema.get_field_index(target.name)
        if index < 0:
            columns.append(pa.nulls(batch.num_rows, target.type))
            continue
        column = batch.column(index)
        columns.append(column if column.type.equals(target.type) else column.cast(target.type, safe=True))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


# --------------------------------------------------------------------------- Azure: ranged reads


class _BlobFile(io.RawIOBase):
    """A blob as a seekable, read-only file: each read downloads a range of the listed version
    (``If-Match`` its ETag), so a Parquet reader fetches the footer and the column chunks it
    needs, never the whole blob at once."""

    def __init__(self, store: Any, path: str, etag: str, size: int | None = None):
        from azure.core import MatchConditions
        from azure.core.exceptions import AzureError, ResourceModifiedError, ResourceNotFoundError

        self._store, self._path, self._etag = store, path, etag
        self._errors = (AzureError,)
        self._changed = (ResourceModifiedError, ResourceNotFoundError)
        self._match = MatchConditions.IfNotModified
        self._client = store.container_client.get_blob_client(store._blob_name(path))
        self._position = 0
        if size is None:
            props = self._call(lambda: self._client.get_blob_properties(etag=self._quoted, match_condition=self._match))
            size = props.size
        self._size = int(size)

    @property
    def _quoted(self) -> str:
        return f'"{self._etag}"'

    def _call(self, action):
        try:
            return action()
        except self._changed:
            raise LandingError(
                "file removed or replaced since it was listed (its window was landed again); read again",
                store=self._store.describe(), table=self._path.split("/", 1)[0], path=self._path,
            ) from None
        except self._errors as exc:
            raise self._store._translate(exc, "reading file", self._path.split("/", 1)[0], self._path) from None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def size(self) -> int:
        return self._size

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        length = min(len(view), self._size - self._position)
        if length <= 0:
            return 0
        data = self._call(lambda: self._client.download_blob(
            offset=self._position, length=length, etag=self._quoted, match_condition=self._match,
        ).readall())
        view[: len(data)] = data
        self._position += len(data)
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self._size - self._position
        buffer = bytearray(max(0, min(size, self._size - self._position)))
        n = self.readinto(buffer)
        return bytes(buffer[:n])


class _ListedFiles(pafs.FileSystemHandler):
    """A read-only Arrow file system of the listed files of one :class:`LandedRows` (Azure), for
    ``pyarrow.dataset``: paths are store-relative, each read is of the listed version."""

    def __init__(self, rows: LandedRows, versions: dict[str, str]):
        self._rows, self._versions = rows, versions
        self._sizes: dict[str, int] = {}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ListedFiles) and other._versions == self._versions

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "incremental-assets-landing"

    def normalize_path(self, path: str) -> str:
        return path

    def _file(self, path: str) -> _BlobFile:
        if path not in self._versions:
            raise FileNotFoundError(path)
        handle = _BlobFile(self._rows.store, path, self._versions[path], self._sizes.get(path))
        self._sizes[path] = handle.size()
        return handle

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        infos = []
        for path in paths:
            if path in self._versions:
                infos.append(pafs.FileInfo(path, pafs.FileType.File, size=self._file(path).size()))
            else:
                infos.append(pafs.FileInfo(path, pafs.FileType.NotFound))
        return infos

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        base = selector.base_dir.rstrip("/") + "/"
        return self.get_file_info([p for p in self._versions if p.startswith(base)])

    def open_input_file(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(self._file(path), mode="r")

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.open_input_file(path)

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise OSError("the landed files are read-only here")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _read_only
    delete_file = move = copy_file = open_output_stream = open_append_stream = _read_only


# --------------------------------------------------------------------------- change logs


def latest_state(
    changes: pa.Table,
    key: Sequence[str],
    *,
    snapshot_version: int | None = None,
    version_column: str = CHANGE_VERSION,
    operation_column: str = CHANGE_OPERATION,
) -> pa.Table:
    """Each key's latest row of a change log (``SYS_CHANGE_VERSION``, ``SYS_CHANGE_OPERATION``
    I/U/D), without the keys whose latest change is a delete: the table's rows as they were at
    the highest version of ``changes``, for the keys that ``changes`` holds. The change columns
    are kept (a row's version says when it was last written).

    ``snapshot_version``: the version of a full copy among the changes (see
    :attr:`LandedRows.snapshot_version`): rows older than it are dropped, so a key deleted
    before the full copy, whose delete the copy does not hold, is gone too. Over every window
    from the first, that is the whole table as the latest landed version saw it."""
    key = list(key)
    if not key:
        raise ValueError("latest_state needs the key column(s) of the table (its primary key)")
    missing = [c for c in [*key, version_column, operation_column] if c not in changes.column_names]
    if missing:
        raise ValueError(
            f"not a change log with key {key}: no column(s) {missing} (columns: {changes.column_names})"
        )
    if snapshot_version is not None:
        changes = changes.filter(pc.greater_equal(changes.column(version_column), snapshot_version))
    if changes.num_rows == 0:
        return changes
    # each key's last row in version order (of equal versions, the last landed): the key columns,
    # the version and the row number only, so any column type (lists, say) comes along by take()
    row = "__incremental_assets_row"
    slim = pa.table([*(changes.column(k) for k in key), changes.column(version_column),
                     pa.array(range(changes.num_rows), pa.int64())], names=[*key, version_column, row])
    slim = slim.take(pc.sort_indices(slim, sort_keys=[(version_column, "ascending"), (row, "ascending")]))
    last = slim.group_by(key, use_threads=False).aggregate([(row, "last")]).column(f"{row}_last")
    picked = changes.take(pc.take(last, pc.sort_indices(last)))  # in landed order
    deleted = pc.fill_null(pc.equal(picked.column(operation_column), "D"), False)
    return picked.filter(pc.invert(deleted))


# --------------------------------------------------------------------------- frames


def to_pandas(table: pa.Table, dtype_backend: str = "numpy_nullable") -> Any:
    """A pandas DataFrame of ``table``. ``numpy_nullable`` (default): NumPy dtypes, with pandas'
    nullable integers and booleans so a NULL never turns an integer column into floats;
    decimals as ``decimal.Decimal``, zoned timestamps as zoned ``datetime64``, lists as arrays.
    ``pyarrow``: every column an ``ArrowDtype`` (the exact Arrow type)."""
    pd = require("pandas", "pandas")
    if dtype_backend == "pyarrow":
        return table.to_pandas(types_mapper=pd.ArrowDtype)
    if dtype_backend != "numpy_nullable":
        raise ValueError(f"dtype_backend must be 'numpy_nullable' or 'pyarrow', got {dtype_backend!r}")
    nullable = {
        pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
        pa.int64(): pd.Int64Dtype(), pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
        pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype(), pa.bool_(): pd.BooleanDtype(),
    }
    return table.to_pandas(types_mapper=nullable.get)


def to_polars(table: pa.Table) -> Any:
    pl = require("polars", "polars")
    return pl.from_arrow(table, rechunk=False)


def require(module: str, extra: str) -> Any:
    """Import an optional library, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"reading landed rows as {module} needs {module}: install the extra, "
            f"pip install 'incremental-assets[{extra}]'"
        ) from None
