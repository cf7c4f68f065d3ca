"""Which process owns a run or a temporary file, and whether that process still lives.

An owner is written as ``<host><boot>-<pid>-<start>``: a hash of the host name, a hash of the
host's boot, the process id and the process's start time (clock ticks since boot, from
``/proc``). A process id alone is not enough: after a crash the id may be given to another
process. Only owners on this host can be judged; the others are left alone.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket

__all__ = ["current_owner", "owner_alive", "describe_owner", "OWNER_PATTERN"]

#: an owner as it appears in a file name or a run tag
OWNER_PATTERN = r"[0-9a-f]{16}-\d+-\d*"
_OWNER = re.compile(rf"^({OWNER_PATTERN})$")


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _host() -> str:
    return _hash(socket.gethostname())


def _boot() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return _hash(f.read().strip())
    except OSError:
        return "0" * 8  # unknown: process ids are then checked without their start time


def _start_and_state(pid: int) -> tuple[str, str] | None:
    """The start time (clock ticks since boot) and state letter of a process, from ``/proc``;
    None when the process does not exist, ("", "") where ``/proc`` is not available."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except FileNotFoundError:
        return None
    except OSError:
        return ("", "")
    fields = stat[stat.rfind(")") + 2:].split()  # the name in parentheses may hold spaces
    return (fields[19], fields[0]) if len(fields) > 19 else ("", "")


_current: tuple[int, str] | None = None


def current_owner() -> str:
    """This process as an owner (computed once per process: a forked child gets its own)."""
    global _current
    pid = os.getpid()
    if _current is None or _current[0] != pid:
        found = _start_and_state(pid) if os.path.isdir("/proc") else ("", "")
        start = found[0] if found else ""
        _current = (pid, f"{_host()}{_boot()}-{pid}-{start}")
    return _current[1]


def owner_alive(owner: str | None) -> bool | None:
    """True when the owner process runs, False when it is gone (or a zombie), None when this
    cannot be told from here (another host, or not an owner)."""
    match = _OWNER.match(owner or "")
    if not match:
        return None
    host, rest = owner[:16], owner[17:]
    if host[:8] != _host():
        return None
    pid_text, start = rest.split("-", 1)
    pid = int(pid_text)
    if host[8:] != _boot() and host[8:] != "0" * 8:
        return False  # the host restarted since
    if pid == os.getpid():
        return owner == current_owner()
    if os.path.isdir("/proc"):
        found = _start_and_state(pid)
        if found is None:
            return False
        found_start, state = found
        if state in ("Z", "X"):
            return False
        if start and found_start and found_start != start:
            return False  # the id now belongs to another process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_owner(owner: str | None) -> str:
    """The owner for a message: its process id, and whether it runs on this host."""
    match = _OWNER.match(owner or "")
    if not match:
        return "no process recorded yet" if not owner else "an unknown process"
    pid = owner[17:].split("-", 1)[0]
    here = owner[:8] == _host()
    return f"process {pid}" + (" on this host" if here else " on another host")
