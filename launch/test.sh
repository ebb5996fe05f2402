#!/usr/bin/env bash
# The test suite: sets up .venv (if needed) and runs the default (non-slow) tests.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -m slow` or `-k rules`.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
exec python -m pytest -q -n "${GHL_TEST_WORKERS:-2}" --durations=15 "$@"
