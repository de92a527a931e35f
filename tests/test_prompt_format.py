"""One prompt format from training to evaluation, for a model whose tokenizer has no chat template.

LLaMA-7B has none, so the paper's configs train in FastChat's vicuna format. The saved tokenizer
must then carry a chat template that renders exactly what training rendered, evaluation must build
the same prompts, and a model with no format at all is refused before any model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from eval import run_eval
from eval.prompts import PromptFormat
from fastchat_plora import train_plora
from fastchat_plora.data import (
    ChatRenderer,
    DataError,
    fastchat_chat_template,
    fastchat_render,
    render_jinja,
    tokenize,
)
from tests.conftest import REPO, tiny_run, write_conversations

QUESTION = "Natalia sold clips to 48 of her friends in April. How many clips did she sell?"
ANSWER = "She sold 48 clips.\n#### 48"
CONVERSATIONS = [
    [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2 + 2?"},
     {"role": "assistant", "content": "4"}],
]  # fmt: skip


@pytest.mark.parametrize("name", ["vicuna_v1.1", "alpaca", "tulu", "zero_shot", "redpajama-incite"])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one turn", "system and two turns"])
def test_the_chat_template_renders_what_fastchat_renders(name, conversation):
    template = fastchat_chat_template(name)
    for cut in range(1, len(conversation) + 1):
        head = conversation[:cut]
        assert render_jinja(template, head, False) == fastchat_render(name, head, False)
        assert render_jinja(template, head, True) == fastchat_render(name, head, True)


def test_templates_without_a_faithful_chat_template_are_refused():
    with pytest.raises(DataError, match="one_shot"):  # fixed few-shot turns
        fastchat_chat_template("one_shot")
    with pytest.raises(DataError, match="llama-2"):  # a separator style not converted here
        fastchat_chat_template("llama-2")
    with pytest.raises(DataError, match="vicuna_v9"):
        fastchat_chat_template("vicuna_v9")


@pytest.fixture(scope="module")
def vicuna_run(tiny_model_dir_without_template, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("vicuna")
    data = tmp / "c.jsonl"
    record = {"conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}]}
    data.write_text((json.dumps(record) + "\n") * 8)
    out = tmp / "run"
    flags = tiny_run(tiny_model_dir_without_template, data, out, conv_template="vicuna_v1.1", unload_every_steps=1,
                     max_steps=2, save_steps=2, per_device_train_batch_size=2)  # fmt: skip
    assert train_plora.cli(flags) == 0
    return out


def test_evaluation_prompts_are_the_prefix_training_rendered(vicuna_run, tiny_model_dir_without_template):
    """Byte for byte and token for token, the question as evaluation wraps it is what training saw before the answer."""
    tokenizer = AutoTokenizer.from_pretrained(vicuna_run)  # the saved model's tokenizer
    assert tokenizer.chat_template  # it carries the training format
    trained = ChatRenderer(AutoTokenizer.from_pretrained(tiny_model_dir_without_template), "vicuna_v1.1")
    rendered = trained.render(CONVERSATIONS[0])
    training_prefix = rendered.text[: rendered.assistant_spans[0][0]]
    assert training_prefix.endswith("USER: " + QUESTION + " ASSISTANT:")

    question = [{"role": "user", "content": QUESTION}]
    for model_path, conv_template in ((vicuna_run, None), (vicuna_run / "checkpoint-2", None),
                                      (tiny_model_dir_without_template, "vicuna_v1.1")):  # fmt: skip
        prompt_format = PromptFormat(AutoTokenizer.from_pretrained(model_path), conv_template)
        prompt = prompt_format.render(question)
        assert prompt == training_prefix, model_path
        training_ids = tokenize(rendered, trained.tokenizer)["input_ids"]
        assert prompt_format.encode(prompt) == training_ids[: len(prompt_format.encode(prompt))]


def test_the_run_records_its_format_and_is_evaluated_in_it(vicuna_run, tmp_path):
    assert json.loads((vicuna_run / "run_args.json").read_text())["conv_template"] == "vicuna_v1.1"
    data_dir = tmp_path / "data"
    (data_dir / "gsm8k").mkdir(parents=True)
    (data_dir / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": QUESTION, "answer": ANSWER}) + "\n")
    out = tmp_path / "eval"
    flags = ["--model_path", str(vicuna_run), "--tasks", "gsm8k_loss", "--data_dir", str(data_dir)]
    assert run_eval.main([*flags, "--output_dir", str(out)]) == 0
    loss = json.loads((out / "results.json").read_text())["metrics"]["gsm8k"]["heldout_loss"]
    assert loss["questions"] == 1 and loss["loss"] > 0


def test_a_model_without_a_format_is_refused_before_it_loads(
    tiny_model_dir_without_template, conversations_file, tmp_path, capsys, monkeypatch
):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(train_plora, "load_model", no_loading)
    out = tmp_path / "never"
    flags = tiny_run(tiny_model_dir_without_template, conversations_file, out, max_steps=1, unload_every_steps=1)
    assert train_plora.cli(flags) == 2
    assert "has no chat template; pass --conv_template" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()

    monkeypatch.setattr(run_eval, "load_for_eval", no_loading)
    flags = ["--model_path", str(tiny_model_dir_without_template), "--tasks", "gsm8k_loss", "--output_dir", str(out)]
    assert run_eval.main(flags) == 2
    assert "pass --conv_template" in capsys.readouterr().err.strip().splitlines()[-1]
    assert run_eval.main([*flags, "--conv_template", "vicuna_v9"]) == 2
    assert "conv_template='vicuna_v9'" in capsys.readouterr().err
    assert not out.exists()


PAPER_CONFIGS = sorted(p for p in (REPO / "configs" / "paper").glob("*.yaml") if not p.name.startswith("_"))


@pytest.mark.slow
@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_every_paper_config_trains_and_evaluates_on_a_model_without_a_template(
    config, tiny_model_dir_without_template, tmp_path
):
    """The 7B configs as they are, on a tiny LLaMA whose tokenizer has none: model, data, steps overridden."""
    data = write_conversations(tmp_path / "c.jsonl", n=8)
    out = tmp_path / "run"
    overrides = tiny_run(tiny_model_dir_without_template, data, out, max_steps=2, use_cpu=True, save_strategy="no")
    if config.stem == "table1_full":  # ZeRO-3 keeps its fp32 masters on GPUs; one CPU process trains fp32 weights
        overrides += ["--deepspeed", "", "--model_dtype", "float32"]
    assert train_plora.cli(["--config", str(config), *overrides]) == 0
    assert "vicuna" in json.loads((out / "run_args.json").read_text())["conv_template"]
    data_dir = tmp_path / "data"
    (data_dir / "gsm8k").mkdir(parents=True)
    (data_dir / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": QUESTION, "answer": ANSWER}) + "\n")
    flags = ["--model_path", str(out), "--tasks", "gsm8k_loss", "--data_dir", str(data_dir)]
    assert run_eval.main([*flags, "--output_dir", str(tmp_path / "eval")]) == 0
