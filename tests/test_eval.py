"""eval/: answer extraction, scoring through the harness with stub models, result files, checkpoint
folding, bad input; and the embedded model on the local mirror."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.model import LM

from eval import run_eval
from eval.loading import eval_dtype, load_for_eval
from eval.tasks.utils import extract_flexible, extract_strict, gsm8k_gold
from fastchat_plora.train_plora import cli
from tests.conftest import REPO, SHARED_DATA, module_env, tiny_run, write_conversations


@pytest.mark.parametrize(
    "text,strict,flexible",
    [
        ("so 3 + 4 = 7\n#### 7", "7", "7"),
        ("#### 1,234", "1234", "1234"),
        ("The total is $1,234.50.", None, "1234.5"),
        ("She loses 5 dollars.\n#### -5", "-5", "-5"),
        ("It weighs 2.5 kg", None, "2.5"),
        ("The answer is 18 eggs.", None, "18"),
        ("#### 18.00", "18", "18"),
        ("no number here", None, None),
        ("first 3, then 40 cm.", None, "40"),
    ],
)
def test_number_extraction(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


def test_gold_answers():
    assert gsm8k_gold("a\nb\n#### 1,000") == "1000" and gsm8k_gold("#### -3") == "-3"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Two items per task, all 57 MMLU subjects, in the local mirror's layout."""
    d = tmp_path_factory.mktemp("evaldata")
    (d / "gsm8k").mkdir()
    rows = [{"question": "What is 2 plus 3?", "answer": "2+3=5\n#### 5"},
            {"question": "What is 10 minus 14?", "answer": "10-14=-4\n#### -4"}]  # fmt: skip
    (d / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for subset in ("ARC-Easy", "ARC-Challenge"):
        (d / "arc" / subset).mkdir(parents=True)
        arc = [
            {"id": "a", "question": {"stem": "Which is a gas?", "choices": [
                {"label": "A", "text": "rock"}, {"label": "B", "text": "steam"}, {"label": "C", "text": "ice"}]},
             "answerKey": "B"},
            {"id": "b", "question": {"stem": "Which is a liquid?", "choices": [
                {"label": "1", "text": "water"}, {"label": "2", "text": "wood"}, {"label": "3", "text": "salt"},
                {"label": "4", "text": "air"}]}, "answerKey": "1"},
        ]  # fmt: skip
        (d / "arc" / subset / f"{subset}-Test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    mmlu = d / "mmlu" / "data" / "test"
    mmlu.mkdir(parents=True)
    for i, subject in enumerate(run_eval.mmlu_subjects()):
        with (mmlu / f"{subject}_test.csv").open("w", newline="") as f:
            csv.writer(f).writerow([f"In {subject}, pick option {'ABCD'[i % 4]}.", "w", "x", "y", "z", "ABCD"[i % 4]])
    return d


def test_mmlu_subjects_are_the_57_of_the_test_set_in_the_harness_categories():
    subjects = run_eval.mmlu_subjects()
    assert len(subjects) == 57 and set(subjects.values()) == set(run_eval.MMLU_CATEGORIES)
    if SHARED_DATA.is_dir():
        files = {p.name.removesuffix("_test.csv") for p in (SHARED_DATA / "mmlu" / "data" / "test").glob("*_test.csv")}
        assert files == set(subjects)
    try:  # the harness's private copy, where this release still has it
        from lm_eval.tasks.mmlu._generate_configs import SUBJECTS
    except ImportError:
        return
    assert subjects == SUBJECTS


class StubLM(LM):
    """Answers from the gold data: correctly, or always wrongly."""

    def __init__(self, data_dir: Path, right: bool):
        super().__init__()
        self.right = right
        self.gsm8k = {}
        for line in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines():
            row = json.loads(line)
            self.gsm8k[row["question"]] = gsm8k_gold(row["answer"])

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in chat_history) + "<assistant>"

    @property
    def tokenizer_name(self) -> str:
        return "stub"

    def generate_until(self, requests):
        outputs = []
        for request in requests:
            context = request.args[0]
            gold = next(g for q, g in self.gsm8k.items() if q in context)
            outputs.append(f"Working.\n#### {gold if self.right else int(gold) + 1}")
        return outputs

    def loglikelihood(self, requests):
        scores = []
        for request in requests:
            context, continuation = request.args
            # the gold letter is named in the stem for MMLU; ARC's gold is "steam" / "water"
            named = re.search(r"pick option ([ABCD])", context)
            gold = continuation.strip().startswith(named.group(1)) if named else any(
                w in continuation for w in ("steam", "water"))  # fmt: skip
            scores.append((0.0 if gold == self.right else -5.0, False))
        return scores

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


@pytest.mark.parametrize("right,expected", [(True, 1.0), (False, 0.0)])
def test_letter_scoring_offers_the_letters_alone(data_dir, right, expected):
    configs = run_eval.task_configs(["mmlu", "arc_easy"], data_dir, choice_format="letter")
    assert {c["doc_to_choice"] for c in configs} == {"{{letters}}"}
    mmlu = [c for c in configs if c["task"].startswith("mmlu")]
    raw, metrics = run_eval.run_harness(StubLM(data_dir, right), ["mmlu"], mmlu, None)
    assert metrics["mmlu"]["Average"] == expected
    continuations = {arg[1].strip() for s in raw["samples"]["mmlu_local_anatomy"] for arg in s["arguments"]}
    assert continuations == set("ABCD")


@pytest.mark.parametrize("right,expected", [(True, 1.0), (False, 0.0)])
def test_stub_scores_all_or_nothing(data_dir, right, expected):
    tasks = list(run_eval.TASKS)
    raw, metrics = run_eval.run_harness(StubLM(data_dir, right), tasks, run_eval.task_configs(tasks, data_dir), None)
    assert metrics["gsm8k"] == {"exact_match_strict": expected, "exact_match_flexible": expected}
    for task in ("arc_easy", "arc_challenge"):
        assert metrics[task]["acc"] == expected
    assert metrics["mmlu"] == {k: expected for k in ("Humanities", "STEM", "Social Sciences", "Other", "Average")}
    rows = run_eval.sample_rows("arc_easy_local", raw["samples"]["arc_easy_local"])
    assert [r["gold"] for r in rows] == [1, 0]  # the digit key "1" is the first choice
    assert all(r["correct"] == right for r in rows)


def test_real_model_writes_result_files(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "eval"
    code = run_eval.main(["--model_path", str(tiny_model_dir), "--data_dir", str(data_dir), "--output_dir", str(out),
                          "--batch_size", "4", "--tasks", "gsm8k,mmlu,arc_easy,arc_challenge"])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    assert set(metrics) == {"gsm8k", "mmlu", "arc_easy", "arc_challenge"}
    assert set(metrics["mmlu"]) == {"Humanities", "STEM", "Social Sciences", "Other", "Average"}
    assert metrics["gsm8k"]["heldout_loss"]["questions"] == 2 and metrics["gsm8k"]["heldout_loss"]["loss"] > 0
    gsm = [json.loads(line) for line in (out / "samples_gsm8k.jsonl").read_text().splitlines()]
    assert len(gsm) == 2 and {"prompt", "output", "extracted_flexible", "gold", "correct"} <= set(gsm[0])
    assert "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>" in gsm[0]["prompt"]  # the training chat format
    assert len((out / "samples_mmlu.jsonl").read_text().splitlines()) == 57


def test_dtype_auto_is_float32_off_the_gpu_and_a_named_dtype_is_kept(monkeypatch):
    assert eval_dtype("auto", "cpu") == torch.float32
    assert eval_dtype("bfloat16", "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert eval_dtype("auto", "cuda") == torch.bfloat16
    assert eval_dtype("auto", "cuda:1") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # pre-Ampere
    assert eval_dtype("auto", "cuda") == torch.float32


def test_the_model_is_evaluated_in_the_dtype_asked_for(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    loaded = {}

    def spy(path, device, dtype):
        loaded["model"] = model = load_for_eval(path, device, dtype)
        return model

    monkeypatch.setattr(run_eval, "load_for_eval", spy)
    out = tmp_path / "eval"
    code = run_eval.main(["--model_path", str(tiny_model_dir), "--data_dir", str(data_dir), "--output_dir", str(out),
                          "--tasks", "gsm8k_loss", "--dtype", "bfloat16", "--wandb", "off"])  # fmt: skip
    assert code == 0
    assert {p.dtype for p in loaded["model"].parameters()} == {torch.bfloat16}
    results = json.loads((out / "results.json").read_text())
    assert results["dtype"] == "bfloat16" and results["metrics"]["gsm8k"]["heldout_loss"]["loss"] > 0


def pretend_vllm_is_installed(monkeypatch, installed: bool) -> None:
    find_spec = importlib.util.find_spec
    vllm = find_spec("json") if installed else None  # any spec stands for an installed vllm
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: vllm if name == "vllm" else find_spec(name, *a))


@pytest.mark.parametrize(
    "tasks, hf_model_loaded, memory", [("arc_easy", False, 0.9), ("arc_easy,gsm8k_loss", True, 0.6)]
)
def test_backend_vllm_runs_the_harness_tasks_on_vllm_and_the_loss_on_hf(
    tiny_model_dir, data_dir, tmp_path, monkeypatch, tasks, hf_model_loaded, memory
):
    pretend_vllm_is_installed(monkeypatch, True)
    calls, loads = [], []

    def fake_vllm_lm(model_path, prompt_format, dtype, gpu_memory_utilization, **kwargs):
        calls.append((str(model_path), dtype, gpu_memory_utilization))
        model = load_for_eval(model_path)  # vLLM itself needs a GPU: the harness's HF model stands in for it
        return run_eval.harness_lm(model, prompt_format, batch_size=2)

    def counting_load(*args):
        loads.append(args)
        return load_for_eval(*args)

    monkeypatch.setattr(run_eval, "vllm_lm", fake_vllm_lm)
    monkeypatch.setattr(run_eval, "load_for_eval", counting_load)
    out = tmp_path / "eval"
    code = run_eval.main(["--model_path", str(tiny_model_dir), "--data_dir", str(data_dir), "--output_dir", str(out),
                          "--tasks", tasks, "--backend", "vllm", "--wandb", "off"])  # fmt: skip
    assert code == 0
    assert calls == [(str(tiny_model_dir), "float32", memory)]
    assert bool(loads) == hf_model_loaded
    results = json.loads((out / "results.json").read_text())
    assert results["backend"] == "vllm" and "acc" in results["metrics"]["arc_easy"]


def test_backend_vllm_without_vllm_or_on_a_checkpoint_is_one_line(
    tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    flags = ["--data_dir", str(data_dir), "--output_dir", str(out), "--tasks", "arc_easy", "--backend", "vllm"]
    pretend_vllm_is_installed(monkeypatch, False)
    assert run_eval.main(["--model_path", str(tiny_model_dir), *flags]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: backend=vllm needs vLLM on a CUDA GPU (pip install vllm); or use --backend hf"
    )
    pretend_vllm_is_installed(monkeypatch, True)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    for name in ("adapter_config.json", "plora_state.safetensors"):
        (checkpoint / name).write_text("{}")
    assert run_eval.main(["--model_path", str(checkpoint), *flags]) == 2
    assert "backend=vllm takes a model directory or hub id, not the checkpoint" in capsys.readouterr().err
    assert not out.exists()


def train_tiny_plora(model_dir: Path, tmp_path: Path, out: Path, *extra: str) -> None:
    """A few PLoRA steps (stages of 2) of the tiny model on made-up conversations, with checkpoints."""
    data = write_conversations(tmp_path / "c.jsonl")
    code = cli([*tiny_run(model_dir, data, out, unload_every_steps=2), *extra])
    assert code == 0


def test_a_plora_checkpoint_folds_into_the_model_it_was(tiny_model_dir, tmp_path):
    # Momentum 0 and a checkpoint at the last step: the final unload merges exactly the live adapter.
    out = tmp_path / "run"
    train_tiny_plora(tiny_model_dir, tmp_path, out, "--max_steps", "3", "--save_steps", "3", "--learning_rate", "1e-2")
    folded = load_for_eval(out / "checkpoint-3")
    final = load_for_eval(out)
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(folded(ids).logits, final(ids).logits, rtol=1e-5, atol=1e-5)


def evaluated_by(processes: int, model: Path, data_dir: Path, out: Path, tasks: str) -> tuple[dict, str]:
    """run_eval as one process, or as a user runs it over a node's GPUs (torchrun; here gloo processes
    on the CPU): results.json and every samples file (samples sorted by prompt), and its log."""
    flags = ["-m", "eval.run_eval", "--model_path", str(model), "--data_dir", str(data_dir), "--output_dir", str(out),
             "--tasks", tasks, "--batch_size", "1", "--device", "cpu", "--wandb", "off"]  # fmt: skip
    command = [sys.executable, *flags]
    if processes > 1:
        command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(processes),
                   *flags]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=module_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = {"results": json.loads((out / "results.json").read_text())}
    for path in out.glob("samples_*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        written[path.stem] = sorted(rows, key=lambda r: (r.get("subtask", ""), r["prompt"]))
    return written, proc.stderr


@pytest.mark.slow
def test_two_processes_score_what_one_process_scores(tiny_model_dir, data_dir, tmp_path):
    # Batch size 1: each item is computed alone in both runs, so only the sharing differs.
    data = shutil.copytree(data_dir, tmp_path / "data")
    for subject in (data / "mmlu" / "data" / "test").iterdir():  # an item a process in every subject
        subject.write_text(subject.read_text() + "Pick option C.,w,x,y,z,C\n")
    tasks = "gsm8k,mmlu,arc_easy,arc_challenge"
    one, _ = evaluated_by(1, tiny_model_dir, data, tmp_path / "one", tasks)
    two, log = evaluated_by(2, tiny_model_dir, data, tmp_path / "two", tasks)
    for task in ("gsm8k_local", "mmlu_local_virology", "arc_challenge_local"):  # the harness's own word
        assert f"Building contexts for {task} on rank 1..." in log  # that the second process took its share
    assert set(two) == set(one) == {"results", "samples_gsm8k", "samples_mmlu", "samples_arc_easy",
                                    "samples_arc_challenge"}  # fmt: skip
    loss_one, loss_two = (w["results"]["metrics"]["gsm8k"].pop("heldout_loss") for w in (one, two))
    assert loss_two["questions"] == loss_one["questions"] == 2 and loss_two["tokens"] == loss_one["tokens"]
    assert loss_two["loss"] == pytest.approx(loss_one["loss"], rel=1e-6)  # summed in another order
    assert two["results"]["metrics"] == one["results"]["metrics"]
    for name in set(one) - {"results"}:
        assert two[name] == one[name], name


@pytest.mark.slow
def test_two_processes_fold_a_checkpoint_in_turn_to_the_loss_one_process_measures(tiny_model_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    train_tiny_plora(tiny_model_dir, tmp_path, run, "--max_steps", "3", "--save_steps", "3", "--learning_rate", "1e-2")
    one, two = (evaluated_by(n, run / "checkpoint-3", data_dir, tmp_path / f"eval{n}", "gsm8k_loss")[0] for n in (1, 2))
    loss_one, loss_two = (w["results"]["metrics"]["gsm8k"]["heldout_loss"] for w in (one, two))
    assert loss_two["tokens"] == loss_one["tokens"] and loss_two["loss"] == pytest.approx(loss_one["loss"], rel=1e-6)


@pytest.mark.parametrize(
    "flags, error",
    [
        (["--tasks", "gsm8k", "--backend", "vllm"],
         "--backend vllm runs as one process (vLLM batches across the GPU itself): run it without torchrun"),
        (["--tasks", "arc_easy,mmlu"], "mmlu_local_abstract_algebra has 1 item(s) for 2 processes: run at most 1 "
         "(torchrun --nproc_per_node), or raise --limit / --mmlu_limit"),
        (["--tasks", "gsm8k", "--limit", "1"], "gsm8k_local has 1 item(s) for 2 processes"),
    ],
)  # fmt: skip
def test_what_two_processes_cannot_share_is_refused_before_the_model_loads(
    tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch, flags, error
):
    pretend_vllm_is_installed(monkeypatch, True)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before any process group is joined
    monkeypatch.setattr(run_eval, "load_for_eval", lambda *a: pytest.fail("the model loaded"))
    out = tmp_path / "eval"
    code = run_eval.main(["--model_path", str(tiny_model_dir), "--data_dir", str(data_dir), "--output_dir", str(out),
                          *flags])  # fmt: skip
    assert code == 2 and not out.exists()
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {error}")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model_path", "{tmp}/nowhere"], "model directory not found"),
        (["--model_path", "{tmp}"], "holds no model"),
        (["--model_path", "{model}", "--tasks", "gsm8k,hellaswag"], "unknown task"),
        (["--model_path", "{model}", "--data_dir", "{tmp}"], "missing local data for gsm8k_local"),
    ],
)
def test_bad_input(tiny_model_dir, data_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("finished earlier")
    args = [a.format(tmp=tmp_path, model=tiny_model_dir) for a in args]
    if "--data_dir" not in args:
        args += ["--data_dir", str(data_dir)]
    assert run_eval.main([*args, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err
    assert (out / "results.json").read_text() == "finished earlier"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the local mirror ../shared/data is not here")
def test_embedded_model_on_the_local_mirror(embedded_path, tmp_path):
    out = tmp_path / "eval"
    code = run_eval.main(["--model_path", embedded_path, "--tasks", "gsm8k,arc_easy", "--limit", "2",
                          "--data_dir", str(SHARED_DATA), "--output_dir", str(out), "--batch_size", "2"])  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert 0 < metrics["gsm8k"]["heldout_loss"]["loss"] < 5
    assert 0.0 <= metrics["arc_easy"]["acc"] <= 1.0


def fake_run(root: Path, name: str, args: dict, summary: dict, metrics: dict) -> Path:
    run = root / name
    (run / "eval").mkdir(parents=True)
    if args:
        (run / "run_args.json").write_text(json.dumps(args))
        (run / "summary.json").write_text(json.dumps(summary))
    results = run / "eval" / "results.json"
    results.write_text(json.dumps({"model_path": str(run), "metrics": metrics}))
    return results


METRICS = {
    "gsm8k": {"exact_match_flexible": 0.125, "exact_match_strict": 0.1, "heldout_loss": {"loss": 0.75}},
    "mmlu": {"Humanities": 0.3, "STEM": 0.25, "Social Sciences": 0.4, "Other": 0.5, "Average": 0.36},
    "arc_easy": {"acc": 0.5, "acc_norm": 0.4},
    "arc_challenge": {"acc": 0.25, "acc_norm": 0.3},
}


def test_table1_from_hand_written_results(tmp_path):
    from eval import tables

    plora_args = {"finetune_mode": "plora", "lora_r": 8, "lora_target_modules": "q_proj,v_proj",
                  "unload_momentum": 0.1, "unload_every_samples": 4800, "learning_rate": 1e-4}  # fmt: skip
    files = [
        fake_run(tmp_path, "base", {}, {}, METRICS),
        fake_run(tmp_path, "plora", plora_args, {"trainable_parameters": 4_194_304}, METRICS),
    ]
    assert tables.main(["--table", "1", "--results", *map(str, files), "--output_dir", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "table1.md").read_text() == (
        "| method | r | trainable params | seeds | GSM8K | GSM8K flexible | GSM8K loss | MMLU Humanities | MMLU STEM"
        " | MMLU Social Sciences | MMLU Other | MMLU Average | ARC-E | ARC-C |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        "| base |  |  | 1 | 10.00 | 12.50 | 0.750 | 30.00 | 25.00 | 40.00 | 50.00 | 36.00 | 50.00 | 25.00 |\n"
        "| PLoRA | 8 | 4.19M | 1 | 10.00 | 12.50 | 0.750 | 30.00 | 25.00 | 40.00 | 50.00 | 36.00 | 50.00 | 25.00 |\n"
        "\nGSM8K: exact match of the number after '####' (strict), the last number beside it (flexible); "
        'GSM8K loss: mean loss of the gold answers; MMLU, ARC: accuracy, scoring "A. text" replies.\n'
    )
    assert tables.main(["--table", "2", "--results", str(files[1]), "--output_dir", str(tmp_path / "t")]) == 0
    assert "| PLoRA | q,v | 8 | 4800 samples |" in (tmp_path / "t" / "table2.md").read_text()
    assert (tmp_path / "t" / "table2.csv").read_text().startswith("method,modules,r,unload every,seeds,GSM8K")


def test_runs_differing_only_in_seed_share_a_row_with_mean_and_std(tmp_path):
    from eval import tables

    args = {"finetune_mode": "lora", "lora_r": 1, "lora_target_modules": "q_proj", "learning_rate": 1e-4}
    losses = {"seed1": 0.70, "seed2": 0.80, "seed3": 0.90}
    files = [
        fake_run(tmp_path, name, {**args, "seed": i}, {}, {"gsm8k": {"heldout_loss": {"loss": loss}}})
        for i, (name, loss) in enumerate(losses.items())
    ]
    rows = tables.build_rows(files, "1")
    assert len(rows) == 1 and rows[0]["seeds"] == 3
    assert rows[0]["GSM8K loss"] == pytest.approx(0.8) and rows[0]["GSM8K loss std"] == pytest.approx(0.1)
    assert "| LoRA | 1 |  | 3 | 0.800 ± 0.100 |" in tables.to_markdown(rows)
    assert "GSM8K loss std" in tables.to_csv(rows).splitlines()[0]


def test_runs_of_other_configurations_keep_their_own_rows_and_the_column_that_tells_them_apart(tmp_path):
    from eval import tables

    args = {"finetune_mode": "plora", "lora_r": 8, "lora_target_modules": "q_proj", "learning_rate": 1e-4,
            "unload_every_samples": 64}  # fmt: skip
    files = [
        fake_run(tmp_path, f"m{momentum}_seed{seed}", {**args, "unload_momentum": momentum, "seed": seed}, {},
                 {"gsm8k": {"heldout_loss": {"loss": loss}}})
        for momentum, seed, loss in ((0.0, 1, 0.7), (0.1, 1, 0.9), (0.0, 2, 0.8), (0.1, 2, 1.0))
    ]  # fmt: skip
    lora = {"finetune_mode": "lora", "lora_r": 8, "lora_target_modules": "q_proj", "learning_rate": 1e-4}
    files.append(fake_run(tmp_path, "lora", lora, {}, {"gsm8k": {"heldout_loss": {"loss": 0.6}}}))
    rows = tables.build_rows(files, "1")  # Table 1 shows method, r and parameters: both PLoRA rows alike
    assert [(row["method"], row["momentum"], row["seeds"]) for row in rows] == [
        ("PLoRA", 0.0, 2), ("PLoRA", 0.1, 2), ("LoRA", "", 1)
    ]  # fmt: skip
    assert [row["GSM8K loss"] for row in rows] == pytest.approx([0.75, 0.95, 0.6])
    assert tables.to_markdown(rows).startswith("| method | r | trainable params | momentum | seeds | GSM8K loss |")


def test_measured_runs_add_their_q_proj_rank_columns(tmp_path):
    from eval import tables

    args = {"finetune_mode": "plora", "lora_r": 1, "lora_target_modules": "q_proj,v_proj", "learning_rate": 1e-4,
            "unload_momentum": 0.1, "unload_every_samples": 64}  # fmt: skip
    files = []
    for seed, (rank, effective) in enumerate([(4, 1.5), (6, 2.5)]):
        files.append(fake_run(tmp_path, f"seed{seed}", args, {}, {"gsm8k": {"heldout_loss": {"loss": 0.8}}}))
        by_type = {"q_proj": {"numerical_rank_max": rank, "effective_rank_mean": effective},
                   "v_proj": {"numerical_rank_max": 1, "effective_rank_mean": 1.0}}  # fmt: skip
        (tmp_path / f"seed{seed}" / "rank").mkdir()
        (tmp_path / f"seed{seed}" / "rank" / "rank.json").write_text(json.dumps({"by_type": by_type}))
    unmeasured = {"gsm8k": {"heldout_loss": {"loss": 0.7}}}
    files.append(fake_run(tmp_path, "unmeasured", {**args, "lora_r": 8}, {}, unmeasured))
    rows = tables.build_rows(files, "2")
    assert rows[0]["rank q"] == 5 and rows[0]["eff. rank q"] == 2.0 and rows[0]["rank q std"] > 0
    assert "rank q" not in rows[1]
    assert tables.main(["--table", "2", "--results", *map(str, files), "--output_dir", str(tmp_path / "t")]) == 0
    markdown = (tmp_path / "t" / "table2.md").read_text()
    assert "| 0.800 ± 0.000 | 5.00 ± 1.41 | 2.00 ± 0.71 |" in markdown
    assert "mean effective rank of W_T - W_0 in q_proj" in markdown


def test_table2_rows_run_from_lora_to_the_longest_interval(tmp_path):
    from eval import tables

    args = {"finetune_mode": "plora", "lora_r": 1, "lora_target_modules": "q_proj,v_proj", "learning_rate": 1e-4,
            "unload_momentum": 0.1}  # fmt: skip
    files = [fake_run(tmp_path, f"plora{n}", {**args, "unload_every_samples": n}, {}, METRICS) for n in (128, 256, 64)]
    lora = {"finetune_mode": "lora", "lora_r": 1, "lora_target_modules": "q_proj,v_proj", "learning_rate": 1e-4}
    files.append(fake_run(tmp_path, "lora", lora, {}, METRICS))
    rows = tables.build_rows(files, "2")
    assert [(row["method"], row.get("unload every", "")) for row in rows] == [
        ("LoRA", ""), ("PLoRA", "64 samples"), ("PLoRA", "128 samples"), ("PLoRA", "256 samples")
    ]  # fmt: skip


def test_capacity_table_compares_the_last_stages_training_loss_and_each_stages_merge(tmp_path):
    from eval import tables

    loss = {"gsm8k": {"heldout_loss": {"loss": 0.8}}}
    lora = {"finetune_mode": "lora", "lora_r": 1, "lora_target_modules": "q_proj", "learning_rate": 1e-4}
    plora = {**lora, "finetune_mode": "plora", "unload_every_steps": 2, "unload_momentum": 0.1,
             "momentum_mode": "refresh"}  # fmt: skip
    runs = {"lora": (lora, {"stage_steps": None}, [2.0, 1.0, 0.5, 0.3], [3.0]),
            "plora": (plora, {"stage_steps": 2}, [2.0, 1.0, 0.9, 0.7], [2.0, 1.0])}  # fmt: skip
    files = []
    for name, (args, summary, losses, norms) in runs.items():
        files.append(fake_run(tmp_path, name, args, summary, loss))
        history = [{"loss": value, "step": step} for step, value in enumerate(losses, 1)] + [{"train_loss": 1.0}]
        (tmp_path / name / "log_history.json").write_text(json.dumps(history))
        events = "".join(json.dumps({"update_norm": n}) + "\n" for n in norms)
        (tmp_path / name / "unload_events.jsonl").write_text(events)
    rows = tables.build_rows(files, "capacity")
    assert [row["train loss, last 2 steps"] for row in rows] == pytest.approx([0.4, 0.8])  # steps 3 and 4
    assert [row["merged norm by stage"] for row in rows] == ["3.00", "2.00, 1.00"]
    labels = [(row["method"], row["momentum"], row["rule"]) for row in rows]
    assert labels == [("LoRA", "", ""), ("PLoRA", 0.1, "refresh")]
    assert tables.main(["--table", "capacity", "--results", *map(str, files), "--output_dir", str(tmp_path)]) == 0
    assert (tmp_path / "capacity_table.md").read_text().startswith("| method | r | momentum | rule | unload every |")


def test_sweep_is_resumable_and_figures_are_pngs(tiny_model_dir, data_dir, tmp_path, capsys):
    from eval import figures, sweep

    run = tmp_path / "run"
    train_tiny_plora(tiny_model_dir, tmp_path, run, "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1")
    flags = ["--run_dir", str(run), "--output_dir", str(tmp_path / "sweep"), "--tasks", "arc_easy",
             "--data_dir", str(data_dir), "--batch_size", "2"]  # fmt: skip
    assert sweep.main(flags) == 0
    index = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert list(index) == ["2", "4"]  # checkpoint-2 and the final model (not checkpoint-4, the same step)
    assert index["4"].endswith("final/results.json")
    capsys.readouterr()
    assert sweep.main(flags) == 0
    assert capsys.readouterr().out.count("done already, skipped") == 2

    for args in (["loss", "--runs", str(run), "--smooth", "2"],
                 ["sweep", "--sweeps", str(tmp_path / "sweep"), "--metric", "arc_easy", "--window", "2"]):  # fmt: skip
        png = tmp_path / f"{args[0]}.png"
        assert figures.main([*args, "--output", str(png)]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_smoothing_counts_its_window_in_steps_not_entries():
    from eval.figures import step_average

    steps = list(range(10, 310, 10))  # logged every 10 steps
    values = [float(s) for s in steps]
    smoothed = step_average(steps, values, 150)
    assert smoothed[0] == 10.0 and smoothed[1] == 15.0  # the start of the run: what there is
    assert smoothed[-1] == sum(values[-15:]) / 15  # 150 steps = the last 15 entries
    assert step_average(steps, values, 10) == values  # a window of one logging interval: no smoothing


def hub_rows(data_dir: Path) -> dict[tuple[str, str], list[dict]]:
    """The fixture's test sets as the hub's datasets hold them (openai/gsm8k, allenai/ai2_arc, cais/mmlu)."""
    rows = {("openai/gsm8k", "main"): [json.loads(line) for line in (data_dir / "gsm8k/test.jsonl").open()]}
    for subset in ("ARC-Easy", "ARC-Challenge"):
        local = [json.loads(line) for line in (data_dir / "arc" / subset / f"{subset}-Test.jsonl").open()]
        rows[("allenai/ai2_arc", subset)] = [
            {"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                         "label": [c["label"] for c in r["question"]["choices"]]}}
            for r in local
        ]  # fmt: skip
    mmlu = []
    for path in sorted((data_dir / "mmlu/data/test").glob("*_test.csv")):
        for question, *choices, answer in csv.reader(path.open()):
            mmlu.append({"question": question, "subject": path.name.removesuffix("_test.csv"), "choices": choices,
                         "answer": "ABCD".index(answer)})  # fmt: skip
    rows[("cais/mmlu", "all")] = mmlu
    return rows


@pytest.fixture
def offline_hub(data_dir, tmp_path, monkeypatch):
    """The hub, played by JSONL files this test writes, read back through `datasets` (no network)."""
    import datasets

    from eval import hub_data

    files = {}
    for (name, config), rows in hub_rows(data_dir).items():
        path = tmp_path / "hub" / name / f"{config}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[(name, config)] = str(path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    monkeypatch.setattr(hub_data, "hub_load", lambda name, config: datasets.load_dataset(
        "json", data_files=files[(name, config)], split="train"))  # fmt: skip
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return hub_data


def test_the_hub_test_sets_land_in_the_local_layout(offline_hub, data_dir, tmp_path, capsys):
    out = tmp_path / "eval_data"
    assert offline_hub.main(["--output_dir", str(out)]) == 0
    assert "mmlu: 57 test rows" in capsys.readouterr().out
    for rel in ("gsm8k/test.jsonl", "arc/ARC-Easy/ARC-Easy-Test.jsonl", "arc/ARC-Challenge/ARC-Challenge-Test.jsonl"):
        ours = [json.loads(line) for line in (out / rel).open()]
        assert ours == [json.loads(line) for line in (data_dir / rel).open()], rel
    for path in (data_dir / "mmlu/data/test").glob("*.csv"):
        assert list(csv.reader((out / "mmlu/data/test" / path.name).open())) == list(csv.reader(path.open()))
    assert offline_hub.main(["--output_dir", str(out)]) == 0  # a second run keeps what is there
    assert "gsm8k: already in" in capsys.readouterr().out


def test_evaluating_with_data_dir_hub_scores_as_the_local_files_do(offline_hub, tiny_model_dir, data_dir, tmp_path):
    flags = ["--model_path", str(tiny_model_dir), "--tasks", "arc_easy,gsm8k_loss", "--batch_size", "2", "--wandb",
             "off"]  # fmt: skip
    assert run_eval.main([*flags, "--data_dir", "hub", "--output_dir", str(tmp_path / "hub_eval")]) == 0
    assert run_eval.main([*flags, "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "local_eval")]) == 0
    hub, local = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("hub_eval", "local_eval"))
    assert hub["metrics"] == local["metrics"]
    assert hub["data_dir"] == str(offline_hub.cache_dir()) and str(tmp_path / "hf_home") in hub["data_dir"]


def test_data_dir_hub_without_network_names_the_download_command(offline_hub, tiny_model_dir, tmp_path, capsys):
    def unreachable(name, config):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    offline_hub.hub_load = unreachable
    code = run_eval.main(["--model_path", str(tiny_model_dir), "--tasks", "gsm8k_loss", "--data_dir", "hub",
                          "--output_dir", str(tmp_path / "never")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: cannot load openai/gsm8k (main) from the hub")
    assert "python -m eval.hub_data --output_dir DIR and pass --data_dir DIR" in err[-1]
    assert not (tmp_path / "never").exists()


def figure_run(path: Path, seed: int, momentum: float, losses: list[float], learning_rate: float = 1e-4) -> Path:
    """A run directory as far as the figures read it: its arguments and its logged training loss."""
    path.mkdir(parents=True)
    args = {"finetune_mode": "plora", "lora_r": 8, "unload_momentum": momentum, "learning_rate": learning_rate,
            "seed": seed, "output_dir": str(path), "run_name": path.name}  # fmt: skip
    (path / "run_args.json").write_text(json.dumps(args))
    history = [{"step": step, "loss": loss} for step, loss in enumerate(losses, start=1)]
    (path / "log_history.json").write_text(json.dumps(history))
    return path


def test_the_loss_figure_draws_the_seeds_of_a_configuration_as_one_mean_curve_with_a_band(tmp_path):
    from eval import figures

    runs = [figure_run(tmp_path / f"m0/seed{seed}", seed, 0.0, [1.0 + d, 0.5 + d]) for seed, d in ((1, 0.0), (2, 0.2))]
    runs.append(figure_run(tmp_path / "m01/seed1", 1, 0.1, [2.0, 1.0]))
    assert figures.main(["loss", "--runs", *map(str, runs), "--smooth", "1", "--output", str(tmp_path / "f.png")]) == 0
    axes = figures.plt.gcf().axes[0]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["plora r8 m=0.0 (2 seeds)", "plora r8 m=0.1"]
    assert list(axes.lines[0].get_ydata()) == pytest.approx([1.1, 0.6])  # the mean of the two seeds
    assert list(axes.lines[1].get_ydata()) == [2.0, 1.0]
    (band,) = axes.collections  # the two-seed curve's spread, lowest to highest seed
    assert band.get_paths()[0].vertices[:, 1].min() == pytest.approx(0.5)
    assert band.get_paths()[0].vertices[:, 1].max() == pytest.approx(1.2)


def test_the_spectra_average_the_seeds_of_a_configuration_into_one_line(tmp_path):
    from eval import figures

    ranks = []
    for name, seed, momentum, lr, values in (("a", 1, 0.0, 1e-4, [4.0, 2.0]), ("b", 2, 0.0, 1e-4, [2.0, 1.0]),
                                             ("c", 1, 0.1, 1e-4, [1.0]), ("d", 1, 0.0, 5e-4, [8.0])):  # fmt: skip
        run = figure_run(tmp_path / name, seed, momentum, [1.0], lr)
        rank = {"model_path": str(run), "layers": [{"type": "q_proj", "singular_values": values}]}
        (run / "rank.json").write_text(json.dumps(rank))
        ranks.append(str(run / "rank.json"))
    assert figures.main(["spectra", "--ranks", *ranks, "--output", str(tmp_path / "s.png")]) == 0
    axes = figures.plt.gcf().axes[0]
    assert [list(line.get_ydata()) for line in axes.lines] == [[3.0, 1.5], [1.0], [8.0]]  # another LR: not a seed
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert labels == ["plora r8 m=0.0 (2 seeds)", "plora r8 m=0.1", "plora r8 m=0.0"]
