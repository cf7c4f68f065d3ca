"""Inputs from ``landing/<table>``: a downstream asset declares ``ins`` and gets the landed rows.

    @dg.asset(partitions_def=dg.DailyPartitionsDefinition("2024-01-01"),
              ins={"orders": dg.AssetIn(dg.AssetKey(["landing", "orders"]))})
    def orders_per_day(orders: pd.DataFrame) -> None: ...

The input holds the rows of the landing windows Dagster maps to the run's partition(s) (its
partition mapping: the same window, a monthly window for a daily asset, every window for an
asset without partitions), as the type the parameter is annotated with: ``pyarrow.Table``
(also when not annotated), ``pandas.DataFrame``, ``polars.DataFrame``, ``polars.LazyFrame``,
``pyarrow.RecordBatchReader`` or ``pyarrow.dataset.Dataset`` (both lazy, for windows larger
than memory), or :class:`~incremental_assets.landing.reading.LandedRows` (the files, to read at
will). The input's metadata (``dg.AssetIn(key, metadata={...})``) may say:

- ``changes``: ``"log"`` (default: a change-tracked table's change log as landed) or
  ``"latest_state"`` (each key's latest row, deletes applied: see ``latest_state``);
- ``key``: the key columns for ``latest_state`` (default: the table's ``primary_key`` as
  configured, else as its latest copy recorded it: the source's primary key);
- ``batch_size``: rows per batch of a ``RecordBatchReader`` (default 65,536);
- ``dtype_backend``: pandas dtypes, ``"numpy_nullable"`` (default) or ``"pyarrow"``.

The landing assets write their files themselves: the IO manager only reads (it refuses an output).
The reading is the engine's (``landing/reading.py``); this is its Dagster face. See
docs/downstream.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import pyarrow as pa

from ..landing import LandingError
from ..landing.reading import DEFAULT_BATCH_SIZE, LandedRows, read_windows, require, to_pandas, to_polars
from .resources import LandingResource

#: the landing assets' io_manager_key
LANDING_IO_MANAGER_KEY = "landing_io_manager"

_CHANGES = ("log", "latest_state")


def io_manager_key(landing_key: str = "landing") -> str:
    """The resource key of the IO manager of the landing assets whose store is the resource
    ``landing_key`` (:data:`LANDING_IO_MANAGER_KEY` for the project's own, one per component
    instance)."""
    return f"{landing_key}_io_manager"


def landing_io_manager(primary_keys: Mapping[str, Sequence[str]], landing_key: str = "landing") -> dg.IOManagerDefinition:
    """The landing assets' IO manager, on the store of the resource ``landing_key``.
    ``primary_keys``: each table's key columns as configured (``primary_key``), for
    ``changes: latest_state``."""
    keys = {name: list(key) for name, key in primary_keys.items() if key}

    @dg.io_manager(
        required_resource_keys={landing_key},
        description="Loads landing/<table> inputs: the rows of the input's windows, as the type the input is "
                    "annotated with; the landing assets write their files themselves.",
    )
    def _landing_io_manager(context: dg.InitResourceContext) -> LandingIOManager:
        return LandingIOManager(getattr(context.resources, landing_key), keys)

    return _landing_io_manager


class LandingIOManager(dg.IOManager):
    """Loads ``landing/<table>`` inputs from the landing store: the rows of the input's windows,
    as the type the input is annotated with (see the module's documentation)."""

    def __init__(self, landing: LandingResource, primary_keys: dict[str, list[str]]):
        self.landing = landing
        self.primary_keys = primary_keys

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        # a landing asset has written its files when it returns; there is nothing else to store
        if obj is not None:
            name = context.asset_key.to_user_string() if context.has_asset_key else context.step_key
            raise dg.Failure(description=(
                f"{name}: the IO manager {LANDING_IO_MANAGER_KEY!r} stores nothing (it reads the landing assets' "
                f"files); give {name} another io_manager_key"))

    def load_input(self, context: dg.InputContext) -> Any:
        table = context.asset_key.path[-1]
        options = dict(context.definition_metadata or {})
        windows = list(context.asset_partition_keys) if context.has_asset_partitions else []
        try:
            rows = read_windows(self.landing.get(), table, windows)
        except LandingError as exc:
            raise dg.Failure(description=f"input {context.asset_key.to_user_string()}: {exc}") from None
        context.log.info(
            f"{context.asset_key.to_user_string()}: {len(rows.files)} file(s) of {len(windows)} window(s)"
            + (f" ({windows[0]} .. {windows[-1]})" if len(windows) > 1 else f" ({windows[0]})" if windows else "")
        )
        changes = options.get("changes", "log")
        if changes not in _CHANGES:
            raise dg.Failure(description=f"input {context.asset_key.to_user_string()}: metadata 'changes' must be "
                                         f"one of {list(_CHANGES)}, got {changes!r}")
        wanted = _annotation(context)
        if changes == "latest_state":
            if not rows.is_change_log:
                raise dg.Failure(description=(
                    f"input {context.asset_key.to_user_string()}: 'changes: latest_state' needs a table copied by "
                    f"change tracking; {table!r} has no SYS_CHANGE_VERSION / SYS_CHANGE_OPERATION columns"))
            key = options.get("key") or self.primary_keys.get(table) or _landed_key(context)
            if not key:
                raise dg.Failure(description=(
                    f"input {context.asset_key.to_user_string()}: 'changes: latest_state' needs the table's key "
                    f"columns, and no copy of {table!r} has recorded them yet: set primary_key in table {table!r} "
                    "of the configuration, or metadata {'key': [...]} on the input"))
            return _convert(rows.latest_state(list(key)), wanted, options)
        return _convert(rows, wanted, options)


def _landed_key(context: dg.InputContext) -> list[str] | None:
    """The key the latest copy of a change-tracked table recorded (the source's primary key)."""
    from .landing import latest_metadata

    metadata = latest_metadata(context.instance, context.asset_key) or {}
    key = metadata.get("primary_key")
    return list(key) if isinstance(key, list) else None


def _annotation(context: dg.InputContext) -> Any:
    typing_type = context.dagster_type.typing_type
    return typing_type if isinstance(typing_type, type) else None


def _is(wanted: type | None, module: str, name: str) -> bool:
    return wanted is not None and wanted.__module__.split(".")[0] == module and wanted.__name__ == name


def _convert(data: LandedRows | pa.Table, wanted: type | None, options: dict[str, Any]) -> Any:
    """The rows as the annotated type (a ``pyarrow.Table`` when there is none)."""
    batch_size = int(options.get("batch_size") or DEFAULT_BATCH_SIZE)
    if wanted is LandedRows:
        if isinstance(data, LandedRows):
            return data
        raise dg.Failure(description="'changes: latest_state' gives a table, not LandedRows: annotate pyarrow.Table")
    if wanted is pa.RecordBatchReader:
        if isinstance(data, LandedRows):
            return data.to_reader(batch_size)
        return data.to_reader(max_chunksize=batch_size)
    if _is(wanted, "pyarrow", "Dataset") or _is(wanted, "pyarrow", "FileSystemDataset"):
        if isinstance(data, LandedRows):
            return data.to_dataset()
        import pyarrow.dataset as ds

        return ds.dataset(data)
    if _is(wanted, "polars", "LazyFrame"):
        pl = require("polars", "polars")
        if isinstance(data, LandedRows):
            return pl.scan_pyarrow_dataset(data.to_dataset())
        return pl.from_arrow(data).lazy()
    table = data.to_table() if isinstance(data, LandedRows) else data
    if _is(wanted, "pandas", "DataFrame"):
        return to_pandas(table, options.get("dtype_backend", "numpy_nullable"))
    if _is(wanted, "polars", "DataFrame"):
        return to_polars(table)
    return table


def windows_landed_since(context: dg.SensorEvaluationContext, landing: dg.AssetKey):
    """For a sensor of one's own that follows a landing asset: a run request per window of
    ``landing`` materialized since the sensor's cursor (a storage id), which it then moves on.
    Each request names its window (``partition_key``): the sensor's target must have the landing
    asset's partitions. See docs/downstream.md, "Following landing"."""
    after = int(context.cursor) if context.cursor else None
    result = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=landing, after_storage_id=after), limit=1000, ascending=True)
    if not result.records:
        return
    last = result.records[-1].storage_id
    for partition in sorted({r.partition_key for r in result.records if r.partition_key}):
        yield dg.RunRequest(run_key=f"{partition}@{last}", partition_key=partition)
    context.update_cursor(str(last))
