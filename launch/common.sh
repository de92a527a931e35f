#!/usr/bin/env bash
# Sourced by the cluster launch scripts: the global batch arithmetic, the config check, and
# printing (DRY_RUN=1: only printing) the one command each script runs.

PYTHON="${PYTHON:-python}"
DRY_RUN="${DRY_RUN:-0}"
GLOBAL_BATCH="${GLOBAL_BATCH:-24}"   # the paper's: 8 GPUs x 3
PER_DEVICE="${PER_DEVICE:-3}"

fail() { echo "error: $*" >&2; exit 2; }

# accumulation WORLD_SIZE: the gradient accumulation that keeps GLOBAL_BATCH at this world size
accumulation() {
    local world="$1"
    (( GLOBAL_BATCH % (world * PER_DEVICE) == 0 )) \
        || fail "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of $world processes x PER_DEVICE=$PER_DEVICE"
    echo $(( GLOBAL_BATCH / (world * PER_DEVICE) ))
}

# check_config CONFIG: every key known and every value valid, before any GPU is touched
check_config() {
    [ -f "$1" ] || fail "config not found: $1"
    "$PYTHON" -m fastchat_plora.args "$1"
    if [ -n "${DEEPSPEED:-}" ] && [ ! -f "$DEEPSPEED" ]; then fail "DeepSpeed config not found: $DEEPSPEED"; fi
}

run() {
    echo "+ $*"
    if [ "$DRY_RUN" = 1 ]; then return 0; fi
    "$@"
}
