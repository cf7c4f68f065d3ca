"""IncrementalCopyComponent in a dg project: scaffolded by `dg scaffold defs`, checked by `dg check
defs`, loaded from the defs folder; rows copied through it; translation; two instances."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TYPE = "incremental_assets.IncrementalCopyComponent"

ROWS = [(1, "Ann", "2024-01-02 09:00:00"), (2, "Bob", "2024-01-02 17:30:00"), (3, "Cid", "2024-01-02 23:59:59")]


@pytest.fixture(scope="module")
def registry_path(tmp_path_factory) -> str:
    """A sys.path entry under which the project's entry points are registered as pyproject.toml
    declares them: none when the installed project already has them (an install of this tree),
    else its metadata built from pyproject.toml (setuptools' egg_info)."""
    found = importlib.metadata.entry_points(group="dagster_dg_cli.registry_modules")
    if any(ep.value == "incremental_assets" for ep in found) and _installed_here():
        return ""
    out = tmp_path_factory.mktemp("metadata")
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "egg_info", "--egg-base", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    return str(out)


def _installed_here() -> bool:
    import incremental_assets

    return Path(incremental_assets.__file__).resolve().parent.parent == ROOT


def make_project(path: Path) -> Path:
    """An empty dg project: pyproject.toml, a package whose definitions load its defs folder."""
    name = f"proj_{uuid.uuid4().hex[:8]}"
    (path / name / "defs").mkdir(parents=True)
    (path / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [project]
        name = "{name}"
        version = "0.1.0"

        [tool.dg]
        directory_type = "project"

        [tool.dg.project]
        root_module = "{name}"
        """))
    (path / name / "__init__.py").write_text("")
    (path / name / "defs" / "__init__.py").write_text("")
    (path / name / "definitions.py").write_text(textwrap.dedent("""\
        from pathlib import Path

        import dagster as dg


        @dg.definitions
        def defs():
            return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
        """))
    return path / name


def source_db(path: Path, name="customers", rows=ROWS) -> str:
    url = f"sqlite:///{path}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {name} (id int PRIMARY KEY, name varchar(20), updated_at datetime)"))
        conn.execute(sa.text(f"CREATE INDEX ix_{name}_updated ON {name} (updated_at)"))
        for row in rows:
            conn.execute(sa.text(f"INSERT INTO {name} VALUES (:i, :n, :u)"), {"i": row[0], "n": row[1], "u": row[2]})
    engine.dispose()
    return url


def dg_command(project: Path, registry: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    paths = [str(ROOT), registry, str(project)]
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), **(env or {})}
    full.pop("INCREMENTAL_ASSETS_CONFIG", None)
    return subprocess.run([str(BIN / "dg"), *args], cwd=project, env=full, capture_output=True, text=True, timeout=300)


def load_defs(project_root: Path, monkeypatch) -> dg.Definitions:
    monkeypatch.syspath_prepend(str(project_root))
    return dg.load_from_defs_folder(path_within_project=project_root)


def test_scaffold_check_and_copy_rows(tmp_path, registry_path, monkeypatch):
    package = make_project(tmp_path)
    listed = dg_command(tmp_path, registry_path, "list", "components", "--json")
    assert listed.returncode == 0, listed.stderr
    assert TYPE in [item["key"] for item in __import__("json").loads(listed.stdout)["items"]]

    scaffolded = dg_command(tmp_path, registry_path, "scaffold", "defs", TYPE, "erp")
    assert scaffolded.returncode == 0, scaffolded.stdout + scaffolded.stderr
    defs_yaml = package / "defs" / "erp" / "defs.yaml"
    text = defs_yaml.read_text()
    assert text.startswith("#") and f"type: {TYPE}" in text and "# replica:" in text  # commented, to edit
    assert yaml.safe_load(text)["attributes"]["sources"]["erp"]["url"] == "${ERP_URL}"

    # the scaffolded table (customers, by updated_at) against a real SQLite source
    url = source_db(tmp_path / "erp.db")
    checked = dg_command(tmp_path, registry_path, "check", "defs", env={"ERP_URL": url})
    assert checked.returncode == 0, checked.stdout + checked.stderr
    unset = dg_command(tmp_path, registry_path, "check", "defs")
    assert unset.returncode != 0 and "environment variable ERP_URL is not set" in unset.stdout + unset.stderr

    monkeypatch.setenv("ERP_URL", url)
    defs = load_defs(tmp_path, monkeypatch)
    key = dg.AssetKey(["landing", "customers"])
    assert key in defs.resolve_all_asset_keys()
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("copy_erp").execute_in_process(
            instance=instance, partition_key="2024-01-02", asset_selection=[key])
        assert result.success
        meta = result.asset_materializations_for_node("landing__customers")[0].metadata
    assert meta["dagster/partition_row_count"].value == 3
    files = sorted((package / "defs" / "erp" / "landing" / "customers" / "2024-01-02").glob("*.parquet"))
    assert files, "the landing folder resolves against the defs.yaml's folder"
    landed = pq.read_table(files[0])
    assert sorted(landed.column("id").to_pylist()) == [1, 2, 3]


TRANSLATED = """\
type: incremental_assets.IncrementalCopyComponent
attributes:
  sources:
    crm:
      url: {url}
  landing: {{url: ./landing}}
  replica: {{url: "sqlite:///{replica}"}}
  tables:
    - name: accounts
      source: crm
      table: accounts
      watermark_column: updated_at
      partitions: {{granularity: daily, start: "2024-01-01"}}
  translation:
    key: "crm/{{{{ layer }}}}/{{{{ table.name }}}}"
    group_name: crm_{{{{ layer }}}}
    owners: ["team:sales"]
    kinds: [sqlite]
    tags: {{system: crm}}
    description: "{{{{ table.table }}}} from CRM ({{{{ layer }}}})"
post_processing:
  assets:
    - target: "*"
      attributes:
        tags: {{reviewed: "yes"}}
"""

PLAIN = """\
type: incremental_assets.IncrementalCopyComponent
attributes:
  sources:
    erp:
      url: {url}
  landing: {{url: ./landing}}
  replica: {{url: "sqlite:///{replica}"}}
  tables:
    - name: customers
      source: erp
      table: customers
      watermark_column: updated_at
      primary_key: [id]
      partitions: {{granularity: daily, start: "2024-01-01"}}
"""


def test_translation_and_two_instances(tmp_path, monkeypatch):
    package = make_project(tmp_path)
    for name, body, table in (("crm", TRANSLATED, "accounts"), ("erp", PLAIN, "customers")):
        folder = package / "defs" / name
        folder.mkdir()
        url = source_db(tmp_path / f"{name}.db", name=table)
        (folder / "defs.yaml").write_text(body.format(url=url, replica=tmp_path / f"{name}_replica.db"))
    defs = load_defs(tmp_path, monkeypatch)

    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert keys == {"crm/landing/accounts", "crm/replica/accounts", "landing/customers", "replica/customers"}
    landing = defs.resolve_assets_def(dg.AssetKey(["crm", "landing", "accounts"]))
    spec = next(iter(landing.specs))
    assert spec.group_name == "crm_landing" and spec.owners == ["team:sales"]
    assert spec.tags["system"] == "crm" and spec.tags["reviewed"] == "yes"  # translation, then post_processing
    assert "sqlite" in spec.kinds and spec.description == "accounts from CRM (landing)"
    replica = defs.resolve_assets_def(dg.AssetKey(["crm", "replica", "accounts"]))
    assert dg.AssetKey(["crm", "landing", "accounts"]) in replica.dependency_keys
    plain = next(iter(defs.resolve_assets_def(dg.AssetKey(["landing", "customers"])).specs))
    assert plain.group_name == "landing" and "system" not in plain.tags

    # each instance its own landing and replica resources, sensor and job
    assert {"landing_crm", "landing_erp", "replica_crm", "replica_erp", "source_crm", "source_erp"} <= set(defs.resources)
    assert {s.name for s in defs.sensors} == {"incremental_copy_crm_sensor", "incremental_copy_erp_sensor"}

    # the source's sensor requests the translated keys; a run through them lands and merges (the
    # accounts table declares its key)
    with dg.instance_for_test() as instance:
        sensor = defs.resolve_sensor_def("incremental_copy_crm_sensor")
        with dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs) as context:
            request = sensor.evaluate_tick(context).run_requests[0]
        assert request.job_name == "copy_crm" and request.partition_key == "2024-01-02"
        assert set(request.asset_selection) == {dg.AssetKey(["crm", "landing", "accounts"]),
                                                dg.AssetKey(["crm", "replica", "accounts"])}
        job = defs.resolve_job_def("copy_crm")
        assert set(job.asset_layer.executable_asset_keys) == {dg.AssetKey(["crm", "landing", "accounts"]),
                                                              dg.AssetKey(["crm", "replica", "accounts"])}
        result = job.execute_in_process(instance=instance, partition_key="2024-01-02")
        assert result.success
        merged = instance.fetch_materializations(dg.AssetKey(["crm", "replica", "accounts"]), limit=1).records
    assert merged
    rows = sa.create_engine(f"sqlite:///{tmp_path / 'crm_replica.db'}").connect().execute(
        sa.text("SELECT count(*) FROM accounts")).scalar()
    assert rows == 3
    assert sorted(p.name for p in (package / "defs" / "crm" / "landing" / "accounts").iterdir()) == ["2024-01-02"]


def test_an_attribute_error_names_the_defs_file_the_table_and_the_key(tmp_path, monkeypatch):
    package = make_project(tmp_path)
    folder = package / "defs" / "erp"
    folder.mkdir()
    body = PLAIN.format(url="sqlite:///x.db", replica=tmp_path / "r.db").replace("watermark_column:", "watermark_colum:")
    (folder / "defs.yaml").write_text(body)
    with pytest.raises(Exception) as raised:
        load_defs(tmp_path, monkeypatch)
    text = str(raised.value) + "".join(str(c) for c in (raised.value.__cause__, raised.value.__context__) if c)
    assert str(folder / "defs.yaml") in text
    assert "tables[0] (table 'customers'): key 'watermark_colum': unknown key" in text


def test_the_command_line_reads_a_component_file_without_translation(tmp_path):
    from incremental_assets.config import ConfigError, load_config

    path = tmp_path / "defs.yaml"
    path.write_text(PLAIN.format(url="sqlite:///x.db", replica=tmp_path / "r.db"))
    assert [t.name for t in load_config(path).tables] == ["customers"]
    path.write_text(TRANSLATED.format(url="sqlite:///x.db", replica=tmp_path / "r.db"))
    with pytest.raises(ConfigError, match="key 'translation'"):
        load_config(path)


def test_the_metadata_a_dagster_user_expects(tmp_path, monkeypatch):
    """Each window's row count, the table's name and columns, and figures to plot: the rows not
    copied yet and how far the copy is behind the source's newest row; a freshness policy."""
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0, tzinfo=None)
    rows = [*ROWS, (4, "Dee", now.strftime("%Y-%m-%d %H:%M:%S"))]  # held back by lag_seconds below
    package = make_project(tmp_path)
    folder = package / "defs" / "erp"
    folder.mkdir()
    body = PLAIN.format(url=source_db(tmp_path / "erp.db", rows=rows), replica=tmp_path / "replica.db")
    body = body.replace("      primary_key: [id]\n", "      primary_key: [id]\n      lag_seconds: 3600\n")
    (folder / "defs.yaml").write_text(body + "  freshness: {fail_window_minutes: 1440, warn_window_minutes: 360}\n")
    defs = load_defs(tmp_path, monkeypatch)
    landing_key, replica_key = dg.AssetKey(["landing", "customers"]), dg.AssetKey(["replica", "customers"])
    policy = next(iter(defs.resolve_assets_def(landing_key).specs)).freshness_policy
    assert policy.fail_window.to_timedelta() == dt.timedelta(days=1)
    assert policy.warn_window.to_timedelta() == dt.timedelta(hours=6)

    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("copy_erp").execute_in_process(instance=instance, partition_key="2024-01-02")
        assert result.success
        landing = result.asset_materializations_for_node("landing__customers")[0].metadata
        replica = instance.fetch_materializations(replica_key, limit=1).records[0].asset_materialization.metadata

    assert landing["dagster/partition_row_count"].value == 3
    assert "dagster/row_count" not in landing  # a slice's rows are not the table's
    assert landing["dagster/table_name"].value.endswith("/landing/customers")
    columns = landing["dagster/column_schema"].value.columns
    assert [c.name for c in columns] == ["id", "name", "updated_at"] and "timestamp" in columns[2].type
    assert landing["rows_ahead"].value == 1  # the row the lag holds back
    behind = (now - dt.datetime(2024, 1, 2, 23, 59, 59)).total_seconds()
    assert abs(landing["lag_seconds"].value - behind) < 5
    assert landing["source_newest_watermark"].value.startswith(now.strftime("%Y-%m-%dT%H:%M"))
    assert landing["rows_per_second"].value > 0
    assert landing["frontier"].value == "2024-01-02T23:59:59.000001+00:00"  # watermarks stay text beside them
    assert replica["dagster/row_count"].value == 3  # the replica table's total
    assert replica["dagster/table_name"].value == "customers"
    assert [c.name for c in replica["dagster/column_schema"].value.columns] == ["id", "name", "updated_at"]


def test_windows_before_the_first_row_are_recorded_empty_and_merged(tmp_path, capsys, dagster_home):
    """A healthy table does not look mostly missing: the windows from `start` to the first row are
    recorded as empty by the initial load, on landing and on the replica (merged: no file)."""
    from incremental_assets import cli
    from incremental_assets.config import load_config
    from incremental_assets.defs.landing import landing_tables

    url = source_db(tmp_path / "erp.db")
    config = tmp_path / "config.yaml"
    # the instance's attributes as a standalone file: the same schema
    config.write_text(yaml.safe_dump(yaml.safe_load(PLAIN.format(url=url, replica=tmp_path / "replica.db"))["attributes"]))
    assert cli.main(["--config", str(config), "sync"]) == 0
    out = capsys.readouterr().out
    assert "customers: [2024-01-02] 3 row(s)" in out
    keys = landing_tables(load_config(config))[0].partitions_def.get_partition_keys()
    with dg.DagsterInstance.get() as instance:
        def windows(layer):
            records = instance.fetch_materializations(dg.AssetKey([layer, "customers"]), limit=10_000).records
            return {r.partition_key: {k: v.value for k, v in r.asset_materialization.metadata.items()} for r in records}

        landing, replica = windows("landing"), windows("replica")
    assert landing["2024-01-01"]["empty_window"] is True and landing["2024-01-01"]["dagster/partition_row_count"] == 0
    assert landing["2024-01-02"]["dagster/partition_row_count"] == 3
    assert sorted(landing) == [k for k in keys if k <= "2024-01-02"]
    assert sorted(replica) == sorted(landing) and replica["2024-01-01"]["files_merged"] == 0
    assert cli.main(["--config", str(config), "status"]) == 0
    assert "0 windows pending merge" in capsys.readouterr().out


def test_change_tracking_metadata(sqlite_db, tmp_path, capsys, dagster_home):
    """Change tracking: each window's rows add up across its slices; the columns include the
    change columns; the version lag is a number."""
    from incremental_assets import cli

    sqlite_db.run("CREATE TABLE people (id int NOT NULL PRIMARY KEY, name varchar(20))",
                  "INSERT INTO people VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "sources": {"src": {"url": sqlite_db.url}}, "landing": {"url": str(tmp_path / "landing")},
        "tables": [{"name": "people", "source": "src", "table": "people", "mode": "change_tracking"}],
    }))
    assert cli.main(["--config", str(config), "enable-change-tracking", "--table", "people"]) == 0
    assert cli.main(["--config", str(config), "sync"]) == 0
    sqlite_db.run("INSERT INTO people VALUES (4, 'd')")
    assert cli.main(["--config", str(config), "sync"]) == 0
    assert "people: [" in capsys.readouterr().out
    with dg.DagsterInstance.get() as instance:
        records = instance.fetch_materializations(dg.AssetKey(["landing", "people"]), limit=10).records
    last, first = ({k: v.value for k, v in r.asset_materialization.metadata.items()} for r in records[:2])
    assert (first["rows_copied"], first["dagster/partition_row_count"]) == (3, 3)
    assert (last["rows_copied"], last["dagster/partition_row_count"]) == (1, 4)  # the same window: 3 + 1
    assert [c.name for c in last["dagster/column_schema"].columns][-2:] == ["SYS_CHANGE_VERSION", "SYS_CHANGE_OPERATION"]
    assert last["watermark_lag"] == 0


def test_a_translation_giving_two_assets_one_key_is_refused(tmp_path):
    from incremental_assets import IncrementalCopyComponent
    from incremental_assets.config import ConfigError

    tables = [{"name": n, "source": "erp", "table": n, "watermark_column": "updated_at"} for n in ("a", "b")]
    component = IncrementalCopyComponent(sources={"erp": {"url": f"sqlite:///{tmp_path / 'x.db'}"}}, tables=tables,
                                         translation=lambda spec, data: spec.replace_attributes(key=["erp", "same"]))
    with pytest.raises(ConfigError, match="asset key 'erp/same' is given to the landing of table 'b' and to the "
                                          "landing of table 'a'"):
        dg.build_defs_for_component(component)
