#!/usr/bin/env bash
# Sourced by the cluster launch scripts: the global batch arithmetic, the config check, and
# printing (DRY_RUN=1: only printing) the one command each script runs.

PYTHON="${PYTHON:-python}"
DRY_RUN="${DRY_RUN:-0}"
GLOBAL_BATCH="${GLOBAL_BATCH:-24}"   # the paper's: 8 GPUs x 3
PER_DEVICE="${PER_DEVICE:-}"         # per-GPU batch; empty: the largest of 3, 2, 1 that keeps GLOBAL_BATCH

fail() { echo "error: $*" >&2; exit 2; }

# REPORT_TO unless set: wandb where the wandb package and a W&B key are here (WANDB_API_KEY, or the
# ~/.netrc entry `wandb login` writes), else nothing; REPORT_TO=none turns W&B off for a logged-in user
if [ -z "${REPORT_TO:-}" ]; then REPORT_TO="$("$PYTHON" -m fastchat_plora.wandb_auth 2> /dev/null || true)"; fi

# run_list_line LIST INDEX: run INDEX (from 0) of a run list launch/reproduce.sh SLURM=1 wrote, one line
# "config<TAB>run dir<TAB>seed" a run, or fails naming the list
run_list_line() {
    [ -f "$1" ] || fail "no run list $1: launch/reproduce.sh SLURM=1 writes it when it queues an experiment"
    local line
    line="$(sed -n "$(($2 + 1))p" "$1")"
    [ -n "$line" ] || fail "run list $1 has no run $2"
    printf '%s\n' "$line"
}

# fit_batch WORLD_SIZE: sets PER_DEVICE (unless given) and ACCUMULATION so that
# PER_DEVICE x ACCUMULATION x WORLD_SIZE = GLOBAL_BATCH, or fails naming the process counts that can
fit_batch() {
    local world="$1" size counts=()
    if [ -n "$PER_DEVICE" ]; then
        (( GLOBAL_BATCH % (world * PER_DEVICE) == 0 )) || fail "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of" \
            "$world processes x PER_DEVICE=$PER_DEVICE: leave PER_DEVICE unset to have it chosen, or set GLOBAL_BATCH"
    else
        for size in 3 2 1; do
            if (( GLOBAL_BATCH % (world * size) == 0 )); then PER_DEVICE="$size"; break; fi
        done
        for (( size = 1; size <= GLOBAL_BATCH; size++ )); do
            if (( GLOBAL_BATCH % size == 0 )); then counts+=("$size"); fi
        done
        [ -n "$PER_DEVICE" ] || fail "GLOBAL_BATCH=$GLOBAL_BATCH does not split over $world processes: run on a" \
            "process count that divides it (${counts[*]}), or set GLOBAL_BATCH (docs/clusters.md)"
    fi
    ACCUMULATION=$(( GLOBAL_BATCH / (world * PER_DEVICE) ))
}

# check_config CONFIG [TRAINING FLAGS]: with those flags, every key known and every value valid, the data
# files there, the model in HF_HOME when offline (fastchat_plora/preflight.py), before any GPU is touched
check_config() {
    local config="$1"
    shift
    [ -f "$config" ] || fail "config not found: $config"
    "$PYTHON" -m fastchat_plora.preflight "$config" -- "$@"
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
