"""What exact resume of a LoRA/PLoRA run needs beyond the HF checkpoint.

The HF Trainer's checkpoint of a PEFT model holds the live adapter, the optimizer, the scheduler,
the RNG states and the step (from which the stage index and the data position follow). It does not
hold the base weights that earlier stages were merged into. `plora_state.safetensors` adds, for
every adapted layer: the current base weight (in its own dtype), the adapter factors, and the
compensation buffer of the compensated merge where there is one.

We store the merged base weights rather than the accumulated update W_t - W_0: both have the
shape of the adapted weights, but the weights themselves are exact in their own dtype, where the
update would have to be re-derived by subtraction (rounding again) and needs W_0 at load time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from fastchat_plora.distributed import gathered
from fastchat_plora.plora import lora_layers
from fastchat_plora.rundir import STATE_FILE


def plora_state(model: torch.nn.Module, compensation: dict[str, torch.Tensor], adapter_name: str = "default") -> dict:
    """The tensors exact resume needs. Under ZeRO-3 every rank must call it (each layer is gathered in turn)."""
    state = {}
    for name, layer in lora_layers(model, adapter_name):
        tensors = {
            "base": layer.get_base_layer().weight,
            "lora_A": layer.lora_A[adapter_name].weight,
            "lora_B": layer.lora_B[adapter_name].weight,
        }
        with gathered(tensors.values()):
            for kind, tensor in tensors.items():
                value = tensor.detach().contiguous().cpu()
                # a gathered ZeRO-3 tensor is released on exit: keep a copy of it
                state[f"{kind}::{name}"] = value.clone() if hasattr(tensor, "ds_id") else value
        if name in compensation:
            state[f"comp::{name}"] = compensation[name].detach().contiguous().cpu()
    return state


def load_merged_base_weights(path: Path, model: torch.nn.Module, compensation: dict[str, torch.Tensor]) -> None:
    """Restore the base weights (and compensation buffers) of a checkpoint; every rank must call it.

    Under DeepSpeed the Trainer restores the adapters and optimizer from DeepSpeed's own checkpoint,
    which leaves out frozen parameters, so the base weights that earlier stages merged into come from here.
    """
    saved = load_file(str(Path(path) / STATE_FILE))
    with torch.no_grad():
        for name, layer in lora_layers(model):
            base = layer.get_base_layer().weight
            with gathered([base], modifier_rank=0):
                base.copy_(saved[f"base::{name}"].to(base.device, base.dtype))
            if f"comp::{name}" in saved:
                compensation[name] = saved[f"comp::{name}"].to(base.device)


def load_plora_state(path: Path, model: torch.nn.Module, compensation: dict[str, torch.Tensor]) -> None:
    """Copy a saved state into the model in place (Parameter objects kept); fail on any mismatch."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a LoRA/PLoRA checkpoint of this project (no {STATE_FILE})")
    saved = load_file(str(file))
    layers = dict(lora_layers(model))
    names = {key.split("::", 1)[1] for key in saved}
    if names != set(layers):
        raise ValueError(f"checkpoint {path} adapts other layers than this run ({len(names)} vs {len(layers)})")
    with torch.no_grad():
        for key, value in saved.items():
            kind, name = key.split("::", 1)
            layer = layers[name]
            if kind == "comp":
                target = compensation.setdefault(name, torch.zeros_like(layer.get_base_layer().weight))
            else:
                target = {
                    "base": layer.get_base_layer().weight,
                    "lora_A": layer.lora_A["default"].weight,
                    "lora_B": layer.lora_B["default"].weight,
                }[kind]
            if target.shape != value.shape:
                shapes = f"{tuple(value.shape)} there, {tuple(target.shape)} in this run"
                raise ValueError(f"checkpoint {path}: {key} has shape {shapes}")
            target.copy_(value)
