#!/usr/bin/env bash
# Install and start Dagster (`dg dev`: the UI and the daemon, sensors running) on the configuration:
# the embedded demo unless INCREMENTAL_ASSETS_CONFIG names a file. Open http://127.0.0.1:3000;
# Ctrl-C (or SIGTERM) stops it. DAGSTER_HOST / DAGSTER_PORT change the address.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
# Dagster stops on SIGINT and maps SIGTERM to the same handler; a shell starting it in the
# background (a script's `&`, some supervisors) makes it ignore SIGINT, and so SIGTERM too. It
# starts here with SIGINT at its default, so both stop it wherever it runs.
exec .venv/bin/python -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])' \
  .venv/bin/dg dev -h "${DAGSTER_HOST:-127.0.0.1}" -p "${DAGSTER_PORT:-3000}" --log-level info
