"""launch/slurm.sbatch on a real single-host SLURM (tests/slurm/): a job that runs to its end, a job
preempted, requeued and resumed that ends bit-identical to one never interrupted, and a node whose
environment was never set up. Two processes (gloo) on the CPU stand in for a node's GPUs."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_conversations
from tests.slurm_harness import Jobs, cluster, write_config

pytestmark = pytest.mark.slow
KNOBS = {"GPUS_PER_NODE": "2", "GLOBAL_BATCH": "4", "PER_DEVICE": "2"}  # 2 processes x 2 = the global batch 4


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm")
    with cluster(tmp / "cluster") as env:
        yield Jobs(env, tmp / "work")


@pytest.fixture(scope="module")
def config(jobs, tiny_model_dir):
    data = write_conversations(jobs.workdir / "c.jsonl", n=64)
    return write_config(jobs.workdir / "tiny_plora.yaml", tiny_model_dir, data, max_steps=300)


@pytest.fixture(scope="module")
def uninterrupted(jobs, config):
    out = jobs.workdir / "runs" / "uninterrupted"
    job = jobs.submit("--cpus-per-task=2", CONFIG=str(config), OUTPUT_DIR=str(out), **KNOBS)
    assert jobs.wait_until_done(job) == "COMPLETED", jobs.tail(job)
    return job, out


def test_a_job_runs_to_its_end_with_its_log_where_the_readme_says(jobs, uninterrupted):
    job, out = uninterrupted
    log = jobs.log(job).read_text()  # logs/plora-JOBID.out beside where sbatch was called
    assert f"job {job} on 1 node(s)" in log and "start 1" in log
    assert re.search(r"\+ torchrun --nnodes 1 --nproc_per_node 2 .*--rdzv_endpoint \S+:\d+", log)
    assert (out / "model.safetensors").is_file() and json.loads((out / "summary.json").read_text())["steps"] == 300


def test_a_preempted_job_is_requeued_and_ends_as_an_uninterrupted_one(jobs, config, uninterrupted):
    out = jobs.workdir / "runs" / "preempted"
    job = jobs.submit("--cpus-per-task=2", CONFIG=str(config), OUTPUT_DIR=str(out), **KNOBS)
    jobs.wait_for_line(job, "unload at step 4")  # training is under way (the log is the job's own)
    jobs.preempt(job)
    assert jobs.wait_until_done(job) == "COMPLETED", jobs.tail(job)

    log = jobs.log(job).read_text()
    assert "start 1" in log and "start 2" in log and jobs.show(job)["Restarts"] == "1"  # SLURM_RESTART_COUNT=1
    stops = re.findall(r"stop requested: every rank stops after step (\d+)", log)
    assert len(stops) == 2 and stops[0] == stops[1]  # both ranks, the same step
    stopped = int(stops[0])
    assert 4 <= stopped < 300
    assert f"requeueing job {job}" in log and "resume: replayed" in log
    ours, theirs = load_file(out / "model.safetensors"), load_file(uninterrupted[1] / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # fp32 on the CPU: bit-identical
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{stopped}"]  # the one the stop saved; save_strategy is "no"


def test_a_node_without_the_package_fails_with_one_line_naming_the_fix(jobs, config):
    out = jobs.workdir / "runs" / "no-env"
    bare = {"ENV_SETUP": "", "PATH": "/usr/sbin:/usr/bin:/bin", "PYTHONPATH": "", "VIRTUAL_ENV": ""}
    job = jobs.submit(CONFIG=str(config), OUTPUT_DIR=str(out), **KNOBS, **bare)
    assert jobs.wait_until_done(job) == "FAILED"
    errors = [line for line in jobs.log(job).read_text().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "fastchat_plora does not import on" in errors[0] and "set ENV_SETUP" in errors[0]
    assert not out.exists()
