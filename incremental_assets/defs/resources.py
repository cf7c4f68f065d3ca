"""Dagster resources wrapping the engine's source and landing store.

URLs are kept as written in the configuration (``${VAR}`` unexpanded, or an ``EnvVar``) and
expanded only when used, so the UI's resource view never shows a password.
"""

from __future__ import annotations

from contextlib import ExitStack

import dagster as dg
from pydantic import PrivateAttr

from ..config import expand, resolve_local
from ..landing import LandingStore, open_landing_store
from ..replica import Replica
from ..sources import Source


#: the Source of each source's settings in this process (see SourceResource.get)
_SOURCES: dict[tuple, Source] = {}


def dispose_sources() -> None:
    """Close the connections of every Source this process shares (see SourceResource.get)."""
    for source in _SOURCES.values():
        source.dispose()


class SourceResource(dg.ConfigurableResource):
    """One source database."""

    name: str
    url: str
    retries: int = 3
    retry_delay_seconds: float = 1.0
    horizon_wait_seconds: float = 30.0

    _source: Source | None = PrivateAttr(default=None)

    def get(self) -> Source:
        if self._source is None:
            url = expand(_value(self.url), where=f"source {self.name!r}: key 'url'")
            settings = (self.name, url, self.retries, self.retry_delay_seconds, self.horizon_wait_seconds)
            # one Source per process and settings: a run in the CLI's process (or a sensor's next
            # tick) finds the engine, its cached reflection and ADBC's type catalogue ready
            source = _SOURCES.get(settings)
            if source is None:
                source = _SOURCES[settings] = Source(
                    self.name, url, retries=self.retries, retry_delay=self.retry_delay_seconds,
                    horizon_wait=self.horizon_wait_seconds,
                )
            self._source = source
        return self._source

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._source is not None:
            self._source.dispose()


class LandingResource(dg.ConfigurableResource):
    """The landing store: a local folder or ``azure://container/prefix``.

    Azure credentials come from the environment: ``AZURE_STORAGE_CONNECTION_STRING``, or
    ``AZURE_STORAGE_ACCOUNT_URL`` / ``AZURE_STORAGE_ACCOUNT`` with ``AZURE_STORAGE_KEY``,
    ``AZURE_STORAGE_SAS_TOKEN`` or ``DefaultAzureCredential``.
    """

    url: str
    format: str = "parquet"
    max_rows_per_file: int | None = 1_000_000
    #: relative folder paths resolve against this folder (the configuration file's)
    base_dir: str | None = None

    _store: LandingStore | None = PrivateAttr(default=None)
    _clients: ExitStack = PrivateAttr(default_factory=ExitStack)

    def get(self) -> LandingStore:
        if self._store is None:
            url = resolve_local(expand(_value(self.url), where="landing: key 'url'"), self.base_dir)
            self._store = open_landing_store(url, self.format, service_client=self._service_client(url))
        return self._store

    def _service_client(self, url: str):
        """An Azure BlobServiceClient from a dagster-azure resource (see AzureLandingResource)."""
        return None

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self._clients.close()


class ReplicaResource(dg.ConfigurableResource):
    """The SQL replica database (URL kept as written; expanded when used)."""

    url: str
    schema_name: str | None = None
    retries: int = 3
    retry_delay_seconds: float = 1.0

    _replica: Replica | None = PrivateAttr(default=None)

    def get(self) -> Replica:
        if self._replica is None:
            self._replica = Replica(
                expand(_value(self.url), where="replica: key 'url'"),
                schema=self.schema_name,
                retries=self.retries,
                retry_delay=self.retry_delay_seconds,
            )
        return self._replica

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._replica is not None and self._replica.engine is not None:
            self._replica.engine.dispose()


def _value(field: str) -> str:
    """A field's value, also when the resource is used outside a run (the CLI plans with it)."""
    return field.get_value() or "" if isinstance(field, dg.EnvVar) else field


def source_resource_key(source_name: str) -> str:
    return "source_" + "".join(ch if ch.isalnum() else "_" for ch in source_name)
