"""Putting LoRA adapters on a model, and the probe weight the run's update rank is measured on."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from fastchat_plora.distributed import gathered
from fastchat_plora.lora_dropout import recompute_lora_dropout
from fastchat_plora.plora import DEFAULT_INIT, lora_layers, reinit_adapters


class AdapterError(ValueError):
    """Adapters that cannot be put on this model; the message names the bad value."""


def add_adapters(
    model: torch.nn.Module,
    *,
    r: int,
    alpha: float,
    targets: list[str],
    generator: torch.Generator,
    dropout: float = 0.0,
    init: str = DEFAULT_INIT,
    recompute_dropout: bool = True,
) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters of rank ``r`` on the ``targets`` layers (by module name).

    The first A is drawn from ``generator`` with ``init``, like every later stage's, so every
    rank and every rerun agree; B starts at zero. ``recompute_dropout`` swaps PEFT's dropout for
    the one that keeps no dropped-out copy of the inputs (`lora_dropout.py`).
    """
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        raise AdapterError(f"lora_target_modules: {','.join(missing)} matches no layer of the model")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    if recompute_dropout:
        recompute_lora_dropout(model)
    reinit_adapters(model, generator, init=init)
    return model


def compute_in_input_dtype(model: torch.nn.Module, adapters_in_base_dtype: bool = False) -> int:
    """Stop PEFT casting each adapted layer's input to the adapter's dtype; returns how many layers.

    On a bf16/fp16 base PEFT keeps the adapters in fp32 and casts the layer input to fp32 for them:
    under autocast the matmuls still run in bf16/fp16 (autocast casts the fp32 copy straight back,
    exactly, as bf16 -> fp32 -> bf16 is lossless), but every adapted layer holds its own copy of its
    input for backward. Without the cast the adapters take the base layer's input tensor itself.
    That needs autocast, or adapters in the base's dtype (``adapters_in_base_dtype``: under DeepSpeed,
    whose optimizer keeps their fp32 masters; ZeRO-2 casts them so itself, ZeRO-3 does not): an fp32
    adapter on a bf16 input outside autocast would fail on the dtype mismatch.
    """
    count = 0
    for _, layer in lora_layers(model):
        if adapters_in_base_dtype:
            dtype = layer.get_base_layer().weight.dtype
            for factor in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                factor.data = factor.data.to(dtype)
        layer.cast_input_dtype_enabled = False
        count += 1
    return count


def probe_layer(model: torch.nn.Module, targets: list[str]) -> tuple[str, torch.Tensor]:
    """The first target layer's name (plain model naming) and a CPU fp32 copy of its weight, W_0.

    Works on a PEFT model (the base layer's weight) and on a plain one (full fine-tuning).
    """
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            weight = module.get_base_layer().weight if hasattr(module, "get_base_layer") else module.weight
            with gathered([weight]):
                return name.removeprefix("base_model.model."), weight.detach().float().cpu().clone()
    raise AdapterError(f"lora_target_modules={','.join(targets)}: no such layer to measure the update rank on")
