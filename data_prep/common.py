"""What every data-prep script shares: where sources come from, reading with bad-line accounting,
normalising text, and writing conversations atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("data_prep")

# ../shared/data beside a checkout is the local mirror in development and CI.
DEFAULT_MIRROR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


class SourceError(RuntimeError):
    """A source that cannot be read at all; the message names it and says how to supply it."""


def default_data_dir() -> Path | None:
    """The local mirror when it exists, else None (meaning: read from the dataset hub)."""
    return DEFAULT_MIRROR if DEFAULT_MIRROR.is_dir() else None


def conversation(conv_id: str, turns: Iterable[tuple[str, str]]) -> dict:
    """A ShareGPT record from (role, text) pairs, roles being system/human/gpt."""
    return {"id": conv_id, "conversations": [{"from": role, "value": text} for role, text in turns]}


def normalize(text: str) -> str:
    """Text for matching: NFKC, lower case, every run of non-alphanumerics one space."""
    return re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).lower()).strip()


@dataclass
class Example:
    """One converted row: the conversation, and the question it asks (for contamination checks)."""

    record: dict
    question: str


def with_replies(examples: Iterable[Example], tally: Tally) -> Iterator[Example]:
    """The examples whose every assistant turn says something; an empty or blank reply is malformed
    (counted and named by conversation id), since training on it teaches the model to stop at once."""
    for ex in examples:
        if any(t["from"] == "gpt" and not t["value"].strip() for t in ex.record["conversations"]):
            tally.bad(ex.record["id"], "empty assistant reply")
            continue
        yield ex


@dataclass
class Tally:
    """Per-source accounting: rows read, malformed rows (with where), and what happened to the rest."""

    read: int = 0
    malformed: list[str] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    inputs: list[dict] = field(default_factory=list)

    def bad(self, where: str, why: str) -> None:
        self.malformed.append(f"{where}: {why}")
        logger.warning("skipping %s: %s", where, why)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_records(path: Path, tally: Tally) -> Iterator[tuple[str, object]]:
    """(where, record) from a JSON array or JSONL file; malformed lines are tallied and skipped."""
    tally.inputs.append({"path": str(path), "sha256": sha256_file(path)})
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}: not valid JSON ({e})") from None
        for i, record in enumerate(records):
            tally.read += 1
            yield f"{path}: record {i}", record
        return
    # split on "\n" only: str.splitlines() also breaks at U+2028 and friends inside strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        tally.read += 1
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            tally.bad(f"{path}:{lineno}", f"not valid JSON ({e.msg})")


def require_file(path: Path, source: str, how: str) -> Path:
    if not path.is_file():
        raise SourceError(f"{source}: {path} not found; {how}")
    return path


def write_jsonl(records: Iterable[dict], path: str | Path) -> int:
    """Write records as JSONL through a temporary file and a rename, so no half-written file stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def hub_rows(name: str, tally: Tally, config: str | None = None, split: str = "train") -> Iterator[dict]:
    """Rows of a dataset-hub dataset through the `datasets` library (the `data` extra)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise SourceError(f"reading {name} from the hub needs `pip install datasets`, or pass --data_dir") from None
    dataset = load_dataset(name, config, split=split)
    tally.inputs.append({"hub": name, "config": config, "split": split, "fingerprint": dataset._fingerprint})
    for row in dataset:
        tally.read += 1
        yield row


def run_converter(name: str, examples: Iterator[Example], output: str, tally: Tally) -> None:
    """The body of each per-source script: write the conversations and print the counts."""
    count = write_jsonl((ex.record for ex in examples), output)
    print(f"{name}: read {tally.read}, malformed {len(tally.malformed)}, wrote {count} conversations to {output}")
