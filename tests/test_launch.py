"""Every launch script in its dry-run mode: it checks the config and prints the one command it would run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("shipped_data")  # the configs' data files: the scripts check them
EXPERIMENTS = ("table1", "table2", "table3", "figure2", "figure3", "figure4")


def dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    path = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"  # the environment's torchrun, as a user has it
    logged_out = {"WANDB_API_KEY": "", "NETRC": os.devnull}  # a developer's own W&B login changes no command
    full_env = {**os.environ, **logged_out, "DRY_RUN": "1", "PYTHON": sys.executable, "PYTHONPATH": str(REPO),
                "PATH": path, **env}  # fmt: skip
    return subprocess.run(["bash", f"launch/{script}", *args], cwd=REPO, env=full_env, capture_output=True, text=True)


def commands(proc: subprocess.CompletedProcess) -> list[str]:
    return [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize(
    "script, env, launcher",
    [
        ("node.sh", {}, "torchrun --nproc_per_node 8"),
        ("node.sh", {"LAUNCHER": "deepspeed"}, "deepspeed --num_gpus 8"),
        ("slurm.sbatch", {}, "torchrun --nnodes 1 --nproc_per_node 8"),
    ],
)
def test_cluster_scripts_print_one_launch_line(script, env, launcher):
    proc = dry_run(script, "--seed", "7", **env)
    assert proc.returncode == 0, proc.stderr
    [command] = commands(proc)
    assert command.startswith(launcher)
    assert "--config configs/paper/table1_plora_r8.yaml" in command
    assert "--per_device_train_batch_size 3 --gradient_accumulation_steps 1" in command  # 8 x 3 = 24
    assert command.endswith("--seed 7")  # extra flags go last, so they override


def test_the_slurm_job_takes_its_gpus_and_port_from_slurm_and_resumes_by_default():
    env = {"SLURM_JOB_ID": "12345", "SLURM_GPUS_ON_NODE": "4", "SLURM_NNODES": "2"}
    [command] = commands(dry_run("slurm.sbatch", **env))
    assert command.startswith("torchrun --nnodes 2 --nproc_per_node 4 --rdzv_id 12345")
    assert ":32345 " in command  # 20000 + job id % 20000: two jobs on one node don't share a port
    assert "--gradient_accumulation_steps 1 --resume_from_checkpoint auto" in command  # 2 x 4 x 3 = 24
    [command] = commands(dry_run("slurm.sbatch", RESUME="no", GPUS_PER_NODE="2", REPORT_TO="wandb", **env))
    assert "--nproc_per_node 2" in command and "--resume_from_checkpoint" not in command
    assert "--gradient_accumulation_steps 2 --report_to wandb" in command


def test_a_job_array_task_trains_its_own_line_of_the_run_list(tmp_path):
    runs = tmp_path / "table1.runs"
    runs.write_text("configs/paper/table1_lora_r8.yaml\truns/a\t42\nconfigs/paper/table1_plora_r8.yaml\truns/b\t43\n")
    env = {"RUN_LIST": str(runs), "SLURM_ARRAY_TASK_ID": "1"}
    [command] = commands(dry_run("slurm.sbatch", "--max_steps", "5", **env))
    assert "--config configs/paper/table1_plora_r8.yaml --output_dir runs/b " in command
    assert command.endswith("--seed 43 --max_steps 5")  # the run's seed, then the job's own flags
    proc = dry_run("slurm.sbatch", **{**env, "SLURM_ARRAY_TASK_ID": "2"})
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: run list {runs} has no run 2"


def test_reproduce_logs_every_run_to_wandb_when_asked():
    proc = dry_run("reproduce.sh", "table2", "small", REPORT_TO="wandb")
    trained = [c for c in commands(proc) if "fastchat_plora.train_plora" in c]
    assert trained and all("--report_to wandb" in c for c in trained)


def test_node_sh_resumes_when_asked_and_logs_to_wandb_with_a_key():
    [command] = commands(dry_run("node.sh", RESUME="auto", WANDB_API_KEY="k" * 40))
    assert command.endswith("--resume_from_checkpoint auto --report_to wandb")
    assert "--resume_from_checkpoint" not in commands(dry_run("node.sh"))[0]


@pytest.mark.parametrize("script", ["node.sh", "slurm.sbatch", "reproduce.sh"])
def test_a_wandb_login_in_netrc_turns_wandb_on_and_report_to_none_turns_it_off(script, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'k' * 40}\n")  # what `wandb login` writes
    args = ("table1", "small") if script == "reproduce.sh" else ()

    def trained(**env) -> list[str]:
        return [c for c in commands(dry_run(script, *args, **env)) if "fastchat_plora.train_plora" in c]

    def every(commands: list[str], check) -> bool:
        return bool(commands) and all(check(c) for c in commands)

    assert every(trained(NETRC=str(netrc)), lambda c: "--report_to wandb" in c)
    assert every(trained(NETRC=str(netrc), REPORT_TO="none"), lambda c: "--report_to none" in c)
    assert every(trained(), lambda c: "--report_to" not in c)  # logged out: nothing, never a login prompt
    other_server = trained(NETRC=str(netrc), WANDB_BASE_URL="https://wandb.example.org")
    assert every(other_server, lambda c: "--report_to" not in c)  # the key is for another server


@pytest.mark.parametrize("script", ["node.sh", "slurm.sbatch", "reproduce.sh"])
def test_padding_free_packs_batches_for_flash_attention_in_every_launcher(script, tmp_path):
    args = ("table1", "paper") if script == "reproduce.sh" else ()
    (tmp_path / "flash_attn").mkdir()  # flash-attn installed, as the check on a machine without a GPU asks
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    proc = dry_run(script, *args, PADDING_FREE="1", PYTHONPATH=f"{REPO}:{tmp_path}")
    trained = [c for c in commands(proc) if "train_plora" in c]
    assert trained and all("--padding_free True --attn_implementation flash_attention_2" in c for c in trained)
    assert not any("--padding_free" in c for c in commands(dry_run(script, *args)))


@pytest.mark.parametrize("scale, template", [("paper", "vicuna_v1.1"), ("small", None)])
def test_the_base_model_is_evaluated_in_its_runs_prompt_format(scale, template, tmp_path):
    proc = dry_run("reproduce.sh", "table1", scale, RUNS_DIR=str(tmp_path))
    [base] = [c for c in commands(proc) if "run_eval" in c and "/base/eval" in c]
    assert (f"--conv_template {template}" in base) if template else ("--conv_template" not in base)


def test_fewer_gpus_keep_the_global_batch_through_accumulation():
    [command] = commands(dry_run("node.sh", NPROC="2", DEEPSPEED="configs/ds/zero3.json"))
    assert "--gradient_accumulation_steps 4" in command and "--deepspeed configs/ds/zero3.json" in command


@pytest.mark.parametrize("gpus, per_device, accumulation", [(12, 2, 1), (24, 1, 1), (6, 2, 2), (1, 3, 8)])
def test_more_gpus_keep_the_global_batch_with_a_smaller_per_device_batch(gpus, per_device, accumulation):
    [command] = commands(dry_run("node.sh", NPROC=str(gpus)))
    assert f"--per_device_train_batch_size {per_device} --gradient_accumulation_steps {accumulation}" in command
    assert per_device * accumulation * gpus == 24


@pytest.mark.parametrize(
    "env, message",
    [
        ({"NPROC": "5"}, "GLOBAL_BATCH=24 does not split over 5 processes: run on a process count that divides it"),
        ({"NPROC": "4", "PER_DEVICE": "4"}, "GLOBAL_BATCH=24 is not a multiple of 4 processes x PER_DEVICE=4"),
        ({"CONFIG": "configs/nope.yaml"}, "nope.yaml"),
        ({"DEEPSPEED": "configs/ds/none.json"}, "none.json"),
        ({"LAUNCHER": "mpirun"}, "LAUNCHER=mpirun"),
        ({"PADDING_FREE": "yes"}, "PADDING_FREE=yes: expected 0 or 1"),
    ],
)
def test_bad_knobs_stop_with_a_clear_error(env, message):
    proc = dry_run("node.sh", **env)
    assert proc.returncode == 2 and message in proc.stderr and not commands(proc)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"ENV_SETUP": "/no/such/setup.sh"}, "ENV_SETUP=/no/such/setup.sh: no such file"),
        ({"PYTHON": "/no/such/python"}, "fastchat_plora does not import on"),
        ({"GPUS_PER_NODE": "5"}, "GLOBAL_BATCH=24 does not split over 5 processes"),
    ],
)
def test_bad_slurm_knobs_stop_with_one_line(env, message):
    proc = dry_run("slurm.sbatch", **env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0] and not commands(proc)


def test_a_bad_config_is_refused_before_launch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data_path: x.jsonl\nfinetune_mode: plora\nunload_every_steps: 0\n")
    proc = dry_run("node.sh", CONFIG=str(bad), LAUNCHER="deepspeed")
    assert proc.returncode == 2 and "unload_every_steps=0" in proc.stderr and not commands(proc)


@pytest.mark.parametrize("scale", ["small", "paper"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_reproduce_plans_every_run_of_every_experiment(experiment, scale, tmp_path):
    proc = dry_run("reproduce.sh", experiment, scale, RUNS_DIR=str(tmp_path / "runs"), RESULTS_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    configs = sorted((REPO / "configs" / scale).glob(f"{experiment}_*.yaml"))
    trained = [c for c in commands(proc) if "fastchat_plora.train_plora" in c]
    assert len(trained) == len(configs)
    for config in configs:
        assert any(f"--config configs/{scale}/{config.name}" in c for c in trained)
    last = commands(proc)[-1]
    assert "eval.tables" in last or "eval.figures" in last
    if experiment != "figure2":  # the test sets are checked (at paper scale: fetched) before any training
        first = commands(proc)[0]
        assert "eval.run_eval --check_data" in first and ("--data_dir hub" in first) == (scale == "paper")


def test_reproduce_evaluates_on_the_tasks_asked_for(tmp_path):
    proc = dry_run("reproduce.sh", "table2", "small", RUNS_DIR=str(tmp_path / "runs"), RESULTS_DIR=str(tmp_path),
                   EVAL_TASKS="gsm8k_loss")  # fmt: skip
    evaluations = [c for c in commands(proc) if "eval.run_eval" in c]
    assert len(evaluations) == 1 + 4  # the data check, then each of the four runs
    assert all(" --tasks gsm8k_loss " in f"{c} " for c in evaluations), evaluations


def test_reproduce_shares_each_evaluation_over_eval_gpus_and_asks_slurm_for_them(tmp_path):
    env = {"RUNS_DIR": str(tmp_path / "runs"), "RESULTS_DIR": str(tmp_path), "EVAL_GPUS": "4"}
    evaluations = [c for c in commands(dry_run("reproduce.sh", "table1", "paper", **env)) if "run_eval --model" in c]
    assert len(evaluations) == 1 + len(list((REPO / "configs" / "paper").glob("table1_*.yaml")))  # base, runs
    assert all(" -m torch.distributed.run --standalone --nproc_per_node 4 -m eval.run_eval " in c for c in evaluations)
    jobs = commands(dry_run("reproduce.sh", "table1", "paper", SLURM="1", **env))
    evaluating = [c for c in jobs if "REPRODUCE_TASK=eval" in c or "REPRODUCE_TASK=base" in c]
    assert len(evaluating) == 2 and all(" --nodes 1 --ntasks 1 --gpus-per-node 4 " in c for c in evaluating)
    proc = dry_run("reproduce.sh", "table1", "paper", **{**env, "EVAL_GPUS": "0"})
    assert proc.returncode == 2 and "EVAL_GPUS=0: expected a number of GPUs, 1 or more" in proc.stderr


def test_reproduce_skips_finished_runs_and_names_unknown_experiments(tmp_path):
    runs = tmp_path / "runs"
    done = runs / "small" / "table2_lora_r1_qv" / "seed42"
    (done / "eval").mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    (done / "eval" / "results.json").write_text("{}")
    proc = dry_run("reproduce.sh", "table2", "small", RUNS_DIR=str(runs), RESULTS_DIR=str(tmp_path))
    assert f"= {done}: trained" in proc.stdout and f"= {done / 'eval'}: evaluated" in proc.stdout
    assert not any(f"--output_dir {done} " in c for c in commands(proc))
    proc = dry_run("reproduce.sh", "table9")
    assert proc.returncode == 2 and "table9" in proc.stderr


def test_reproduce_trains_only_the_configs_named(tmp_path):
    env = {"RUNS_DIR": str(tmp_path / "runs"), "RESULTS_DIR": str(tmp_path), "SEEDS": "42 43"}
    proc = dry_run("reproduce.sh", "capacity", "small", CONFIGS="capacity_lora_r1 capacity_plora_r1_m0", **env)
    assert proc.returncode == 0, proc.stderr
    trained = [c for c in commands(proc) if "fastchat_plora.train_plora" in c]
    assert [c.split("--config ")[1].split()[0] for c in trained] == [
        "configs/small/capacity_lora_r1.yaml", "configs/small/capacity_lora_r1.yaml",
        "configs/small/capacity_plora_r1_m0.yaml", "configs/small/capacity_plora_r1_m0.yaml",
    ]  # fmt: skip
    assert " --tasks gsm8k_loss --limit 200 " in [c for c in commands(proc) if "eval.run_eval --model_path" in c][0]
    assert "eval.tables --table capacity" in commands(proc)[-1]
    proc = dry_run("reproduce.sh", "capacity", "small", CONFIGS="table1_lora_r1", **env)
    assert proc.returncode == 2 and "CONFIGS: 'table1_lora_r1' is not a config of capacity" in proc.stderr


def test_reproduce_under_slurm_queues_arrays_sized_to_the_runs_left(tmp_path):
    """The queueing itself runs on a real SLURM in tests/test_slurm_reproduce.py; here, what is queued when."""
    runs = tmp_path / "runs"
    (runs / "paper" / "figure2_m0" / "seed42").mkdir(parents=True)  # the last of the four in file order
    (runs / "paper" / "figure2_m0" / "seed42" / "summary.json").write_text("{}")
    env = {"RUNS_DIR": str(runs), "RESULTS_DIR": str(tmp_path), "SLURM": "1", "NODES": "2", "NPROC": "4"}
    proc = dry_run("reproduce.sh", "figure2", "paper", SBATCH_FLAGS="--partition gpu --time 2:00:00", **env)
    assert proc.returncode == 0, proc.stderr
    train, results = commands(proc)[-2:]
    assert train.startswith("sbatch --chdir ") and " --partition gpu --time 2:00:00 " in train
    assert " --array 0,1,2 --nodes 2 --gpus-per-node 4 " in train and train.endswith(" launch/slurm.sbatch")
    assert " --dependency afterok:JOB1 " in results and "REPRODUCE_TASK=results" in results  # no evaluation
    assert "queued 3 of 4 runs to train" in proc.stdout and not (runs / "paper" / "figure2.runs").exists()
    proc = dry_run("reproduce.sh", "figure2", "paper", **{**env, "NPROC": "8"})  # 16 GPUs cannot split 24
    assert proc.returncode == 2 and "GLOBAL_BATCH=24 does not split over 16 processes" in proc.stderr
    assert not commands(proc)
    proc = dry_run("reproduce.sh", "figure2", "paper", **{**env, "SLURM": "yes"})
    assert proc.returncode == 2 and "SLURM=yes: expected 0 or 1" in proc.stderr


@pytest.mark.skipif(not (REPO / ".venv/bin/python").exists(), reason="env.sh sets up .venv; tests/run.sh makes it")
@pytest.mark.parametrize("allocator, expected", [("mimalloc", "libmimalloc"), ("system", ""), ("tcmalloc", None)])
def test_env_sh_starts_later_commands_on_the_chosen_allocator(allocator, expected):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    script = 'source launch/env.sh && echo "preload=${LD_PRELOAD:-}"'
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env={**env, "PLORA_ALLOCATOR": allocator},
                          capture_output=True, text=True)  # fmt: skip
    if expected is None:
        assert proc.returncode == 2 and "PLORA_ALLOCATOR=tcmalloc" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("preload=")]
    assert (expected in line) if expected else line == "preload="
