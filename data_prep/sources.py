"""The command line every per-source script shares."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from data_prep.common import SourceError, Tally, default_data_dir, run_converter, with_replies


def source_main(name: str, examples: Callable, doc: str, argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument(
        "--data_dir",
        default=None,
        help="local mirror in the original formats (default: ../shared/data if present, else the hub)",
    )
    parser.add_argument(
        "--tulu_path", default=None, help="a local copy of the Tülu v2 mixture (JSONL in the hub's format)"
    )
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    tally = Tally()
    kwargs = {"tulu_path": Path(args.tulu_path)} if args.tulu_path and name in ("orca", "code_alpaca") else {}
    try:
        run_converter(name, with_replies(examples(data_dir, tally, **kwargs), tally), args.output, tally)
    except SourceError as e:
        sys.exit(f"error: {e}")
