#!/usr/bin/env bash
# One node, NPROC GPUs, the DeepSpeed launcher with ZeRO (the paper's stack).
#   CONFIG=configs/paper/table1_full.yaml DEEPSPEED=configs/ds/zero3.json bash launch/deepspeed_node.sh [extra flags]
# DRY_RUN=1 prints the command and checks the config without starting anything.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/common.sh

# ---- knobs ----
CONFIG="${CONFIG:-configs/paper/table1_plora_r8.yaml}"
OUTPUT_DIR="${OUTPUT_DIR:-runs/$(basename "$CONFIG" .yaml)}"
NPROC="${NPROC:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"
DEEPSPEED="${DEEPSPEED:-configs/ds/zero2.json}"

check_config "$CONFIG"
ACCUMULATION="$(accumulation "$NPROC")"
run deepspeed --num_gpus "$NPROC" --master_port "$MASTER_PORT" --module fastchat_plora.train_plora \
    --config "$CONFIG" --output_dir "$OUTPUT_DIR" --per_device_train_batch_size "$PER_DEVICE" --gradient_accumulation_steps "$ACCUMULATION" \
    --deepspeed "$DEEPSPEED" "$@"
