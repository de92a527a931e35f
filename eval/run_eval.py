"""Evaluate a model directory with lm-evaluation-harness, zero-shot, in the training prompt format.

    python -m eval.run_eval --model_path runs/demo --tasks gsm8k,mmlu,arc_easy,arc_challenge \
        [--data_dir ../shared/data] [--limit N] [--mmlu_limit N] --output_dir runs/demo/eval

`--tasks gsm8k_loss` computes the GSM8K held-out loss alone (no generation; cheap on a CPU).
Data-parallel over a node's GPUs, each process holding a copy of the model and a share of every task:

    torchrun --standalone --nproc_per_node 8 -m eval.run_eval --model_path ... --output_dir ...

Reads a plain HF model directory (what train_plora.py writes, or a full-fine-tuning checkpoint) or a
LoRA/PLoRA checkpoint-N (its adapter and merged base weights are folded into the base model). The
tasks are the harness YAMLs in eval/tasks/, reading local files under --data_dir (default
../shared/data when it exists), or the hub's test sets with `--data_dir hub` (eval/hub_data.py).
Prompts are wrapped in the training format: the chat template the trained model's tokenizer
carries, or `--conv_template` for a base model without one (eval/prompts.py).
Writes OUT/results.json (metrics per task, MMLU by category, the GSM8K held-out loss) and
OUT/samples_<task>.jsonl; all files are written to temporary names first and renamed at the end,
so a failed evaluation never overwrites finished results.
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from eval import hub_data
from eval.loading import EVAL_DTYPES, ModelPathError, eval_dtype, is_checkpoint, load_for_eval, load_tokenizer_for_eval
from eval.prompts import PromptFormat, PromptFormatError, harness_lm, vllm_lm
from eval.tasks.utils import extract_flexible, extract_strict, gsm8k_gold

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
TASKS = ("gsm8k", "mmlu", "arc_easy", "arc_challenge")
WANDB_RUN_FILE = "wandb_run.json"  # the run directory contract: docs/run_directory.md
LOSS_TASK = "gsm8k_loss"  # the GSM8K held-out loss alone, without generation (cheap on a CPU)
MMLU_CATEGORIES = {"humanities": "Humanities", "stem": "STEM", "social_sciences": "Social Sciences", "other": "Other"}
logger = logging.getLogger("eval")


class EvalError(ValueError):
    """Bad input to the evaluation; the message names it."""


def load_task_yaml(path: Path) -> dict:
    try:  # the harness's own loader resolves the `!function` tags; its home moved between releases
        from lm_eval.utils import load_yaml_config as load
    except ImportError:
        from lm_eval.tasks._yaml_loader import load_yaml as load
    return load(str(path))


@functools.cache
def mmlu_subjects() -> dict[str, str]:
    """MMLU's 57 subjects -> category (stem, humanities, social_sciences, other), as the harness groups them.

    Kept as a file here rather than imported from the harness, whose only copy is a private module.
    """
    return json.loads((TASKS_DIR / "mmlu_subjects.json").read_text())


CHOICE_FORMATS = {  # how a multiple-choice answer (MMLU, ARC) is scored: the log-likelihood of ...
    "text": "{{choices}}",  # "B. text", the reply format training used for ARC
    "letter": "{{letters}}",  # the letter alone, lm-evaluation-harness's standard MMLU scoring
}


def local_config(yaml_name: str, data_dir: Path, subject: str | None = None, choice_format: str = "text") -> dict:
    config = load_task_yaml(TASKS_DIR / yaml_name)
    if config["output_type"] == "multiple_choice":
        config["doc_to_choice"] = CHOICE_FORMATS[choice_format]
    files = config["dataset_kwargs"]["data_files"]
    for split, rel in files.items():
        rel = rel.replace("SUBJECT", subject) if subject else rel
        path = data_dir / rel
        if not path.is_file():
            raise EvalError(f"missing local data for {config['task']}: {path} (pass --data_dir)")
        files[split] = str(path)
    if subject:
        config["task"] = f"mmlu_local_{subject}"
    return config


def task_configs(tasks: list[str], data_dir: Path, choice_format: str = "text") -> list[dict]:
    configs = []
    for task in tasks:
        if task == "mmlu":
            configs += [
                local_config("mmlu_local_template.yaml", data_dir, s, choice_format) for s in sorted(mmlu_subjects())
            ]
        else:
            configs.append(local_config(f"{task}_local.yaml", data_dir, choice_format=choice_format))
    return configs


def heldout_loss(model, prompt_format: PromptFormat, data_dir: Path, limit: int | None, accelerator=None) -> dict:
    """Mean per-token loss of the gold GSM8K test answers, given the question in the training format.

    A continuous signal that still moves where a small model's accuracy is near zero. With several
    processes each takes every world-size-th answer and the sums are added up across them.
    """
    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines() if line]
    rows = rows[:limit] if limit else rows
    questions = len(rows)
    if accelerator is not None:
        rows = rows[accelerator.process_index :: accelerator.num_processes]
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    for row in rows:
        prompt_ids = prompt_format.encode(prompt_format.render([{"role": "user", "content": row["question"]}]))
        answer_ids = prompt_format.tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids], device=device)
        labels = ids.clone()
        labels[0, : len(prompt_ids)] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        total += loss.item() * len(answer_ids)
        tokens += len(answer_ids)
    if accelerator is not None:
        sums = accelerator.reduce(torch.tensor([total, tokens], dtype=torch.float64, device=device), "sum")
        total, tokens = sums[0].item(), int(sums[1].item())
    return {"loss": total / tokens, "tokens": tokens, "questions": questions}


def sample_rows(task: str, samples: list[dict]) -> list[dict]:
    """Per item: prompt, model output, extracted answer, gold answer, correct or not."""
    rows = []
    for s in samples:
        prompt = s["arguments"][0][0] if s.get("arguments") else None
        if task == "gsm8k_local":
            output = s["resps"][0][0]
            rows.append({
                "prompt": prompt, "output": output,
                "extracted_strict": extract_strict(output), "extracted_flexible": extract_flexible(output),
                "gold": gsm8k_gold(s["doc"]["answer"]),
                "correct": bool(s["exact_match_flexible"]), "correct_strict": bool(s["exact_match_strict"]),
            })  # fmt: skip
        else:
            scores = [r[0] for r in s["filtered_resps"]]
            choices = [a[1] for a in s["arguments"]]
            pick = max(range(len(scores)), key=scores.__getitem__)
            rows.append({
                "prompt": prompt, "output": choices[pick], "extracted": pick, "gold": s["target"],
                "correct": bool(s["acc"]), "loglikelihoods": scores,
            })  # fmt: skip
    return rows


def summarize(raw: dict, tasks: list[str]) -> dict:
    metrics = {}
    results = raw["results"]
    if "gsm8k" in tasks:
        r = results["gsm8k_local"]
        metrics["gsm8k"] = {"exact_match_strict": r["exact_match_strict,none"],
                            "exact_match_flexible": r["exact_match_flexible,none"]}  # fmt: skip
    for task in ("arc_easy", "arc_challenge"):
        if task in tasks:
            r = results[f"{task}_local"]
            metrics[task] = {"acc": r["acc,none"], "acc_norm": r["acc_norm,none"]}
    if "mmlu" in tasks:
        counts = {name: len(s) for name, s in raw["samples"].items()}
        by_category = {c: [0.0, 0] for c in MMLU_CATEGORIES}
        for subject, category in mmlu_subjects().items():
            name = f"mmlu_local_{subject}"
            correct, n = results[name]["acc,none"] * counts[name], counts[name]
            by_category[category][0] += correct
            by_category[category][1] += n
        mmlu = {MMLU_CATEGORIES[c]: s / n for c, (s, n) in by_category.items() if n}
        mmlu["Average"] = sum(s for s, _ in by_category.values()) / sum(n for _, n in by_category.values())
        metrics["mmlu"] = mmlu
    return metrics


def run_harness(lm, tasks: list[str], configs: list[dict], limit: int | None, mmlu_limit: int | None = None):
    """Zero-shot, chat-templated harness run of `configs` on any harness LM; raw output and metrics
    (on process 0; other processes of a data-parallel run get None, None).

    MMLU's 57 subjects may take their own per-subject limit; the harness takes one limit per
    call, so they then run as a second call whose results and samples join the first's.
    """
    import lm_eval

    def harness(subset: list[dict], n: int | None) -> dict | None:
        return lm_eval.simple_evaluate(
            model=lm, tasks=subset, limit=n, apply_chat_template=True, log_samples=True,
            bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
        )  # fmt: skip

    if mmlu_limit is None:
        raw = harness(configs, limit)
        return (raw, summarize(raw, tasks)) if raw is not None else (None, None)
    raw = {"results": {}, "samples": {}}
    mmlu = [c for c in configs if c["task"].startswith("mmlu_local_")]
    rest = [c for c in configs if c not in mmlu]
    for subset, n in ((rest, limit), (mmlu, mmlu_limit)):
        if subset:
            part = harness(subset, n)
            if part is None:  # a process other than the first: its share went to process 0
                return None, None
            raw["results"].update(part["results"])
            raw["samples"].update(part["samples"])
    return raw, summarize(raw, tasks)


def write_atomically(files: dict[str, str], output_dir: Path) -> None:
    """Write every file to a temporary name first; rename them all only once all are written."""
    output_dir.mkdir(parents=True, exist_ok=True)
    staged = []
    try:
        for name, text in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=output_dir)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            staged.append((tmp, output_dir / name))
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    for tmp, final in staged:
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)


def resolve_data_dir(value: str | None, tasks: list[str]) -> Path:
    """The local folder of test sets: --data_dir, ../shared/data by default, or `hub`: the hub's test
    sets, downloaded into a cache on first use (`eval/hub_data.py`)."""
    if value == "hub":
        needed = sorted({"gsm8k" if t == LOSS_TASK else t for t in tasks})
        try:
            hub_data.download(hub_data.cache_dir(), needed)
        except hub_data.HubDataError as e:
            raise EvalError(str(e)) from None
        return hub_data.cache_dir()
    data_dir = Path(value) if value else DEFAULT_DATA
    if not data_dir.is_dir():
        raise EvalError(
            f"data directory not found: {data_dir} (pass --data_dir DIR, or --data_dir hub on a machine with "
            "network; python -m eval.hub_data --output_dir DIR fetches the test sets once)"
        )
    return data_dir


def checked_data(args: argparse.Namespace) -> tuple[list[str], Path, list[dict]]:
    """(tasks, data folder, harness task configs), every data file checked before any model loads."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in (*TASKS, LOSS_TASK)]
    if unknown or not tasks:
        raise EvalError(f"unknown task(s) {unknown or args.tasks!r}; choose from {','.join((*TASKS, LOSS_TASK))}")
    data_dir = resolve_data_dir(args.data_dir, tasks)
    configs = task_configs([t for t in tasks if t != LOSS_TASK], data_dir, args.choice_format)
    gsm8k_test = data_dir / "gsm8k" / "test.jsonl"
    if ("gsm8k" in tasks or LOSS_TASK in tasks) and not gsm8k_test.is_file():
        raise EvalError(f"missing local data for the held-out loss: {gsm8k_test} (pass --data_dir)")
    return tasks, data_dir, configs


def check_backend(args: argparse.Namespace) -> None:
    """vLLM installed, and a model it can load, before anything loads."""
    if args.backend != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise EvalError("backend=vllm needs vLLM on a CUDA GPU (pip install vllm); or use --backend hf")
    if is_checkpoint(Path(args.model_path)) and not (Path(args.model_path) / "config.json").is_file():
        raise EvalError(
            f"backend=vllm takes a model directory or hub id, not the checkpoint {args.model_path}: evaluate it with "
            "--backend hf, which folds it into one model"
        )


def items(path: Path) -> int:
    """The items of a local test file: JSON lines, or MMLU's CSV rows."""
    with path.open(newline="", encoding="utf-8") as f:
        if path.suffix == ".csv":
            return sum(1 for _ in csv.reader(f))
        return sum(1 for line in f if line.strip())


def data_parallel(args: argparse.Namespace, configs: list[dict]):
    """Under torchrun (WORLD_SIZE > 1): this process's Accelerator, each process on a GPU of its own
    (gloo processes on the CPU with --device cpu); one process: None. The harness gives every process a
    share of every task and stops on a process without one, so each task needs an item a process."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes <= 1:
        return None
    if args.backend == "vllm":
        raise EvalError(
            "--backend vllm runs as one process (vLLM batches across the GPU itself): run it without torchrun"
        )
    for config in configs:
        limit = args.mmlu_limit if config["task"].startswith("mmlu_local_") and args.mmlu_limit else args.limit
        n = items(Path(config["dataset_kwargs"]["data_files"]["test"]))
        n = min(n, limit) if limit else n
        if n < processes:
            raise EvalError(
                f"{config['task']} has {n} item(s) for {processes} processes: run at most {n} (torchrun "
                "--nproc_per_node), or raise --limit / --mmlu_limit"
            )
    from accelerate import Accelerator

    return Accelerator(cpu=not str(args.device).startswith("cuda"))


def load_in_turn(accelerator, path: str | Path, device: str, dtype: torch.dtype):
    """The model on every process. A checkpoint-N is folded in fp32 in CPU memory (27 GB at 7B), so the
    processes of a node fold theirs one after another; model directories load at once."""
    if accelerator is None or not is_checkpoint(Path(path)):
        return load_for_eval(path, device, dtype)
    model = None
    for turn in range(accelerator.num_processes):
        if accelerator.process_index == turn:
            model = load_for_eval(path, device, dtype)
        accelerator.wait_for_everyone()
    return model


def evaluate(args: argparse.Namespace) -> dict | None:
    """Evaluate and write the results (None on the processes other than the first of a data-parallel run)."""
    tasks, data_dir, configs = checked_data(args)
    check_backend(args)
    accelerator = data_parallel(args, configs)
    device = str(accelerator.device) if accelerator is not None else args.device
    harness_tasks = [t for t in tasks if t != LOSS_TASK]
    wants_loss = "gsm8k" in tasks or LOSS_TASK in tasks
    # the prompt format is settled before the model loads: a model without one fails at once
    prompt_format = PromptFormat(load_tokenizer_for_eval(args.model_path), args.conv_template, str(args.model_path))
    dtype = eval_dtype(args.dtype, device)
    vllm = args.backend == "vllm" and bool(harness_tasks)
    model = None if vllm and not wants_loss else load_in_turn(accelerator, args.model_path, device, dtype)
    processes = f", {accelerator.num_processes} processes" if accelerator is not None else ""
    logger.info("evaluating %s in %s on %s (%s%s)", args.model_path, str(dtype).removeprefix("torch."), device,
                args.backend, processes)  # fmt: skip

    start = time.perf_counter()
    raw, metrics = {"samples": {}}, {}
    if harness_tasks:
        if vllm:  # vLLM loads its own copy; with the loss's copy beside it, it leaves that room on the GPU
            lm = vllm_lm(args.model_path, prompt_format, str(dtype).removeprefix("torch."),
                         gpu_memory_utilization=0.6 if wants_loss else 0.9, batch_size="auto")  # fmt: skip
        else:
            lm = harness_lm(model, prompt_format, accelerator, batch_size=args.batch_size, device=device)
        raw, metrics = run_harness(lm, harness_tasks, configs, args.limit, args.mmlu_limit)
    if wants_loss:
        loss = heldout_loss(model, prompt_format, data_dir, args.limit, accelerator)
        if metrics is not None:
            metrics.setdefault("gsm8k", {})["heldout_loss"] = loss
    if accelerator is not None and not accelerator.is_main_process:
        return None  # process 0 holds everything gathered, and writes it
    results = {
        "model_path": str(args.model_path),
        "tasks": tasks,
        "limit": args.limit,
        "mmlu_limit": args.mmlu_limit,
        "conv_template": args.conv_template,
        "choice_format": args.choice_format,
        "dtype": str(dtype).removeprefix("torch."),
        "backend": args.backend,
        "data_dir": str(data_dir),
        "metrics": metrics,
        "seconds": round(time.perf_counter() - start, 1),
    }
    files = {"results.json": json.dumps(results, indent=2)}
    groups = {"gsm8k": ["gsm8k_local"], "arc_easy": ["arc_easy_local"], "arc_challenge": ["arc_challenge_local"]}
    groups["mmlu"] = [f"mmlu_local_{s}" for s in sorted(mmlu_subjects())]
    for task in harness_tasks:
        rows = [dict(r, subtask=name) for name in groups[task] for r in sample_rows(name, raw["samples"][name])]
        files[f"samples_{task}.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_atomically(files, Path(args.output_dir))
    if args.wandb == "auto":
        log_to_training_run(Path(args.model_path), metrics)
    return results


def numeric_leaves(tree: dict, prefix: str) -> dict[str, float]:
    """{"gsm8k": {"heldout_loss": {"loss": 0.9}}} -> {"<prefix>/gsm8k/heldout_loss/loss": 0.9}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(numeric_leaves(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}/{key}"] = value
    return flat


def log_to_training_run(model_path: Path, metrics: dict) -> str | None:
    """Log the metrics to the W&B run that trained this model (or checkpoint), when it had one.

    Training leaves that run's id in `wandb_run.json` (a file contract, like the checkpoints). The
    metrics go in under `eval/...` against `eval/step`, the training step they were measured at.
    Best effort: results.json is already written, so a W&B failure is a warning, never an error.
    """
    run_dir = model_path if (model_path / WANDB_RUN_FILE).is_file() else model_path.parent
    info_file = run_dir / WANDB_RUN_FILE
    if not info_file.is_file():
        return None
    if importlib.util.find_spec("wandb") is None:
        logger.warning("%s names a W&B run, but wandb is not installed: metrics not logged there", info_file)
        return None
    import wandb

    info = json.loads(info_file.read_text())
    try:
        run = wandb.init(
            id=info["id"], project=info["project"], entity=info.get("entity") or None, dir=info["dir"],
            resume="allow", mode="offline" if info.get("offline") else None, reinit="finish_previous",
        )  # fmt: skip
        run.define_metric("eval/step")
        run.define_metric("eval/*", step_metric="eval/step")
        run.log({"eval/step": training_step(model_path), **numeric_leaves(metrics, "eval")})
        run.finish()
    except Exception as e:  # noqa: BLE001 (W&B's errors are many and not ours to tell apart)
        logger.warning("could not log to W&B run %s: %s", info["id"], e)
        return None
    return info["id"]


def training_step(model_path: Path) -> int:
    """The step a model directory was saved at: a checkpoint's trainer_state, or the run's summary."""
    for name, key in (("trainer_state.json", "global_step"), ("summary.json", "steps")):
        if (model_path / name).is_file():
            return json.loads((model_path / name).read_text()).get(key, 0)
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", help="a model directory or a checkpoint-N of a run")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {','.join(TASKS)}")
    parser.add_argument(
        "--data_dir", default=None,
        help="the test sets: a local folder (default: ../shared/data), or hub (the hub's, cached on first use; "
        "python -m eval.hub_data --output_dir DIR fetches them for offline nodes)",
    )  # fmt: skip
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task (and MMLU subject)")
    parser.add_argument("--mmlu_limit", type=int, default=None, help="first N of each MMLU subject (default: --limit)")
    parser.add_argument("--output_dir", help="where results.json and samples_<task>.jsonl go")
    parser.add_argument(
        "--check_data", action="store_true",
        help="only check (with hub: fetch) the tasks' test sets, as reproduce.sh does before it trains",
    )  # fmt: skip
    parser.add_argument("--batch_size", default="16", help="harness batch size (an int, or 'auto')")
    parser.add_argument(
        "--choice_format", choices=sorted(CHOICE_FORMATS), default="text",
        help="MMLU and ARC: score the 'B. text' reply (text, the training format) or the letter alone (letter, "
        "lm-evaluation-harness's standard)",
    )  # fmt: skip
    parser.add_argument(
        "--conv_template", default=None,
        help="FastChat template to prompt in (e.g. vicuna_v1.1), for a base model without a chat template; "
        "a trained model carries its training format in its tokenizer",
    )  # fmt: skip
    parser.add_argument(
        "--wandb", choices=("auto", "off"), default="auto",
        help="auto: log the metrics to the W&B run that trained the model, when there was one",
    )  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--backend", choices=("hf", "vllm"), default="hf",
        help="the harness's model for the harness tasks: hf (transformers), or vllm (batched generation on a GPU: "
        "pip install vllm; a model directory or hub id, not a checkpoint-N); the held-out loss always runs on hf",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", choices=("auto", *EVAL_DTYPES), default="auto",
        help="the weights' dtype: auto is bfloat16 on a CUDA GPU that has it, float32 elsewhere",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse(argv)
    try:
        if args.check_data:
            _, data_dir, _ = checked_data(args)
            print(f"evaluation data for {args.tasks}: {data_dir}")
            return 0
        if args.model_path is None or args.output_dir is None:
            raise EvalError("--model_path and --output_dir are required (or --check_data alone)")
        results = evaluate(args)
    except (EvalError, ModelPathError, PromptFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if results is None:  # a data-parallel process other than the first
        return 0
    print(json.dumps(results["metrics"], indent=2))
    print(f"wrote {args.output_dir}/results.json in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
