"""A landing store tells each data file's version: what the replica records as merged, so a
rewritten file is told from the one merged before without comparing clocks."""

from __future__ import annotations

import pyarrow as pa
import pytest

from incremental_assets.landing import open_landing_store
from incremental_assets.landing.local import LocalLandingStore

SCHEMA = pa.schema([("id", pa.int64())])


def rows(*ids):
    return [pa.record_batch([pa.array(ids, pa.int64())], schema=SCHEMA)]


def check_versions(store):
    store.write_slice("t", "2024-01-01", "a", SCHEMA, rows(1, 2))
    store.write_slice("t", "2024-01-02", "b", SCHEMA, rows(3))
    first = store.file_versions("t")
    assert list(first) == store.list_files("t") == ["t/2024-01-01/a.parquet", "t/2024-01-02/b.parquet"]
    assert store.file_versions("t", "2024-01-02") == {"t/2024-01-02/b.parquet": first["t/2024-01-02/b.parquet"]}
    assert all(first.values())
    # listing again: the same versions; a rewrite of one file (same name): a new version for it only
    assert store.file_versions("t") == first
    store.write_slice("t", "2024-01-01", "a", SCHEMA, rows(1, 2, 4))
    second = store.file_versions("t")
    assert second["t/2024-01-01/a.parquet"] != first["t/2024-01-01/a.parquet"]
    assert second["t/2024-01-02/b.parquet"] == first["t/2024-01-02/b.parquet"]
    assert store.file_versions("t", "2024-01-03") == {} and store.file_versions("missing") == {}


def test_local_file_versions(tmp_path):
    check_versions(LocalLandingStore(tmp_path / "landing", create=True))


@pytest.mark.azurite
def test_azure_file_versions_are_etags(azure_container):
    check_versions(open_landing_store(f"azure://{azure_container}/landing", "parquet",
                                      env={"AZURE_STORAGE_CONNECTION_STRING": azure_container.connection_string}))
