#!/usr/bin/env bash
# One node's part of a SLURM job: launch/slurm.sbatch runs it through srun, once per node.
# Sets up the node's environment (ENV_SETUP), checks the package is there, then starts torchrun
# for this node's GPUS_PER_NODE processes. Arguments: what torchrun runs (-m fastchat_plora.train_plora ...).
set -euo pipefail
if [ -n "${ENV_SETUP:-}" ]; then
    set +u; source "$ENV_SETUP"; set -u
fi
source launch/common.sh
check_package
# the first node hosts the c10d store; saying so keeps two agents on one host from both trying to
is_host=0
if [ "${SLURM_NODEID:-0}" = 0 ]; then is_host=1; fi
run torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --rdzv_id "${SLURM_JOB_ID:-local}" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_conf "is_host=$is_host" "$@"
