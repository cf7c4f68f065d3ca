"""Landing stores: where copied slices land as Parquet/CSV files (local folder or Azure Blob).

Dagster-free: the engine and the CLI use it directly; the Dagster layer wraps it.
"""

from .base import LandedFile, LandingError, LandingStore, StagedSlice, open_landing_store, redact
from .formats import FORMATS, SliceWriter, make_writer, read_table
from .local import LocalLandingStore

__all__ = [
    "FORMATS",
    "AzureLandingStore",
    "LandedFile",
    "LandingError",
    "LandingStore",
    "LocalLandingStore",
    "SliceWriter",
    "StagedSlice",
    "blob_service_client_from_env",
    "container_client_from_env",
    "make_writer",
    "open_landing_store",
    "read_table",
    "redact",
]


def __getattr__(name: str):
    # azure-storage-blob is imported only when an Azure store is used
    if name in ("AzureLandingStore", "blob_service_client_from_env", "container_client_from_env"):
        from . import azure

        return getattr(azure, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
