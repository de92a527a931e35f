#!/usr/bin/env bash
# One node, NPROC GPUs: torchrun (DDP, or ZeRO with DEEPSPEED=) or the DeepSpeed launcher (LAUNCHER=deepspeed).
#   CONFIG=configs/paper/table1_plora_r8.yaml bash launch/node.sh [extra flags]
#   CONFIG=configs/paper/table1_full.yaml LAUNCHER=deepspeed DEEPSPEED=configs/ds/zero3.json bash launch/node.sh
# DRY_RUN=1 prints the command and checks the config without starting anything.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/common.sh

# ---- knobs ----
CONFIG="${CONFIG:-configs/paper/table1_plora_r8.yaml}"
OUTPUT_DIR="${OUTPUT_DIR:-runs/$(basename "$CONFIG" .yaml)}"
NPROC="${NPROC:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"
LAUNCHER="${LAUNCHER:-torchrun}"      # torchrun or deepspeed
DEEPSPEED="${DEEPSPEED:-}"            # a ZeRO config; empty: plain DDP (torchrun only)
REPORT_TO="${REPORT_TO:-}"  # wandb or none; default: wandb when logged in to W&B (WANDB_API_KEY or wandb login)
RESUME="${RESUME:-}"                  # auto: the latest complete checkpoint if there is one, else a fresh start; or a path
PADDING_FREE="${PADDING_FREE:-0}"     # 1: one row per batch with flash-attention 2 (no padding)

check_config "$CONFIG" "$@"
fit_batch "$NPROC"
case "$LAUNCHER" in
    torchrun) START=(torchrun --nproc_per_node "$NPROC" --master_port "$MASTER_PORT" -m) ;;
    deepspeed)
        [ -n "$DEEPSPEED" ] || DEEPSPEED=configs/ds/zero2.json
        START=(deepspeed --num_gpus "$NPROC" --master_port "$MASTER_PORT" --module) ;;
    *) fail "LAUNCHER=$LAUNCHER: expected torchrun or deepspeed" ;;
esac
FLAGS=()
if [ -n "$DEEPSPEED" ]; then FLAGS+=(--deepspeed "$DEEPSPEED"); fi
if [ -n "$RESUME" ]; then FLAGS+=(--resume_from_checkpoint "$RESUME"); fi
if [ -n "$REPORT_TO" ]; then FLAGS+=(--report_to "$REPORT_TO"); fi
add_padding_free FLAGS
run "${START[@]}" fastchat_plora.train_plora --config "$CONFIG" --output_dir "$OUTPUT_DIR" \
    --per_device_train_batch_size "$PER_DEVICE" --gradient_accumulation_steps "$ACCUMULATION" "${FLAGS[@]}" "$@"
