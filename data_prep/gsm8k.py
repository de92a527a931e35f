"""GSM8K train as conversations: the question as the human turn, the worked solution as the reply.

    python -m data_prep.gsm8k --output data/gsm8k_train.jsonl [--data_dir ../shared/data]

The solution is kept as published, calculator annotations (`<<48/2=24>>`) and the final
`#### N` line included: the evaluation extracts the number after `####`, and the paper trained on
the dataset as released. Reads `DATA_DIR/gsm8k/{split}.jsonl` when a data directory is given (or the
local mirror exists), else `openai/gsm8k` (config "main") from the dataset hub.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.common import Example, Tally, conversation, hub_rows, read_records, require_file
from data_prep.sources import source_main

PAPER_COUNT = 7473


def examples(data_dir: Path | None, tally: Tally, split: str = "train") -> Iterator[Example]:
    if data_dir is None:
        rows = ((f"openai/gsm8k row {i}", r) for i, r in enumerate(hub_rows("openai/gsm8k", tally, "main", split)))
    else:
        path = require_file(data_dir / "gsm8k" / f"{split}.jsonl", "gsm8k", "pass --data_dir holding gsm8k/")
        rows = read_records(path, tally)
    for i, (where, row) in enumerate(rows):
        question, answer = (row.get("question"), row.get("answer")) if isinstance(row, dict) else (None, None)
        if not isinstance(question, str) or not isinstance(answer, str) or "####" not in answer:
            tally.bad(where, "needs a string question and an answer ending in '#### N'")
            continue
        yield Example(conversation(f"gsm8k_{split}_{i}", [("human", question), ("gpt", answer)]), question)


if __name__ == "__main__":
    source_main("gsm8k", examples, __doc__)
