"""The paper's Table 1, 2 and 3 layouts, and the capacity experiment's, from results files, as markdown and CSV.

    python -m eval.tables --table 1 --results runs/*/eval/results.json --output_dir results/tables

Each results.json names the model it evaluated; rows are labelled from that run's saved
`run_args.json` and `summary.json` (method, rank, trainable parameters, modules, learning rate,
unloading interval). A model directory without them (e.g. the untouched base) is labelled "base".
A run measured by `fastchat_plora.analyze` (its `rank/rank.json`) adds the rank of its update
W_T - W_0 in the q_proj layers, which every configuration adapts. The capacity table adds, from
the run's own files, the training loss over the last stage's steps (the same steps, so the same
batches, in every run of a seed) and the update each unload merged.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from pathlib import Path

from eval.runs import by_configuration

MMLU = ("Humanities", "STEM", "Social Sciences", "Other", "Average")
SHORT = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
         "down_proj": "down"}  # fmt: skip


def run_labels(model_path: Path) -> dict:
    args_file, summary_file = model_path / "run_args.json", model_path / "summary.json"
    if not args_file.is_file():
        return {"method": "base"}
    args = json.loads(args_file.read_text())
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    mode = args["finetune_mode"]
    labels = {"method": {"full": "Full FT", "lora": "LoRA", "plora": "PLoRA"}[mode]}
    if mode != "full":
        labels["r"] = args["lora_r"]
        labels["modules"] = ",".join(SHORT.get(m, m) for m in args["lora_target_modules"].split(","))
    if mode == "plora":
        labels["momentum"] = args["unload_momentum"]
        if args["unload_momentum"] > 0:
            labels["rule"] = args.get("momentum_mode", "preserve")
        labels["unload every"] = (
            f"{args['unload_every_samples']} samples" if args.get("unload_every_samples")
            else f"{args['unload_every_steps']} steps"
        )  # fmt: skip
    labels["lr"] = args["learning_rate"]
    labels["trainable params"] = summary.get("trainable_parameters")
    return labels


def metric_columns(metrics: dict) -> dict:
    """GSM8K's headline is the strict match after '####' (the paper's base-model 0.0 is this score),
    the last-number match beside it; MMLU and ARC are accuracies in the results' choice format."""
    row = {}
    if "exact_match_strict" in metrics.get("gsm8k", {}):
        row["GSM8K"] = 100 * metrics["gsm8k"]["exact_match_strict"]
        row["GSM8K flexible"] = 100 * metrics["gsm8k"]["exact_match_flexible"]
    if "heldout_loss" in metrics.get("gsm8k", {}):
        row["GSM8K loss"] = metrics["gsm8k"]["heldout_loss"]["loss"]
    for key in MMLU:
        if key in metrics.get("mmlu", {}):
            row[f"MMLU {key}"] = 100 * metrics["mmlu"][key]
    for task, name in (("arc_easy", "ARC-E"), ("arc_challenge", "ARC-C")):
        if task in metrics:
            row[name] = 100 * metrics[task]["acc"]
    return row


RANK_LAYER = "q_proj"


def rank_columns(model_path: Path) -> dict:
    """The numerical rank (largest over the layers) and the mean effective rank of the q_proj updates."""
    rank_file = model_path / "rank" / "rank.json"
    if not rank_file.is_file():
        return {}
    by_type = json.loads(rank_file.read_text())["by_type"].get(RANK_LAYER)
    if by_type is None:
        return {}
    return {"rank q": by_type["numerical_rank_max"], "eff. rank q": by_type["effective_rank_mean"]}


def last_steps_loss(model_path: Path, steps: int) -> float | None:
    """Mean logged training loss over the run's last ``steps`` optimizer steps."""
    history_file = model_path / "log_history.json"
    if not history_file.is_file():
        return None
    losses = {e["step"]: e["loss"] for e in json.loads(history_file.read_text()) if "loss" in e}
    if not losses:
        return None
    last = max(losses)
    window = [loss for step, loss in losses.items() if step > last - steps]
    return statistics.fmean(window)


def merged_norms(model_path: Path) -> list[float]:
    """The norm of the update each unload merged, stage by stage (the final merge last)."""
    events = model_path / "unload_events.jsonl"
    if not events.is_file():
        return []
    return [json.loads(line)["update_norm"] for line in events.read_text().splitlines() if line]


def stage_length(results: list[dict]) -> int | None:
    """The shortest stage, in steps, of the PLoRA runs among ``results``: the window the capacity
    table compares training losses over."""
    lengths = []
    for result in results:
        summary = Path(result["model_path"]) / "summary.json"
        if summary.is_file() and (steps := json.loads(summary.read_text()).get("stage_steps")):
            lengths.append(steps)
    return min(lengths, default=None)


LAYOUTS = {  # which label columns each table shows, in the paper's order
    "1": ["method", "r", "trainable params"],
    "2": ["method", "modules", "r", "unload every"],
    "3": ["modules", "lr", "method", "r"],
    "capacity": ["method", "r", "momentum", "rule", "unload every"],
}


def build_rows(results_files: list[Path], table: str) -> list[dict]:
    """One row per configuration (`eval.runs`): runs that differ only in their seed are averaged.

    Such a row holds each metric's mean, its standard deviation across seeds (`<metric> std`,
    when there are two or more) and the number of seeds. Rows of different configurations that the
    table's columns would show alike gain the label columns that tell them apart (e.g. the momentum
    of two PLoRA rows in Table 1).
    """
    results = [json.loads(path.read_text()) for path in results_files]
    groups = by_configuration(results, lambda result: Path(result["model_path"]))
    labels = [run_labels(Path(group[0]["model_path"])) for group in groups]
    columns = label_columns(LAYOUTS[table], labels)
    window = stage_length(results) if table == "capacity" else None
    rows = []
    for group, group_labels in zip(groups, labels):
        row = {column: group_labels.get(column, "") for column in columns}
        row["seeds"] = len(group)
        runs = [metric_columns(r["metrics"]) | rank_columns(Path(r["model_path"])) for r in group]
        if window:
            for run, result in zip(runs, group):
                if (loss := last_steps_loss(Path(result["model_path"]), window)) is not None:
                    run[f"train loss, last {window} steps"] = loss
        for metric in dict.fromkeys(m for run in runs for m in run):
            values = [run[metric] for run in runs if metric in run]
            row[metric] = statistics.fmean(values)
            if len(values) > 1:
                row[f"{metric} std"] = statistics.stdev(values)
        if table == "capacity" and (norms := [merged_norms(Path(r["model_path"])) for r in group]) and norms[0]:
            by_stage = [statistics.fmean(stage) for stage in zip(*norms)]  # the mean over seeds, stage by stage
            row["merged norm by stage"] = ", ".join(f"{n:.2f}" for n in by_stage)
        rows.append(row)
    if table == "2":  # read by stage length: LoRA (never unloads), then the intervals from shortest to longest
        rows.sort(key=lambda row: (row["method"] != "LoRA", int(str(row.get("unload every") or 0).split()[0])))
    return rows


def label_columns(layout: list[str], labels: list[dict]) -> list[str]:
    """The layout's columns, then, in label order, each label in which rows that the columns so far
    show alike differ (a label that tells no such rows apart is left out, e.g. the momentum rule
    of rows that their momentum already tells apart)."""
    columns = list(layout)
    candidates = [key for row in labels for key in row if key not in layout]
    for key in dict.fromkeys(candidates):
        alike: dict[tuple, set[str]] = {}
        for row in labels:
            alike.setdefault(tuple(str(row.get(c, "")) for c in columns), set()).add(str(row.get(key, "")))
        if any(len(values) > 1 for values in alike.values()):
            columns.append(key)
    return columns


def scoring_note(results_files: list[Path]) -> str:
    """One line saying how the table's scores were computed, from the results files themselves."""
    formats = sorted({json.loads(p.read_text()).get("choice_format", "text") for p in results_files})
    choice = {"text": '"A. text" replies', "letter": "the answer letter alone"}
    mc = " and ".join(choice.get(f, f) for f in formats) + (" (mixed across rows)" if len(formats) > 1 else "")
    return (
        "GSM8K: exact match of the number after '####' (strict), the last number beside it (flexible); "
        f"GSM8K loss: mean loss of the gold answers; MMLU, ARC: accuracy, scoring {mc}."
    )


def fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.1e}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value / 1e6:.2f}M"
    return str(value)


def fmt_cell(row: dict, column: str) -> str:
    """A metric with a spread across seeds shows as mean ± std; a loss shows three decimals, where
    rows that differ in the second decimal are often seeds apart."""
    show = (lambda v: f"{v:.3f}") if column.endswith("loss") else fmt
    cell = show(row[column]) if row.get(column) is not None else ""
    if f"{column} std" in row:
        cell += f" ± {show(row[f'{column} std'])}"
    return cell


def to_markdown(rows: list[dict]) -> str:
    columns = [c for c in dict.fromkeys(k for row in rows for k in row) if not c.endswith(" std")]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt_cell(row, c) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--table", choices=sorted(LAYOUTS), required=True,
        help="the paper's table number, or capacity (the capacity experiment, docs/reproducing.md)",
    )  # fmt: skip
    parser.add_argument("--results", nargs="+", required=True, help="results.json files (seeds share a row)")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    missing = [p for p in args.results if not Path(p).is_file()]
    if missing:
        print(f"error: results file not found: {missing[0]}", file=sys.stderr)
        return 2
    rows = build_rows([Path(p) for p in args.results], args.table)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows) + "\n" + scoring_note([Path(p) for p in args.results]) + "\n"
    if any("rank q" in row for row in rows):
        markdown += (
            f"rank q, eff. rank q: the numerical rank (largest over the layers) and the mean effective rank of "
            f"W_T - W_0 in {RANK_LAYER}.\n"
        )
    stem = f"table{args.table}" if args.table.isdigit() else f"{args.table}_table"
    (out / f"{stem}.md").write_text(markdown)
    (out / f"{stem}.csv").write_text(to_csv(rows))
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
