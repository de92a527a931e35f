"""The whole PLoRA update as one standard PEFT LoRA adapter of rank sum_t r_t.

    python -m fastchat_plora.export --run_dir runs/x --output_dir runs/x/adapter [--max_rank K]

Every unload merges c_t * B_t @ A_t into a base weight (c_t = (1 - m) * alpha / r, the whole
scaling for the final merge). Training writes each merge's factors (c_t B_t, A_t) to RUN/stages/
(one file per stage, `--save_stage_factors`), and since

    W_T - W_0 = sum_t (c_t B_t) @ A_t = [c_1 B_1 | ... | c_T B_T] @ [A_1; ...; A_T]

the stacked factors are one LoRA adapter of rank R = sum_t r_t with scaling 1 (alpha = r = R):
base + this adapter computes what the trained model computes, and any LoRA-serving stack can
load it. `--max_rank K` compresses each layer's update to its best rank-K approximation (by SVD)
and reports the relative error it costs. `--push_to_hub ORG/NAME` uploads the adapter to the model hub
(a token from `hf auth login` or HF_TOKEN).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from fastchat_plora.models import resolve_model_path
from fastchat_plora.rundir import PEFT_PREFIX, RunDir, RunDirError

logger = logging.getLogger(__name__)


class ExportError(ValueError):
    """A run that cannot be exported; the message names what is missing."""


def load_stages(run: RunDir) -> list[dict[str, torch.Tensor]]:
    """Every stage's factors in stage order; the run must have finished and kept all of them."""
    summary = run.summary()
    if summary is None:
        raise ExportError(f"{run.path} holds no finished run (no summary.json)")
    if summary.get("finetune_mode") == "full":
        raise ExportError(f"{run.path} is a full fine-tuning run: its update is not a sum of low-rank factors")
    try:
        return run.load_stages()
    except RunDirError as e:
        raise ExportError(str(e)) from None


def stack(stages: list[dict[str, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (B, A) = ([B_1 | ... | B_T], [A_1; ...; A_T]): one factor pair of rank sum r_t.

    A stage whose unload was skipped (non-finite adapters) has an empty file and adds nothing.
    """
    stages = [s for s in stages if s]
    if not stages:
        raise ExportError("every stage was skipped: there is no update to export")
    layers = [key.removesuffix(".lora_A") for key in stages[0] if key.endswith(".lora_A")]
    return {
        layer: (
            torch.cat([s[f"{layer}.lora_B"] for s in stages], dim=1),
            torch.cat([s[f"{layer}.lora_A"] for s in stages], dim=0),
        )
        for layer in layers
    }


@dataclass
class Compression:
    relative_error: float  # ||Delta - Delta_K||_F / ||Delta||_F
    kept_energy: float  # the share of ||Delta||_F^2 kept


def compress(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, Compression]:
    """The best rank-`rank` factors of B @ A (Eckart-Young), without forming the full product.

    With B = Q_b R_b and A^T = Q_a R_a, B @ A = Q_b (R_b R_a^T) Q_a^T, so the SVD of the small
    R x R core gives the SVD of the update. The kept singular values are split evenly between
    the two factors (sqrt on each side), as a trained adapter's would be.
    """
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    new_b = (q_b @ u[:, :k]) * root
    new_a = root[:, None] * (vh[:k] @ q_a.T)
    total = s.pow(2).sum().item()
    dropped = s[k:].pow(2).sum().item()
    error = math.sqrt(dropped / total) if total > 0 else 0.0
    kept = 1.0 - dropped / total if total > 0 else 1.0
    return new_b.float(), new_a.float(), Compression(error, kept)


def export_adapter(run_dir: Path, output_dir: Path, max_rank: int | None = None, base_model: str | None = None) -> dict:
    """Write `output_dir` as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).

    Returns a report: the rank, the layers, and with `max_rank` each layer's compression error.
    """
    run = RunDir(run_dir)
    stages = load_stages(run)
    factors = stack(stages)
    full_rank = next(iter(factors.values()))[1].shape[0]
    report: dict = {"stages": len(stages), "full_rank": full_rank, "layers": len(factors)}
    if max_rank is not None and max_rank < full_rank:
        errors = {}
        for layer, (b, a) in factors.items():
            b, a, result = compress(b, a, max_rank)
            factors[layer] = (b, a)
            errors[layer] = result.relative_error
        report["compression"] = {
            "rank": max_rank,
            "max_relative_error": max(errors.values()),
            "mean_relative_error": sum(errors.values()) / len(errors),
            "relative_error_by_layer": errors,
        }
    rank = next(iter(factors.values()))[1].shape[0]
    report["rank"] = rank

    base = base_model or resolve_model_path(run.base_model())
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling alpha / r = 1: the coefficients are already in B
        lora_dropout=0.0,
        target_modules=sorted({layer.rsplit(".", 1)[-1] for layer in factors}),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    )
    tensors = {}
    for layer, (b, a) in factors.items():
        tensors[f"{PEFT_PREFIX}{layer}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{layer}.lora_B.weight"] = b.contiguous()
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output_dir / "adapter_model.safetensors"))
    config.save_pretrained(str(output_dir))
    report["base_model"] = base
    (output_dir / "export_report.json").write_text(json.dumps(report, indent=2))
    return report


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ExportError(f"push_to_hub={repo_id!r}: not a hub repository id (ORG/NAME)") from None
    if "/" not in repo_id:
        raise ExportError(f"push_to_hub={repo_id!r}: name the owner too (ORG/NAME or USER/NAME)")


def push_to_hub(output_dir: Path, repo_id: str, private: bool, report: dict) -> str:
    """Upload the exported adapter folder to a hub model repository (created if missing); its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    message = f"PLoRA adapter: rank {report['rank']} over {report['stages']} stages, base {report['base_model']}"
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message=message)
    return getattr(commit, "commit_url", f"https://huggingface.co/{repo_id}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True, help="a finished LoRA or PLoRA run (with its stages/ folder)")
    parser.add_argument("--output_dir", required=True, help="where the PEFT adapter is written")
    parser.add_argument("--max_rank", type=int, default=None, help="compress each layer to this rank by SVD")
    parser.add_argument("--base_model", default=None, help="base model recorded in the adapter (default: the run's)")
    parser.add_argument("--push_to_hub", default=None, metavar="ORG/NAME", help="upload the adapter to this hub repo")
    parser.add_argument("--private", action="store_true", help="with --push_to_hub: create the repo private")
    args = parser.parse_args(argv)
    if args.max_rank is not None and args.max_rank <= 0:
        print(f"error: max_rank={args.max_rank}: must be positive", file=sys.stderr)
        return 2
    try:
        if args.push_to_hub:
            check_repo_id(args.push_to_hub)  # before any work
        report = export_adapter(Path(args.run_dir), Path(args.output_dir), args.max_rank, args.base_model)
    except (ExportError, RunDirError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    line = f"wrote a rank-{report['rank']} LoRA adapter ({report['stages']} stages, {report['layers']} layers)"
    if "compression" in report:
        c = report["compression"]
        line += (
            f", compressed from rank {report['full_rank']}: relative error max {c['max_relative_error']:.3g}, "
            f"mean {c['mean_relative_error']:.3g}"
        )
    print(f"{line} to {args.output_dir}")
    if args.push_to_hub:
        if Path(report["base_model"]).exists():
            logger.warning("the adapter names a local base model (%s): pass --base_model ORG/NAME so that others "
                           "can load it", report["base_model"])  # fmt: skip
        try:
            url = push_to_hub(Path(args.output_dir), args.push_to_hub, args.private, report)
        except Exception as e:  # noqa: BLE001 (the hub's errors are many: auth, network, permissions)
            print(f"error: push to {args.push_to_hub} failed ({type(e).__name__}: {e}); the adapter is in "
                  f"{args.output_dir}", file=sys.stderr)  # fmt: skip
            return 1
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
