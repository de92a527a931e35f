"""Long runs: exact resume after SIGKILL, SIGTERM preemption, atomic checkpoints, bad resume input,
and stopping after repeated non-finite stages."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from fastchat_plora.adapters import add_adapters
from fastchat_plora.callback import PLoRACallback, PreemptionCallback, StopRequest, TrainingDiverged
from fastchat_plora.checkpoint import base_checksum, restore_base_weights
from fastchat_plora.plora import LocalWeights, StagePlan, lora_layers
from fastchat_plora.rundir import RunDir, RunDirError
from fastchat_plora.train_plora import cli
from fastchat_plora.trainer import PLoRATrainer
from tests.conftest import ALL_LINEAR, start_module, tiny_lora, tiny_run, write_conversations

WAIT_SECONDS = 300


def latest_checkpoint(out: Path) -> Path | None:
    return RunDir(out).latest_checkpoint()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_conversations(tmp_path_factory.mktemp("data") / "c.jsonl", n=64)


def flags(model_dir, data, out, *extra) -> list[str]:
    # Momentum 0.1 and dropout: the live adapter, the optimizer, the stage and the RNG all matter.
    run = tiny_run(model_dir, data, out, per_device_train_batch_size=4, unload_every_steps=4, unload_momentum=0.1,
                   max_steps=16, learning_rate=1e-2, logging_steps=1)  # fmt: skip
    return [*run, *extra]


def start(args: list[str]) -> subprocess.Popen:
    return start_module("fastchat_plora.train_plora", *args)


def finish(args: list[str]) -> subprocess.CompletedProcess:
    proc = start(args)
    out, _ = proc.communicate(timeout=WAIT_SECONDS)
    return subprocess.CompletedProcess(args, proc.returncode, out)


def wait_for(proc: subprocess.Popen, path: Path, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared:\n{proc.stdout.read()[-2000:]}"
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.002)


@pytest.fixture(scope="module")
def straight(tiny_model_dir, data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("straight")
    done = finish(flags(tiny_model_dir, data, out, "--save_strategy", "no"))
    assert done.returncode == 0, done.stdout[-2000:]
    return load_file(out / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical on CPU fp32


def test_sigkill_mid_stage_then_resume_is_exact(tiny_model_dir, data, tmp_path, straight):
    out = tmp_path / "run"
    proc = start(flags(tiny_model_dir, data, out, "--save_steps", "10"))
    wait_for(proc, out / "checkpoint-10")  # step 10 is mid-stage: stage 2 runs steps 9-12
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=WAIT_SECONDS)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()

    done = finish(flags(tiny_model_dir, data, out, "--save_steps", "10", "--resume_from_checkpoint", "latest"))
    assert done.returncode == 0, done.stdout[-2000:]
    assert_same_weights(load_file(out / "model.safetensors"), straight)
    steps = [json.loads(line)["step"] for line in (out / "unload_events.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 16]


def test_sigterm_saves_a_checkpoint_and_stops_cleanly(tiny_model_dir, data, tmp_path, straight):
    out = tmp_path / "run"
    proc = start(flags(tiny_model_dir, data, out, "--save_strategy", "no"))
    wait_for(proc, out / "unload_events.jsonl")  # training has passed the first unload
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, log[-2000:]
    assert "resume with --resume_from_checkpoint latest" in log and "Traceback" not in log
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and not (out / "model.safetensors").exists()

    done = finish(
        flags(tiny_model_dir, data, out, "--save_strategy", "no", "--resume_from_checkpoint", str(checkpoint))
    )
    assert done.returncode == 0, done.stdout[-2000:]
    assert_same_weights(load_file(out / "model.safetensors"), straight)


def test_a_stop_file_then_auto_resume_ends_as_an_uninterrupted_run(tiny_model_dir, data, tmp_path, straight):
    """What a requeued cluster job does: stop on the STOP file, start again with `auto`, finish."""
    out = tmp_path / "run"
    auto = flags(tiny_model_dir, data, out, "--save_strategy", "no", "--resume_from_checkpoint", "auto")
    proc = start(auto)  # auto on an empty directory: a fresh start
    wait_for(proc, out / "unload_events.jsonl")
    (out / "STOP").touch()
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, log[-2000:]
    assert "stop requested: every rank stops after step" in log
    done = finish(auto)
    assert done.returncode == 0, done.stdout[-2000:]
    assert not (out / "STOP").exists()  # the earlier attempt's request is answered, not repeated
    assert_same_weights(load_file(out / "model.safetensors"), straight)
    again = finish(auto)  # requeued once more after it finished: nothing to do
    assert again.returncode == 0 and "holds a finished run: nothing to resume" in again.stdout


@pytest.mark.parametrize(
    "change,message",
    [
        (["--lora_r", "4"], "holds a run with lora_r=2, this one has lora_r=4"),
        (["--seed", "7"], "holds a run with seed=42, this one has seed=7"),
    ],
)
def test_resuming_with_other_settings_is_refused(tiny_model_dir, data, tmp_path, capsys, change, message):
    out = tmp_path / "run"
    assert cli(flags(tiny_model_dir, data, out, "--max_steps", "4", "--save_steps", "2")) == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert cli([*flags(tiny_model_dir, data, out, "--resume_from_checkpoint", "auto"), *change]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_auto_resume_starts_over_only_a_run_that_has_no_checkpoint_yet(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    assert run.resume_point("auto") is None
    run.check_writable(overwrite=False, resuming=False, auto=True)  # no directory yet
    (run.path / "stages").mkdir(parents=True)
    (run.path / "unload_events.jsonl").write_text("")
    (run.path / "checkpoint-8").mkdir()  # half-written: no trainer_state.json
    with caplog.at_level("WARNING", logger="fastchat_plora.rundir"):
        assert run.resume_point("auto") is None
    assert "checkpoint-8 not complete" in caplog.text
    (run.path / "checkpoint-8").rmdir()
    run.check_writable(overwrite=False, resuming=False, auto=True)  # what a run writes before its checkpoint
    (run.path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="holds 'notes.txt' and no checkpoint: not an unfinished run"):
        run.check_writable(overwrite=False, resuming=False, auto=True)


def test_crash_during_a_save_leaves_the_previous_checkpoint(tiny_model_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original, calls = PLoRATrainer._save_optimizer_and_scheduler, []

    def crash_on_second_save(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            raise OSError("disk full")
        original(self, output_dir)

    monkeypatch.setattr(PLoRATrainer, "_save_optimizer_and_scheduler", crash_on_second_save)
    with pytest.raises(OSError, match="disk full"):
        cli(flags(tiny_model_dir, data, out, "--save_steps", "3"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert latest_checkpoint(out) == out / "checkpoint-3"

    monkeypatch.setattr(PLoRATrainer, "_save_optimizer_and_scheduler", original)
    assert cli(flags(tiny_model_dir, data, out, "--save_steps", "3", "--resume_from_checkpoint", "latest")) == 0
    assert (out / "model.safetensors").is_file()


def test_save_total_limit_keeps_the_newest(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    assert cli(flags(tiny_model_dir, data, out, "--save_steps", "2", "--save_total_limit", "2")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-14", "checkpoint-16"]
    assert not (out / ".staging").exists()


@pytest.mark.parametrize(
    "resume,message",
    [
        ("latest", "no complete checkpoint"),
        ("{tmp}/nowhere", "no such directory"),
        ("{tmp}/half", "not a complete checkpoint"),
    ],
)
def test_bad_resume_paths(tiny_model_dir, data, tmp_path, capsys, resume, message):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_model.safetensors").write_text("")
    out = tmp_path / "run"
    code = cli(flags(tiny_model_dir, data, out, "--resume_from_checkpoint", resume.format(tmp=tmp_path)))
    assert code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_resume_from_a_run_with_other_layers_is_refused(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(flags(tiny_model_dir, data, out, "--save_steps", "4", "--max_steps", "4")) == 0
    other = flags(tiny_model_dir, data, tmp_path / "other", "--lora_target_modules", "q_proj")
    code = cli([*other, "--resume_from_checkpoint", str(out / "checkpoint-4")])
    assert code == 2
    assert "adapts other layers" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "other" / "model.safetensors").exists()


def test_callback_stops_after_consecutive_bad_stages():
    model = tiny_lora()
    callback = PLoRACallback(StagePlan(steps=1), max_bad_stages=2)
    state = SimpleNamespace(global_step=1, max_steps=10, is_world_process_zero=True)
    control = SimpleNamespace(should_save=False, should_training_stop=False)

    def poison():
        with torch.no_grad():
            next(lora_layers(model))[1].lora_B["default"].weight.fill_(float("nan"))

    poison()
    callback.on_step_end(None, state, control, model=model)  # one bad stage: discarded, go on
    state.global_step = 2
    callback.on_step_end(None, state, control, model=model)  # a good stage resets the count
    poison()
    state.global_step = 3
    callback.on_step_end(None, state, control, model=model)
    poison()
    state.global_step = 4
    with pytest.raises(TrainingDiverged, match="2 consecutive stages"):
        callback.on_step_end(None, state, control, model=model)
    assert [e["skipped_non_finite"] for e in callback.events] == [True, False, True, True]


def test_stop_request_saves_and_stops_in_every_mode():
    # PreemptionCallback is registered for full fine-tuning too, not only with the PLoRA callback.
    stop = StopRequest()
    callback = PreemptionCallback(stop)
    state = SimpleNamespace(global_step=3, max_steps=10)
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    callback.on_step_end(None, state, control)
    assert not control.should_save and not control.should_training_stop
    stop.signalled = True
    callback.on_step_end(None, state, control)
    assert control.should_save and control.should_training_stop and stop.stopped_early(state)
    state.global_step, control.should_save, control.should_training_stop = 10, False, False
    callback.on_step_end(None, state, control)  # a request during the last step changes nothing
    assert not control.should_save and not stop.stopped_early(state)


def test_a_stop_file_is_a_stop_request(tmp_path):
    stop = StopRequest(tmp_path / "STOP")
    callback = PreemptionCallback(stop)
    state = SimpleNamespace(global_step=3, max_steps=10)
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    callback.on_step_end(None, state, control)
    assert not control.should_save
    (tmp_path / "STOP").touch()
    callback.on_step_end(None, state, control)
    assert control.should_save and control.should_training_stop


def adapter_bytes(run: Path) -> int:
    """The size of the live adapter's fp32 tensors: what one stage file holds."""
    state = load_file(next(run.glob("checkpoint-*")) / "plora_state.safetensors")
    return sum(t.numel() * 4 for k, t in state.items() if k.startswith(("lora_A::", "lora_B::")))


def test_a_checkpoint_holds_the_adapter_not_the_base_weights(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    assert cli(flags(tiny_model_dir, data, out, "--save_steps", "12", "--lora_r", "8")) == 0
    checkpoint = out / "checkpoint-12"
    state = load_file(checkpoint / "plora_state.safetensors")
    assert not any(key.startswith(("base::", "comp::")) for key in state)  # no base weights in it
    adapter = adapter_bytes(out)
    tensors = sum((checkpoint / f).stat().st_size for f in ("plora_state.safetensors", "adapter_model.safetensors"))
    assert tensors <= 2 * 1.06 * adapter  # the live adapter, twice (PEFT's file and ours); 6% for the headers
    # what resuming needs besides the optimizer and the tokenizer (a fixed 3.5 MB here, whatever the model):
    # the checkpoint's tensors and the stage files it stands on (the 3 unloads before step 12)
    stages = [json.loads(line)["stage"] for line in (out / "unload_events.jsonl").read_text().splitlines()][:-1]
    stage_bytes = sum((out / "stages" / f"stage-{s:05d}.safetensors").stat().st_size for s in stages)
    assert len(stages) == 3 and tensors + stage_bytes <= (len(stages) + 2) * 1.06 * adapter


def test_bf16_resume_replays_the_stages_to_the_same_bits(tiny_model_dir, data, tmp_path):
    # bf16 base weights: compensated merges, whose Kahan buffers the replay must rebuild exactly.
    bf16 = ("--model_dtype", "bfloat16", "--save_steps", "10")
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    assert cli(flags(tiny_model_dir, data, straight_dir, *bf16)) == 0
    assert cli(flags(tiny_model_dir, data, resumed_dir, *bf16, "--max_steps", "10")) == 0  # the run stops at 10
    resume = ["--max_steps", "16", "--resume_from_checkpoint", str(resumed_dir / "checkpoint-10")]
    assert cli(flags(tiny_model_dir, data, resumed_dir, *bf16, *resume)) == 0
    assert_same_weights(load_file(resumed_dir / "model.safetensors"), load_file(straight_dir / "model.safetensors"))


def test_resume_against_another_base_or_changed_stages_is_refused(tiny_model_dir, data, tmp_path, capsys):
    base, out = tmp_path / "base", tmp_path / "run"
    shutil.copytree(tiny_model_dir, base)
    assert cli(flags(base, data, out, "--save_steps", "10", "--max_steps", "10")) == 0
    finished = {p.name: p.read_bytes() for p in (*out.glob("*.*"), *(out / "stages").iterdir())}
    resume = ["--max_steps", "16", "--resume_from_checkpoint", "latest"]
    assert cli(flags(tiny_model_dir, data, out, *resume)) == 2  # another path: the run's settings differ
    assert "holds a run with model_name_or_path=" in capsys.readouterr().err.strip().splitlines()[-1]
    weights = load_file(base / "model.safetensors")  # the same path, its q_proj weights moved
    weights = {k: v + 0.01 if "q_proj" in k else v for k, v in weights.items()}
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    assert cli(flags(base, data, out, *resume)) == 2
    assert "other base weights" in capsys.readouterr().err.strip().splitlines()[-1]
    shutil.copy(tiny_model_dir / "model.safetensors", base / "model.safetensors")

    stage = out / "stages" / "stage-00001.safetensors"
    stage.write_bytes(stage.read_bytes()[:-4] + b"\0\0\0\0")
    assert cli(flags(base, data, out, *resume)) == 2
    assert f"the stage file {stage} it replays has changed" in capsys.readouterr().err.strip().splitlines()[-1]
    stage.write_bytes(finished[stage.name])
    # nothing of the finished run was touched: model, events, stage files (its final merge's too)
    assert {p.name: p.read_bytes() for p in (*out.glob("*.*"), *(out / "stages").iterdir())} == finished


def test_a_checkpoint_of_the_earlier_layout_still_resumes_exactly(tiny_model_dir, data, tmp_path, straight):
    """Checkpoints written before the stage replay held the merged base weights themselves."""
    out = tmp_path / "run"
    assert cli(flags(tiny_model_dir, data, out, "--save_steps", "10", "--max_steps", "10")) == 0
    checkpoint = out / "checkpoint-10"
    model = add_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=2, alpha=16, targets=ALL_LINEAR,
                         generator=StagePlan().generator(0))  # fmt: skip
    restore_base_weights(checkpoint, model, LocalWeights(), base_checksum(model))  # W_10, by replay
    state = load_file(checkpoint / "plora_state.safetensors")
    state.update(
        {f"base::{name}": layer.get_base_layer().weight.detach().clone() for name, layer in lora_layers(model)}
    )
    save_file(state, checkpoint / "plora_state.safetensors")  # the earlier layout: no metadata, base:: tensors
    shutil.rmtree(out / "stages")  # which it does not need
    resume = ["--max_steps", "16", "--resume_from_checkpoint", str(checkpoint)]
    assert cli(flags(tiny_model_dir, data, out, *resume)) == 0
    assert_same_weights(load_file(out / "model.safetensors"), straight)
