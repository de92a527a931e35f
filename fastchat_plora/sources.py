"""Training data as users hold it: files in three record formats, hub datasets, and mixes of them.

A `--data_path` entry is a source, optionally followed by `=` and an amount:

    mix.jsonl                                   every record, in file order
    orca.jsonl=2000                             2,000 records drawn (more than the source holds: repeated)
    hub:allenai/tulu-v2-sft-mixture:train=0.5   a weight (written with a decimal point)

`hub:ID[:SPLIT]` loads a dataset through `datasets` (split `train` by default); ID may also be a
local dataset folder. Weighted sources share as many records as they hold together, split in
proportion to their weights; counted sources give exactly their count. A mix of several sources,
or of any with an amount, is shuffled with the run's seed.

Record formats, detected per source from its records (one format a source):

    ShareGPT  {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}
    messages  {"messages": [{"role": "system" | "user" | "assistant", "content": "...",
                             "train": false | "weight": 0 (optional: an assistant turn left out of the loss)}]}
    Alpaca    {"instruction": "...", "input": "..." (optional), "output": "...", "system": "..." (optional)}

Each becomes the same list of role/content messages (`data.Message`), so the same conversation
written three ways trains on the same tokens and labels.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fastchat_plora.data import DataError, Message

logger = logging.getLogger(__name__)

HUB_PREFIX = "hub:"
# ShareGPT role names, with the OpenAI-style aliases that converted data often carries.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
MESSAGE_ROLES = ("system", "user", "assistant")
FORMATS = ("sharegpt", "messages", "alpaca")


@dataclass(frozen=True)
class Source:
    location: str  # a file path, or hub:ID[:SPLIT]
    count: int | None = None  # records to draw
    weight: float | None = None  # share of the weighted sources' records

    @classmethod
    def parse(cls, entry: str) -> Source:
        """`PATH`, `PATH=COUNT` or `PATH=WEIGHT` (a weight has a decimal point)."""
        location, sep, amount = entry.rpartition("=")
        if not sep or not location or Path(entry).exists():
            return cls(entry)
        try:
            if "." in amount:
                weight = float(amount)
                if not (weight >= 0 and math.isfinite(weight)):
                    raise ValueError
                return cls(location, weight=weight)
            count = int(amount)
            if count <= 0:
                raise ValueError
            return cls(location, count=count)
        except ValueError:
            raise DataError(
                f"data_path entry {entry!r}: the amount after '=' must be a positive count (2000) "
                "or a weight >= 0 (0.5)"
            ) from None


def detect_format(record: object) -> str | None:
    if isinstance(record, dict):
        if "conversations" in record:
            return "sharegpt"
        if "messages" in record:
            return "messages"
        if "instruction" in record and "output" in record:
            return "alpaca"
    return None


# the two turn-list formats: (list key, role key, text key, role names -> our roles)
TURN_FORMATS = {
    "sharegpt": ("conversations", "from", "value", SHAREGPT_ROLES),
    "messages": ("messages", "role", "content", {role: role for role in MESSAGE_ROLES}),
}


def trains(turn: dict, where: str) -> bool:
    """A messages turn's loss switch: `train` (bool) or `weight` (0 or 1); on by default for assistant turns."""
    flags = [turn[key] for key in ("train", "weight") if key in turn]
    if any(flag not in (True, False) for flag in flags):  # 0 and 1 compare equal to False and True
        raise DataError(f"{where}: 'train' must be true/false and 'weight' 0/1, got {turn!r:.80}")
    on = all(flags)
    if on and flags and turn["role"] != "assistant":
        raise DataError(f"{where}: only assistant turns are trained; a {turn['role']} turn cannot be switched on")
    return on


def parse_turns(record: dict, fmt: str, where: str) -> list[Message]:
    """A ShareGPT or messages record's turns as role/content messages (messages: with their loss switch)."""
    list_key, role_key, text_key, roles = TURN_FORMATS[fmt]
    if not isinstance(record[list_key], list):
        raise DataError(f"{where}: {list_key!r} must be a list of turns")
    messages = []
    for turn in record[list_key]:
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise DataError(f"{where}: each turn needs {role_key!r} and a string {text_key!r}, got {turn!r:.80}")
        role = roles.get(turn.get(role_key))
        if role is None:
            raise DataError(f"{where}: unknown role {turn.get(role_key)!r}; expected one of {sorted(roles)}")
        message = {"role": role, "content": turn[text_key]}
        if fmt == "messages" and not trains(turn, where) and role == "assistant":
            message["train"] = False
        messages.append(message)
    return messages


def parse_alpaca(record: dict, where: str) -> list[Message]:
    """Instruction and input joined by a blank line, as data_prep's code-alpaca and the Tülu mixture do."""
    fields = {key: record.get(key, "") for key in ("system", "instruction", "input", "output")}
    bad = [key for key, value in fields.items() if not isinstance(value, str)]
    if bad:
        raise DataError(f"{where}: {bad[0]!r} must be a string")
    prompt = f"{fields['instruction']}\n\n{fields['input']}" if fields["input"].strip() else fields["instruction"]
    system = [{"role": "system", "content": fields["system"]}] if fields["system"] else []
    return [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": fields["output"]}]


def parse_record(record: object, where: str, expected: str | None = None) -> list[Message]:
    """One record as messages; `expected` is the format of the source's first record."""
    found = detect_format(record)
    if found is None:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(
            f"{where}: unknown record shape (keys {keys}); expected 'conversations' (ShareGPT), "
            "'messages' (OpenAI) or 'instruction' + 'output' (Alpaca)"
        )
    if expected is not None and found != expected:
        raise DataError(f"{where}: a {found} record in a {expected} source (one format a file)")
    messages = parse_alpaca(record, where) if found == "alpaca" else parse_turns(record, found, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: conversation {record.get('id', '?')!r} has no assistant turn")
    if not any(m["role"] == "assistant" and m.get("train", True) for m in messages):
        raise DataError(f"{where}: every assistant turn is switched off ('train': false / 'weight': 0)")
    return messages


def file_records(path: Path) -> Iterable[tuple[object, str]]:
    """Records of a JSON list or a JSONL file, each with where it stands (file:line or file: record i)."""
    if not path.is_file():
        looks_like_hub = len(path.parts) == 2 and path.suffix not in (".json", ".jsonl")
        hint = f" (a hub dataset is written {HUB_PREFIX}{path})" if looks_like_hub else ""
        raise DataError(f"data file not found: {path}{hint}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"data file is empty: {path}")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        return [(record, f"{path}: record {i}") for i, record in enumerate(records)]
    located = []
    # split on "\n" only: str.splitlines() also breaks at U+2028 and friends inside strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            located.append((json.loads(line), f"{path}:{lineno}"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return located


def hub_records(location: str) -> Iterable[tuple[object, str]]:
    """Rows of a hub dataset split (or a local dataset folder), through `datasets`."""
    name, _, split = location.removeprefix(HUB_PREFIX).partition(":")
    split = split or "train"
    try:
        import datasets
    except ImportError:
        raise DataError(f"{location}: hub datasets need the datasets package: pip install -e '.[data]'") from None
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001  the hub's errors are many (network, missing split, auth); all are this entry's
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"{location}: cannot load split {split!r} ({reason}); without network, copy it to a JSONL file "
            "on a machine with one and pass that file"
        ) from None
    return ((row, f"{location} row {i}") for i, row in enumerate(rows))


def load_source(location: str) -> list[list[Message]]:
    """Every conversation of one source, failing on the first bad record (named by file and line)."""
    records = hub_records(location) if location.startswith(HUB_PREFIX) else file_records(Path(location))
    conversations, expected = [], None
    for record, where in records:
        conversations.append(parse_record(record, where, expected))
        expected = expected or detect_format(record)
    if not conversations:
        raise DataError(f"{location}: holds no conversations")
    return conversations


def draw(conversations: list, count: int, rng: random.Random) -> list:
    """`count` records: whole copies of the source while it lasts, then a sample without repeats."""
    copies, rest = divmod(count, len(conversations))
    return conversations * copies + rng.sample(conversations, rest)


def weighted_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Split sum(sizes) records in proportion to the weights, by largest remainder (so they add up)."""
    total, weight_sum = sum(sizes), sum(weights)
    shares = [total * w / weight_sum for w in weights]
    counts = [int(s) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def load_training_data(entries: list[str], seed: int) -> list[list[Message]]:
    """The conversations of every `--data_path` entry, mixed as their amounts say."""
    sources = [Source.parse(entry) for entry in entries]
    loaded = [load_source(source.location) for source in sources]
    if len(sources) == 1 and sources[0].count is None:  # one source as it is (a weight alone changes nothing)
        return loaded[0]
    counts = [len(records) if s.count is None else s.count for s, records in zip(sources, loaded)]
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    if weighted:
        weights = [sources[i].weight for i in weighted]
        if sum(weights) <= 0:
            raise DataError(f"data_path weights {weights} sum to {sum(weights)}; they must sum to a positive number")
        for i, count in zip(weighted, weighted_counts([len(loaded[i]) for i in weighted], weights)):
            counts[i] = count
    rng = random.Random(seed)
    mix = []
    for source, records, count in zip(sources, loaded, counts):
        mix += draw(records, count, rng)
        logger.info("data: %s: %d of its %d conversations", source.location, count, len(records))
    rng.shuffle(mix)
    return mix


def hold_out(conversations: list, count: int) -> tuple[list, list]:
    """(all but the last `count` conversations, the last `count`): a held-out slice of the training data."""
    if count >= len(conversations):
        raise DataError(f"eval_holdout={count}: the training data holds only {len(conversations)} conversations")
    return conversations[:-count], conversations[-count:]


def load_prompts(location: str) -> list[list[Message]]:
    """Prompts for sample replies: a .txt file (one user message a line) or conversations in any source format."""
    if not location.endswith(".txt"):
        return load_source(location)
    path = Path(location)
    if not path.is_file():
        raise DataError(f"prompts file not found: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    if not lines:
        raise DataError(f"prompts file holds no prompt: {path}")
    return [[{"role": "user", "content": line}] for line in lines]
