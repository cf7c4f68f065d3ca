#!/usr/bin/env bash
# Install and start Dagster on the configuration (the embedded demo unless INCREMENTAL_ASSETS_CONFIG
# is set), with the sensors running: open http://127.0.0.1:3000
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec .venv/bin/dagster dev -w workspace.yaml -h "${DAGSTER_HOST:-127.0.0.1}" -p "${DAGSTER_PORT:-3000}"
