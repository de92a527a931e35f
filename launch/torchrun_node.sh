#!/usr/bin/env bash
# One node, NPROC GPUs, torchrun data parallel (DEEPSPEED=configs/ds/zero2.json for ZeRO).
#   CONFIG=configs/paper/table1_plora_r8.yaml bash launch/torchrun_node.sh [extra flags]
# DRY_RUN=1 prints the command and checks the config without starting anything.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/common.sh

# ---- knobs ----
CONFIG="${CONFIG:-configs/paper/table1_plora_r8.yaml}"
OUTPUT_DIR="${OUTPUT_DIR:-runs/$(basename "$CONFIG" .yaml)}"
NPROC="${NPROC:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"
DEEPSPEED="${DEEPSPEED:-}"            # empty: plain DDP

check_config "$CONFIG"
ACCUMULATION="$(accumulation "$NPROC")"
DS_FLAGS=()
if [ -n "$DEEPSPEED" ]; then DS_FLAGS=(--deepspeed "$DEEPSPEED"); fi
run torchrun --nproc_per_node "$NPROC" --master_port "$MASTER_PORT" -m fastchat_plora.train_plora \
    --config "$CONFIG" --output_dir "$OUTPUT_DIR" --per_device_train_batch_size "$PER_DEVICE" --gradient_accumulation_steps "$ACCUMULATION" \
    "${DS_FLAGS[@]}" "$@"
