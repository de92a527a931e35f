"""Rows of the Tülu v2 SFT mixture, where the paper took its Orca and code-alpaca parts.

Each row is {"dataset": source name, "id", "messages": [{"role", "content"}]}. The same code reads the
hub (`allenai/tulu-v2-sft-mixture`) or a local JSONL file in that format (`--tulu_path`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from data_prep.common import Example, SourceError, Tally, conversation, hub_rows, read_records, require_file

TULU_HUB = "allenai/tulu-v2-sft-mixture"
ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def messages_to_example(conv_id: str, messages: object, where: str, tally: Tally) -> Example | None:
    """Role/content messages as a conversation; the first user turn is the question. None if malformed."""
    if not isinstance(messages, list) or not messages:
        tally.bad(where, "no messages list")
        return None
    turns = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            tally.bad(where, f"bad message {str(m)[:60]!r}")
            return None
        turns.append((ROLES[m["role"]], m["content"]))
    roles = [role for role, _ in turns]
    if "human" not in roles or "gpt" not in roles:
        tally.bad(where, "needs a user and an assistant turn")
        return None
    question = next(text for role, text in turns if role == "human")
    return Example(conversation(conv_id, turns), question)


def tulu_examples(subset: str, prefix: str, tally: Tally, tulu_path: Path | None = None) -> Iterator[Example]:
    """The rows whose `dataset` field equals `subset`, from the hub or a local copy."""
    if tulu_path is not None:
        rows = (r for _, r in read_records(require_file(tulu_path, "tulu", "pass --tulu_path FILE.jsonl"), tally))
    else:
        rows = hub_rows(TULU_HUB, tally)
    matched = 0
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or row.get("dataset") != subset:
            tally.read -= 1  # rows of other subsets are not this source's rows
            continue
        matched += 1
        example = messages_to_example(f"{prefix}_{row.get('id', i)}", row.get("messages"), f"tulu row {i}", tally)
        if example is not None:
            yield example
    if matched == 0:
        raise SourceError(f"no rows with dataset == {subset!r} in {tulu_path or TULU_HUB}; check --tulu_subset")


def tulu_or_local(
    source: str,
    subset: str,
    row_to_example: Callable[[int, object, str, Tally], Example | None],
    data_dir: Path | None,
    tally: Tally,
    tulu_path: Path | None = None,
) -> Iterator[Example]:
    """The Tülu rows of `subset` (hub, or --tulu_path), else the original-format files in DATA_DIR/source/."""
    if tulu_path is not None or data_dir is None:
        yield from tulu_examples(subset, source, tally, tulu_path)
        return
    files = sorted(p for p in (data_dir / source).rglob("*") if p.suffix in (".json", ".jsonl"))
    if not files:
        raise SourceError(f"{source}: no .json/.jsonl files under {data_dir / source}; pass --tulu_path or use the hub")
    for path in files:
        for i, (where, row) in enumerate(read_records(path, tally)):
            example = row_to_example(i, row, where, tally)
            if example is not None:
                yield example
