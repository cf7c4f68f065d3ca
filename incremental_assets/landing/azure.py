"""Landing store in an Azure Blob Storage container (or Azurite)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
)
from azure.storage.blob import BlobServiceClient, ContainerClient, ContentSettings

from .base import (
    TEMP_SUFFIX,
    LandingError,
    LandingStore,
    is_data_file_name,
    new_temp_token,
    redact,
    validate_relative_path,
    validate_segment,
)
from .formats import read_table

__all__ = [
    "AzureLandingStore",
    "blob_service_client_from_env",
    "container_client_from_env",
]

_CONTENT_TYPES = {
    "parquet": "application/vnd.apache.parquet",
    "csv": "text/csv; charset=utf-8",
}

_NO_ACCOUNT = (
    "no Azure storage account configured: set AZURE_STORAGE_CONNECTION_STRING, or "
    "AZURE_STORAGE_ACCOUNT_URL (or AZURE_STORAGE_ACCOUNT) with AZURE_STORAGE_KEY, "
    "AZURE_STORAGE_SAS_TOKEN or an Azure identity (DefaultAzureCredential)"
)


# --------------------------------------------------------------------------- clients


def blob_service_client_from_env(
    env: Mapping[str, str] | None = None, **client_kwargs: Any
) -> BlobServiceClient:
    """Build a BlobServiceClient from environment variables.

    ``AZURE_STORAGE_CONNECTION_STRING``; else ``AZURE_STORAGE_ACCOUNT_URL`` (or
    ``AZURE_STORAGE_ACCOUNT`` -> ``https://<name>.blob.core.windows.net``) with
    ``AZURE_STORAGE_KEY``, or ``AZURE_STORAGE_SAS_TOKEN``, or
    ``azure.identity.DefaultAzureCredential``. ``client_kwargs`` go to the client
    (e.g. ``retry_total``, ``connection_timeout``).
    """
    env = os.environ if env is None else env
    conn = (env.get("AZURE_STORAGE_CONNECTION_STRING") or "").strip()
    if conn:
        try:
            return BlobServiceClient.from_connection_string(conn, **client_kwargs)
        except (ValueError, TypeError, KeyError):
            raise LandingError(
                "AZURE_STORAGE_CONNECTION_STRING is malformed (its value is not shown)"
            ) from None

    account = (env.get("AZURE_STORAGE_ACCOUNT") or "").strip()
    url = (env.get("AZURE_STORAGE_ACCOUNT_URL") or "").strip()
    if not url and account:
        url = f"https://{account}.blob.core.windows.net"
    if not url:
        raise LandingError(_NO_ACCOUNT)

    key = (env.get("AZURE_STORAGE_KEY") or "").strip()
    sas = (env.get("AZURE_STORAGE_SAS_TOKEN") or "").strip()
    credential: Any
    if key:
        if account:
            from azure.core.credentials import AzureNamedKeyCredential

            credential = AzureNamedKeyCredential(account, key)
        else:
            credential = key  # the SDK takes the account name from the URL
    elif sas:
        from azure.core.credentials import AzureSasCredential

        credential = AzureSasCredential(sas.lstrip("?"))
    elif "sig=" in urlsplit(url).query:
        credential = None  # a SAS URL carries its own credential
    else:
        try:
            from azure.identity import DefaultAzureCredential
        except ImportError:  # pragma: no cover - azure-identity is a dependency
            raise LandingError(_NO_ACCOUNT + " (azure-identity is not installed)") from None
        credential = DefaultAzureCredential()
    try:
        return BlobServiceClient(url, credential=credential, **client_kwargs)
    except ValueError as exc:
        raise LandingError(f"invalid Azure storage account URL: {redact(str(exc))}") from None


def container_client_from_env(
    container: str,
    env: Mapping[str, str] | None = None,
    *,
    service_client: BlobServiceClient | None = None,
    **client_kwargs: Any,
) -> ContainerClient:
    """A ContainerClient for ``container``.

    Uses ``service_client`` when given (e.g. from dagster-azure's
    ``AzureBlobStorageResource.get_client()``), else builds one from ``env``.
    """
    if not container:
        raise ValueError("an Azure container name is required")
    if service_client is None:
        service_client = blob_service_client_from_env(env, **client_kwargs)
    return service_client.get_container_client(container)


# --------------------------------------------------------------------------- store


def _strip_query(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class AzureLandingStore(LandingStore):
    """Blobs ``<prefix>/<table>/<partition>/<stem>.<ext>`` in one container.

    Each file is written to a local temp file (bounded memory), then uploaded with
    ``overwrite=True``: a single Put Blob, or staged blocks committed at the end, so
    no reader ever sees a partial blob. Transient errors are retried by the SDK's
    retry policy; a missing container or a refused credential fail at once with a
    clear message that never contains a secret.
    """

    def __init__(
        self,
        container_client: ContainerClient,
        prefix: str = "",
        format: str = "parquet",
        *,
        tmp_dir: str | os.PathLike[str] | None = None,
        max_concurrency: int = 4,
    ) -> None:
        super().__init__(format)
        if isinstance(container_client, BlobServiceClient):
            raise TypeError(
                "AzureLandingStore needs a ContainerClient; use "
                "container_client_from_env(container, service_client=...)"
            )
        self.container_client = container_client
        self.container = container_client.container_name
        prefix = (prefix or "").strip("/")
        if prefix:
            validate_relative_path(prefix)
        self.prefix = prefix
        self.tmp_dir = os.fspath(tmp_dir) if tmp_dir is not None else None
        self.max_concurrency = max_concurrency

    # ---- naming -----------------------------------------------------------------------

    def _blob_name(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def _relative(self, blob_name: str) -> str | None:
        if not self.prefix:
            return blob_name
        head = self.prefix + "/"
        return blob_name[len(head):] if blob_name.startswith(head) else None

    def uri_for(self, path: str) -> str:
        return f"azure://{self.container}/{self._blob_name(path)}"

    def describe(self) -> str:
        location = f"azure://{self.container}" + (f"/{self.prefix}" if self.prefix else "")
        try:
            endpoint = _strip_query(self.container_client.primary_endpoint)
        except Exception:  # pragma: no cover - defensive
            endpoint = ""
        return f"{location} ({endpoint})" if endpoint else location

    # ---- errors -----------------------------------------------------------------------

    @contextmanager
    def _azure_errors(self, action: str, table: str | None = None, path: str | None = None) -> Iterator[None]:
        try:
            yield
        except LandingError:
            raise
        except AzureError as exc:
            raise self._translate(exc, action, table, path) from None

    def _translate(self, exc: AzureError, action: str, table: str | None, path: str | None) -> LandingError:
        status = getattr(exc, "status_code", None)
        code = getattr(exc, "error_code", None)
        if code is None:
            response = getattr(exc, "response", None)
            headers = getattr(response, "headers", None) or {}
            code = headers.get("x-ms-error-code")
        code = getattr(code, "value", code)  # StorageErrorCode enum -> its text
        store = self.describe()
        if code == "ContainerNotFound" or (
            isinstance(exc, ResourceNotFoundError) and code is None and path is None
        ):
            return LandingError(
                f"{action} failed: Azure container {self.container!r} does not exist; "
                f"it must be created first (e.g. `az storage container create --name {self.container}`)",
                store=store,
                table=table,
                path=path,
            )
        if isinstance(exc, ResourceNotFoundError):
            return LandingError(
                f"{action} failed: not found (HTTP {status}, {code})", store=store, table=table, path=path
            )
        if isinstance(exc, ClientAuthenticationError) or status in (401, 403):
            return LandingError(
                f"{action} failed: Azure refused the credentials or their permissions "
                f"(HTTP {status}, {code or type(exc).__name__}); check the account key, SAS token "
                "or identity and its role on the container (the credential is not shown)",
                store=store,
                table=table,
                path=path,
            )
        first_line = (str(exc.message if hasattr(exc, "message") else exc) or "").strip().splitlines()
        detail = redact(first_line[0]) if first_line else type(exc).__name__
        extra = f" (HTTP {status}, {code})" if isinstance(exc, HttpResponseError) else ""
        return LandingError(
            f"{action} failed{extra}: {type(exc).__name__}: {detail}", store=store, table=table, path=path
        )

    # ---- public -----------------------------------------------------------------------

    def check_writable(self) -> None:
        """Upload and delete a hidden probe blob (proves the container exists and accepts writes)."""
        probe = self._blob_name(f".write-check-{new_temp_token()}{TEMP_SUFFIX}")
        with self._azure_errors("write check"):
            self.container_client.upload_blob(probe, b"", overwrite=True)
        try:
            self.container_client.delete_blob(probe)
        except AzureError:
            pass  # hidden and harmless; delete permission is checked when it is needed

    def list_files(self, table: str, partition: str | None = None) -> list[str]:
        return sorted(self.file_versions(table, partition))

    def file_versions(self, table: str, partition: str | None = None) -> dict[str, str]:
        validate_segment(table, "table")
        if partition is not None:
            validate_segment(partition, "partition")
        start = self._blob_name(table) + "/" + (f"{partition}/" if partition is not None else "")
        out: dict[str, str] = {}
        with self._azure_errors("listing files", table=table):
            for blob in self.container_client.list_blobs(name_starts_with=start):
                rel = self._relative(blob.name)
                if rel is None:
                    continue
                parts = rel.split("/")
                if len(parts) != 3 or parts[1].startswith("."):
                    continue
                if is_data_file_name(parts[2]):
                    out[rel] = (blob.etag or "").strip('"')
        return dict(sorted(out.items()))

    def delete(self, paths: Iterable[str]) -> None:
        if isinstance(paths, str):
            paths = [paths]
        for path in paths:
            validate_relative_path(path)
            with self._azure_errors("deleting file", table=path.split("/", 1)[0], path=path):
                try:
                    self.container_client.delete_blob(self._blob_name(path))
                except ResourceNotFoundError as exc:
                    if getattr(exc, "error_code", None) == "ContainerNotFound":
                        raise
                    # already gone: delete is idempotent

    # ---- primitives -------------------------------------------------------------------

    def _new_temp(self, table: str, folder: str, stem: str, token: str, index: int) -> Any:
        fd, temp = tempfile.mkstemp(prefix=f"landing-{token}-{index}-", suffix=TEMP_SUFFIX, dir=self.tmp_dir)
        return temp, os.fdopen(fd, "wb")

    def _temps(self, table: str):
        # "landing-<token>-<index>-<random>.tmp" in the local scratch folder, whatever their table:
        # a dead writer's are of no use to any
        folder = self.tmp_dir or tempfile.gettempdir()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            name = entry.name
            if not (name.startswith("landing-") and name.endswith(TEMP_SUFFIX)):
                continue
            pieces = name[len("landing-"): -len(TEMP_SUFFIX)].rsplit("-", 2)
            if len(pieces) != 3:
                continue
            try:
                mtime = entry.stat().st_mtime
            except OSError:
                continue
            yield entry.path, pieces[0], mtime

    def _sync(self, fileobj: Any) -> None:
        fileobj.flush()  # a local scratch file: durability comes from the upload

    def _sync_temp(self, temp: Any, table: str, folder: str) -> None:
        pass  # as _sync

    def _publish(self, temp: Any, path: str, table: str, rows: int) -> None:
        try:
            size = os.path.getsize(temp)
            with open(temp, "rb") as data, self._azure_errors("uploading file", table=table, path=path):
                self.container_client.upload_blob(
                    self._blob_name(path),
                    data,
                    length=size,
                    overwrite=True,
                    max_concurrency=self.max_concurrency,
                    content_settings=ContentSettings(content_type=_CONTENT_TYPES[self.format]),
                    metadata={"rows": str(rows)},
                )
        finally:
            self._discard_temp(temp)

    def _discard_temp(self, temp: Any) -> None:
        try:
            os.remove(temp)
        except OSError:
            pass

    def _read(self, path: str, fmt: str, schema: pa.Schema | None) -> pa.Table:
        table = path.split("/", 1)[0]
        with self._azure_errors("reading file", table=table, path=path):
            data = self.container_client.download_blob(self._blob_name(path)).readall()
        try:
            return read_table(pa.BufferReader(data), fmt, schema)
        except (pa.ArrowException, ValueError) as exc:
            raise LandingError(
                f"cannot read file: {exc}", store=self.describe(), table=table, path=path
            ) from exc
