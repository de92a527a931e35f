#!/usr/bin/env bash
# Set up (first run only) and watch PLoRA fine-tune the embedded SmolLM2-135M-Instruct on GSM8K,
# a few minutes on a laptop CPU. GSM8K comes from ../shared/data when that mirror exists, else
# from DATA_DIR, else from the dataset hub (openai/gsm8k).
set -euo pipefail
# On a Linux machine without an NVIDIA GPU, mimalloc: it holds far less CPU memory than glibc's malloc under
# training on the CPU (docs/performance.md); PLORA_ALLOCATOR=system runs on the system's malloc instead. On a GPU
# the activations are the CUDA allocator's, and nothing is preloaded. The demo extra (gguf, mimalloc) comes with
# env.sh.
if [ "$(uname -s)" = Linux ] && ! nvidia-smi -L > /dev/null 2>&1; then
    export PLORA_ALLOCATOR="${PLORA_ALLOCATOR:-mimalloc}"
fi
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

OUTPUT_DIR="${OUTPUT_DIR:-$REPO/runs/demo}"
DATA="$REPO/data/gsm8k_train.jsonl"
DATA_DIR_FLAG=()
if [ -n "${DATA_DIR:-}" ]; then DATA_DIR_FLAG=(--data_dir "$DATA_DIR"); fi

cd "$REPO"
if [ ! -f "$DATA" ]; then
    "$PY" -m data_prep.gsm8k --output "$DATA" "${DATA_DIR_FLAG[@]}"
fi
CMD=("$PY" -m fastchat_plora.train_plora --config configs/demo_smollm2_gsm8k.yaml
     --data_path "$DATA" --output_dir "$OUTPUT_DIR" --overwrite_output_dir True "$@")
echo "+ ${CMD[*]}"
"${CMD[@]}"
