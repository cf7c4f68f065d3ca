# Sourced by the scripts: a virtualenv in .venv with the project installed (editable).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet -e ".${EXTRAS:-}"
# Freshly written files sit in the page cache in large folios, and a process that maps such a
# library (pyarrow's is 60 MB) is charged whole folios of it: peak RSS reads ~40 MB higher than
# once the files have been read back from disk. Evict the installed libraries so they are mapped
# as any library read from disk is (their pages are shared either way; nothing else changes).
# Only libraries written since the last eviction: the others are read from disk already.
.venv/bin/python - <<'PY'
import os, pathlib
marker = pathlib.Path(".venv/.libraries-evicted")
since = marker.stat().st_mtime if marker.exists() else 0
for path in pathlib.Path(".venv").rglob("*.so*"):
    if path.is_file() and not path.is_symlink() and path.stat().st_mtime > since:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
marker.touch()
PY
export DAGSTER_HOME="${DAGSTER_HOME:-$ROOT/dagster_home}"
mkdir -p "$DAGSTER_HOME"
[ -f "$DAGSTER_HOME/dagster.yaml" ] || cp "$ROOT/dagster_home/dagster.yaml" "$DAGSTER_HOME/dagster.yaml"
