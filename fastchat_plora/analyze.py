"""The rank of an update W_T - W_0, measured against the rounding floor of the stored weights.

    python -m fastchat_plora.analyze --model_path runs/x [--base_model DIR] [--output_dir runs/x/rank]

Compares a trained model with the model it started from and prints, per adapted weight, the
numerical rank, the effective rank and the largest singular values of W_T - W_0; `--output_dir`
keeps every spectrum in rank.json, which `python -m eval.figures spectra` plots by layer type.
Weights are read one at a time straight from the safetensors files, so a 7B pair needs no more
memory than its largest matrix.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from fastchat_plora.models import resolve_model_path
from fastchat_plora.plora import update_rank
from fastchat_plora.rundir import RunDir, RunDirError

LINEAR_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AnalysisError(ValueError):
    """Models that cannot be compared; the message names what is wrong."""


def effective_rank(sigma: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values.

    Where the numerical rank counts every direction above the rounding floor, this weighs them:
    r equal singular values give r, one dominant direction gives about 1.
    """
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def weight_files(model: str) -> dict[str, Path]:
    """Tensor name -> safetensors file of a model directory (or a hub id, through the local cache)."""
    path = Path(model)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model, allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise AnalysisError(f"{model} holds no .safetensors weights")
    names = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            names.update(dict.fromkeys(f.keys(), file))
    return names


def read(files: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(str(files[name]), "pt") as f:
        return f.get_tensor(name)


def layer_type(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `q_proj`."""
    return name.removesuffix(".weight").rsplit(".", 1)[-1]


def analyze(model: str, base: str, layer_types: list[str], top: int = 8) -> list[dict]:
    """Per adapted weight (in layer order): the rank, effective rank and spectrum of W_T - W_0."""
    trained, initial = weight_files(model), weight_files(base)
    names = [n for n in trained if n.endswith(".weight") and layer_type(n) in layer_types and n in initial]
    if not names:
        raise AnalysisError(f"no weights of types {','.join(layer_types)} shared by {model} and {base}")
    rows = []
    for name in tqdm(sorted(names, key=natural_key), desc="SVD of W_T - W_0", unit="layer"):
        w_t, w_0 = read(trained, name), read(initial, name)
        if w_t.shape != w_0.shape:
            raise AnalysisError(f"{name}: shape {tuple(w_t.shape)} in {model} but {tuple(w_0.shape)} in {base}")
        report = update_rank(w_t, w_0, w_t.dtype, top=min(w_t.shape))
        sigma = torch.tensor(report.top_singular_values, dtype=torch.float64)
        rows.append({
            "layer": name.removesuffix(".weight"),
            "type": layer_type(name),
            "shape": list(w_t.shape),
            "numerical_rank": report.numerical_rank,
            "effective_rank": effective_rank(sigma[: report.numerical_rank]),
            "tolerance": report.tolerance,
            "relative_update": (w_t.double() - w_0.double()).norm().item() / w_0.double().norm().item(),
            "top_singular_values": report.top_singular_values[:top],
            "singular_values": [float(f"{s:.6g}") for s in report.top_singular_values],
        })  # fmt: skip
    return rows


def natural_key(name: str) -> list:
    """Sort `layers.10` after `layers.9`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def summarize_by_type(rows: list[dict]) -> dict[str, dict]:
    by_type: dict[str, list[dict]] = {}
    for row in rows:
        by_type.setdefault(row["type"], []).append(row)
    return {
        t: {
            "layers": len(group),
            "numerical_rank_min": min(r["numerical_rank"] for r in group),
            "numerical_rank_max": max(r["numerical_rank"] for r in group),
            "effective_rank_mean": sum(r["effective_rank"] for r in group) / len(group),
        }
        for t, group in by_type.items()
    }


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'layer':<40} {'shape':>11} {'rank':>5} {'eff.rank':>8} {'|dW|/|W|':>9}  top singular values"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        top = ", ".join(f"{s:.3g}" for s in r["top_singular_values"][:5])
        lines.append(
            f"{r['layer']:<40} {shape:>11} {r['numerical_rank']:>5} {r['effective_rank']:>8.1f} "
            f"{r['relative_update']:>9.2e}  {top}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True, help="a trained model directory (what train_plora.py wrote)")
    parser.add_argument(
        "--base_model", default=None, help="the model it started from (default: the run's, from run_args.json)"
    )
    parser.add_argument("--layer_types", default=",".join(LINEAR_TYPES), help="comma-separated module names to analyse")
    parser.add_argument("--top", type=int, default=8, help="how many of the largest singular values to print")
    parser.add_argument("--output_dir", default=None, help="write rank.json (every layer's spectrum) here")
    args = parser.parse_args(argv)
    try:
        base = args.base_model or base_of_run(Path(args.model_path))
        rows = analyze(args.model_path, base, [t.strip() for t in args.layer_types.split(",") if t.strip()], args.top)
    except (AnalysisError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_rows(rows))
    by_type = summarize_by_type(rows)
    for t, s in by_type.items():
        print(
            f"{t}: numerical rank {s['numerical_rank_min']}..{s['numerical_rank_max']} over {s['layers']} layers, "
            f"mean effective rank {s['effective_rank_mean']:.1f}"
        )
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        result = {"model_path": args.model_path, "base_model": base, "by_type": by_type, "layers": rows}
        tmp = out / "rank.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out / "rank.json")
        print(f"wrote {out / 'rank.json'} (plot it: python -m eval.figures spectra --ranks {out / 'rank.json'})")
    return 0


def base_of_run(model_path: Path) -> str:
    """The base model a run started from, as its run_args.json records it."""
    try:
        return resolve_model_path(RunDir(model_path).base_model())
    except RunDirError as e:
        raise AnalysisError(f"{e}; pass --base_model") from None


if __name__ == "__main__":
    sys.exit(main())
