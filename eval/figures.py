"""The paper's figures as PNGs: loss by run (Figure 2), a metric by step (Figures 3, 4), update spectra.

    python -m eval.figures loss --runs runs/m0 runs/m01 runs/m03 --smooth 150 --output results/fig2.png
    python -m eval.figures sweep --sweeps runs/a/sweep runs/b/sweep --metric gsm8k --window 10 --output fig3.png
    python -m eval.figures spectra --ranks runs/a/rank/rank.json runs/b/rank/rank.json --output spectra.png

Loss curves read each run's `log_history.json` (and, for a run that evaluated while training, its
held-out loss and its stage boundaries from `unload_events.jsonl`); sweeps read `sweep.json` from eval/sweep.py;
spectra read the `rank.json` files of `python -m fastchat_plora.analyze`.
Losses are smoothed over a trailing window of optimizer steps (the paper: 150), checkpoint curves
over a trailing window of checkpoints (the paper: 10). Runs that differ only in their seed make one
curve, their mean; a loss curve shows the spread of its seeds as a band.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from eval.runs import by_configuration  # noqa: E402

METRICS = {
    "gsm8k": lambda m: 100 * m["gsm8k"]["exact_match_strict"],
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


def step_average(steps: list[int], values: list[float], window: int) -> list[float]:
    """At each logged step s, the mean of the values logged at steps in (s - window, s].

    The window is counted in optimizer steps, whatever the logging interval: the paper's 150-step
    smoothing averages 15 entries of a run that logs every 10 steps.
    """
    out, start, total = [], 0, 0.0
    for i, (step, value) in enumerate(zip(steps, values)):
        total += value
        while steps[start] <= step - window:
            total -= values[start]
            start += 1
        out.append(total / (i + 1 - start))
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


def curve_label(name: str, group: list) -> str:
    return f"{name} ({len(group)} seeds)" if len(group) > 1 else name


def mean_band(series: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """At the steps every run logged: the mean over the runs, the lowest and the highest value."""
    steps = sorted(set.intersection(*(set(s) for s in series)))
    values = [[s[step] for s in series] for step in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def logged(history: list[dict], key: str) -> dict[int, float]:
    return {entry["step"]: entry[key] for entry in history if key in entry}


def plot_loss(runs: list[Path], smooth: int, output: Path) -> None:
    """Training loss by configuration; where it evaluated while training, its held-out loss beside it
    (dashed, on both sides of each unload) and its stage boundaries (dotted verticals).

    The seeds of one configuration make one curve, their mean, with a band from the lowest to the
    highest seed.
    """
    fig, ax = plt.subplots(figsize=(7, 4))
    for group in by_configuration(runs):
        name = label(group[0])
        histories = [json.loads((run / "log_history.json").read_text()) for run in group]
        train = []
        for history in histories:
            losses = logged(history, "loss")
            steps = sorted(losses)
            train.append(dict(zip(steps, step_average(steps, [losses[step] for step in steps], smooth))))
        steps, mean, low, high = mean_band(train)
        (line,) = ax.plot(steps, mean, label=curve_label(name, group))
        if len(group) > 1:
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        held_out = [logged(history, "eval_loss") for history in histories]
        if not all(held_out):
            continue
        steps, mean, _, _ = mean_band(held_out)
        ax.plot(steps, mean, "o--", color=line.get_color(), markersize=3, label=f"{name}, held-out")
        steps, mean, _, _ = mean_band([logged(history, "eval_before_unload_loss") for history in histories])
        ax.plot(steps, mean, "x", color=line.get_color())
        for step in stage_boundaries(group[0]):
            ax.axvline(step, color=line.get_color(), linestyle=":", linewidth=0.8, alpha=0.6)
    ax.set(xlabel="step", ylabel=f"loss (training: mean over {smooth} steps)", title="Training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)


def stage_boundaries(run: Path) -> list[int]:
    """The steps after which the run unloaded (its unload_events.jsonl, final merge left out)."""
    events = run / "unload_events.jsonl"
    if not events.is_file():
        return []
    lines = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    return [event["step"] for event in lines if not event["final"]]


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


def plot_spectra(rank_files: list[Path], output: Path, count: int = 64) -> None:
    """Singular values of W_T - W_0 by layer type, averaged over the layers of each type, one line per
    configuration (its seeds averaged too).

    Reads the rank.json files of `python -m fastchat_plora.analyze`. A LoRA run's curve drops to the
    rounding floor after r values; a PLoRA run's carries on to T * r.
    """
    runs = [json.loads(path.read_text()) for path in rank_files]
    groups = [(label(Path(group[0]["model_path"])), group)
              for group in by_configuration(runs, lambda run: Path(run["model_path"]))]  # fmt: skip
    types = list(dict.fromkeys(layer["type"] for run in runs for layer in run["layers"]))
    cols = min(4, len(types))
    rows = -(-len(types) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax, layer_type in zip(axes.flat, types, strict=False):
        for name, group in groups:
            spectra = [layer["singular_values"][:count] for run in group for layer in run["layers"]
                       if layer["type"] == layer_type]  # fmt: skip
            if not spectra:
                continue
            n = min(map(len, spectra))
            mean = [statistics.fmean(s[i] for s in spectra) for i in range(n)]
            ax.semilogy(range(1, n + 1), mean, label=curve_label(name, group))
        ax.set(title=layer_type, xlabel="index")
    for ax in list(axes.flat)[len(types) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("singular value of W_T - W_0")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="figure", required=True)
    loss = sub.add_parser("loss", help="training loss by run (Figure 2)")
    loss.add_argument("--runs", nargs="+", required=True)
    loss.add_argument("--smooth", type=int, default=150, help="moving-average window in optimizer steps (paper: 150)")
    loss.add_argument("--output", required=True)
    sweep = sub.add_parser("sweep", help="a metric against step (Figures 3 and 4)")
    sweep.add_argument("--sweeps", nargs="+", required=True)
    sweep.add_argument("--metric", choices=sorted(METRICS), default="gsm8k")
    sweep.add_argument("--window", type=int, default=10)
    sweep.add_argument("--output", required=True)
    spectra = sub.add_parser("spectra", help="singular values of W_T - W_0 by layer type, one line per configuration")
    spectra.add_argument("--ranks", nargs="+", required=True, help="rank.json files (python -m fastchat_plora.analyze)")
    spectra.add_argument("--count", type=int, default=64, help="how many singular values to draw")
    spectra.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        if args.figure == "loss":
            plot_loss([Path(r) for r in args.runs], args.smooth, output)
        elif args.figure == "sweep":
            plot_sweeps([Path(s) for s in args.sweeps], args.metric, args.window, output)
        else:
            plot_spectra([Path(r) for r in args.ranks], output, args.count)
    except FileNotFoundError as e:
        print(f"error: {e.filename} not found", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
