"""Two CPU processes (torchrun DDP over gloo, DeepSpeed ZeRO-2 and ZeRO-3) train what one process trains.

Each run: the tiny LLaMA, PLoRA r = 2 with momentum 0.3, three stages of two steps, global batch 2
(one process x 2, or two processes x 1), sequential data order, no dropout, LR 1e-3. Tolerance: the
distributed update W_T - W_0 differs from the single-process one by less than 1e-3 of its norm, per
weight (measured here: 6e-6 for DDP, 3e-4 for ZeRO-2 and ZeRO-3, whose reduction order differs), and
every adapted layer's update has the same rank, 3 x 2. The DeepSpeed runs are launched exactly as a
user would on this CPU: `DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module fastchat_plora.train_plora ...`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eval.loading import load_for_eval
from tests.conftest import (
    ALL_LINEAR,
    REPO,
    module_env,
    relative_update_difference,
    run_module,
    tiny_run,
    write_conversations,
)

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TOLERANCE = 1e-3


def flags(model_dir: Path, data: Path, out: Path, per_device: int, *extra: str) -> list[str]:
    run = tiny_run(model_dir, data, out, per_device_train_batch_size=per_device, unload_every_steps=2, max_steps=6,
                   unload_momentum=0.3, lora_dropout=0, learning_rate=1e-3, train_sampling_strategy="sequential",
                   save_steps=3, logging_steps=1, use_cpu=True)  # fmt: skip
    return [*run, *extra]


def launch(launcher: str, port: int, args: list[str], log: Path, env: dict | None = None) -> None:
    if launcher == "single":
        command = [sys.executable, "-m", "fastchat_plora.train_plora", *args]
    elif launcher == "torchrun":
        command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
                   "-m", "fastchat_plora.train_plora", *args]  # fmt: skip
    else:
        command = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
                   "--module", "fastchat_plora.train_plora", *args]  # fmt: skip
    env = module_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **(env or {}))
    with log.open("w") as f:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    data = write_conversations(tmp / "c.jsonl")
    reference = tmp / "single"
    launch("single", 0, flags(tiny_model_dir, data, reference, 2), tmp / "single.log")
    return tiny_model_dir, data, reference, tmp


@pytest.mark.parametrize(
    "launcher, extra, port",
    [
        ("torchrun", [], 29611),
        ("deepspeed", ["--deepspeed", str(REPO / "configs" / "ds" / "zero2.json")], 29612),
        ("deepspeed", ["--deepspeed", str(REPO / "configs" / "ds" / "zero3.json")], 29613),
    ],
    ids=["ddp-gloo", "zero2", "zero3"],
)
def test_two_processes_train_what_one_trains(setup, launcher, extra, port):
    base, data, reference, tmp = setup
    out = tmp / f"{launcher}-{port}"
    launch(launcher, port, flags(base, data, out, 1, *extra), tmp / f"{out.name}.log")

    assert relative_update_difference(out, reference, base) < TOLERANCE
    probe = json.loads((out / "summary.json").read_text())["rank_probe"]
    assert (
        probe["numerical_rank"]
        == json.loads((reference / "summary.json").read_text())["rank_probe"]["numerical_rank"]
        == 3 * 2
    )
    assert sorted(p.name for p in (out / "stages").iterdir()) == [f"stage-0000{i}.safetensors" for i in range(3)]

    # the mid-run checkpoint is readable on its own and is the model a single process had at that step
    ids = torch.arange(3, 30).unsqueeze(0)
    ours = load_for_eval(out / "checkpoint-3")
    theirs = load_for_eval(reference / "checkpoint-3")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize(
    "launcher, extra, port",
    [("torchrun", [], 29617), ("deepspeed", ["--deepspeed", str(REPO / "configs" / "ds" / "zero3.json")], 29618)],
    ids=["ddp-gloo", "zero3"],
)
def test_held_out_loss_and_samples_with_two_processes(setup, launcher, extra, port):
    """Every rank evaluates and generates (ZeRO-3 gathers layers for both); rank 0 writes once."""
    base, data, _, tmp = setup
    out = tmp / f"eval-{launcher}"
    evals = ["--eval_holdout", "4", "--sample_prompts", "1", "--sample_max_new_tokens", "4", "--save_strategy", "no"]
    launch(launcher, port, flags(base, data, out, 1, *extra, *evals), tmp / f"{out.name}.log")
    history = json.loads((out / "log_history.json").read_text())
    before = {e["step"]: e["eval_before_unload_loss"] for e in history if "eval_before_unload_loss" in e}
    after = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}
    assert list(before) == list(after) == [2, 4]
    assert all(after[s] == pytest.approx(before[s], rel=1e-4) for s in before)  # preserve: the output is kept
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 2, 4, 6]


BF16 = ["--model_dtype", "bfloat16", "--bf16", "True", "--lora_dropout", "0.05"]


def zero3_partitioning_everything(tmp: Path) -> Path:
    """configs/ds/zero3.json with no parameter kept whole: the LoRA factors are partitioned too."""
    config = json.loads((REPO / "configs" / "ds" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp / "zero3_threshold0.json"
    path.write_text(json.dumps(config))
    return path


def replayed_on_one_process(run: Path, base: Path) -> dict[str, torch.Tensor]:
    """W_0 with every stage file of ``run`` merged by the single-process core (bf16, Kahan-compensated)."""
    from fastchat_plora.adapters import add_adapters
    from fastchat_plora.models import load_model
    from fastchat_plora.plora import LocalWeights, replay, stage_generator
    from fastchat_plora.rundir import RunDir

    model = add_adapters(load_model(str(base), "bfloat16"), r=2, alpha=16, targets=ALL_LINEAR,
                         generator=stage_generator(0, 0))  # fmt: skip
    stages = RunDir(run)
    assert replay(model, (stages.stage_factors(s) for s in range(3)), weights=LocalWeights({})) == 3
    return {name.removeprefix("base_model.model.").replace(".base_layer", ""): p.detach()
            for name, p in model.named_parameters() if ".base_layer." in name}  # fmt: skip


@pytest.mark.parametrize(
    "launcher, extra, port",
    [("torchrun", [], 29621), ("deepspeed", ["--deepspeed", "ZERO2"], 29622),
     ("deepspeed", ["--deepspeed", "ZERO3_THRESHOLD0"], 29623)],
    ids=["ddp-gloo", "zero2", "zero3"],
)  # fmt: skip
def test_bf16_merges_of_two_processes_are_the_single_process_merges_with_half_the_buffers_each(
    setup, launcher, extra, port
):
    """DDP and ZeRO-2 share the Kahan buffers out by layer (owner merges, then broadcasts); ZeRO-3 merges
    each rank's partition with its slice of the buffers. Either way the weights are those one process gets
    from the same stage factors, bit for bit, and each rank holds half of the buffers."""
    base, data, reference, tmp = setup
    configs = {"ZERO2": str(REPO / "configs" / "ds" / "zero2.json"), "ZERO3_THRESHOLD0": str(
        zero3_partitioning_everything(tmp))}  # fmt: skip
    out, log = tmp / f"bf16-{launcher}-{port}", tmp / f"bf16-{launcher}-{port}.log"
    launch(launcher, port, flags(base, data, out, 1, *[configs.get(e, e) for e in extra], *BF16), log)

    saved = load_file(str(out / "model.safetensors"))
    for name, weight in replayed_on_one_process(out, base).items():
        assert torch.equal(saved[name], weight), name
    sizes = [float(m) for m in re.findall(r"merge compensation: ([\d.]+) MiB", log.read_text())]
    total = replayed_total_mib(base)
    assert len(sizes) == 2 and all(size <= 0.55 * total for size in sizes) and sum(sizes) >= 0.99 * total, sizes


def replayed_total_mib(base: Path) -> float:
    """The Kahan buffers one process keeps for the tiny model in bf16: one per adapted weight."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(base)
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    per_layer = 2 * c.hidden_size**2 + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * per_layer * 2 / 2**20


def test_zero3_resumes_exactly_from_its_checkpoint(setup):
    """bf16 with Kahan buffers, LoRA dropout and every parameter partitioned: the resumed run replays the
    stages into its partitions and goes on to the same bits as the run that was not stopped."""
    base, data, _, tmp = setup
    zero3 = zero3_partitioning_everything(tmp)
    whole = tmp / "zero3-whole"
    launch("deepspeed", 29614, flags(base, data, whole, 1, "--deepspeed", str(zero3), *BF16), tmp / "whole.log")
    resumed = tmp / "zero3-resumed"
    shutil.copytree(whole / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copytree(whole / "stages", resumed / "stages")  # the checkpoint stands on the run's stage files
    extra = ["--deepspeed", str(zero3), *BF16, "--resume_from_checkpoint", "latest"]
    launch("deepspeed", 29615, flags(base, data, resumed, 1, *extra), tmp / "resumed.log")
    ours, theirs = (load_file(str(run / "model.safetensors")) for run in (resumed, whole))
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_zero3_trains_with_the_recomputed_lora_dropout(setup):
    """The dropout recompute in backward meets ZeRO-3's partitioned lora_A weights: they must be gathered."""
    base, data, _, tmp = setup
    out = tmp / "zero3-dropout"
    extra = ["--deepspeed", str(REPO / "configs" / "ds" / "zero3.json"), "--lora_dropout", "0.1"]
    launch("deepspeed", 29616, flags(base, data, out, 1, *extra), tmp / "zero3-dropout.log")
    summary = json.loads((out / "summary.json").read_text())
    assert all(math.isfinite(loss) for loss in summary["loss_by_stage"].values())
    assert summary["rank_probe"]["numerical_rank"] == 3 * 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fsdp", "full_shard"], "FSDP"),
        (["--deepspeed", "OFFLOAD"], "offload_optimizer.device='cpu'"),
        (["--deepspeed", "missing.json"], "missing.json"),
    ],
)
def test_unsupported_setups_stop_before_training(setup, tmp_path, extra, message):
    base, data, _, _ = setup
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    (tmp_path / "offload.json").write_text(json.dumps(offload))
    extra = [str(tmp_path / "offload.json") if e == "OFFLOAD" else e for e in extra]
    out = tmp_path / "out"
    proc = run_module("fastchat_plora.train_plora", *flags(base, data, out, 1, *extra))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_a_rank_that_dies_ends_the_job_and_leaves_the_last_checkpoint_readable(setup, tmp_path):
    base, data, _, _ = setup
    out = tmp_path / "run"
    args = flags(base, data, out, 1)
    args[args.index("--max_steps") + 1] = "400"  # long enough to be killed mid-run
    args[args.index("--save_steps") + 1] = "2"
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29616",
               "-m", "fastchat_plora.train_plora", *args]  # fmt: skip
    log = (tmp_path / "log").open("w")
    job = subprocess.Popen(command, cwd=REPO, env=module_env(OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while not (out / "checkpoint-4").is_dir() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert workers and job.poll() is None, (tmp_path / "log").read_text()[-2000:]
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies without warning
    assert job.wait(timeout=300) != 0
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    model = load_for_eval(out / f"checkpoint-{last}")  # complete: staged, then renamed into place
    assert not (out / "summary.json").exists()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(3, 20).unsqueeze(0)).logits).all()


def test_deepspeed_resume_with_wandb_starts(setup, tmp_path):
    """The cluster path: DeepSpeed, resumed from a checkpoint, logging to W&B (offline here)."""
    pytest.importorskip("wandb")
    base, data, _, _ = setup
    wandb_env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_API_KEY": ""}
    out = tmp_path / "run"
    extra = ["--deepspeed", str(REPO / "configs" / "ds" / "zero2.json"), "--report_to", "wandb"]
    launch("deepspeed", 29617, flags(base, data, out, 1, *extra, "--max_steps", "3"), tmp_path / "first.log", wandb_env)
    resume = [*extra, "--resume_from_checkpoint", "latest"]
    launch("deepspeed", 29618, flags(base, data, out, 1, *resume), tmp_path / "resumed.log", wandb_env)
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert [e["step"] for e in map(json.loads, (out / "unload_events.jsonl").read_text().splitlines())] == [2, 4, 6]
    # each launch finished its W&B run before its process left: an exit record, code 0
    from tests.test_tracking import records

    run_id = json.loads((out / "wandb_run.json").read_text())["id"]
    files = sorted(tmp_path.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    exits = [r.exit.exit_code for f in files for r in records(f) if r.WhichOneof("record_type") == "exit"]
    assert len(files) == 2 and exits == [0, 0]
