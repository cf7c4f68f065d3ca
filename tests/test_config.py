"""Configuration: what a user writes, and the errors they get when it is wrong."""

from __future__ import annotations

import pytest

from incremental_assets.config import ConfigError, expand, load_config, parse_config

GOOD = """
sources:
  erp: {url: "postgresql+psycopg://u:${ERP_PASSWORD}@h/db"}
landing: {url: ./landing}
tables:
  - name: customers
    source: erp
    table: sales.Customer
    mode: watermark
    watermark_column: LastModified
"""


def test_defaults_and_env_expansion(monkeypatch, tmp_path):
    monkeypatch.setenv("ERP_PASSWORD", "pw")
    path = tmp_path / "c.yaml"
    path.write_text(GOOD)
    config = load_config(path)
    table = config.table("customers")
    assert table.partitions.granularity == "daily" and table.null_watermark == "fail"
    assert config.landing.format == "parquet"
    # kept unexpanded (no secret in Dagster's resource config), expanded when used
    assert "${ERP_PASSWORD}" in config.sources["erp"].url
    assert expand(config.sources["erp"].url) == "postgresql+psycopg://u:pw@h/db"
    assert expand("${NOPE:-fallback}") == "fallback"


@pytest.mark.parametrize(
    "change, expected",
    [
        (("watermark_column: LastModified", "watermark_colum: LastModified"),
         ["c.yaml", "table 'customers'", "'watermark_colum'", "unknown key"]),
        (("source: erp\n    table", "source: crm\n    table"), ["table 'customers'", "'source'", "unknown source 'crm'"]),
        (("mode: watermark", "mode: magic"), ["table 'customers'", "'mode'"]),
        (("name: customers", "name: 'bad name/../x'"), ["'name'", "letters, digits"]),
        (("landing: {url: ./landing}", "landing: {url: ./landing, format: xml}"), ["c.yaml", "'landing.format'", "'parquet' or 'csv'"]),
        (("    watermark_column: LastModified", "    watermark_column: LastModified\n    watermark_timezone: Mars/Olympus"),
         ["'watermark_timezone'", "unknown time zone"]),
        (("    watermark_column: LastModified", ""), ["table 'customers'", "'watermark_column'", "required with mode: watermark"]),
    ],
)
def test_invalid_configuration_names_file_table_and_key(tmp_path, monkeypatch, change, expected):
    monkeypatch.setenv("ERP_PASSWORD", "pw")
    path = tmp_path / "c.yaml"
    path.write_text(GOOD.replace(*change))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    for fragment in expected:
        assert fragment in str(info.value)


def test_missing_environment_variable_is_named_not_guessed(tmp_path, monkeypatch):
    monkeypatch.delenv("ERP_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="source 'erp': key 'url': environment variable ERP_PASSWORD is not set"):
        parse_config(GOOD, tmp_path / "c.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config("sources: [", "x.yaml")
