"""Held-out loss while training: at eval steps, and on both sides of every unload."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import tiny_run, write_conversations

from fastchat_plora.train_plora import cli


def train_with_eval(tiny_model_dir, tmp_path, **flags) -> list[dict]:
    data = write_conversations(tmp_path / "c.jsonl", n=40)
    out = tmp_path / "run"
    defaults = dict(unload_every_steps=2, max_steps=6, learning_rate=1e-2, save_strategy="no", eval_holdout=8,
                    per_device_eval_batch_size=4)  # fmt: skip
    flags = {key: value for key, value in {**defaults, **flags}.items() if value is not None}  # None: left out
    assert cli(tiny_run(tiny_model_dir, data, out, **flags)) == 0
    return json.loads((out / "log_history.json").read_text())


def assert_refused(model_dir, data, out, capsys, flags: list[str], message: str) -> None:
    """The run stops with one error line naming the bad value, before anything is written."""
    assert cli([*tiny_run(model_dir, data, out, unload_every_steps=2), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not out.exists()


def losses(history: list[dict], key: str) -> dict[int, float]:
    return {entry["step"]: entry[key] for entry in history if key in entry}


@pytest.mark.parametrize("momentum,mode", [(0.0, "paper"), (0.5, "preserve")])
def test_unloads_that_keep_the_output_keep_the_held_out_loss(tiny_model_dir, tmp_path, momentum, mode, caplog):
    with caplog.at_level(logging.INFO, logger="fastchat_plora"):
        history = train_with_eval(tiny_model_dir, tmp_path, unload_momentum=momentum, momentum_mode=mode)
    before, after = losses(history, "eval_before_unload_loss"), losses(history, "eval_loss")
    assert list(before) == [2, 4] and list(after) == [2, 4]  # the boundaries; step 6 ends in the final merge
    for step in before:
        assert after[step] == pytest.approx(before[step], rel=1e-5)
    assert before[2] != before[4]  # it trained in between: the same number twice would prove nothing
    assert "held-out loss at step 2:" in caplog.text and "changed the held-out loss" not in caplog.text


def test_the_paper_rule_with_momentum_moves_the_held_out_loss(tiny_model_dir, tmp_path):
    history = train_with_eval(tiny_model_dir, tmp_path, unload_momentum=0.5, momentum_mode="paper")
    before, after = losses(history, "eval_before_unload_loss"), losses(history, "eval_loss")
    # merging (1 - m)BA and keeping mA, mB changes the update by (m^2 - m)BA: the loss moves
    assert all(abs(after[s] - before[s]) > 1e-6 for s in before)


def test_eval_steps_add_evaluations_between_unloads(tiny_model_dir, tmp_path):
    history = train_with_eval(tiny_model_dir, tmp_path, eval_steps=3, finetune_mode="lora", unload_every_steps=None)
    assert list(losses(history, "eval_loss")) == [3, 6] and not losses(history, "eval_before_unload_loss")
    assert all("loss" in e or "eval_loss" in e or "train_loss" in e for e in history)


def test_eval_data_from_a_file(tiny_model_dir, tmp_path):
    held_out = write_conversations(tmp_path / "held_out.jsonl", n=5)
    history = train_with_eval(tiny_model_dir, tmp_path, eval_holdout=None, eval_data_path=held_out)
    assert list(losses(history, "eval_loss")) == [2, 4]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--eval_steps", "2"], "eval_strategy=steps (eval_steps=2) needs eval data: pass --eval_data_path FILE or"),
        (["--eval_strategy", "steps"], "eval_strategy=steps (eval_steps=10) needs eval data"),
        (["--eval_holdout", "0"], "eval_holdout=0: must be positive"),
        (["--eval_holdout", "32"], "eval_holdout=32: the training data holds only 32 conversations"),
        (["--eval_holdout", "2", "--eval_data_path", "x.jsonl"], "give one of them"),
    ],
)
def test_bad_eval_settings_fail_before_anything_is_written(tiny_model_dir, conversations_file, tmp_path, capsys,
                                                           flags, message):  # fmt: skip
    assert_refused(tiny_model_dir, conversations_file, tmp_path / "never", capsys, flags, message)


def test_the_loss_figure_draws_the_held_out_loss_and_the_stage_boundaries(tiny_model_dir, tmp_path):
    from eval import figures

    train_with_eval(tiny_model_dir, tmp_path)
    run, png = tmp_path / "run", tmp_path / "loss.png"
    assert figures.stage_boundaries(run) == [2, 4]
    assert figures.main(["loss", "--runs", str(run), "--smooth", "2", "--output", str(png)]) == 0
    axes = figures.plt.gcf().axes[0]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["plora r2 m=0.0", "plora r2 m=0.0, held-out"]
    assert [line.get_xdata()[0] for line in axes.lines if line.get_linestyle() == ":"] == [2, 4]
    assert png.read_bytes().startswith(b"\x89PNG")


def read_samples(run) -> list[dict]:
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


def test_samples_before_training_after_every_unload_and_at_the_end(tiny_model_dir, tmp_path, tokenizer):
    train_with_eval(tiny_model_dir, tmp_path, sample_prompts=2, sample_max_new_tokens=5)
    rows = read_samples(tmp_path / "run")
    assert [(r["step"], r["stage"], r["final"]) for r in rows] == [
        (0, 0, False), (0, 0, False), (2, 0, False), (2, 0, False), (4, 1, False), (4, 1, False),
        (6, 2, True), (6, 2, True),
    ]  # fmt: skip
    held_out = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()][-8:]
    first_question = held_out[0]["conversations"][0]["value"]
    assert rows[0]["prompt"] == tokenizer.apply_chat_template(
        [{"role": "user", "content": first_question}], tokenize=False, add_generation_prompt=True
    )
    assert {r["prompt"] for r in rows} == {rows[0]["prompt"], rows[1]["prompt"]}  # the same two prompts each time
    assert all(0 < len(tokenizer(r["output"], add_special_tokens=False)["input_ids"]) <= 6 for r in rows)


def test_sample_prompts_from_a_text_file_without_eval_data(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hi.\n\nCount to three.\n")
    train_with_eval(tiny_model_dir, tmp_path, eval_holdout=None, sample_prompts_file=prompts, sample_max_new_tokens=3,
                    finetune_mode="lora", unload_every_steps=None, max_steps=2)  # fmt: skip
    rows = read_samples(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 0, 2, 2] and "Count to three." in rows[1]["prompt"]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--sample_prompts", "2"], "sample_prompts=2 takes its prompts from eval data: pass --eval_data_path"),
        (["--sample_prompts", "-1"], "sample_prompts=-1: must be 0 (off) or positive"),
        (["--sample_prompts_file", "nowhere.txt"], "prompts file not found: nowhere.txt"),
        (["--sample_max_new_tokens", "0"], "sample_max_new_tokens=0: must be positive"),
    ],
)
def test_bad_sample_settings_fail_before_anything_is_written(tiny_model_dir, conversations_file, tmp_path, capsys,
                                                             flags, message):  # fmt: skip
    assert_refused(tiny_model_dir, conversations_file, tmp_path / "never", capsys, flags, message)
