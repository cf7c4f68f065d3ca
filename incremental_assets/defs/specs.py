"""The attributes of each table's assets (key, group, kinds, description, metadata, freshness
policy) as ``AssetSpec`` objects, and a component's translation of them.

The assets are built from these specs, so a translation that changes a key changes it everywhere
the key is used: the replica's dependency, the copy jobs, the sensor's run requests.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Any

import dagster as dg

from ..config import ConfigError, ProjectConfig, TableConfig
from .landing import LandingTable
from .replica import ReplicaTable

#: the ``kinds`` shown on an asset are tags with this prefix in an AssetSpec
KIND_TAG = "dagster/kind/"


def freshness_policy(config: ProjectConfig, table: TableConfig) -> dg.FreshnessPolicy | None:
    """The table's freshness policy (``freshness:``), or None when none is configured."""
    chosen = config.freshness_of(table)
    if chosen is None:
        return None
    warn = None if chosen.warn_window_minutes is None else dt.timedelta(minutes=chosen.warn_window_minutes)
    return dg.FreshnessPolicy.time_window(fail_window=dt.timedelta(minutes=chosen.fail_window_minutes),
                                          warn_window=warn)


def landing_spec(table: LandingTable, config: ProjectConfig) -> dg.AssetSpec:
    """``landing/<table>`` as the configuration describes it."""
    tc = table.config
    kinds = {"sql", config.landing.format}
    if config.landing.url.startswith("azure://"):
        kinds.add("azure")
    return dg.AssetSpec(
        key=dg.AssetKey(["landing", tc.name]),
        group_name="landing",
        kinds=kinds,
        description=tc.description
        or (f"Table `{tc.table}` of source `{tc.source}`, copied by change tracking (net inserts, updates, deletes)."
            if tc.mode == "change_tracking" else
            f"Table `{tc.table}` of source `{tc.source}`, copied incrementally by `{tc.watermark_column}`."),
        metadata={
            "source": tc.source,
            "source_table": tc.table,
            "watermark_column": tc.watermark_column or "(change tracking)",
        },
        freshness_policy=freshness_policy(config, tc),
    )


def replica_spec(table: ReplicaTable, config: ProjectConfig) -> dg.AssetSpec:
    """``replica/<table>`` as the configuration describes it."""
    tc = table.landing.config
    return dg.AssetSpec(
        key=dg.AssetKey(["replica", tc.name]),
        deps=[table.landing.key],
        group_name="replica",
        kinds={"sql"},
        description=f"`{tc.table}` kept equal to the source in replica table `{table.target}`: landed slices "
        f"merged by key, last writer wins by `{tc.watermark_column or 'SYS_CHANGE_VERSION'}`.",
        metadata={"replica_table": table.target},
        freshness_policy=freshness_policy(config, tc),
    )


def asset_attributes(spec: dg.AssetSpec) -> dict[str, Any]:
    """The keyword arguments of ``@dg.asset`` that carry ``spec``'s attributes."""
    tags = {k: v for k, v in (spec.tags or {}).items() if not k.startswith(KIND_TAG)}
    return {
        "key": spec.key,
        "deps": list(spec.deps) or None,
        "group_name": spec.group_name,
        "kinds": set(spec.kinds) or None,
        "description": spec.description,
        "metadata": dict(spec.metadata or {}),
        "tags": tags or None,
        "owners": list(spec.owners) or None,
        "code_version": spec.code_version,
        "automation_condition": spec.automation_condition,
        "freshness_policy": spec.freshness_policy,
    }


@dataclasses.dataclass(frozen=True)
class TableAsset:
    """What a translation sees of one asset: ``table`` (the table's configuration: ``name``,
    ``source``, ``table``, ``mode``, ``watermark_column``, ...) and ``layer`` (``landing`` or
    ``replica``)."""

    table: TableConfig
    layer: str


Translate = Callable[[dg.AssetSpec, TableAsset], dg.AssetSpec]


def translated(config: ProjectConfig, tables: list[LandingTable], replicas: list[ReplicaTable],
               translate: Translate | None, *, landing_key: str = "landing",
               replica_key: str = "replica") -> tuple[list[LandingTable], list[ReplicaTable]]:
    """The tables and replica tables with their specs as ``translate`` makes them (the defaults
    without one), and the resource keys of their landing store and replica."""
    translate = translate or (lambda spec, _: spec)
    keys: dict[dg.AssetKey, str] = {}

    def checked(spec: dg.AssetSpec, name: str, layer: str) -> dg.AssetSpec:
        other = keys.setdefault(spec.key, f"{layer} of table {name!r}")
        if other != f"{layer} of table {name!r}":
            raise ConfigError(
                f"{config.path}: key 'translation': asset key {spec.key.to_user_string()!r} is given to the "
                f"{layer} of table {name!r} and to the {other}; asset keys must be unique "
                "(use {{ table.name }} and {{ layer }} in the key)"
            )
        return spec

    out = []
    replica_keys: dict[str, dg.AssetKey] = {}
    for table in tables:
        table = dataclasses.replace(table, landing_key=landing_key)
        spec = checked(translate(landing_spec(table, config), TableAsset(table.config, "landing")),
                       table.config.name, "landing")
        out.append(dataclasses.replace(table, spec=spec))
    landed = {t.config.name: t for t in out}
    final = []
    for rt in replicas:
        landing = landed[rt.landing.config.name]
        rt = dataclasses.replace(rt, landing=landing, replica_key=replica_key)
        spec = translate(replica_spec(rt, config), TableAsset(landing.config, "replica"))
        # the replica merges what its own table landed, whatever the translation says
        spec = checked(spec.replace_attributes(deps=[landing.key]), landing.config.name, "replica")
        replica_keys[landing.config.name] = spec.key
        final.append(spec)
    out = [dataclasses.replace(t, replica_asset_key=replica_keys.get(t.config.name)) for t in out]
    landed = {t.config.name: t for t in out}
    replicas_out = [dataclasses.replace(rt, landing=landed[rt.landing.config.name], replica_key=replica_key, spec=spec)
                    for rt, spec in zip(replicas, final)]
    return out, replicas_out
