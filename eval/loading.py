"""Load what training wrote as a plain causal LM: a model directory or a LoRA/PLoRA checkpoint-N.

The checkpoint format is a file contract with training, docs/run_directory.md (no training code
is imported):
`adapter_config.json` (PEFT) names the base model, `plora_state.safetensors` holds for every
adapted layer its merged base weight (`base::<name>`) and live adapter (`lora_A::`, `lora_B::`).
The model the run was training at that step is base + scaling * B @ A on those weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
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


def load_for_eval(path: str | Path, device: str = "cpu"):
    """The model at ``path`` as a plain causal LM in eval mode (a checkpoint-N folded into one)."""
    if looks_like_hub_id(path):  # e.g. the base model of a paper-scale table row
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        return model.to(device).eval()
    path = Path(path)
    check_model_dir(path)
    if (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        model = fold_checkpoint(path)
    return model.to(device).eval()


def looks_like_hub_id(path: str | Path) -> bool:
    """`org/name` that is not a local path: a model on the hub (or in its local cache)."""
    text = str(path)
    return not Path(text).exists() and text.count("/") == 1 and not text.startswith((".", "/", "~"))


def fold_checkpoint(path: Path):
    adapter = json.loads((path / "adapter_config.json").read_text())
    base = adapter["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    scaling = adapter["lora_alpha"] / adapter["r"]
    state = load_file(str(path / "plora_state.safetensors"))
    with torch.no_grad():
        for key, base_weight in state.items():
            kind, name = key.split("::", 1)
            if kind != "base":
                continue
            weight = model.get_submodule(name.removeprefix(PEFT_PREFIX)).weight
            delta = state[f"lora_B::{name}"].float() @ state[f"lora_A::{name}"].float() * scaling
            weight.copy_(base_weight.float() + delta)
    return model
