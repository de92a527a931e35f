"""The paper's figures as PNGs: training loss by run (Figure 2) and a metric against step (Figures 3, 4).

    python -m eval.figures loss --runs runs/m0 runs/m01 runs/m03 --smooth 150 --output results/fig2.png
    python -m eval.figures sweep --sweeps runs/a/sweep runs/b/sweep --metric gsm8k --window 10 --output fig3.png

Loss curves read each run's `log_history.json`; sweeps read `sweep.json` from eval/sweep.py.
Both smooth with a trailing moving average of the given window (the paper: 150 for losses, 10 for
the checkpoint curves).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

METRICS = {
    "gsm8k": lambda m: 100 * m["gsm8k"]["exact_match_flexible"],
    "gsm8k_loss": lambda m: m["gsm8k"]["heldout_loss"]["loss"],
    "mmlu": lambda m: 100 * m["mmlu"]["Average"],
    "arc_easy": lambda m: 100 * m["arc_easy"]["acc"],
    "arc_challenge": lambda m: 100 * m["arc_challenge"]["acc"],
}


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def label(run_dir: Path) -> str:
    args_file = run_dir / "run_args.json"
    if not args_file.is_file():
        return run_dir.name
    args = json.loads(args_file.read_text())
    text = f"{args['finetune_mode']}"
    if args["finetune_mode"] != "full":
        text += f" r{args['lora_r']}"
    if args["finetune_mode"] == "plora":
        text += f" m={args['unload_momentum']}"
    return text


def plot_loss(runs: list[Path], smooth: int, output: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        history = [e for e in json.loads((run / "log_history.json").read_text()) if "loss" in e]
        ax.plot([e["step"] for e in history], moving_average([e["loss"] for e in history], smooth), label=label(run))
    ax.set(xlabel="step", ylabel=f"training loss (moving average, {smooth})", title="Training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)


def plot_sweeps(sweeps: list[Path], metric: str, window: int, output: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for sweep in sweeps:
        index = json.loads((sweep / "sweep.json").read_text())
        steps = sorted(int(s) for s in index)
        values = [METRICS[metric](json.loads(Path(index[str(s)]).read_text())["metrics"]) for s in steps]
        run_dir = Path(json.loads(Path(index[str(steps[-1])]).read_text())["model_path"])
        ax.plot(steps, moving_average(values, window), marker="o", label=label(run_dir))
    ax.set(xlabel="step", ylabel=f"{metric} (moving average, {window})", title=f"{metric} by checkpoint")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="figure", required=True)
    loss = sub.add_parser("loss", help="training loss by run (Figure 2)")
    loss.add_argument("--runs", nargs="+", required=True)
    loss.add_argument("--smooth", type=int, default=150)
    loss.add_argument("--output", required=True)
    sweep = sub.add_parser("sweep", help="a metric against step (Figures 3 and 4)")
    sweep.add_argument("--sweeps", nargs="+", required=True)
    sweep.add_argument("--metric", choices=sorted(METRICS), default="gsm8k")
    sweep.add_argument("--window", type=int, default=10)
    sweep.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    try:
        if args.figure == "loss":
            plot_loss([Path(r) for r in args.runs], args.smooth, Path(args.output))
        else:
            plot_sweeps([Path(s) for s in args.sweeps], args.metric, args.window, Path(args.output))
    except FileNotFoundError as e:
        print(f"error: {e.filename} not found", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
