"""Which runs are seeds of one configuration, for the tables and the figures alike.

A run's configuration is its saved `run_args.json` less the entries that say where and how it ran
rather than what it trained. Runs with equal configurations are seeds of one another: a table
averages them into one row, a figure into one curve. A model directory without `run_args.json`
(e.g. the untouched base model) is a configuration of its own.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

# run_args.json entries that say where and how a run went, not what it trained
NOT_CONFIGURATION = {"seed", "data_seed", "output_dir", "run_name", "logging_dir", "resume_from_checkpoint",
                     "overwrite_output_dir", "report_to", "disable_tqdm"}  # fmt: skip


def configuration(run_dir: Path) -> str:
    args_file = run_dir / "run_args.json"
    if not args_file.is_file():
        return str(run_dir.resolve())
    args = json.loads(args_file.read_text())
    return json.dumps({k: v for k, v in args.items() if k not in NOT_CONFIGURATION}, sort_keys=True)


def by_configuration(items: list, run_dir: Callable[..., Path] = lambda item: item) -> list[list]:
    """`items` grouped by the configuration of their run (`run_dir(item)`), groups and items in the
    order given."""
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(configuration(run_dir(item)), []).append(item)
    return list(groups.values())
