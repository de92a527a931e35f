"""Evaluate every checkpoint of a run (and its final model), one results file each, resumable.

    python -m eval.sweep --run_dir runs/x --output_dir runs/x/sweep [--every 100] [--tasks ...] [--limit N]

Finished checkpoints (their results.json exists) are skipped, so an interrupted sweep picks up where
it stopped. Writes OUT/sweep.json: step -> results file, in step order (the paper's Figures 3, 4).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from eval import run_eval

# The run directory contract (docs/run_directory.md): checkpoint-N is complete once it holds
# trainer_state.json, which the Trainer writes last. eval/ reads training's files, never its code.
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(run_dir: Path, every: int | None) -> list[tuple[int, Path]]:
    """(step, path) for every complete checkpoint and the final model, in step order.

    A checkpoint at the last step computes what the final model computes; the final model is kept.
    """
    found = {}
    for path in run_dir.glob("checkpoint-*"):
        match = CHECKPOINT_RE.match(path.name)
        if match and (path / "trainer_state.json").is_file():
            step = int(match.group(1))
            if every is None or step % every == 0:
                found[step] = path
    summary = run_dir / "summary.json"
    if summary.is_file() and (run_dir / "config.json").is_file():
        found[json.loads(summary.read_text())["steps"]] = run_dir
    return sorted(found.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True, help="a train_plora.py output directory")
    parser.add_argument("--output_dir", required=True, help="one sub-directory of results per checkpoint")
    parser.add_argument("--every", type=int, default=None, help="only checkpoints whose step is a multiple of this")
    args, eval_flags = parser.parse_known_args(argv)
    run_dir, out = Path(args.run_dir), Path(args.output_dir)
    if not run_dir.is_dir():
        print(f"error: run directory not found: {run_dir}", file=sys.stderr)
        return 2
    found = checkpoints(run_dir, args.every)
    if not found:
        print(f"error: no complete checkpoint or final model in {run_dir}", file=sys.stderr)
        return 2
    index = {}
    for i, (step, path) in enumerate(found):
        target = out / ("final" if path == run_dir else path.name)
        index[step] = str(target / "results.json")
        if (target / "results.json").is_file():
            print(f"[{i + 1}/{len(found)}] step {step}: done already, skipped")
            continue
        print(f"[{i + 1}/{len(found)}] step {step}: evaluating {path}", flush=True)
        code = run_eval.main(["--model_path", str(path), "--output_dir", str(target), *eval_flags])
        if code:
            return code
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({str(k): v for k, v in sorted(index.items())}, indent=2))
    print(f"wrote {out / 'sweep.json'} ({len(index)} checkpoints)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
