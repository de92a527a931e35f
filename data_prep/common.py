"""What every data-prep script shares: where sources come from and how conversations are written."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

# ../shared/data beside a checkout is the local mirror in development and CI.
DEFAULT_MIRROR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def default_data_dir() -> Path | None:
    """The local mirror when it exists, else None (meaning: read from the dataset hub)."""
    return DEFAULT_MIRROR if DEFAULT_MIRROR.is_dir() else None


def conversation(conv_id: str, turns: Iterable[tuple[str, str]]) -> dict:
    """A ShareGPT record from (role, text) pairs, roles being system/human/gpt."""
    return {"id": conv_id, "conversations": [{"from": role, "value": text} for role, text in turns]}


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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count
