"""Names the replica's engine sees differently from the source: case-folded column names,
backticks in MySQL/MariaDB names, names past the engine's length limit."""

from __future__ import annotations

import pyarrow as pa
import pytest
import sqlalchemy as sa

from incremental_assets.config import ConfigError, parse_config
from incremental_assets.replica import Replica, ReplicaError


def rows(columns: dict[str, list]) -> pa.Table:
    return pa.table({name: pa.array(values, pa.int64()) for name, values in columns.items()})


@pytest.fixture(params=["mariadb_db", "mariadb_mysqlclient_db", "sqlite_db"])
def case_blind_db(request):
    return request.getfixturevalue(request.param)


def test_columns_one_only_by_case_are_refused_before_anything_is_created(case_blind_db):
    replica = Replica(case_blind_db.url, retries=0)
    data = rows({"id": [1], "val": [10], "VAL": [20], "v": [1]})
    with pytest.raises(ReplicaError) as caught:
        replica.merge("t", data, ["id"], version_column="v")
    replica.dispose()
    message = str(caught.value)
    assert "table 't', column 'VAL'" in message and "columns 'val' and 'VAL' would be one column" in message
    assert "key 'columns'" in message
    assert not sa.inspect(case_blind_db.engine).has_table("t")


def test_a_column_the_engine_takes_for_the_soft_delete_flag_is_refused(mariadb_db):
    replica = Replica(mariadb_db.url, retries=0)
    with pytest.raises(ReplicaError, match=r"column '_DELETED': is the replica's own column '_deleted' on this engine"):
        replica.merge("t", rows({"id": [1], "_DELETED": [0], "v": [1]}), ["id"], version_column="v")
    replica.dispose()


def test_postgresql_keeps_columns_that_differ_only_by_case(pg_db):
    replica = Replica(pg_db.url, retries=0)
    replica.merge("t", rows({"id": [1], "val": [10], "VAL": [20], "v": [1]}), ["id"], version_column="v")
    replica.merge("t", rows({"id": [1], "val": [11], "VAL": [21], "v": [2]}), ["id"], version_column="v")
    replica.dispose()
    assert pg_db.rows('SELECT id, val, "VAL" FROM t') == [(1, 11, 21)]


@pytest.mark.parametrize("db_fixture", ["mariadb_db", "mariadb_mysqlclient_db"])
def test_backticks_in_names_survive_the_next_merge_on_mariadb(request, db_fixture):
    db = request.getfixturevalue(db_fixture)
    replica = Replica(db.url, retries=0)
    table = "t`x"
    replica.merge(table, rows({"k`1": [1, 2], "col`q": [10, 20], "a``b": [5, 6], "v": [1, 1]}), ["k`1"], version_column="v")
    # the next merge finds the table it created, with the same names
    result = replica.merge(table, rows({"k`1": [2, 3], "col`q": [21, 30], "a``b": [7, 8], "v": [2, 2]}), ["k`1"],
                           version_column="v")
    replica.dispose()
    assert (result.inserted, result.updated, result.added_columns) == (1, 1, [])
    assert db.rows("SELECT `k``1`, `col``q`, `a````b` FROM `t``x` ORDER BY 1") == [(1, 10, 5), (2, 21, 7), (3, 30, 8)]


# -- name lengths ---------------------------------------------------------------------------------


def _config(name: str, replica_url: str, replica_table: str | None = None) -> str:
    replica = f", replica: {{table: {replica_table}}}" if replica_table else ""
    return (f"sources: {{s: {{url: 'sqlite:///a.db'}}}}\nreplica: {{url: '{replica_url}'}}\n"
            f"tables:\n  - {{name: {name}, source: s, table: {name}, watermark_column: w{replica}}}\n")


def test_a_name_whose_tombstone_table_passes_the_limit_is_refused_when_the_configuration_loads(pg_db):
    name = "t" * 63  # a valid PostgreSQL table name; its tombstone table's would be 72 bytes
    with pytest.raises(ConfigError) as caught:
        parse_config(_config(name, pg_db.url), "config.yaml")
    message = str(caught.value)
    assert message.startswith(f"config.yaml: tables[0] (table '{name}'): replica table '{name}': its tombstone table")
    assert "72 bytes, over the 63-byte limit of postgresql names" in message and "at most 54 bytes" in message
    # the longest name it suggests merges (tombstone table included) on the real server
    short = "s" * 54
    parse_config(_config(name, pg_db.url, short), "config.yaml")
    replica = Replica(pg_db.url, retries=0)
    replica.merge(short, rows({"id": [1], "v": [1]}), ["id"], version_column="v")
    replica.dispose()
    assert pg_db.rows(f'SELECT id FROM "{short}"') == [(1,)]
    assert sa.inspect(pg_db.engine).has_table(short + "__deleted")


def test_mariadb_names_get_64_bytes_and_sqlite_has_no_limit(mariadb_db, tmp_path):
    with pytest.raises(ConfigError, match="over the 64-byte limit of mysql names"):
        parse_config(_config("m" * 56, mariadb_db.url), "config.yaml")
    parse_config(_config("m" * 55, mariadb_db.url), "config.yaml")
    parse_config(_config("m" * 200, f"sqlite:///{tmp_path / 'r.db'}"), "config.yaml")


def test_a_mariadb_table_with_backticks_in_its_names_is_copied_and_merged_again_and_again(
        mariadb_db, mariadb_mysqlclient_db, tmp_path, capsys, dagster_home):
    from tests.helpers import after_horizon, fresh_time, run_cli, write_config

    source, replica = mariadb_db, mariadb_mysqlclient_db
    source.run("CREATE TABLE `t``x` (`k``1` int PRIMARY KEY, `col``q` varchar(20), `w` datetime(6), INDEX (`w`))",
               "INSERT INTO `t``x` VALUES (1, 'a', '2024-01-02 00:00:00'), (2, 'b', '2024-01-03 00:00:00')")
    table = {"name": "tx", "table": "t`x", "watermark_column": "w", "partitions": {"granularity": "monthly", "start": "2024-01-01"},
             "replica": {"table": "t`x"}}
    config = write_config(tmp_path, source.url, [table], replica={"url": replica.url})
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    source.run("INSERT INTO `t``x` VALUES (3, 'c', :w)", params={"w": fresh_time()})
    source.run("UPDATE `t``x` SET `col``q` = 'b2', `w` = :w WHERE `k``1` = 2", params={"w": fresh_time()})
    after_horizon()
    code, out, err = run_cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert replica.rows("SELECT `k``1`, `col``q` FROM `t``x` ORDER BY 1") == [(1, "a"), (2, "b2"), (3, "c")]
