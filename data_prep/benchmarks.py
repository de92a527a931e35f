"""The evaluation test questions (GSM8K, ARC, MMLU), normalised, for the contamination filter."""

from __future__ import annotations

import csv
from pathlib import Path

from data_prep import arc
from data_prep.common import SourceError, Tally, hub_rows, normalize, read_records


def _local(data_dir: Path) -> dict[str, list[str]]:
    tally = Tally()  # the test files are ours to trust; a malformed line still is no question
    questions = {"gsm8k": [], "arc": [], "mmlu": []}
    path = data_dir / "gsm8k" / "test.jsonl"
    questions["gsm8k"] = [r["question"] for _, r in read_records(path, tally)] if path.is_file() else None
    arc_files = [data_dir / "arc" / s / f"{s}-Test.jsonl" for s in arc.SUBSETS]
    if all(p.is_file() for p in arc_files):
        questions["arc"] = [arc.parse_row(r)[1] for p in arc_files for _, r in read_records(p, tally)]
    else:
        questions["arc"] = None
    mmlu_files = sorted((data_dir / "mmlu" / "data" / "test").glob("*_test.csv"))
    questions["mmlu"] = [row[0] for p in mmlu_files for row in _csv_rows(p)] or None
    missing = [name for name, qs in questions.items() if qs is None]
    if missing:
        raise SourceError(
            f"test sets {missing} not found under {data_dir}; they are needed for the contamination filter"
        )
    return questions


def _csv_rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def _hub() -> dict[str, list[str]]:
    tally = Tally()
    return {
        "gsm8k": [r["question"] for r in hub_rows("openai/gsm8k", tally, "main", "test")],
        "arc": [r["question"] for s in arc.SUBSETS for r in hub_rows("allenai/ai2_arc", tally, s, "test")],
        "mmlu": [r["question"] for r in hub_rows("cais/mmlu", tally, "all", "test")],
    }


def test_questions(data_dir: Path | None) -> dict[str, set[str]]:
    """Benchmark name -> normalised test questions, from the local mirror or the hub."""
    raw = _local(data_dir) if data_dir is not None else _hub()
    return {name: {normalize(q) for q in qs} for name, qs in raw.items()}
