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

# check_package: the package and torchrun are there, or a one-line error naming the fix (a node
# whose job environment was never set up)
check_package() {
    local fix="set ENV_SETUP to a script that activates the environment (module load, conda activate, source .venv/bin/activate), or pip install -e . there"
    "$PYTHON" -c "import fastchat_plora.train_plora" 2> /dev/null \
        || fail "fastchat_plora does not import on $(hostname) with PYTHON=$PYTHON ($(command -v "$PYTHON" || echo not found)): $fix"
    command -v torchrun > /dev/null || fail "no torchrun on $(hostname): $fix"
}

# add_padding_free ARRAY: with PADDING_FREE=1, append the flags that pack each batch into one row
# for flash-attention (batches keep their random order; only the padding goes)
add_padding_free() {
    local -n into="$1"
    case "${PADDING_FREE:-0}" in
        0) ;;
        1) into+=(--padding_free True --attn_implementation flash_attention_2) ;;
        *) fail "PADDING_FREE=$PADDING_FREE: expected 0 or 1" ;;
    esac
}

run() {
    echo "+ $*"
    if [ "$DRY_RUN" = 1 ]; then return 0; fi
    "$@"
}
