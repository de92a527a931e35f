"""Long runs: exact resume after SIGKILL, SIGTERM preemption, atomic checkpoints, bad resume input,
and stopping after repeated non-finite stages."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fastchat_plora.callback import PLoRACallback, PreemptionCallback, StopRequest, TrainingDiverged
from fastchat_plora.plora import StagePlan, lora_layers
from fastchat_plora.rundir import RunDir
from fastchat_plora.train_plora import cli
from fastchat_plora.trainer import PLoRATrainer
from tests.conftest import start_module, tiny_lora, tiny_run, write_conversations

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
    stop.requested = True
    callback.on_step_end(None, state, control)
    assert control.should_save and control.should_training_stop
    state.global_step, control.should_save = 10, False  # a request during the last step changes nothing
    callback.on_step_end(None, state, control)
    assert not control.should_save
