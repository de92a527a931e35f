"""launch/slurm.sbatch across two nodes: Debian's SLURM runs two slurmd on this host as nodes n1 and
n2 (tests/slurm/slurm-2nodes.conf), so a --nodes=2 job takes the multi-node path for real: one srun
task per node, torchrun's c10d rendezvous across them, gloo on the CPU. It trains what one process
trains, within the tolerance of the DDP test (tests/test_distributed.py)."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import relative_update_difference, run_module, write_conversations
from tests.slurm_harness import Jobs, cluster, write_config

pytestmark = pytest.mark.slow
TOLERANCE = 1e-3  # as tests/test_distributed.py: the update W_T - W_0, relative, per weight


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm_nodes")
    with cluster(tmp / "cluster", "slurm-2nodes.conf") as env:
        yield Jobs(env, tmp / "work")


def test_two_nodes_train_what_one_process_trains(jobs, tiny_model_dir):
    data = write_conversations(jobs.workdir / "c.jsonl", n=32)
    config = write_config(jobs.workdir / "tiny_plora.yaml", tiny_model_dir, data, max_steps=12, lora_dropout=0.0,
                          train_sampling_strategy="sequential", learning_rate=1.0e-3)  # fmt: skip
    out = jobs.workdir / "runs" / "two-nodes"
    job = jobs.submit("--nodes=2", CONFIG=str(config), OUTPUT_DIR=str(out), GPUS_PER_NODE="1", GLOBAL_BATCH="2",
                      PER_DEVICE="1")  # fmt: skip
    assert jobs.wait_until_done(job) == "COMPLETED", jobs.tail(job)
    log = jobs.log(job).read_text()
    assert f"job {job} on 2 node(s) (n[1-2])" in log
    launches = re.findall(r"\+ torchrun --nnodes 2 --nproc_per_node 1 .*--rdzv_conf is_host=(\d)", log)
    assert sorted(launches) == ["0", "1"]  # one torchrun per node; the first hosts the rendezvous

    single = jobs.workdir / "runs" / "single"
    done = run_module("fastchat_plora.train_plora", "--config", str(config), "--output_dir", str(single),
                      "--per_device_train_batch_size", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert relative_update_difference(out, single, tiny_model_dir) < TOLERANCE
    probe = json.loads((out / "summary.json").read_text())["rank_probe"]
    assert probe["numerical_rank"] == json.loads((single / "summary.json").read_text())["rank_probe"]["numerical_rank"]
