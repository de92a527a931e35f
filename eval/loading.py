"""Load what training wrote as a plain causal LM: a model directory or a LoRA/PLoRA checkpoint-N.

The checkpoint format is a file contract with training, docs/run_directory.md (no training code
is imported): `adapter_config.json` (PEFT) names the base model W_0, `plora_state.safetensors` holds
every adapted layer's live adapter (`lora_A::<name>`, `lora_B::<name>`) and, in its metadata, the
stage files in RUN/stages/ merged so far. The model the run was training at that step is
W_0 + sum over those stages of (c B) @ A + scaling * B @ A. (Checkpoints of the earlier layout hold
the merged base weight itself, `base::<name>`, in place of W_0 and the stages.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

PEFT_PREFIX = "base_model.model."


class ModelPathError(ValueError):
    """A model path that holds no model we can load."""


def load_tokenizer_for_eval(path: str | Path):
    """The tokenizer of a model directory, a checkpoint-N (the Trainer saves it there) or a hub id."""
    if not looks_like_hub_id(path):
        check_model_dir(Path(path))
    return AutoTokenizer.from_pretrained(str(path))


def check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelPathError(f"model directory not found: {path}")
    if not (path / "config.json").is_file() and not is_checkpoint(path):
        raise ModelPathError(f"{path} holds no model (no config.json, nor a LoRA/PLoRA checkpoint)")


def is_checkpoint(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and (path / "plora_state.safetensors").is_file()


EVAL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def eval_dtype(name: str, device: str) -> torch.dtype:
    """The weights' dtype for evaluation: `auto` is bf16 on a CUDA GPU that computes in it (a 7B model
    in 13.5 GB instead of 27, at the precision it trained in), fp32 elsewhere."""
    if name != "auto":
        return EVAL_DTYPES[name]
    on_gpu = str(device).startswith("cuda") and torch.cuda.is_available()
    return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32


def load_for_eval(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The model at ``path`` as a plain causal LM in eval mode (a checkpoint-N folded into one, in fp32,
    before its weights are cast to ``dtype``)."""
    if looks_like_hub_id(path):  # e.g. the base model of a paper-scale table row
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        return model.to(device).eval()
    path = Path(path)
    check_model_dir(path)
    if (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = fold_checkpoint(path).to(dtype)
    return model.to(device).eval()


def looks_like_hub_id(path: str | Path) -> bool:
    """`org/name` that is not a local path: a model on the hub (or in its local cache)."""
    text = str(path)
    return not Path(text).exists() and text.count("/") == 1 and not text.startswith((".", "/", "~"))


def fold_checkpoint(path: Path):
    adapter = json.loads((path / "adapter_config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(adapter["base_model_name_or_path"], dtype=torch.float32)
    scaling = adapter["lora_alpha"] / adapter["r"]
    state = load_file(str(path / "plora_state.safetensors"))
    with safe_open(str(path / "plora_state.safetensors"), "pt") as f:
        metadata = f.metadata() or {}
    stages = [load_file(str(stage_file(path.parent, s))) for s, _ in json.loads(metadata.get("stages", "[]"))]
    with torch.no_grad():
        for key in state:
            kind, name = key.split("::", 1)
            if kind != "lora_A":
                continue
            layer = name.removeprefix(PEFT_PREFIX)
            weight = model.get_submodule(layer).weight
            if f"base::{name}" in state:  # the earlier layout: the merged weight itself
                weight.copy_(state[f"base::{name}"].float())
            for stage in stages:  # a skipped stage's file is empty
                if f"{layer}.lora_A" in stage:
                    weight.add_(stage[f"{layer}.lora_B"].float() @ stage[f"{layer}.lora_A"].float())
            weight.add_(state[f"lora_B::{name}"].float() @ state[f"lora_A::{name}"].float() * scaling)
    return model


def stage_file(run_dir: Path, stage: int) -> Path:
    """RUN/stages/stage-NNNNN.safetensors (docs/run_directory.md)."""
    path = run_dir / "stages" / f"stage-{stage:05d}.safetensors"
    if not path.is_file():
        raise ModelPathError(f"{path} is missing: the checkpoint stands on it (evaluate checkpoints inside their run)")
    return path
