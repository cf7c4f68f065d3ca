"""Landing stores: real files in a temp folder and real blobs in Azurite (no mocks)."""

from __future__ import annotations

import base64
import datetime as dt
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from incremental_assets.landing import (
    LandedFile,
    LandingError,
    LocalLandingStore,
    open_landing_store,
)

UTC = dt.timezone.utc
PARIS = dt.timezone(dt.timedelta(hours=1))

SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("name", pa.string()),
        pa.field("changed_at", pa.timestamp("us", tz="Europe/Paris")),
        pa.field("local_time", pa.timestamp("us")),
        pa.field("precise", pa.timestamp("ns")),
        pa.field("amount", pa.decimal128(18, 4)),
        pa.field("payload", pa.binary()),
    ]
)


def sample(n: int = 4, start: int = 0) -> pa.Table:
    ids = list(range(start, start + n))
    names = ["Zoë, \"the\" señora 日本", "", None, "line\nbreak"]
    return pa.table(
        {
            "id": ids,
            "name": [names[i % 4] for i in range(n)],
            "changed_at": [
                None if i % 4 == 2 else dt.datetime(2024, 3, 31, 1, 59, 59, 123456 + i, tzinfo=UTC)
                for i in range(n)
            ],
            "local_time": [
                None if i % 4 == 3 else dt.datetime(2023, 12, 31, 23, 59, 59, 999999) for i in range(n)
            ],
            "precise": pa.array([1_700_000_000_123_456_789 + i for i in range(n)], pa.timestamp("ns")),
            "amount": [None if i % 4 == 1 else Decimal("12345678901234.5678") - i for i in range(n)],
            "payload": [None if i % 4 == 0 else bytes([0, 255, i % 256]) + "é".encode() for i in range(n)],
        },
        schema=SCHEMA,
    )


def batches(table: pa.Table, size: int = 3):
    return table.to_batches(max_chunksize=size)


def failing_batches(table: pa.Table, after: int = 1):
    for i, batch in enumerate(table.to_batches(max_chunksize=2)):
        if i == after:
            raise RuntimeError("source connection lost")
        yield batch


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def local(tmp_path) -> LocalLandingStore:
    root = tmp_path / "landing"
    root.mkdir()
    return LocalLandingStore(root)


# --------------------------------------------------------------------------- local: parquet


def test_parquet_round_trip_keeps_exact_types(local):
    data = sample(8)
    files = local.write_slice("orders", "2024-03-31", "slice-1", SCHEMA, batches(data))

    assert files == [
        LandedFile(
            path="orders/2024-03-31/slice-1.parquet",
            uri=(local.root / "orders/2024-03-31/slice-1.parquet").as_uri(),
            rows=8,
            bytes=os.path.getsize(local.root / "orders/2024-03-31/slice-1.parquet"),
        )
    ]
    back = local.read_arrow(files[0].path)
    assert back.schema.equals(SCHEMA)
    assert back.equals(data)
    # exact values, not just equal types
    assert back.column("changed_at")[0].as_py() == dt.datetime(2024, 3, 31, 1, 59, 59, 123456, tzinfo=UTC)
    assert back.column("precise")[0].value == 1_700_000_000_123_456_789
    assert back.column("amount")[0].as_py() == Decimal("12345678901234.5678")
    assert back.column("amount")[1].as_py() is None
    assert back.column("payload")[1].as_py() == b"\x00\xff\x01\xc3\xa9"
    # any Parquet reader sees native types (no int96, no coercion to ms)
    physical = pq.read_schema(local.root / files[0].path)
    assert physical.field("precise").type == pa.timestamp("ns")
    assert physical.field("amount").type == pa.decimal128(18, 4)


def _dictionary_columns(path) -> set[str]:
    meta = pq.ParquetFile(path).metadata.row_group(0)
    return {meta.column(i).path_in_schema for i in range(meta.num_columns) if "RLE_DICTIONARY" in meta.column(i).encodings}


def test_a_tables_next_files_keep_the_dictionary_choice_of_its_first(local):
    schema = pa.schema([("id", pa.int64()), ("code", pa.string())])
    repeating = pa.table({"id": range(4000), "code": [f"c{i % 8}" for i in range(4000)]}, schema=schema)
    unique = pa.table({"id": range(4000, 8000), "code": [f"u{i}" for i in range(4000)]}, schema=schema)
    local.write_slice("t", "2024-01-01", "a", schema, batches(repeating))
    local.write_slice("t", "2024-01-02", "b", schema, batches(unique))  # chosen once, for the table
    local.write_slice("other", "2024-01-02", "b", schema, batches(unique))  # chosen for itself

    assert _dictionary_columns(local.root / "t/2024-01-01/a.parquet") == {"code"}
    assert _dictionary_columns(local.root / "t/2024-01-02/b.parquet") == {"code"}
    assert _dictionary_columns(local.root / "other/2024-01-02/b.parquet") == set()
    # an encoding only: the values read back the same
    assert local.read_arrow("t/2024-01-02/b.parquet").equals(unique)


def test_same_stem_twice_leaves_one_file_with_the_second_content(local):
    local.write_slice("t", "p", "s", SCHEMA, batches(sample(4)))
    second = sample(2, start=100)
    local.write_slice("t", "p", "s", SCHEMA, batches(second))

    assert local.list_files("t") == ["t/p/s.parquet"]
    assert local.read_arrow("t/p/s.parquet").equals(second)
    assert all_files(local.root) == ["t/p/s.parquet"]


def test_max_rows_per_file_splits_with_deterministic_names(local):
    data = sample(10)
    files = local.write_slice("t", "p", "s", SCHEMA, batches(data, 3), max_rows_per_file=4)

    assert [f.path for f in files] == [
        "t/p/s.part-00000.parquet",
        "t/p/s.part-00001.parquet",
        "t/p/s.part-00002.parquet",
    ]
    assert [f.rows for f in files] == [4, 4, 2]
    assert local.list_files("t", "p") == [f.path for f in files]
    assert pa.concat_tables(local.read_arrow(f.path) for f in files).equals(data)

    # a retry that fits one file replaces the parts (no leftovers, no duplicates)
    files = local.write_slice("t", "p", "s", SCHEMA, batches(data), max_rows_per_file=10)
    assert [f.path for f in files] == ["t/p/s.parquet"]
    assert local.list_files("t") == ["t/p/s.parquet"]


def test_a_retry_removes_only_its_own_stems_files(local):
    """The files an earlier attempt of the same stem left go; neighbours sharing a prefix or a
    suffix, other formats and hidden files stay."""
    folder = local.root / "t" / "p"
    folder.mkdir(parents=True)
    stale = ["s.part-00000.parquet", "s.part-00001.parquet", "s.part-123456.parquet"]
    kept = ["s2.parquet", "s.part-0001.parquet", "s.part-0000x.parquet", "xs.parquet", "s.csv",
            "s.part-00000.csv", "s.parquet.bak", ".s.parquet", "s.x.parquet"]
    for name in stale + kept:
        (folder / name).write_bytes(b"earlier")
    files = local.write_slice("t", "p", "s", SCHEMA, batches(sample(3)))
    assert [f.path for f in files] == ["t/p/s.parquet"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(kept + ["s.parquet"])


def test_zero_rows_writes_nothing(local):
    empty = sample(0)
    assert local.write_slice("t", "p", "s", SCHEMA, batches(empty)) == []
    assert local.write_slice("t", "p", "s", SCHEMA, iter([])) == []
    assert local.list_files("t") == []
    assert all_files(local.root) == []


def test_iterator_failing_midway_leaves_nothing_visible(local):
    with pytest.raises(RuntimeError, match="source connection lost"):
        local.write_slice("t", "p", "s", SCHEMA, failing_batches(sample(6), after=2))
    assert local.list_files("t") == []
    assert all_files(local.root) == []  # temp files removed too

    # an earlier good file of the same stem is left untouched
    good = sample(3)
    local.write_slice("t", "p", "s", SCHEMA, batches(good))
    with pytest.raises(RuntimeError):
        local.write_slice("t", "p", "s", SCHEMA, failing_batches(sample(6), after=2), max_rows_per_file=2)
    assert all_files(local.root) == ["t/p/s.parquet"]
    assert local.read_arrow("t/p/s.parquet").equals(good)


def test_list_and_delete(local):
    for partition in ("2024-01-02", "2024-01-01"):
        for stem in ("b", "a"):
            local.write_slice("t", partition, stem, SCHEMA, batches(sample(1)))
    local.write_slice("other", "2024-01-01", "a", SCHEMA, batches(sample(1)))

    assert local.list_files("t") == [
        "t/2024-01-01/a.parquet",
        "t/2024-01-01/b.parquet",
        "t/2024-01-02/a.parquet",
        "t/2024-01-02/b.parquet",
    ]
    assert local.list_files("t", "2024-01-02") == ["t/2024-01-02/a.parquet", "t/2024-01-02/b.parquet"]
    assert local.list_files("t", "1999-01-01") == []
    assert local.list_files("missing") == []

    local.delete(["t/2024-01-01/a.parquet", "t/2024-01-01/does-not-exist.parquet"])
    local.delete(["t/2024-01-01/a.parquet"])  # idempotent
    assert local.list_files("t", "2024-01-01") == ["t/2024-01-01/b.parquet"]
    assert local.list_files("other") == ["other/2024-01-01/a.parquet"]
    with pytest.raises(ValueError):
        local.delete(["../outside.parquet"])


def test_bad_names_are_rejected(local):
    for table, partition, stem in [("../x", "p", "s"), ("t", "a/b", "s"), ("t", "p", ".hidden"), ("", "p", "s")]:
        with pytest.raises(ValueError):
            local.write_slice(table, partition, stem, SCHEMA, batches(sample(1)))


# --------------------------------------------------------------------------- local: csv


def test_csv_is_adf_delimited_text(tmp_path):
    store = open_landing_store(str(tmp_path), format="csv")
    data = sample(4)
    files = store.write_slice("people", "2024-03-31", "s", SCHEMA, batches(data))
    assert [f.path for f in files] == ["people/2024-03-31/s.csv"]

    raw = (tmp_path / files[0].path).read_bytes()
    text = raw.decode("utf-8")  # UTF-8, no BOM
    assert not raw.startswith(b"\xef\xbb\xbf")
    lines = text.split("\n")
    assert lines[0] == '"id","name","changed_at","local_time","precise","amount","payload"'
    # comma and quote inside a value: quoted, inner quote doubled; unicode kept
    assert lines[1] == (
        '0,"Zoë, ""the"" señora 日本","2024-03-31T01:59:59.123456Z","2023-12-31T23:59:59.999999",'
        '"2023-11-14T22:13:20.123456789",12345678901234.5678,'
    )
    # NULL is an empty field; an empty string is ""
    assert lines[2].startswith('1,"","2024-03-31T01:59:59.123457Z",')
    assert ",," in lines[2]  # NULL amount
    assert lines[3].startswith("2,,,")  # NULL name and NULL timestamp

    # read back: exact types when the schema is given, names and count in any case
    back = store.read_arrow(files[0].path, schema=SCHEMA)
    assert back.schema.equals(SCHEMA)
    assert back.equals(data)
    inferred = store.read_arrow(files[0].path)
    assert inferred.column_names == SCHEMA.names
    assert inferred.num_rows == 4
    assert base64.b64decode(inferred.column("payload")[1].as_py()) == data.column("payload")[1].as_py()


def test_csv_split_and_failure(tmp_path):
    store = LocalLandingStore(tmp_path, "csv")
    files = store.write_slice("t", "p", "s", SCHEMA, batches(sample(5)), max_rows_per_file=2)
    assert [f.path for f in files] == ["t/p/s.part-00000.csv", "t/p/s.part-00001.csv", "t/p/s.part-00002.csv"]
    assert sum(store.read_arrow(f.path, schema=SCHEMA).num_rows for f in files) == 5
    with pytest.raises(RuntimeError):
        store.write_slice("t", "q", "s", SCHEMA, failing_batches(sample(6)))
    assert store.list_files("t", "q") == []
    assert not [p for p in (tmp_path / "t" / "q").iterdir()]


# --------------------------------------------------------------------------- opening stores


def test_open_landing_store_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    relative = open_landing_store("rel")
    assert isinstance(relative, LocalLandingStore)
    assert relative.root == tmp_path / "rel"
    assert relative.format == "parquet"
    relative.check_writable()

    by_url = open_landing_store((tmp_path / "rel").as_uri(), format="csv")
    assert by_url.root == tmp_path / "rel" and by_url.format == "csv"
    assert by_url.describe() == (tmp_path / "rel").as_uri()

    with pytest.raises(ValueError, match="s3"):
        open_landing_store("s3://bucket/x")
    with pytest.raises(ValueError, match="orc"):
        open_landing_store("rel", format="orc")

    # a local landing folder is created on first use, as a user expects of a folder path
    fresh = open_landing_store(str(tmp_path / "new" / "landing"))
    fresh.check_writable()
    assert [f.rows for f in fresh.write_slice("t", "p", "s", SCHEMA, batches(sample(1)))] == [1]
    # a path that cannot be a folder fails clearly, naming it
    (tmp_path / "blocked").write_text("not a folder")
    with pytest.raises(LandingError) as err:
        open_landing_store(str(tmp_path / "blocked")).write_slice("t", "p", "s", SCHEMA, batches(sample(1)))
    assert "blocked" in str(err.value)


def test_redact_removes_secrets():
    from incremental_assets.landing import redact

    text = redact(
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=abc/def+ghi==;"
        " https://acct.blob.core.windows.net/c?sv=2024-01-01&sig=SECRETSIG%3D&se=x"
        " postgresql://user:pa55word@db/x"
    )
    assert "abc/def" not in text and "SECRETSIG" not in text and "pa55word" not in text
    assert "AccountName=acct" in text and "acct.blob.core.windows.net" in text


def test_engine_does_not_import_dagster():
    code = "import sys, incremental_assets.landing.azure; print('dagster' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- Azure (Azurite)


def azure_store(container, prefix="landing/v1", fmt="parquet", **kwargs):
    return open_landing_store(
        f"azure://{container}/{prefix}" if prefix else f"azure://{container}",
        fmt,
        env={"AZURE_STORAGE_CONNECTION_STRING": container.connection_string},
        **kwargs,
    )


def blob_names(container) -> list[str]:
    from azure.storage.blob import ContainerClient

    client = ContainerClient.from_connection_string(container.connection_string, container.name)
    return sorted(b.name for b in client.list_blobs())


@pytest.mark.azurite
def test_azure_write_list_read(azure_container):
    store = azure_store(azure_container)
    store.check_writable()
    data = sample(8)
    files = store.write_slice("orders", "2024-03-31", "slice-1", SCHEMA, batches(data), max_rows_per_file=5)

    assert [f.path for f in files] == [
        "orders/2024-03-31/slice-1.part-00000.parquet",
        "orders/2024-03-31/slice-1.part-00001.parquet",
    ]
    assert files[0].uri == f"azure://{azure_container}/landing/v1/orders/2024-03-31/slice-1.part-00000.parquet"
    assert [f.rows for f in files] == [5, 3]
    assert all(f.bytes > 0 for f in files)
    assert store.list_files("orders") == [f.path for f in files]
    assert store.list_files("orders", "2024-03-31") == [f.path for f in files]
    assert blob_names(azure_container) == [
        "landing/v1/orders/2024-03-31/slice-1.part-00000.parquet",
        "landing/v1/orders/2024-03-31/slice-1.part-00001.parquet",
    ]
    back = pa.concat_tables(store.read_arrow(f.path) for f in files)
    assert back.schema.equals(SCHEMA) and back.equals(data)

    # retry with the same stem: replaced, never duplicated
    files = store.write_slice("orders", "2024-03-31", "slice-1", SCHEMA, batches(sample(2)))
    assert store.list_files("orders") == ["orders/2024-03-31/slice-1.parquet"]
    assert store.read_arrow(files[0].path).equals(sample(2))

    # zero rows: nothing written
    assert store.write_slice("orders", "2024-04-01", "s", SCHEMA, iter([])) == []
    assert store.list_files("orders", "2024-04-01") == []

    store.delete(["orders/2024-03-31/slice-1.parquet", "orders/nope/x.parquet"])
    store.delete(["orders/2024-03-31/slice-1.parquet"])
    assert store.list_files("orders") == []
    assert "AccountKey" not in store.describe()


@pytest.mark.azurite
def test_azure_block_upload_of_a_multi_block_file(azure_container):
    from incremental_assets.landing import AzureLandingStore, container_client_from_env

    # tiny block size: the same staged-blocks-then-commit path as a file over 64 MiB
    client = container_client_from_env(
        azure_container,
        env={"AZURE_STORAGE_CONNECTION_STRING": azure_container.connection_string},
        max_single_put_size=1024,
        max_block_size=1024,
    )
    store = AzureLandingStore(client, "", "parquet")
    data = pa.concat_tables([sample(4, start=i * 4) for i in range(100)])
    [landed] = store.write_slice("t", "p", "s", SCHEMA, data.to_batches(max_chunksize=64))
    committed, uncommitted = client.get_blob_client("t/p/s.parquet").get_block_list("all")
    assert len(committed) > 1 and not uncommitted
    assert landed.rows == 400 and store.read_arrow(landed.path).equals(data)


@pytest.mark.azurite
def test_azure_csv_round_trip(azure_container):
    store = azure_store(azure_container, prefix="", fmt="csv")
    data = sample(4)
    [landed] = store.write_slice("people", "p", "s", SCHEMA, batches(data))
    assert landed.uri == f"azure://{azure_container}/people/p/s.csv"
    assert store.read_arrow(landed.path, schema=SCHEMA).equals(data)


@pytest.mark.azurite
def test_azure_iterator_failing_midway_leaves_nothing(azure_container, tmp_path):
    from incremental_assets.landing import AzureLandingStore, container_client_from_env

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    client = container_client_from_env(
        azure_container, env={"AZURE_STORAGE_CONNECTION_STRING": azure_container.connection_string}
    )
    store = AzureLandingStore(client, "pre", "parquet", tmp_dir=scratch)
    with pytest.raises(RuntimeError, match="source connection lost"):
        store.write_slice("t", "p", "s", SCHEMA, failing_batches(sample(6), after=2), max_rows_per_file=2)
    assert blob_names(azure_container) == []
    assert list(scratch.iterdir()) == []  # local temp files removed


@pytest.mark.azurite
def test_azure_missing_container_is_a_clear_error(azurite):
    store = open_landing_store(
        "azure://no-such-container/x",
        env={"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string},
    )
    with pytest.raises(LandingError) as err:
        store.check_writable()
    message = str(err.value)
    assert "no-such-container" in message and "must be created" in message
    assert "AccountKey" not in message and azurite.account_key not in message

    with pytest.raises(LandingError, match="no-such-container") as err:
        store.write_slice("t", "p", "s", SCHEMA, batches(sample(2)))
    assert azurite.account_key not in str(err.value)
    assert "t/p/s.parquet" in str(err.value)


@pytest.mark.azurite
def test_azure_bad_key_is_a_clear_error_without_the_key(azure_container, azurite):
    bad_key = base64.b64encode(b"definitely not the right key 0123456789abcdef").decode()
    bad = azure_container.connection_string.replace(azurite.account_key, bad_key)
    store = open_landing_store(
        f"azure://{azure_container}/x", env={"AZURE_STORAGE_CONNECTION_STRING": bad}
    )
    for action in (store.check_writable, lambda: store.list_files("t")):
        with pytest.raises(LandingError) as err:
            action()
        message = str(err.value)
        assert "credential" in message and "403" in message
        assert bad_key not in message and "AccountKey" not in message
        assert err.value.__cause__ is None and err.value.__suppress_context__


def test_azure_env_without_account_is_a_clear_error():
    with pytest.raises(LandingError, match="AZURE_STORAGE_CONNECTION_STRING"):
        open_landing_store("azure://c/p", env={})
    with pytest.raises(LandingError) as err:
        open_landing_store("azure://c/p", env={"AZURE_STORAGE_CONNECTION_STRING": "AccountKey=s3cret;junk"})
    assert "s3cret" not in str(err.value)
