"""Code-alpaca as conversations: the instruction (and its input, when there is one) asks, the output answers.

    python -m data_prep.code_alpaca --output data/code_alpaca.jsonl [--data_dir ../shared/data | --tulu_path tulu.jsonl]

The paper's 20,016 rows are the code-alpaca part of the Tülu v2 SFT mixture (`dataset ==
"code_alpaca"`), read from the hub by default or from `--tulu_path`; `DATA_DIR/code_alpaca/*.json`
may instead hold the original `instruction`/`input`/`output` rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.common import Example, Tally, conversation
from data_prep.sources import source_main
from data_prep.tulu import messages_to_example, tulu_or_local

PAPER_COUNT = 20016
TULU_SUBSET = "code_alpaca"


def row_to_example(i: int, row: object, where: str, tally: Tally) -> Example | None:
    if isinstance(row, dict) and "messages" in row:
        return messages_to_example(f"code_alpaca_{row.get('id', i)}", row["messages"], where, tally)
    fields = [row.get(k) if isinstance(row, dict) else None for k in ("instruction", "input", "output")]
    if not all(isinstance(f, str) for f in fields) or not fields[0].strip():
        tally.bad(where, "needs string instruction, input and output")
        return None
    instruction, extra, output = fields
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Example(conversation(f"code_alpaca_{i}", [("human", prompt), ("gpt", output)]), prompt)


def examples(data_dir: Path | None, tally: Tally, tulu_path: Path | None = None) -> Iterator[Example]:
    return tulu_or_local("code_alpaca", TULU_SUBSET, row_to_example, data_dir, tally, tulu_path)


if __name__ == "__main__":
    source_main("code_alpaca", examples, __doc__)
