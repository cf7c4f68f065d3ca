"""Table discovery: a source configured with patterns gets an asset per matching table, with its
watermark column and key; tables that cannot be copied are reported; the catalog is read once,
by `incremental-assets discover` (or the first load), never at every definitions load."""

from __future__ import annotations

import pytest
import yaml

from incremental_assets.config import ConfigError, load_config
from incremental_assets.discovery import state_path
from tests.helpers import landed, run_cli

pytestmark = pytest.mark.usefixtures("dagster_home")


def write(tmp_path, url, discover, tables=None, replica=None):
    config = {
        "sources": {"erp": {"url": url, "retries": 0, "discover": discover}},
        "landing": {"url": str(tmp_path / "landing")},
        **({"tables": tables} if tables else {}),
        **({"replica": {"url": replica}} if replica else {}),
    }
    path = tmp_path / "erp.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_postgresql_schemas_patterns_watermarks_and_skips(pg_db, tmp_path, capsys):
    pg_db.run(
        "CREATE SCHEMA sales", "CREATE SCHEMA hr",
        "CREATE TABLE sales.orders (id int PRIMARY KEY, updated_at timestamptz NOT NULL)",
        "CREATE TABLE sales.order_lines (id int PRIMARY KEY, order_id int, last_update timestamp)",
        "CREATE TABLE sales.orders_archive (id int PRIMARY KEY, updated_at timestamptz)",
        "CREATE TABLE sales.notes (id int PRIMARY KEY, body text)",  # no watermark candidate
        "CREATE TABLE sales.codes (code text PRIMARY KEY, updated_at text)",  # a text 'watermark'
        "CREATE TABLE hr.staff (id int PRIMARY KEY, updated_at timestamp)",
        "CREATE TABLE public.orders (id int PRIMARY KEY, updated_at timestamp)",
        "INSERT INTO sales.orders VALUES (1, '2026-01-02 03:04:05+00'), (2, '2026-01-03 00:00:00+00')",
    )
    config = write(tmp_path, pg_db.url, {"include": ["sales.*", "orders"], "exclude": ["*_archive"],
                                         "defaults": {"partitions": {"granularity": "monthly", "start": "2026-01-01"}}})
    code, out, err = run_cli(capsys, "--config", str(config), "discover")
    assert code == 0, err
    loaded = load_config(config)
    tables = {t.table: t for t in loaded.tables}
    assert sorted(tables) == ["orders", "sales.order_lines", "sales.orders"]
    # the same table name in two schemas: both get an asset, told apart by their schema
    assert tables["sales.orders"].name == "sales__orders" and tables["orders"].name == "orders"
    assert tables["sales.order_lines"].watermark_column == "last_update"
    assert tables["sales.orders"].primary_key == ["id"]
    assert tables["sales.orders"].partitions.granularity == "monthly"  # the defaults apply
    assert "sales.notes" in out and "SKIPPED: no watermark column among the candidates" in out
    assert "sales.codes" in out and "cannot be one: updated_at" in out
    assert "hr.staff" not in out and "orders_archive" not in out

    # the discovered tables copy like listed ones
    code, out, err = run_cli(capsys, "--config", str(config), "sync", "--table", tables["sales.orders"].name)
    assert code == 0, err
    _, data = landed(str(tmp_path / "landing"), tables["sales.orders"].name)
    assert sorted(data.column("id").to_pylist()) == [1, 2]


def test_definitions_load_reads_the_file_not_the_catalog(pg_db, tmp_path, capsys):
    pg_db.run("CREATE TABLE a (id int PRIMARY KEY, updated_at timestamp)")
    config = write(tmp_path, pg_db.url, {"include": ["*"]})
    assert [t.name for t in load_config(config).tables] == ["a"]  # first load: discovers, writes the file
    assert state_path(config).exists()
    pg_db.run("CREATE TABLE b (id int PRIMARY KEY, updated_at timestamp)")
    assert [t.name for t in load_config(config).tables] == ["a"]  # from the file: no catalog query
    assert run_cli(capsys, "--config", str(config), "discover")[0] == 0
    assert [t.name for t in load_config(config).tables] == ["a", "b"]  # after discover: the new table


def test_listed_tables_override_discovered_ones_and_replica_needs_a_key(pg_db, tmp_path, capsys):
    pg_db.run("CREATE TABLE keyed (id int PRIMARY KEY, updated_at timestamp)",
              "CREATE TABLE keyless (id int, updated_at timestamp)",
              "CREATE TABLE tuned (id int PRIMARY KEY, updated_at timestamp, changed timestamp)")
    config = write(tmp_path, pg_db.url, {"include": ["*"]},
                   tables=[{"name": "tuned_by_hand", "source": "erp", "table": "tuned", "watermark_column": "changed"}],
                   replica=f"sqlite:///{tmp_path / 'replica.db'}")
    code, out, err = run_cli(capsys, "--config", str(config), "discover")
    assert code == 0, err
    tables = {t.table: t for t in load_config(config).tables}
    assert sorted(tables) == ["keyed", "tuned"]
    assert tables["tuned"].name == "tuned_by_hand" and tables["tuned"].watermark_column == "changed"
    assert "keyless" in out and "no primary key (the replica merges by key)" in out


def test_mariadb_discovery_and_change_tracking_mode(mariadb_db, tmp_path, capsys):
    mariadb_db.run("CREATE TABLE customers (id int PRIMARY KEY, name varchar(20), LastModifytime datetime(6))",
                   "CREATE TABLE events (at datetime, what varchar(20))")
    config = write(tmp_path, mariadb_db.url, {"include": ["*"], "mode": "change_tracking"})
    code, out, err = run_cli(capsys, "--config", str(config), "discover")
    assert code == 0, err
    tables = load_config(config).tables
    assert [(t.name, t.mode, t.primary_key) for t in tables] == [("customers", "change_tracking", ["id"])]
    assert "events" in out and "no primary key (change tracking needs one)" in out


def test_bad_discovery_defaults_are_named(tmp_path):
    config = write(tmp_path, "sqlite:///x.db", {"include": ["*"], "defaults": {"watermark_column": "x"}})
    with pytest.raises(ConfigError, match=r"source 'erp': key 'discover.defaults': .*set per discovered table"):
        load_config(config)
