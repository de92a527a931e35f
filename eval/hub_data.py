"""The evaluation test sets from the dataset hub, written in the layout `--data_dir` reads.

    python -m eval.hub_data --output_dir eval_data [--tasks gsm8k,mmlu,arc_easy,arc_challenge]

The datasets are the ones lm-evaluation-harness's stock tasks read: `openai/gsm8k` (main),
`allenai/ai2_arc` (ARC-Easy, ARC-Challenge) and `cais/mmlu` (all), test splits. Run it once on a
machine with network and pass the folder to `eval.run_eval --data_dir` on nodes without one;
`--data_dir hub` does the same into a cache under HF_HOME on first use. Files already there are
kept; each is written to a temporary name and renamed, so an interrupted download leaves no half file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

TASKS = ("gsm8k", "mmlu", "arc_easy", "arc_challenge")
HUB = {  # task -> (dataset, config): lm-evaluation-harness's sources
    "gsm8k": ("openai/gsm8k", "main"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "mmlu": ("cais/mmlu", "all"),
}


class HubDataError(ValueError):
    """The hub could not give a test set; the message says what to do instead."""


def cache_dir() -> Path:
    """Where `--data_dir hub` keeps what it downloads."""
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "fastchat_plora" / "eval_data"


def hub_load(dataset: str, config: str):
    import datasets

    return datasets.load_dataset(dataset, config, split="test")


def arc_row(row: dict) -> dict:
    """A hub ARC row as the ARC release's JSONL has it (what the local task reads)."""
    choices = [{"text": text, "label": label} for text, label in zip(row["choices"]["text"], row["choices"]["label"])]
    return {"id": row["id"], "question": {"stem": row["question"], "choices": choices}, "answerKey": row["answerKey"]}


def jsonl(rows) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def mmlu_files(rows) -> dict[str, str]:
    """The hub's MMLU rows as one headerless CSV per subject: question, A, B, C, D, answer letter."""
    by_subject: dict[str, io.StringIO] = {}
    for row in rows:
        buffer = by_subject.setdefault(row["subject"], io.StringIO())
        csv.writer(buffer, lineterminator="\n").writerow([row["question"], *row["choices"], "ABCD"[row["answer"]]])
    return {f"mmlu/data/test/{subject}_test.csv": buffer.getvalue() for subject, buffer in by_subject.items()}


def task_files(task: str, rows) -> dict[str, str]:
    """The files (relative path -> text) one task's test set takes in the local layout."""
    if task == "gsm8k":
        return {"gsm8k/test.jsonl": jsonl({"question": r["question"], "answer": r["answer"]} for r in rows)}
    if task in ("arc_easy", "arc_challenge"):
        name = HUB[task][1]
        return {f"arc/{name}/{name}-Test.jsonl": jsonl(arc_row(r) for r in rows)}
    return mmlu_files(rows)


def is_present(task: str, output_dir: Path) -> bool:
    if task == "gsm8k":
        return (output_dir / "gsm8k" / "test.jsonl").is_file()
    if task == "mmlu":
        return (output_dir / "mmlu" / "data" / "test").is_dir() and any((output_dir / "mmlu/data/test").iterdir())
    name = HUB[task][1]
    return (output_dir / "arc" / name / f"{name}-Test.jsonl").is_file()


def download(output_dir: Path, tasks=TASKS, load: Callable | None = None) -> dict[str, int]:
    """Write each task's test set under output_dir (tasks already there are skipped); rows per task.
    `load(dataset, config)` gives a test split's rows (default: the hub, through `datasets`)."""
    load = load or hub_load
    counts = {}
    for task in tasks:
        if is_present(task, output_dir):
            continue
        dataset, config = HUB[task]
        try:
            rows = list(load(dataset, config))
        except ImportError:
            raise HubDataError("the hub's test sets need the datasets package: pip install -e '.[data]'") from None
        except Exception as e:  # noqa: BLE001  network, auth, a moved dataset: all mean "not from here"
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise HubDataError(
                f"cannot load {dataset} ({config}) from the hub ({reason}); on a machine with network run "
                f"python -m eval.hub_data --output_dir DIR and pass --data_dir DIR"
            ) from None
        for rel, text in task_files(task, rows).items():
            path = output_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        counts[task] = len(rows)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="the folder to pass as --data_dir")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in HUB]
    if unknown:
        print(f"error: task {unknown[0]!r}: expected one of {', '.join(TASKS)}", file=sys.stderr)
        return 2
    try:
        counts = download(Path(args.output_dir), tasks)
    except HubDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for task in tasks:
        print(f"{task}: {counts[task]} test rows" if task in counts else f"{task}: already in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
