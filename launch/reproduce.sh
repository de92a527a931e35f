#!/usr/bin/env bash
# Reproduce one of the paper's experiments: train each of its runs, evaluate them, write its table
# or figure, and measure the rank of each run's update.
#
#   bash launch/reproduce.sh EXPERIMENT [SCALE]
#   SLURM=1 SBATCH_FLAGS="--partition gpu --time 24:00:00" bash launch/reproduce.sh EXPERIMENT paper
#
# EXPERIMENT: table1 table2 table3 figure2 figure3 figure4 (the runs are configs/SCALE/EXPERIMENT_*.yaml),
#             or capacity (small scale only: does PLoRA r = 1 learn more than LoRA r = 1 where rank binds?).
# SCALE: small (default: the embedded SmolLM2-135M on one CPU or GPU, every length scaled down) or
#        paper (LLaMA-7B on NPROC GPUs through torchrun, global batch 24 as in the paper).
# SLURM=1 queues the experiment instead of running it here: a job array that trains (one task per run
# and seed, each a launch/slurm.sbatch job: preempted, requeued and resumed), an evaluation array whose
# task N starts when training task N has ended well, the base model's evaluation, and a last job that
# writes the table or figure once all of them have. Logs: LOG_DIR/plora-EXPERIMENT*-JOB_TASK.out.
# Resumable: a run with a summary.json is not trained again, one with checkpoints resumes from the
# newest, an evaluation with a results.json is skipped. The mix must exist first:
#   python -m data_prep.build_mix --output_dir data/mix [--data_dir ../shared/data]
# DRY_RUN=1 prints every command and checks every config without running or queueing anything.
set -euo pipefail

# ---- knobs (environment variables) ----
RUNS_DIR="${RUNS_DIR:-runs}"            # runs land in RUNS_DIR/SCALE/<config name>/seed<SEED>
RESULTS_DIR="${RESULTS_DIR:-results}"   # tables and figures land in RESULTS_DIR/SCALE/EXPERIMENT
SEEDS="${SEEDS:-42}"                    # several seeds, space-separated: table rows show mean ± std
CONFIGS="${CONFIGS:-}"                  # train these configs only (names, e.g. "table1_lora_r1 table1_plora_r1"); default all
NPROC="${NPROC:-8}"                     # paper scale: GPUs per node
GLOBAL_BATCH="${GLOBAL_BATCH:-24}"      # paper scale: per-device batch x accumulation x NPROC x NODES
DEEPSPEED="${DEEPSPEED:-}"              # paper scale: e.g. configs/ds/zero3.json (full fine-tuning of 7B needs ZeRO)
PADDING_FREE="${PADDING_FREE:-0}"       # paper scale: 1 packs each batch into one row for flash-attention 2
DATA_DIR="${DATA_DIR:-}"                # the test sets: a folder, or hub (default: ../shared/data small, hub paper)
BASE_MODEL="${BASE_MODEL:-}"            # the model the table's base row and the rank measure start from (default: the scale's)
DRY_RUN="${DRY_RUN:-0}"
TRAIN_ARGS="${TRAIN_ARGS:-}"            # extra flags for every training run, e.g. "--logging_steps 10"
EVAL_TASKS="${EVAL_TASKS:-}"            # evaluate on these tasks only, e.g. gsm8k_loss (default: all of the scale's)
EVAL_ARGS="${EVAL_ARGS:-}"              # extra flags for every evaluation, e.g. "--batch_size 16" or "--backend vllm"
EVAL_GPUS="${EVAL_GPUS:-1}"             # GPUs of one node each model's evaluation shares its items over (torchrun)
REPORT_TO="${REPORT_TO:-}"  # wandb or none; default: wandb when logged in to W&B (WANDB_API_KEY or wandb login)
SLURM="${SLURM:-0}"                     # 1: queue the experiment through SLURM (above) instead of running it here
SBATCH_FLAGS="${SBATCH_FLAGS:-}"        # SLURM=1: options for every job, e.g. "--partition gpu --account A --time 24:00:00"
NODES="${NODES:-1}"                     # SLURM=1, paper scale: nodes per training run, NPROC GPUs each
REQUEST_GPUS="${REQUEST_GPUS:-1}"       # SLURM=1: 0 asks SLURM for no GPUs (nodes without a gpu GRES)
LOG_DIR="${LOG_DIR:-logs}"              # SLURM=1: where the jobs' logs go
ENV_SETUP="${ENV_SETUP:-}"              # SLURM=1: sourced by every job first (default: this checkout's .venv)

main() {
    local experiment="${1:?usage: bash launch/reproduce.sh EXPERIMENT [small|paper]}"
    local scale="${2:-small}"
    if [ -n "${REPRODUCE_TASK:-}" ] && [ -n "$ENV_SETUP" ]; then  # a SLURM=1 job: the node's environment first
        set +u; source "$ENV_SETUP"; set -u
    fi
    source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
    cd "$REPO"
    PYTHON="$PY"
    source launch/common.sh  # fail, run (DRY_RUN), fit_batch
    case "$scale" in small | paper) ;; *) fail "scale '$scale': expected small or paper" ;; esac
    case "$SLURM" in 0 | 1) ;; *) fail "SLURM=$SLURM: expected 0 or 1" ;; esac
    [[ "$EVAL_GPUS" =~ ^[1-9][0-9]*$ ]] || fail "EVAL_GPUS=$EVAL_GPUS: expected a number of GPUs, 1 or more"
    set_scale "$scale"
    if [ "$experiment" = capacity ]; then EVAL_FLAGS=(--tasks gsm8k_loss --limit 200); fi  # its one measure
    RUN_LIST="$RUNS_DIR/$scale/$experiment.runs"
    local listed  # (a failed lookup ends the job: set -e stops at an assignment, not at an argument)
    case "${REPRODUCE_TASK:-}" in  # one job of SLURM=1's (queue below)
        eval) listed="$(list_field "$SLURM_ARRAY_TASK_ID" 2)"; evaluate_run "$experiment" "$listed"; return ;;
        base) listed="$(list_field 0 1)"; evaluate_base "$experiment" "$scale" "$listed"; return ;;
        results) listed="$(list_field all 2)"; write_results "$experiment" "$scale" "$listed"; return ;;
        "") ;;
        *) fail "REPRODUCE_TASK=$REPRODUCE_TASK: set by SLURM=1 for its own jobs (eval, base, results)" ;;
    esac

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
    # every config, its data and (offline) its model checked before any run starts
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
    "$PY" -m fastchat_plora.preflight "${configs[@]}" -- "${SCALE_FLAGS[@]}" $TRAIN_ARGS
    if [ "$experiment" != figure2 ]; then  # and the test sets, before hours of training
        run "$PY" -m eval.run_eval --check_data --tasks "$TASKS" "${DATA_FLAGS[@]}"
    fi

    local cfg seed dir runs=() lines=""  # the run list: config, run dir, seed (tab-separated, a run a line)
    for cfg in "${configs[@]}"; do
        for seed in $SEEDS; do
            dir="$RUNS_DIR/$scale/$(basename "$cfg" .yaml)/seed$seed"
            runs+=("$dir")
            lines+="$cfg"$'\t'"$dir"$'\t'"$seed"$'\n'
        done
    done
    if [ "$SLURM" = 1 ]; then queue "$experiment" "$scale" "$lines"; return; fi
    while IFS=$'\t' read -r cfg dir seed; do train "$cfg" "$dir" "$seed"; done <<< "${lines%$'\n'}"
    for dir in "${runs[@]}"; do evaluate_run "$experiment" "$dir"; done
    evaluate_base "$experiment" "$scale" "${configs[0]}"
    write_results "$experiment" "$scale" "$(printf '%s\n' "${runs[@]}")"
}

evaluate_run() {  # experiment, run dir: what the experiment measures of one run
    case "$1" in
        table1 | table2 | table3 | capacity) evaluate "$2" "$2/eval"; rank "$2" ;;
        figure3) sweep "$2" "$SWEEP_METRIC" mmlu ;;  # Figure 3 is swept on GSM8K and MMLU, Figure 4 on GSM8K
        figure4) sweep "$2" "$SWEEP_METRIC" ;;
        figure2) ;;  # the training loss curves alone
    esac
}

base_dir() {  # experiment, scale: where the base model's evaluation goes (none: the experiment has no base row)
    case "$1" in
        table1) echo "$RUNS_DIR/$2/base/eval" ;;
        capacity) echo "$RUNS_DIR/$2/capacity_base/eval" ;;
    esac
}

evaluate_base() {  # experiment, scale, a config of its runs: the base model, in the prompt format they trained in
    local dir
    dir="$(base_dir "$1" "$2")"
    # shellcheck disable=SC2046  # base_format prints a flag and its value, or nothing
    if [ -n "$dir" ]; then evaluate "$BASE_MODEL" "$dir" $(base_format "$3"); fi
}

write_results() {  # experiment, scale, run dirs (one a line): the table or figure
    local experiment="$1" out="$RESULTS_DIR/$2/$1" base runs=() evals=()
    mapfile -t runs <<< "$3"
    base="$(base_dir "$1" "$2")"
    for dir in "${runs[@]}"; do evals+=("$dir/eval/results.json"); done
    case "$experiment" in
        table1)
            run "$PY" -m eval.tables --table 1 --output_dir "$out" --results "$base/results.json" "${evals[@]}"
            run "$PY" -m eval.figures spectra --output "$out/spectra.png" --ranks "${runs[@]/%//rank/rank.json}" ;;
        capacity)
            run "$PY" -m eval.tables --table capacity --output_dir "$out" --results "$base/results.json" "${evals[@]}" ;;
        table2 | table3)
            run "$PY" -m eval.tables --table "${experiment#table}" --output_dir "$out" --results "${evals[@]}" ;;
        figure2)
            run "$PY" -m eval.figures loss --runs "${runs[@]}" --smooth "$LOSS_SMOOTH" --output "$out/figure2.png" ;;
        figure3 | figure4)
            local metrics=("$SWEEP_METRIC") metric
            if [ "$experiment" = figure3 ]; then metrics+=(mmlu); fi
            for metric in "${metrics[@]}"; do
                run "$PY" -m eval.figures sweep --sweeps "${runs[@]/%//sweep}" --metric "$metric" \
                    --window "$SWEEP_WINDOW" --output "$out/${experiment}_$metric.png"
            done ;;
    esac
}

list_field() {  # task index (or all), field (1 config, 2 run dir, 3 seed): from the run list SLURM=1 wrote
    if [ "$1" = all ]; then run_list_line "$RUN_LIST" 0 > /dev/null && cut -f "$2" "$RUN_LIST"; return; fi
    local line
    line="$(run_list_line "$RUN_LIST" "$1")"
    cut -f "$2" <<< "$line"
}

# queue EXPERIMENT SCALE RUN_LINES (SLURM=1): training array (the runs without a summary.json) ->
# evaluation array (task N after training task N) + the base model -> the table or figure
queue() {
    local experiment="$1" scale="$2" lines="$3" i todo=() after=() deps=()
    local n
    n="$(grep -c . <<< "$lines")"
    for (( i = 0; i < n; i++ )); do
        [ -f "$(sed -n "$((i + 1))p" <<< "$lines" | cut -f 2)/summary.json" ] || todo+=("$i")
    done
    if [ "$DRY_RUN" != 1 ]; then mkdir -p "$(dirname "$RUN_LIST")" "$LOG_DIR" && printf '%s' "$lines" > "$RUN_LIST"; fi
    export RUN_LIST ENV_SETUP="${ENV_SETUP:-$VENV/bin/activate}" REPORT_TO DEEPSPEED PADDING_FREE GLOBAL_BATCH
    local common=(--chdir "$REPO") job=plora-$experiment
    # shellcheck disable=SC2206  # SBATCH_FLAGS is a list of options
    common+=($SBATCH_FLAGS)
    JOB_IDS=()
    if [ ${#todo[@]} -gt 0 ]; then
        if [ "$scale" = paper ]; then
            export GPUS_PER_NODE="$NPROC"  # and the batch split set_scale checked
        else
            export GPUS_PER_NODE=1 GLOBAL_BATCH=config  # one process, the config's own batch
        fi
        local gpus=()
        if [ "$REQUEST_GPUS" = 1 ]; then gpus=(--gpus-per-node "$GPUS_PER_NODE"); fi
        # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
        submit "${common[@]}" --job-name "$job" --array "$(IFS=,; echo "${todo[*]}")" --nodes "$NODES" \
            "${gpus[@]}" --output "$LOG_DIR/%x-%A_%a.out" launch/slurm.sbatch $TRAIN_ARGS
        after=(--dependency "aftercorr:$JOB" --kill-on-invalid-dep=yes)
        deps+=("$JOB")
    fi
    local eval_gpus=()
    if [ "$REQUEST_GPUS" = 1 ]; then eval_gpus=(--gpus-per-node "$EVAL_GPUS"); fi
    local task=(--nodes 1 --ntasks 1 "${eval_gpus[@]}" --wrap "bash launch/reproduce.sh $experiment $scale")
    if [ "$experiment" != figure2 ]; then
        submit "${common[@]}" --job-name "$job-eval" --array "0-$((n - 1))" "${after[@]}" \
            --output "$LOG_DIR/%x-%A_%a.out" --export "ALL,REPRODUCE_TASK=eval" "${task[@]}"
        deps=("$JOB")
    fi
    if [ -n "$(base_dir "$experiment" "$scale")" ]; then
        submit "${common[@]}" --job-name "$job-base" --output "$LOG_DIR/%x-%j.out" \
            --export "ALL,REPRODUCE_TASK=base" "${task[@]}"
        deps+=("$JOB")
    fi
    local results_after=()
    if [ ${#deps[@]} -gt 0 ]; then results_after=(--dependency "afterok:$(IFS=:; echo "${deps[*]}")" --kill-on-invalid-dep=yes); fi
    submit "${common[@]}" --job-name "$job-results" "${results_after[@]}" --nodes 1 --ntasks 1 \
        --output "$LOG_DIR/%x-%j.out" --export "ALL,REPRODUCE_TASK=results" \
        --wrap "bash launch/reproduce.sh $experiment $scale"
    echo "queued ${#todo[@]} of $n runs to train; jobs ${JOB_IDS[*]}; the last writes $RESULTS_DIR/$scale/$experiment"
}

submit() {  # sbatch OPTIONS SCRIPT...: queues (DRY_RUN: prints) one job; JOB is its id
    echo "+ sbatch $*"
    if [ "$DRY_RUN" = 1 ]; then
        JOB="JOB$(( ${#JOB_IDS[@]} + 1 ))"
    else
        JOB="$(sbatch --parsable "$@")"
        JOB="${JOB%%;*}"  # --parsable: id[;cluster]
    fi
    JOB_IDS+=("$JOB")
}

set_scale() {
    if [ "$1" = small ]; then
        LAUNCH=("$PY" -m fastchat_plora.train_plora)
        if [ -z "$BASE_MODEL" ]; then
            BASE_MODEL="$("$PY" -c 'from fastchat_plora.models import resolve_model_path; print(resolve_model_path(None))')"
        fi
        TASKS="${EVAL_TASKS:-gsm8k_loss,arc_easy,arc_challenge,mmlu}"
        EVAL_FLAGS=(--tasks "$TASKS" --limit 100 --mmlu_limit 1)
        SWEEP_FLAGS=(--limit 100 --mmlu_limit 1)
        SWEEP_METRIC=gsm8k_loss SWEEP_WINDOW=3 LOSS_SMOOTH=8  # steps: the paper's 150 of 2,520 per epoch, scaled
        SCALE_FLAGS=()
    else
        LAUNCH=(torchrun --nproc_per_node "$NPROC" -m fastchat_plora.train_plora)
        BASE_MODEL="${BASE_MODEL:-huggyllama/llama-7b}"
        TASKS="${EVAL_TASKS:-gsm8k,arc_easy,arc_challenge,mmlu}"
        EVAL_FLAGS=(--tasks "$TASKS")
        SWEEP_FLAGS=()
        SWEEP_METRIC=gsm8k SWEEP_WINDOW=10 LOSS_SMOOTH=150  # the paper's windows: 10 checkpoints, 150 steps
        DATA_DIR="${DATA_DIR:-hub}"  # a cluster has no ../shared/data
        fit_batch $((NODES * NPROC))  # NODES > 1 with SLURM=1 only
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
    local launch=("$PY")  # EVAL_GPUS > 1: one process a GPU, each with a share of every task
    if [ "$EVAL_GPUS" -gt 1 ]; then launch+=(-m torch.distributed.run --standalone --nproc_per_node "$EVAL_GPUS"); fi
    # shellcheck disable=SC2086  # EVAL_ARGS is a list of flags
    run "${launch[@]}" -m eval.run_eval --model_path "$1" "${EVAL_FLAGS[@]}" "${DATA_FLAGS[@]}" --output_dir "$2" \
        "${@:3}" $EVAL_ARGS
}

base_format() {  # config: the base model is evaluated in the prompt format its runs trained in
    "$PY" -c 'import sys; from fastchat_plora.args import load_config
t = load_config(sys.argv[1]).get("conv_template"); print(f"--conv_template {t}" if t else "")' "$1"
}

sweep() {  # run dir, metrics (gsm8k, gsm8k_loss, mmlu)
    local dir="$1" tasks
    shift
    tasks="$(IFS=,; echo "$*")"
    # shellcheck disable=SC2086  # EVAL_ARGS is a list of flags
    run "$PY" -m eval.sweep --run_dir "$dir" --output_dir "$dir/sweep" --tasks "$tasks" "${SWEEP_FLAGS[@]}" \
        "${DATA_FLAGS[@]}" $EVAL_ARGS
}

rank() {  # run dir
    if [ -f "$1/rank/rank.json" ]; then echo "= $1: rank measured"; return; fi
    run "$PY" -m fastchat_plora.analyze --model_path "$1" --base_model "$BASE_MODEL" --output_dir "$1/rank"
}

main "$@"; exit $?
