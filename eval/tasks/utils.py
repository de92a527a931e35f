"""Document processing and scoring for the local harness tasks (referenced from the YAMLs by !function).

Prompts follow the training format: a question with lettered options for ARC and MMLU (as
data_prep/arc.py writes them), the bare question for GSM8K; the harness wraps them in the model's
chat template (`apply_chat_template`), as training did.
"""

from __future__ import annotations

import re
import string

LETTERS = string.ascii_uppercase
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5'; '-3' -> '-3'; '7.' -> '7'; not a number -> None."""
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def extract_strict(output: str) -> str | None:
    """The number after '#### ', the format the training answers end with."""
    match = re.search(r"####\s*(-?[\d.,$]+)", output)
    return normalize_number(match.group(1)) if match else None


def extract_flexible(output: str) -> str | None:
    """The last number anywhere in the output (units, commas and a trailing period allowed)."""
    numbers = _NUMBER.findall(output.replace("$", ""))
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_gold(answer: str) -> str:
    return normalize_number(answer.split("####")[-1])


def gsm8k_process_results(doc: dict, results: list[str]) -> dict:
    gold = gsm8k_gold(doc["answer"])
    output = results[0]
    return {
        "exact_match_strict": float(extract_strict(output) == gold),
        "exact_match_flexible": float(extract_flexible(output) == gold),
    }


def lettered(stem: str, options: list[str]) -> str:
    return stem + "\n" + "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))


def arc_process_docs(dataset):
    """ARC rows (release JSONL) -> query, lettered choices "B. text", gold index via the row's own labels."""

    def convert(row: dict) -> dict:
        question = row["question"]
        labels = [c["label"] for c in question["choices"]]
        texts = [c["text"] for c in question["choices"]]
        return {
            "query": lettered(question["stem"], texts),
            "choices": [f"{LETTERS[i]}. {t}" for i, t in enumerate(texts)],
            "letters": list(LETTERS[: len(texts)]),
            "gold": labels.index(row["answerKey"]),
        }

    return dataset.map(convert, remove_columns=dataset.column_names)


def mmlu_process_docs(dataset):
    """MMLU CSV rows (question, A, B, C, D, answer) -> the same lettered format."""

    def convert(row: dict) -> dict:
        texts = [str(row[k]) for k in "ABCD"]
        return {
            "query": lettered(str(row["question"]), texts),
            "choices": [f"{k}. {t}" for k, t in zip("ABCD", texts)],
            "letters": list("ABCD"),
            "gold": "ABCD".index(row["answer"].strip()),
        }

    return dataset.map(convert, remove_columns=dataset.column_names)
