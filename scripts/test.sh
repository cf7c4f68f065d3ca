#!/usr/bin/env bash
# Install the project with its test extras and Azurite (npm), then run the tests against real
# SQLite, PostgreSQL (127.0.0.1:5432), MariaDB (127.0.0.1:3306) and Azurite. Extra arguments go to pytest.
# mysqlclient (the faster MySQL/MariaDB driver) builds where the client headers are installed;
# without them its tests are skipped with the reason
EXTRAS="[dev]"
if command -v pkg-config >/dev/null && { pkg-config --exists mysqlclient || pkg-config --exists mariadb; }; then
  EXTRAS="[dev,mysqlclient]"
fi
EXTRAS="$EXTRAS" source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
if [ ! -x node_modules/.bin/azurite-blob ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
export DAGSTER_HOME="$(mktemp -d)"  # tests never touch the project's own instance
exec .venv/bin/python -m pytest "$@"
