"""The definitions load the way Dagster's own tools load them, on the embedded demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from incremental_assets.definitions import load_definitions

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_demo_definitions_have_partitioned_assets_sensors_and_pools(tmp_path, monkeypatch):
    monkeypatch.setenv("INCREMENTAL_ASSETS_DEMO_DIR", str(tmp_path))
    monkeypatch.delenv("INCREMENTAL_ASSETS_CONFIG", raising=False)
    defs = load_definitions()
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    tables = {"data_source_table", "customer_table", "project_table"}
    # and the demo's own asset downstream of a landing asset
    assert keys == {f"landing/{t}" for t in tables} | {f"replica/{t}" for t in tables} | {
        "demo/data_source_table_rows_per_day"}
    asset = defs.resolve_assets_def(dg.AssetKey(["landing", "data_source_table"]))
    assert asset.partitions_def.get_first_partition_key() == "2017-09-01"
    assert asset.backfill_policy is not None
    assert asset.op.pool == "incremental_assets/data_source_table"
    # one sensor for the source's tables, not one per table (and the demo's downstream asset's)
    assert [s.name for s in defs.sensors] == ["incremental_copy_demo_sensor", "demo_rows_per_day_follows_landing"]
    assert defs.resolve_sensor_def("incremental_copy_demo_sensor").default_status == dg.DefaultSensorStatus.RUNNING
    replica = defs.resolve_assets_def(dg.AssetKey(["replica", "data_source_table"]))
    assert replica.partitions_def == asset.partitions_def
    assert dg.AssetKey(["landing", "data_source_table"]) in replica.dependency_keys
    assert [c.name for c in replica.check_specs] == ["reconciles_with_source"]


@pytest.mark.parametrize(
    "command",
    [
        ["dagster", "definitions", "validate", "-w", "workspace.yaml"],
        ["dagster", "definitions", "validate"],  # via pyproject.toml [tool.dagster]
        ["dg", "check", "defs"],
    ],
)
def test_dagster_tools_load_the_definitions(command, tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "INCREMENTAL_ASSETS_DEMO_DIR": str(tmp_path / "demo")}
    env.pop("INCREMENTAL_ASSETS_CONFIG", None)
    result = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_new_instance_gets_the_project_instance_settings():
    """The CLI writes the settings of dagster_home/dagster.yaml into a new DAGSTER_HOME."""
    import yaml

    from incremental_assets.cli import INSTANCE_YAML

    assert yaml.safe_load(INSTANCE_YAML) == yaml.safe_load((ROOT / "dagster_home" / "dagster.yaml").read_text())
