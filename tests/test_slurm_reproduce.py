"""launch/reproduce.sh with SLURM=1 on a real single-host SLURM (tests/slurm/): Table 1 queued as a
training array (each task a launch/slurm.sbatch job), an evaluation array whose task N waits for
training task N, the base model's evaluation and the job that writes the table, at both scales, on a
tiny LLaMA without a chat template (the paper configs' vicuna format) with steps overridden."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.conftest import REPO, write_conversations
from tests.slurm_harness import Jobs, cluster

pytestmark = pytest.mark.slow
RUNS = ("table1_lora_r1", "table1_plora_r1")
QUESTION = "Tom has 3 apples and buys 2 more. How many apples does he have?"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm_reproduce")
    with cluster(tmp / "cluster") as env:
        yield Jobs(env, tmp / "work"), tmp


def reproduce(slurm, scale: str, model, **knobs: str) -> subprocess.CompletedProcess:
    jobs, tmp = slurm
    test_sets = tmp / "test_sets"
    (test_sets / "gsm8k").mkdir(parents=True, exist_ok=True)
    answer = "He has 3 + 2 = 5 apples.\n#### 5"
    (test_sets / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": QUESTION, "answer": answer}) + "\n")
    data = write_conversations(tmp / "conversations.jsonl", n=32)
    steps = "--max_steps 4 --unload_every_samples 8 --use_cpu True"  # unloads at both scales' batch sizes
    train_args = f"--model_name_or_path {model} --data_path {data} {steps}"
    env = {**jobs.env, "SLURM": "1", "REQUEST_GPUS": "0", "SEEDS": "42", "CONFIGS": " ".join(RUNS),
           "RUNS_DIR": str(tmp / "runs"), "RESULTS_DIR": str(tmp / "results"), "LOG_DIR": str(tmp / "logs"),
           "BASE_MODEL": str(model), "DATA_DIR": str(test_sets), "EVAL_TASKS": "gsm8k_loss", "TRAIN_ARGS": train_args,
           "REPORT_TO": "none", "WANDB_API_KEY": "", "NETRC": os.devnull, **knobs}  # fmt: skip
    return subprocess.run(["bash", "launch/reproduce.sh", "table1", scale], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def logs(tmp) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted((tmp / "logs").glob("*")))


SCALES = [
    ("small", "tiny_model_dir", {}),  # the embedded model's stand-in: it has a chat template
    ("paper", "tiny_model_dir_without_template", {"NPROC": "1", "GLOBAL_BATCH": "4"}),  # LLaMA-7B's: none
]


@pytest.mark.parametrize("scale, model, knobs", SCALES)
def test_a_table_is_queued_as_arrays_and_written_once_they_end(slurm, scale, model, knobs, request):
    jobs, tmp = slurm
    model = request.getfixturevalue(model)
    queued = reproduce(slurm, scale, model, **knobs)
    assert queued.returncode == 0, queued.stderr[-3000:]
    submitted = [line for line in queued.stdout.splitlines() if line.startswith("+ sbatch ")]
    names = [re.search(r"--job-name (\S+)", line).group(1) for line in submitted]
    assert names == ["plora-table1", "plora-table1-eval", "plora-table1-base", "plora-table1-results"]
    assert "--array 0,1 " in submitted[0] and "launch/slurm.sbatch" in submitted[0]
    assert "--array 0-1 --dependency aftercorr:" in submitted[1]  # task N evaluates once training task N is done
    train_job, eval_job, base_job, results_job = re.search(r"jobs (\d+) (\d+) (\d+) (\d+)", queued.stdout).groups()
    assert f"--dependency afterok:{eval_job}:{base_job}" in submitted[3]

    assert jobs.wait_until_done(int(results_job), timeout=900) == "COMPLETED", logs(tmp)
    table = (tmp / "results" / scale / "table1" / "table1.md").read_text()
    assert [row.split("|")[1].strip() for row in table.splitlines()[2:5]] == ["base", "LoRA", "PLoRA"]
    for name in RUNS:
        run = tmp / "runs" / scale / name / "seed42"
        assert json.loads((run / "summary.json").read_text())["steps"] == 4
        assert json.loads((run / "run_args.json").read_text())["seed"] == 42
        assert "heldout_loss" in json.loads((run / "eval" / "results.json").read_text())["metrics"]["gsm8k"]
        assert (run / "rank" / "rank.json").is_file()
    training_logs = sorted((tmp / "logs").glob(f"plora-table1-{train_job}_*.out"))
    assert len(training_logs) == 2 and all("start 1" in log.read_text() for log in training_logs)
    nproc = knobs.get("NPROC", "1")
    assert all(f"torchrun --nnodes 1 --nproc_per_node {nproc} " in log.read_text() for log in training_logs)
    base = json.loads((tmp / "runs" / scale / "base" / "eval" / "results.json").read_text())
    assert base["conv_template"] == ("vicuna_v1.1" if scale == "paper" else None)  # the format the runs trained in

    again = reproduce(slurm, scale, model, DRY_RUN="1", **knobs)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "queued 0 of 2 runs to train" in again.stdout and "--job-name plora-table1 " not in again.stdout
