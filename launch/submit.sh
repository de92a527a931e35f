#!/usr/bin/env bash
# Submit launch/slurm.sbatch after checking here, on the login node, what would otherwise fail only
# after the queue wait: the node and GPU counts against the global batch, the config with the extra
# flags, its data files, and (OFFLINE=1) the model in HF_HOME. A failed check queues nothing.
#
#   CONFIG=configs/paper/table1_plora_r8.yaml bash launch/submit.sh --nodes 2 --gpus-per-node 4 \
#       --cpus-per-task 32 --time 24:00:00 [--partition P] [--account A] [-- extra training flags]
#
# Every option before `--` goes to sbatch; --nodes and --gpus-per-node (default 1 and GPUS_PER_NODE,
# else 8) set the world size. The knobs are slurm.sbatch's (CONFIG, DEEPSPEED, OFFLINE, GLOBAL_BATCH, ...).
# DRY_RUN=1 checks and prints the sbatch command without submitting.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/common.sh

CONFIG="${CONFIG:-configs/paper/table1_plora_r8.yaml}"
export CONFIG
nodes=1 gpus="${GPUS_PER_NODE:-8}" options=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do
    case "$1" in
        --nodes | -N | --gpus-per-node)
            [ $# -ge 2 ] || fail "$1 needs a value"
            if [ "$1" = --gpus-per-node ]; then gpus="$2"; else nodes="$2"; fi
            options+=("$1" "$2"); shift 2 ;;
        --nodes=*) nodes="${1#*=}"; options+=("$1"); shift ;;
        --gpus-per-node=*) gpus="${1#*=}"; options+=("$1"); shift ;;
        *) options+=("$1"); shift ;;
    esac
done
if [ $# -gt 0 ]; then shift; fi  # the `--`: what follows goes to training
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || fail "--nodes $nodes: expected one node count (not a range)"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || fail "--gpus-per-node $gpus: expected a GPU count (e.g. 8, without a type)"

fit_batch $((nodes * gpus))
if [ "${OFFLINE:-0}" = 1 ]; then export HF_HUB_OFFLINE=1; fi
check_config "$CONFIG" "$@"
echo "$nodes node(s) x $gpus GPU(s): per-device batch $PER_DEVICE x accumulation $ACCUMULATION = $GLOBAL_BATCH"
mkdir -p logs  # SLURM opens the job's log there before the script runs
run sbatch "${options[@]}" launch/slurm.sbatch "$@"
