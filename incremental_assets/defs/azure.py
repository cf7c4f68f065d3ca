"""Azure Blob landing through dagster-azure's AzureBlobStorageResource (imported only when used)."""

from collections.abc import Mapping

import dagster as dg
from dagster_azure.blob import (
    AzureBlobStorageDefaultCredential,
    AzureBlobStorageKeyCredential,
    AzureBlobStorageResource,
    AzureBlobStorageSASTokenCredential,
)

from .resources import LandingResource


class AzureLandingResource(LandingResource):
    """The landing store in Azure Blob Storage, authenticated by dagster-azure's resource: an
    account URL with a key, a SAS token or DefaultAzureCredential."""

    azure: AzureBlobStorageResource

    def _service_client(self, url: str):
        return self._clients.enter_context(self.azure.get_client()) if url.startswith("azure://") else None


def azure_blob_resource(env: Mapping[str, str]) -> AzureBlobStorageResource | None:
    """dagster-azure's resource for ``AZURE_STORAGE_ACCOUNT_URL`` (or ``AZURE_STORAGE_ACCOUNT``)
    with ``AZURE_STORAGE_KEY``, ``AZURE_STORAGE_SAS_TOKEN`` or DefaultAzureCredential; None where a
    connection string is given (the resource takes none: azure-storage-blob reads it directly)."""
    if env.get("AZURE_STORAGE_CONNECTION_STRING"):
        return None
    if env.get("AZURE_STORAGE_ACCOUNT_URL"):
        account_url: str = dg.EnvVar("AZURE_STORAGE_ACCOUNT_URL")
    elif env.get("AZURE_STORAGE_ACCOUNT"):
        account_url = f"https://{env['AZURE_STORAGE_ACCOUNT']}.blob.core.windows.net"
    else:
        return None
    credential: AzureBlobStorageKeyCredential | AzureBlobStorageSASTokenCredential | AzureBlobStorageDefaultCredential
    if env.get("AZURE_STORAGE_KEY"):
        credential = AzureBlobStorageKeyCredential(key=dg.EnvVar("AZURE_STORAGE_KEY"))
    elif env.get("AZURE_STORAGE_SAS_TOKEN"):
        credential = AzureBlobStorageSASTokenCredential(token=dg.EnvVar("AZURE_STORAGE_SAS_TOKEN"))
    else:
        credential = AzureBlobStorageDefaultCredential()
    return AzureBlobStorageResource(account_url=account_url, credential=credential)
