"""Training data as users hold it: the three record formats, hub datasets, mixes, and bad input."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest
from conftest import tiny_run
from safetensors.torch import load_file

from fastchat_plora.data import IGNORE_INDEX, ChatRenderer, DataError, build_examples
from fastchat_plora.sources import Source, load_source, load_training_data, weighted_counts

QUESTION, ANSWER, SYSTEM = "What is 2 plus 3?", "2 plus 3 is 5.", "Answer briefly."
THREE_WAYS = {
    "sharegpt": {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": QUESTION},
                                   {"from": "gpt", "value": ANSWER}]},
    "messages": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION},
                              {"role": "assistant", "content": ANSWER}]},
    "alpaca": {"system": SYSTEM, "instruction": QUESTION, "input": "", "output": ANSWER},
}  # fmt: skip


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def numbered(fmt: str, n: int, tag: str = "") -> list[dict]:
    """n conversations in one format, each with its own numbers; the tag opens every question."""
    rows = []
    for i in range(n):
        question, answer = f"{tag}What is {i} plus {i + 1}?", f"{i} plus {i + 1} is {2 * i + 1}."
        rows.append({
            "sharegpt": {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]},
            "messages": {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]},
            "alpaca": {"instruction": question, "output": answer},
        }[fmt])  # fmt: skip
    return rows


def test_one_conversation_written_three_ways_gives_the_same_tokens_and_labels(tmp_path, tokenizer):
    examples = {}
    for fmt, record in THREE_WAYS.items():
        conversations = load_source(write_jsonl(tmp_path / f"{fmt}.jsonl", [record]))
        examples[fmt], counts = build_examples(conversations, ChatRenderer(tokenizer), 256, progress=False)
        assert counts == {"kept": 1}
    assert examples["sharegpt"] == examples["messages"] == examples["alpaca"]
    labels = [t for t in examples["alpaca"][0]["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(labels) == ANSWER + "<|im_end|>\n"


def test_alpaca_input_follows_the_instruction_after_a_blank_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Sort these.", "input": "3 1 2", "output": "1 2 3"}])
    assert load_source(path)[0][0] == {"role": "user", "content": "Sort these.\n\n3 1 2"}


def test_a_messages_turn_switched_off_is_not_trained(tmp_path, tokenizer):
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Wrong answer.", "weight": 0},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Right answer.", "train": True},
    ]
    conversations = load_source(write_jsonl(tmp_path / "m.jsonl", [{"messages": turns}]))
    assert conversations[0][1] == {"role": "assistant", "content": "Wrong answer.", "train": False}
    (example,), _ = build_examples(conversations, ChatRenderer(tokenizer), 256, progress=False)
    assert tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX]) == "Right answer.<|im_end|>\n"


def test_json_list_and_jsonl_give_the_same(tmp_path):
    records = [{"id": "a", "conversations": [{"from": "human", "value": "x\u2028y"}, {"from": "gpt", "value": "z"}]}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text(json.dumps(records[0], ensure_ascii=False) + "\n")
    assert load_source(str(tmp_path / "a.json")) == load_source(str(tmp_path / "a.jsonl"))
    assert load_source(str(tmp_path / "a.jsonl"))[0][0] == {"role": "user", "content": "x\u2028y"}


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "not found"),
        ("", "empty"),
        ('{"id": 1, "conversations": [}\n', r"bad\.jsonl:1: not valid JSON"),
        ('{"conversations": [{"from": "human", "value": "q"}]}\n', r"bad\.jsonl:1: .* no assistant"),
        ('{"messages": [{"role": "user", "content": "q"}]}\n', r"bad\.jsonl:1: .* no assistant"),
        ('{"conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]}\n', "'robot'"),
        ('{"messages": [{"role": "bot", "content": "q"}]}\n', "'bot'"),
        ('{"conversations": "not a list"}\n', "conversations"),
        ('{"prompt": "q", "completion": "a"}\n',
         r"bad\.jsonl:1: unknown record shape \(keys \['completion', 'prompt'\]\)"),
        ("[1, 2]", "record 0"),
        ('{"instruction": "q", "output": 5}\n', "'output' must be a string"),
        ('{"messages": [{"role": "user", "content": "q", "train": true}, {"role": "assistant", "content": "a"}]}\n',
         "only assistant turns"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]}\n',
         "'weight' 0/1"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": false}]}\n',
         "every assistant turn is switched off"),
        ('{"instruction": "q", "output": "a"}\n{"messages": [{"role": "user", "content": "q"}]}\n',
         r"bad\.jsonl:2: a messages record in a alpaca source"),
    ],
)  # fmt: skip
def test_bad_data_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_source(str(path))


def test_a_hub_id_given_as_a_path_is_named_as_such(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="data file not found: allenai/tulu-v2-sft-mixture .*hub:allenai"):
        load_source("allenai/tulu-v2-sft-mixture")


@pytest.mark.parametrize(
    "entry,parsed",
    [
        ("a.jsonl", Source("a.jsonl")),
        ("a.jsonl=200", Source("a.jsonl", count=200)),
        ("hub:org/name:train=0.5", Source("hub:org/name:train", weight=0.5)),
        ("a.jsonl=0.0", Source("a.jsonl", weight=0.0)),
    ],
)
def test_source_entries(entry, parsed):
    assert Source.parse(entry) == parsed


@pytest.mark.parametrize("entry", ["a.jsonl=0", "a.jsonl=-3", "a.jsonl=many", "a.jsonl=-0.5", "a.jsonl=inf.0"])
def test_bad_amounts_name_the_entry(entry):
    with pytest.raises(DataError, match=f"data_path entry '{entry}'"):
        Source.parse(entry)


def test_weighted_counts_add_up_to_the_sources_together():
    assert weighted_counts([10, 20], [1.0, 1.0]) == [15, 15]
    assert weighted_counts([7, 0], [2.0, 1.0]) == [5, 2]  # 14/3 and 7/3: the larger remainder gets the spare
    assert sum(weighted_counts([13, 17, 5], [0.3, 0.3, 0.4])) == 35


def test_a_mix_draws_each_sources_count_seeded(tmp_path, caplog):
    a = write_jsonl(tmp_path / "a.jsonl", numbered("sharegpt", 10, tag="a: "))
    b = write_jsonl(tmp_path / "b.jsonl", numbered("messages", 4, tag="b: "))
    c = write_jsonl(tmp_path / "c.jsonl", numbered("alpaca", 6, tag="c: "))
    entries = [f"{a}=3", f"{b}=9", c]
    with caplog.at_level("INFO", logger="fastchat_plora.sources"):
        mix = load_training_data(entries, seed=1)
    assert f"{b}: 9 of its 4 conversations" in caplog.text and f"{c}: 6 of its 6 conversations" in caplog.text
    assert Counter(m[0]["content"][0] for m in mix) == {"a": 3, "b": 9, "c": 6}
    b_copies = Counter(m[0]["content"] for m in mix if m[0]["content"].startswith("b"))
    assert sorted(b_copies.values()) == [2, 2, 2, 3]  # every row twice, then one drawn again
    assert len({m[0]["content"] for m in mix if m[0]["content"].startswith("a")}) == 3  # no repeats below its size
    assert [m[0]["content"][0] for m in mix] != sorted(m[0]["content"][0] for m in mix)  # shuffled
    assert load_training_data(entries, seed=1) == mix
    assert load_training_data(entries, seed=2) != mix


def test_weights_share_the_weighted_sources_records(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", numbered("sharegpt", 10))
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                         {"role": "assistant", "content": "y"}]}] * 20)  # fmt: skip
    mix = load_training_data([f"{a}=2.0", f"{b}=1.0"], seed=0)
    assert len(mix) == 30 and sum(m[0]["content"] == "x" for m in mix) == 10  # a third of 10 + 20
    with pytest.raises(DataError, match=r"weights \[0.0, 0.0\] sum to 0.0"):
        load_training_data([f"{a}=0.0", f"{b}=0.0"], seed=0)


def test_a_single_file_keeps_its_order(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", numbered("alpaca", 5))
    assert load_training_data([path], seed=3) == load_source(path)


def test_a_hub_dataset_loads_through_datasets(tmp_path, monkeypatch):
    """A dataset folder the test writes stands in for a hub id: load_dataset reads both the same way."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "org_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", numbered("messages", 3))
    write_jsonl(folder / "test.jsonl", numbered("messages", 2))
    assert load_source(f"hub:{folder}") == load_source(str(folder / "train.jsonl"))
    assert len(load_source(f"hub:{folder}:test")) == 2
    with pytest.raises(DataError, match=f"hub:{folder}:nosuch: cannot load split 'nosuch'"):
        load_source(f"hub:{folder}:nosuch")


def test_a_hub_source_without_datasets_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(
        DataError, match=r"hub:org/name: hub datasets need the datasets package: pip install -e '\.\[data\]"
    ):
        load_source("hub:org/name")


def test_training_on_each_format_gives_the_same_model(tiny_model_dir, tmp_path):
    from fastchat_plora.train_plora import cli

    weights = {}
    for fmt in ("sharegpt", "messages", "alpaca"):
        data = write_jsonl(tmp_path / f"{fmt}.jsonl", numbered(fmt, 8))
        out = tmp_path / fmt
        flags = tiny_run(tiny_model_dir, data, out, finetune_mode="lora", max_steps=2, save_strategy="no",
                         per_device_train_batch_size=2, learning_rate=1e-2)  # fmt: skip
        assert cli(flags) == 0
        weights[fmt] = load_file(out / "model.safetensors")
    first = weights["sharegpt"]
    for fmt in ("messages", "alpaca"):
        assert all((weights[fmt][name] == tensor).all() for name, tensor in first.items()), fmt
    assert json.loads((tmp_path / "alpaca" / "run_args.json").read_text())["data_path"] == [
        str(tmp_path / "alpaca.jsonl")
    ]
