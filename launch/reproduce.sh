#!/usr/bin/env bash
# Reproduce one of the paper's experiments: train each of its runs, evaluate them, write its table
# or figure, and measure the rank of each run's update.
#
#   bash launch/reproduce.sh EXPERIMENT [SCALE]
#
# EXPERIMENT: table1 table2 table3 figure2 figure3 figure4 (the runs are configs/SCALE/EXPERIMENT_*.yaml),
#             or capacity (small scale only: does PLoRA r = 1 learn more than LoRA r = 1 where rank binds?).
# SCALE: small (default: the embedded SmolLM2-135M on one CPU or GPU, every length scaled down) or
#        paper (LLaMA-7B on NPROC GPUs through torchrun, global batch 24 as in the paper).
# Resumable: a run with a summary.json is not trained again, one with checkpoints resumes from the
# newest, an evaluation with a results.json is skipped. The mix must exist first:
#   python -m data_prep.build_mix --output_dir data/mix [--data_dir ../shared/data]
# DRY_RUN=1 prints every command and checks every config without running anything.
set -euo pipefail

# ---- knobs (environment variables) ----
RUNS_DIR="${RUNS_DIR:-runs}"            # runs land in RUNS_DIR/SCALE/<config name>/seed<SEED>
RESULTS_DIR="${RESULTS_DIR:-results}"   # tables and figures land in RESULTS_DIR/SCALE/EXPERIMENT
SEEDS="${SEEDS:-42}"                    # several seeds, space-separated: table rows show mean ± std
CONFIGS="${CONFIGS:-}"                  # train these configs only (names, e.g. "table1_lora_r1 table1_plora_r1"); default all
NPROC="${NPROC:-8}"                     # paper scale: GPUs on this node
GLOBAL_BATCH="${GLOBAL_BATCH:-24}"      # paper scale: per-device batch x accumulation x NPROC
DEEPSPEED="${DEEPSPEED:-}"              # paper scale: e.g. configs/ds/zero3.json (full fine-tuning of 7B needs ZeRO)
PADDING_FREE="${PADDING_FREE:-0}"       # paper scale: 1 packs each batch into one row for flash-attention 2
DATA_DIR="${DATA_DIR:-}"                # the test sets: a folder, or hub (default: ../shared/data small, hub paper)
DRY_RUN="${DRY_RUN:-0}"
TRAIN_ARGS="${TRAIN_ARGS:-}"            # extra flags for every training run, e.g. "--logging_steps 10"
EVAL_TASKS="${EVAL_TASKS:-}"            # evaluate on these tasks only, e.g. gsm8k_loss (default: all of the scale's)
REPORT_TO="${REPORT_TO:-}"  # wandb or none; default: wandb when logged in to W&B (WANDB_API_KEY or wandb login)

main() {
    local experiment="${1:?usage: bash launch/reproduce.sh EXPERIMENT [small|paper]}"
    local scale="${2:-small}"
    source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
    cd "$REPO"
    PYTHON="$PY"
    source launch/common.sh  # fail, run (DRY_RUN), fit_batch
    case "$scale" in small | paper) ;; *) fail "scale '$scale': expected small or paper" ;; esac
    shopt -s nullglob
    local configs=(configs/"$scale"/"$experiment"_*.yaml)
    [ ${#configs[@]} -gt 0 ] || fail "experiment '$experiment': no configs/$scale/${experiment}_*.yaml"
    if [ -n "$CONFIGS" ]; then
        local name chosen=()
        for name in $CONFIGS; do
            [ -f "configs/$scale/$name.yaml" ] && [[ "$name" == "$experiment"_* ]] \
                || fail "CONFIGS: '$name' is not a config of $experiment (configs/$scale/${experiment}_*.yaml)"
            chosen+=("configs/$scale/$name.yaml")
        done
        configs=("${chosen[@]}")
    fi
    set_scale "$scale"
    # every config, its data and (offline) its model checked before any run starts
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
    "$PY" -m fastchat_plora.preflight "${configs[@]}" -- "${SCALE_FLAGS[@]}" $TRAIN_ARGS
    if [ "$experiment" != figure2 ]; then  # and the test sets, before hours of training
        run "$PY" -m eval.run_eval --check_data --tasks "$TASKS" "${DATA_FLAGS[@]}"
    fi

    local cfg seed dir runs=()
    for cfg in "${configs[@]}"; do
        for seed in $SEEDS; do
            dir="$RUNS_DIR/$scale/$(basename "$cfg" .yaml)/seed$seed"
            train "$cfg" "$dir" "$seed"
            runs+=("$dir")
        done
    done

    local out="$RESULTS_DIR/$scale/$experiment" evals=()
    for dir in "${runs[@]}"; do evals+=("$dir/eval/results.json"); done
    case "$experiment" in
        table1)
            evaluate "$BASE_MODEL" "$RUNS_DIR/$scale/base/eval" $(base_format "${configs[0]}")
            for dir in "${runs[@]}"; do evaluate "$dir" "$dir/eval"; rank "$dir"; done
            run "$PY" -m eval.tables --table 1 --output_dir "$out" \
                --results "$RUNS_DIR/$scale/base/eval/results.json" "${evals[@]}"
            run "$PY" -m eval.figures spectra --output "$out/spectra.png" \
                --ranks "${runs[@]/%//rank/rank.json}" ;;
        capacity)  # the GSM8K held-out loss of 200 test answers: the experiment's one measure
            EVAL_FLAGS=(--tasks gsm8k_loss --limit 200)
            evaluate "$BASE_MODEL" "$RUNS_DIR/$scale/capacity_base/eval" $(base_format "${configs[0]}")
            for dir in "${runs[@]}"; do evaluate "$dir" "$dir/eval"; rank "$dir"; done
            run "$PY" -m eval.tables --table capacity --output_dir "$out" \
                --results "$RUNS_DIR/$scale/capacity_base/eval/results.json" "${evals[@]}" ;;
        table2 | table3)
            for dir in "${runs[@]}"; do evaluate "$dir" "$dir/eval"; rank "$dir"; done
            run "$PY" -m eval.tables --table "${experiment#table}" --output_dir "$out" --results "${evals[@]}" ;;
        figure2)
            run "$PY" -m eval.figures loss --runs "${runs[@]}" --smooth "$LOSS_SMOOTH" --output "$out/figure2.png" ;;
        figure3 | figure4)  # Figure 3 is swept on GSM8K and MMLU, Figure 4 on GSM8K
            local metrics=("$SWEEP_METRIC") metric
            if [ "$experiment" = figure3 ]; then metrics+=(mmlu); fi
            for dir in "${runs[@]}"; do sweep "$dir" "${metrics[@]}"; done
            for metric in "${metrics[@]}"; do
                run "$PY" -m eval.figures sweep --sweeps "${runs[@]/%//sweep}" --metric "$metric" \
                    --window "$SWEEP_WINDOW" --output "$out/${experiment}_$metric.png"
            done ;;
    esac
}

set_scale() {
    if [ "$1" = small ]; then
        LAUNCH=("$PY" -m fastchat_plora.train_plora)
        BASE_MODEL="$("$PY" -c 'from fastchat_plora.models import resolve_model_path; print(resolve_model_path(None))')"
        TASKS="${EVAL_TASKS:-gsm8k_loss,arc_easy,arc_challenge,mmlu}"
        EVAL_FLAGS=(--tasks "$TASKS" --limit 100 --mmlu_limit 1)
        SWEEP_FLAGS=(--limit 100 --mmlu_limit 1)
        SWEEP_METRIC=gsm8k_loss SWEEP_WINDOW=3 LOSS_SMOOTH=8  # steps: the paper's 150 of 2,520 per epoch, scaled
        SCALE_FLAGS=()
    else
        LAUNCH=(torchrun --nproc_per_node "$NPROC" -m fastchat_plora.train_plora)
        BASE_MODEL=huggyllama/llama-7b
        TASKS="${EVAL_TASKS:-gsm8k,arc_easy,arc_challenge,mmlu}"
        EVAL_FLAGS=(--tasks "$TASKS")
        SWEEP_FLAGS=()
        SWEEP_METRIC=gsm8k SWEEP_WINDOW=10 LOSS_SMOOTH=150  # the paper's windows: 10 checkpoints, 150 steps
        DATA_DIR="${DATA_DIR:-hub}"  # a cluster has no ../shared/data
        fit_batch "$NPROC"
        SCALE_FLAGS=(--per_device_train_batch_size "$PER_DEVICE" --gradient_accumulation_steps "$ACCUMULATION")
        if [ -n "$DEEPSPEED" ]; then SCALE_FLAGS+=(--deepspeed "$DEEPSPEED"); fi
        add_padding_free SCALE_FLAGS
    fi
    DATA_FLAGS=()
    if [ -n "$DATA_DIR" ]; then DATA_FLAGS=(--data_dir "$DATA_DIR"); fi
}

train() {  # config, run dir, seed
    local cfg="$1" dir="$2" seed="$3" resume=()
    if [ -f "$dir/summary.json" ]; then echo "= $dir: trained"; return; fi
    if compgen -G "$dir/checkpoint-*/trainer_state.json" > /dev/null; then
        resume=(--resume_from_checkpoint latest)
    elif [ -d "$dir" ]; then
        resume=(--overwrite_output_dir True)  # died before its first checkpoint: start over
    fi
    local report=()
    if [ -n "$REPORT_TO" ]; then report=(--report_to "$REPORT_TO"); fi
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
    run "${LAUNCH[@]}" --config "$cfg" --output_dir "$dir" --seed "$seed" \
        "${SCALE_FLAGS[@]}" "${resume[@]}" "${report[@]}" $TRAIN_ARGS
}

evaluate() {  # model, output dir, extra flags
    if [ -f "$2/results.json" ]; then echo "= $2: evaluated"; return; fi
    run "$PY" -m eval.run_eval --model_path "$1" "${EVAL_FLAGS[@]}" "${DATA_FLAGS[@]}" --output_dir "$2" "${@:3}"
}

base_format() {  # config: the base model is evaluated in the prompt format its runs trained in
    "$PY" -c 'import sys; from fastchat_plora.args import load_config
t = load_config(sys.argv[1]).get("conv_template"); print(f"--conv_template {t}" if t else "")' "$1"
}

sweep() {  # run dir, metrics (gsm8k, gsm8k_loss, mmlu)
    local dir="$1" tasks
    shift
    tasks="$(IFS=,; echo "$*")"
    run "$PY" -m eval.sweep --run_dir "$dir" --output_dir "$dir/sweep" --tasks "$tasks" "${SWEEP_FLAGS[@]}" \
        "${DATA_FLAGS[@]}"
}

rank() {  # run dir
    if [ -f "$1/rank/rank.json" ]; then echo "= $1: rank measured"; return; fi
    run "$PY" -m fastchat_plora.analyze --model_path "$1" --base_model "$BASE_MODEL" --output_dir "$1/rank"
}

main "$@"; exit $?
