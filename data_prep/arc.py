"""ARC train (Easy + Challenge) as conversations: the question with lettered options, then the answer.

    python -m data_prep.arc --output data/arc_train.jsonl [--data_dir ../shared/data]

Options are shown as A., B., C., ... in their given order, whatever the row's own labels (some rows
label choices 1-4, and 3 or 5 choices occur): the answer key is looked up among the row's labels,
and the reply names the option's letter and text, e.g. "B. food". Reads
`DATA_DIR/arc/ARC-{Easy,Challenge}/ARC-*-Train.jsonl` or `allenai/ai2_arc` from the hub.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from pathlib import Path

from data_prep.common import Example, Tally, conversation, hub_rows, read_records, require_file
from data_prep.sources import source_main

PAPER_COUNT = 3370  # 2,251 Easy + 1,119 Challenge
SUBSETS = ("ARC-Easy", "ARC-Challenge")


def parse_row(row: object) -> tuple[str, str, list[tuple[str, str]], str]:
    """(id, stem, [(label, text)], answer key) from the release's JSONL or the hub's format."""
    question = row["question"]
    if isinstance(question, dict):  # release JSONL: question {stem, choices: [{text, label}]}
        choices = [(c["label"], c["text"]) for c in question["choices"]]
        stem = question["stem"]
    else:  # hub: question str, choices {text: [...], label: [...]}
        choices = list(zip(row["choices"]["label"], row["choices"]["text"]))
        stem = question
    return row["id"], stem, choices, row["answerKey"]


def render(stem: str, choices: list[tuple[str, str]], key: str) -> tuple[str, str]:
    """The human turn and the reply; raises ValueError if the key is not among the labels."""
    labels = [label for label, _ in choices]
    index = labels.index(key)
    options = "\n".join(f"{letter}. {text}" for letter, (_, text) in zip(string.ascii_uppercase, choices))
    return f"{stem}\n{options}", f"{string.ascii_uppercase[index]}. {choices[index][1]}"


def examples(data_dir: Path | None, tally: Tally, split: str = "train") -> Iterator[Example]:
    for subset in SUBSETS:
        if data_dir is None:
            rows = ((f"{subset} row {i}", r) for i, r in enumerate(hub_rows("allenai/ai2_arc", tally, subset, split)))
        else:
            name = f"{subset}-{split.capitalize()}.jsonl"
            rows = read_records(
                require_file(data_dir / "arc" / subset / name, "arc", "pass --data_dir holding arc/"), tally
            )
        for where, row in rows:
            try:
                row_id, stem, choices, key = parse_row(row)
                human, reply = render(stem, choices, key)
            except (KeyError, TypeError, ValueError) as e:
                tally.bad(where, f"not an ARC row with its answer among its choices ({e!r:.60})")
                continue
            yield Example(conversation(f"arc_{row_id}", [("human", human), ("gpt", reply)]), stem)


if __name__ == "__main__":
    source_main("arc", examples, __doc__)
