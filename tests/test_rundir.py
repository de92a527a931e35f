"""The run directory contract: checkpoint finding and rotation, resume points, trimming a resumed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastchat_plora.rundir import RunDir, RunDirError


def checkpoint(run: RunDir, step: int, complete: bool = True) -> Path:
    path = run.checkpoint(step)
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_latest_checkpoint_is_the_complete_one_with_the_largest_step(tmp_path):
    run = RunDir(tmp_path)
    assert run.latest_checkpoint() is None
    checkpoint(run, 9)
    checkpoint(run, 10)  # 10 sorts before 9 as text
    checkpoint(run, 12, complete=False)  # half-written: never counts
    (tmp_path / "checkpoint-x").mkdir()
    assert run.latest_checkpoint() == tmp_path / "checkpoint-10"
    assert [step for step, _ in run.checkpoints()] == [9, 10]


def test_rotation_keeps_the_newest_by_step(tmp_path):
    run = RunDir(tmp_path)
    for step in (2, 10, 4, 8):
        checkpoint(run, step)
    run.rotate(2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-8"]
    run.rotate(None)
    assert len(list(tmp_path.iterdir())) == 2


def test_resume_point_finds_latest_or_names_the_problem(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.resume_point(None) is None and run.resume_point("False") is None
    with pytest.raises(RunDirError, match="no complete checkpoint"):
        run.resume_point("latest")
    done = checkpoint(run, 4)
    assert run.resume_point("latest") == done == run.resume_point("true")
    half = checkpoint(run, 6, complete=False)
    with pytest.raises(RunDirError, match="not a complete checkpoint"):
        run.resume_point(str(half))
    with pytest.raises(RunDirError, match="no such directory"):
        run.resume_point(str(tmp_path / "nowhere"))


def test_a_run_is_not_written_over_unless_asked(tmp_path):
    run = RunDir(tmp_path)
    run.check_writable(overwrite=False, resuming=False)  # empty: fine
    (tmp_path / "model.safetensors").write_text("an earlier run")
    with pytest.raises(RunDirError, match="already holds a run"):
        run.check_writable(overwrite=False, resuming=False)
    run.check_writable(overwrite=True, resuming=False)
    run.check_writable(overwrite=False, resuming=True)


def samples(run: RunDir) -> list[tuple[int, bool]]:
    return [(row["step"], row["final"]) for row in map(json.loads, run.samples_file.read_text().splitlines())]


def test_a_resumed_run_forgets_events_samples_and_stages_after_its_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    run.append_samples([{"step": 0, "final": False, "output": "before training"}])
    for stage, step, final in ((0, 2, False), (1, 4, False), (2, 5, True)):  # a run that ended at step 5
        run.save_stage(stage, step, {"base_model.model.x": (torch.zeros(3, 1), torch.zeros(1, 2))}, final=final)
        run.append_event({"step": step, "stage": stage, "final": final})
        run.append_samples([{"step": step, "final": final, "output": "é"}])
    run.trim(checkpoint(run, 5))  # goes on from its last step: its final merge is undone
    assert [p.name for p in run.stage_files()] == ["stage-00000.safetensors", "stage-00001.safetensors"]
    assert [e["step"] for e in run.events()] == [2, 4]
    assert samples(run) == [(0, False), (2, False), (4, False)]
    run.trim(checkpoint(run, 3))
    assert samples(run) == [(0, False), (2, False)]
    assert [p.name for p in run.stage_files()] == ["stage-00000.safetensors"]
    assert run.events() == [{"step": 2, "stage": 0, "final": False}]
    assert set(run.load_stages()[0]) == {"x.lora_A", "x.lora_B"}  # the plain model's names
    run.trim(None)  # a fresh run
    assert run.stage_files() == [] and run.events() == [] and not run.samples_file.exists()


def test_stage_files_with_a_gap_are_refused(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(RunDirError, match="no stage factors"):
        run.load_stages()
    run.save_stage(0, 2, {})
    run.save_stage(2, 6, {})
    with pytest.raises(RunDirError, match=r"\[0, 2\]"):
        run.load_stages()


def test_base_model_is_the_one_the_run_resolved(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(RunDirError, match="run_args.json"):
        run.base_model()
    (tmp_path / "run_args.json").write_text(json.dumps({"model_name_or_path": None, "base_model": "/cache/smol"}))
    assert run.base_model() == "/cache/smol"
    (tmp_path / "run_args.json").write_text(json.dumps({"model_name_or_path": "org/model"}))  # an older run
    assert run.base_model() == "org/model"


def test_a_stop_file_from_an_earlier_attempt_goes_and_a_new_one_stays(tmp_path):
    run = RunDir(tmp_path)
    run.stop_file.touch()
    started = run.stop_file.stat().st_mtime + 1  # this attempt started after the file was written
    run.trim(None, started)
    assert not run.stop_file.exists()
    run.stop_file.touch()
    run.trim(None, run.stop_file.stat().st_mtime - 1)  # written while this attempt was starting: its request
    assert run.stop_file.exists()
