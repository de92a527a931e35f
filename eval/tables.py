"""The paper's Table 1, 2 and 3 layouts from results files, as markdown and CSV.

    python -m eval.tables --table 1 --results runs/*/eval/results.json --output_dir results/tables

Each results.json names the model it evaluated; rows are labelled from that run's saved
`run_args.json` and `summary.json` (method, rank, trainable parameters, modules, learning rate,
unloading interval). A model directory without them (e.g. the untouched base) is labelled "base".
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

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
        labels["unload every"] = (
            f"{args['unload_every_samples']} samples" if args.get("unload_every_samples")
            else f"{args['unload_every_steps']} steps"
        )  # fmt: skip
    labels["lr"] = args["learning_rate"]
    labels["trainable params"] = summary.get("trainable_parameters")
    return labels


def metric_columns(metrics: dict) -> dict:
    row = {}
    if "gsm8k" in metrics:
        row["GSM8K"] = 100 * metrics["gsm8k"]["exact_match_flexible"]
        if "heldout_loss" in metrics["gsm8k"]:
            row["GSM8K loss"] = metrics["gsm8k"]["heldout_loss"]["loss"]
    for key in MMLU:
        if key in metrics.get("mmlu", {}):
            row[f"MMLU {key}"] = 100 * metrics["mmlu"][key]
    for task, name in (("arc_easy", "ARC-E"), ("arc_challenge", "ARC-C")):
        if task in metrics:
            row[name] = 100 * metrics[task]["acc"]
    return row


LAYOUTS = {  # which label columns each table shows, in the paper's order
    1: ["method", "r", "trainable params"],
    2: ["method", "modules", "r", "unload every"],
    3: ["modules", "lr", "method", "r"],
}


def build_rows(results_files: list[Path], table: int) -> list[dict]:
    rows = []
    for path in results_files:
        results = json.loads(path.read_text())
        labels = run_labels(Path(results["model_path"]))
        row = {key: labels.get(key, "") for key in LAYOUTS[table]}
        row.update(metric_columns(results["metrics"]))
        rows.append(row)
    return rows


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.1e}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value / 1e6:.2f}M"
    return str(value)


def to_markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
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
    parser.add_argument("--table", type=int, choices=sorted(LAYOUTS), required=True, help="the paper's table number")
    parser.add_argument("--results", nargs="+", required=True, help="results.json files, one per row")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    missing = [p for p in args.results if not Path(p).is_file()]
    if missing:
        print(f"error: results file not found: {missing[0]}", file=sys.stderr)
        return 2
    rows = build_rows([Path(p) for p in args.results], args.table)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"table{args.table}.md").write_text(to_markdown(rows))
    (out / f"table{args.table}.csv").write_text(to_csv(rows))
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
