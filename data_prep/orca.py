"""Orca as conversations, system prompts kept as system turns.

    python -m data_prep.orca --output data/orca.jsonl [--data_dir ../shared/data | --tulu_path tulu.jsonl]

The paper's 29,683 rows are the Orca part of the Tülu v2 SFT mixture (rows with
`dataset == "open_orca"`), read from the hub by default or from `--tulu_path`. A local directory
`DATA_DIR/orca/` may instead hold files in any original format: OpenOrca's
`system_prompt`/`question`/`response`, a chat `messages` list, or a preference pair
(`input.messages` + `preferred_output`, whose preferred reply is taken).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.common import Example, Tally, conversation
from data_prep.sources import source_main
from data_prep.tulu import messages_to_example, tulu_or_local

PAPER_COUNT = 29683
TULU_SUBSET = "open_orca"


def row_to_example(i: int, row: object, where: str, tally: Tally) -> Example | None:
    if not isinstance(row, dict):
        tally.bad(where, "not an object")
        return None
    conv_id = f"orca_{row.get('id', i)}"
    if "question" in row and "response" in row:  # OpenOrca
        turns = [("system", row.get("system_prompt") or ""), ("human", row["question"]), ("gpt", row["response"])]
        if not all(isinstance(text, str) for _, text in turns):
            tally.bad(where, "question, response and system_prompt must be strings")
            return None
        turns = [t for t in turns if not (t[0] == "system" and not t[1])]
        return Example(conversation(conv_id, turns), row["question"])
    if "messages" in row:  # chat format (e.g. Tülu rows)
        return messages_to_example(conv_id, row["messages"], where, tally)
    if isinstance(row.get("input"), dict) and "preferred_output" in row:  # preference pair
        preferred = row["preferred_output"] if isinstance(row["preferred_output"], list) else []
        return messages_to_example(conv_id, row["input"].get("messages", []) + preferred, where, tally)
    tally.bad(where, "not an Orca row (system_prompt/question/response, messages, or a preference pair)")
    return None


def examples(data_dir: Path | None, tally: Tally, tulu_path: Path | None = None) -> Iterator[Example]:
    return tulu_or_local("orca", TULU_SUBSET, row_to_example, data_dir, tally, tulu_path)


if __name__ == "__main__":
    source_main("orca", examples, __doc__)
