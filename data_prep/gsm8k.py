"""GSM8K train as conversations: the question as the human turn, the worked solution as the reply.

    python -m data_prep.gsm8k --output data/gsm8k_train.jsonl [--data_dir ../shared/data]

The solution is kept as published, calculator annotations (`<<48/2=24>>`) and the final
`#### N` line included: the evaluation extracts the number after `####`, and the paper trained on
the dataset as released. Reads `DATA_DIR/gsm8k/{split}.jsonl` when a data directory is given (or the
local mirror exists), else `openai/gsm8k` (config "main") from the dataset hub.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

from data_prep.common import conversation, default_data_dir, write_jsonl


def read_rows(data_dir: Path | None, split: str) -> Iterator[dict]:
    if data_dir is None:
        from datasets import load_dataset  # only when the hub is used

        yield from load_dataset("openai/gsm8k", "main", split=split)
        return
    path = Path(data_dir) / "gsm8k" / f"{split}.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: GSM8K {split} not found at {path} (pass --data_dir holding gsm8k/{split}.jsonl)")
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def to_conversations(rows: Iterator[dict], split: str) -> Iterator[dict]:
    for i, row in enumerate(rows):
        yield conversation(f"gsm8k_{split}_{i}", [("human", row["question"]), ("gpt", row["answer"])])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument(
        "--data_dir",
        default=None,
        help="local mirror holding gsm8k/ (default: ../shared/data if present, else the hub)",
    )
    parser.add_argument("--split", default="train", choices=["train", "test"], help="which split to convert")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N rows")
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    rows = read_rows(data_dir, args.split)
    records = to_conversations(rows, args.split)
    if args.limit is not None:
        records = itertools.islice(records, args.limit)
    count = write_jsonl(records, args.output)
    print(
        f"gsm8k {args.split}: wrote {count} conversations to {args.output} (source: {data_dir or 'hub openai/gsm8k'})"
    )


if __name__ == "__main__":
    main()
