"""SQL replicas kept equal to the source by merging landed slices (no Dagster here).

One module per engine (``sqlite``, ``postgresql``, ``mysql``, ``mssql``); see :mod:`.base`.
"""

from .base import MergeResult, Replica, ReplicaError, ReplicaUnavailable, reconcile_source

__all__ = ["MergeResult", "Replica", "ReplicaError", "ReplicaUnavailable", "reconcile_source"]
