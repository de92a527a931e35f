"""The entry point end to end on a tiny LLaMA: stages, saved model, untouched weights, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastchat_plora.callback import PLoRACallback
from fastchat_plora.models import flash_attention_available
from fastchat_plora.train_plora import cli
from tests.conftest import run_module, tiny_run


def train(tiny_model_dir, data, out, *extra) -> int:
    """A tiny run (batch 2, no checkpoints); ``extra`` flags come last and override."""
    flags = tiny_run(tiny_model_dir, data, out, per_device_train_batch_size=2, logging_steps=1, save_strategy="no")
    return cli([*flags, *extra])


def events(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "unload_events.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "period",
    [["--unload_every_steps", "2"], ["--unload_every_samples", "8"]],  # batch 2 x accumulation 2: 8 samples = 2 steps
)
def test_stage_boundaries_under_gradient_accumulation(tiny_model_dir, conversations_file, tmp_path, period):
    out = tmp_path / "run"
    assert (
        train(
            tiny_model_dir, conversations_file, out, "--gradient_accumulation_steps", "2", "--max_steps", "5", *period
        )
        == 0
    )
    assert [(e["step"], e["stage"], e["final"]) for e in events(out)] == [(2, 0, False), (4, 1, False), (5, 2, True)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage_steps"] == 2 and summary["stages"] == 3
    assert set(summary["loss_by_stage"]) == {"0", "1", "2"}


@pytest.mark.parametrize("mode", ["lora", "plora"])
def test_saved_model_loads_generates_and_keeps_non_targets(tiny_model_dir, conversations_file, tmp_path, mode):
    out = tmp_path / mode
    period = ["--unload_every_steps", "2"] if mode == "plora" else []
    code = train(
        tiny_model_dir,
        conversations_file,
        out,
        "--finetune_mode",
        mode,
        "--max_steps",
        "4",
        "--learning_rate",
        "1e-2",
        "--lora_target_modules",
        "q_proj,v_proj,down_proj",
        *period,
    )
    assert code == 0
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    targets = ("q_proj", "v_proj", "down_proj")
    assert changed == {k for k in before if any(f"{t}.weight" in k for t in targets)}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config

    model = AutoModelForCausalLM.from_pretrained(out)  # a plain HF model: no PEFT involved
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("What is 2 plus 3?", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 5
    summary = json.loads((out / "summary.json").read_text())
    rank = summary["rank_probe"]["numerical_rank"]
    assert rank == (4 if mode == "plora" else 2)  # two stages of r = 2, or one adapter of r = 2


def test_full_finetune_changes_every_weight(tiny_model_dir, conversations_file, tmp_path):
    out = tmp_path / "full"
    assert train(tiny_model_dir, conversations_file, out, "--finetune_mode", "full", "--max_steps", "2") == 0
    assert not (out / "unload_events.jsonl").exists()
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert [k for k in before if torch.equal(before[k], after[k])] == []


INPUT_IDS = torch.arange(3, 40).unsqueeze(0)


def test_saved_model_computes_what_the_trained_model_computes(
    tiny_model_dir, conversations_file, tmp_path, monkeypatch
):
    # Momentum keeps part of the update in the adapter; the final unload must still merge all of it.
    trained = []
    final_unload = PLoRACallback.on_train_end

    def logits_then_final_unload(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            trained.append(model.eval()(input_ids=INPUT_IDS).logits)  # the PEFT model as training left it
        return final_unload(self, args, state, control, model=model, **kwargs)

    monkeypatch.setattr(PLoRACallback, "on_train_end", logits_then_final_unload)
    out = tmp_path / "momentum"
    extra = ["--max_steps", "5", "--unload_every_steps", "2", "--unload_momentum", "0.3", "--learning_rate", "1e-2"]
    assert train(tiny_model_dir, conversations_file, out, *extra) == 0
    assert [e["momentum"] for e in events(out)] == [0.3, 0.3, 0.0]
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    untouched = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(untouched(input_ids=INPUT_IDS).logits, trained[0], atol=1e-3)
        torch.testing.assert_close(saved(input_ids=INPUT_IDS).logits, trained[0], rtol=1e-4, atol=5e-5)


BAD_INPUTS = [
    (["--unload_every_steps", "2", "--unload_momentum", "1.0"], "unload_momentum=1.0"),
    (["--unload_every_steps", "2", "--unload_momentum", "-0.1"], "unload_momentum=-0.1"),
    (["--unload_every_steps", "2", "--unload_every_samples", "8"], "not both"),
    (["--unload_every_steps", "0"], "unload_every_steps=0"),
    (["--unload_every_samples", "-5"], "unload_every_samples=-5"),
    (["--unload_every_steps", "2", "--lora_r", "0"], "lora_r=0"),
    (["--unload_every_steps", "2", "--lora_target_modules", "q_proj,qproj"], "qproj"),
    (["--unload_every_steps", "2", "--momentum_mode", "literal"], "momentum_mode='literal'"),
    (["--unload_every_steps", "2", "--finetune_mode", "dora"], "finetune_mode='dora'"),
    (["--unload_every_steps", "2", "--conv_template", "vicuna_v9"], "conv_template='vicuna_v9'"),
    (["--unload_every_steps", "2", "--merge_compensation", "maybe"], "merge_compensation='maybe'"),
    (["--unload_every_steps", "2", "--max_bad_stages", "0"], "max_bad_stages=0"),
    (["--unload_every_steps", "2", "--model_dtype", "int8"], "model_dtype='int8'"),
    (["--unload_every_steps", "2", "--model_max_length", "0"], "model_max_length=0"),
    (["--unload_every_steps", "2", "--lora_dropout", "1.5"], "lora_dropout=1.5"),
    (["--unload_every_steps", "2", "--max_train_samples", "0"], "max_train_samples=0"),
    (["--unload_every_steps", "2", "--attn_implementation", "flash"], "attn_implementation='flash'"),
    (["--unload_every_steps", "2", "--lora_init", "gaussian"], "lora_init='gaussian'"),
    (["--unload_every_steps", "2", "--conv_template", "one_shot"], "conv_template='one_shot'"),
    (["--finetune_mode", "full", "--model_dtype", "bfloat16"], "no fp32 master copy"),
    pytest.param(
        ["--unload_every_steps", "2", "--attn_implementation", "flash_attention_2"],
        "needs flash-attn",
        marks=pytest.mark.skipif(flash_attention_available(), reason="flash-attn is installed on a GPU here"),
    ),
]


@pytest.mark.parametrize("extra,message", BAD_INPUTS)
def test_bad_arguments_fail_cleanly(tiny_model_dir, conversations_file, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    assert train(tiny_model_dir, conversations_file, out, *extra) == 2
    assert_one_error_line(capsys.readouterr().err, message)
    assert not out.exists()


def assert_one_error_line(stderr: str, message: str) -> None:
    """The error is the last line of stderr, alone; progress bars from loading may come before it."""
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], stderr[-500:]
    assert sum(line.startswith("error: ") for line in lines) == 1


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "not found"),
        ("not json at all\n", "not valid JSON"),
        ("", "empty"),
        ('{"conversations": [{"from": "human", "value": "q"}]}\n', "no assistant"),
        ('{"conversations": [{"from": "bot", "value": "q"}]}\n', "'bot'"),
        ('{"prompt": "q"}\n', "data.jsonl:1: unknown record shape"),
        ('{"instruction": "q", "output": "a"}\n{"messages": []}\n', "data.jsonl:2: a messages record in a alpaca"),
    ],
)
def test_bad_data_fails_cleanly(tiny_model_dir, tmp_path, capsys, content, message):
    data, out = tmp_path / "data.jsonl", tmp_path / "never"
    if content is not None:
        data.write_text(content)
    assert train(tiny_model_dir, data, out, "--unload_every_steps", "2") == 2
    assert_one_error_line(capsys.readouterr().err, message)
    assert not out.exists()


@pytest.mark.parametrize(
    "model,message", [("/no/such/model", "model directory not found"), ("{tmp}", "no config.json")]
)
def test_bad_model_path(conversations_file, tmp_path, capsys, model, message):
    flags = tiny_run(model.format(tmp=tmp_path), conversations_file, tmp_path / "never", unload_every_steps=2)
    code = cli(flags)
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "never").exists()


def test_existing_run_is_not_overwritten(tiny_model_dir, conversations_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_text("an earlier run")
    assert train(tiny_model_dir, conversations_file, out, "--unload_every_steps", "2", "--max_steps", "1") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "model.safetensors").read_text() == "an earlier run"
    args = ["--unload_every_steps", "2", "--max_steps", "1", "--overwrite_output_dir", "True"]
    assert train(tiny_model_dir, conversations_file, out, *args) == 0


def test_unknown_config_key_and_flags_override_the_file(tiny_model_dir, conversations_file, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("unload_every_steps: 2\nlora_rank: 4\n")
    assert train(tiny_model_dir, conversations_file, tmp_path / "a", "--config", str(config)) == 2
    assert "unknown config key 'lora_rank'" in capsys.readouterr().err
    config.write_text("unload_every_steps: 2\nmax_steps: 3\nlora_r: 0\n")
    assert train(tiny_model_dir, conversations_file, tmp_path / "b", "--config", str(config), "--lora_r", "1") == 0
    assert json.loads((tmp_path / "b" / "run_args.json").read_text())["lora_r"] == 1


@pytest.mark.slow
def test_embedded_model_trains_as_a_module(conversations_file, tmp_path, embedded_path):
    """A few PLoRA steps on the embedded SmolLM2 itself, through `python -m` as a user runs it."""
    out = tmp_path / "embedded"
    done = run_module("fastchat_plora.train_plora", "--data_path", str(conversations_file), "--output_dir", str(out),
                      "--max_steps", "4", "--unload_every_steps", "2", "--lora_r", "2", "--per_device_train_batch_size",
                      "2", "--model_max_length", "128", "--save_strategy", "no", "--logging_steps", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank of W_T - W_0 for model.layers.0.self_attn.q_proj: 4" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"] == 2 and all(v < 5 for v in summary["loss_by_stage"].values())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 30


def test_plora_without_a_stage_length_unloads_every_4800_samples(tiny_model_dir, conversations_file, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="fastchat_plora"):
        assert train(tiny_model_dir, conversations_file, out, "--max_steps", "1") == 0
    assert "unloading every 4800 samples, the paper's stage length" in caplog.text
    assert json.loads((out / "summary.json").read_text())["stage_steps"] == 2400  # batch 2: 4800 / 2 steps
