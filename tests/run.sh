#!/usr/bin/env bash
# Set up (first run only) and run the test suite on the CPU. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch/env.sh"
cd "$REPO"
"$PY" -m ruff check .
"$PY" -m pytest -q "$@"
