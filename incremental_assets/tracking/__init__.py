"""Change tracking (no Dagster here): SQL Server's own, or an equivalent installed elsewhere.

``ChangeReader(source, table).read(last_version)`` gives a :class:`ChangeSet`: a full copy on the
first run or when ``last_version`` is no longer valid, else the net changes per primary key since
it, with ``SYS_CHANGE_VERSION`` and ``SYS_CHANGE_OPERATION`` (I/U/D), read in one snapshot.
See ``base.py`` for what versions mean, and each engine module for how they are made.
"""

from .base import (
    SYS_CHANGE_OPERATION,
    SYS_CHANGE_VERSION,
    ChangeReader,
    ChangeSet,
    ChangeTrackingError,
    change_tracking_status,
    cleanup_change_tracking,
    disable_change_tracking,
    enable_change_tracking,
)

__all__ = [
    "SYS_CHANGE_OPERATION",
    "SYS_CHANGE_VERSION",
    "ChangeReader",
    "ChangeSet",
    "ChangeTrackingError",
    "change_tracking_status",
    "cleanup_change_tracking",
    "disable_change_tracking",
    "enable_change_tracking",
]
