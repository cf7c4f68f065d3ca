#!/usr/bin/env bash
# Install the project with its dev extra, then lint (ruff) and type-check the package (mypy), as CI
# does before the tests.
EXTRAS="${EXTRAS:-[dev]}" source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
.venv/bin/ruff check .
.venv/bin/mypy
