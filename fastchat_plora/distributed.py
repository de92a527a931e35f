"""The PLoRA unload where DeepSpeed ZeRO owns the weights: gather, compute with plora.py, write back.

Plain data parallel (torchrun, DDP) needs nothing of this: every rank holds the same full weights
and the same adapters, draws the same A from the same (seed, stage) generator, and so makes the
same unload as a single process. ZeRO breaks two assumptions of the single-process core:

- ZeRO-1/2 keep fp32 master copies of the trainable parameters (the adapters) in the optimizer, and
  copy them over the parameters after every step: a plain write to A or B would be undone at the
  next step. The new A and B go into the master copies through DeepSpeed's `safe_set_full_fp32_param`
  as well as into the parameters.
- ZeRO-3 also partitions every parameter, frozen base weights included: each base weight is gathered
  (`deepspeed.zero.GatheredParameters`, modifier rank 0, entered on every rank), updated, and
  partitioned again; the adapters are read with `safe_get_full_fp32_param` and written back through
  the same gather (their bf16/fp32 partitions) and `safe_set_full_fp32_param` (their masters).

The optimizer state is reset by zeroing the state of DeepSpeed's inner optimizer, whose state is
keyed by flat partitions rather than by our parameters. That is exact because in lora and plora
mode every trainable parameter is an adapter factor (checked before training starts).
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import torch

from fastchat_plora.plora import (
    NonFiniteAdapterError,
    StageOps,
    UnloadReport,
    compensated_add_,
    fresh_lora_a,
    lora_layers,
    needs_compensation,
    next_factors,
    next_stage,
    scaled_update,
    zero_state_,
)

UNSUPPORTED_OFFLOAD = ("offload_optimizer", "offload_param")


def deepspeed_config(training_args) -> dict | None:
    """The DeepSpeed config of a run (a path or a dict in --deepspeed), or None without DeepSpeed."""
    value = getattr(training_args, "deepspeed", None)
    if not value:
        return None
    if isinstance(value, dict):
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"deepspeed={value}: no such config file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"deepspeed={value}: not valid JSON ({e})") from None


def check_supported(training_args, finetune_mode: str) -> None:
    """Refuse, before anything is loaded, a distributed setup the unload cannot work under."""
    if getattr(training_args, "fsdp", None) and finetune_mode != "full":
        raise ValueError(
            f"fsdp={training_args.fsdp!r} with finetune_mode={finetune_mode}: the unload does not support FSDP yet; "
            "use --deepspeed configs/ds/zero2.json or zero3.json, or plain data parallel (torchrun)"
        )
    config = deepspeed_config(training_args)
    if config is None or finetune_mode == "full":
        return
    zero = config.get("zero_optimization", {})
    for key in UNSUPPORTED_OFFLOAD:
        device = (zero.get(key) or {}).get("device", "none")
        if device not in ("none", None):
            raise ValueError(
                f"deepspeed {key}.device={device!r} with finetune_mode={finetune_mode}: the unload rewrites the "
                "adapters' master copies and optimizer state in place, which offloaded state does not support"
            )
    if "optimizer" in config and config["optimizer"].get("type", "").lower() not in ("adamw", "adam"):
        raise ValueError(f"deepspeed optimizer type {config['optimizer'].get('type')!r}: only Adam/AdamW is supported")


def init_deepspeed_comm(training_args) -> None:
    """Start DeepSpeed's communication layer on the process group the Trainer set up, before any model loads.

    Under ZeRO-3, `from_pretrained` builds the model inside `deepspeed.zero.Init`, which reads the world
    size from DeepSpeed's own layer. On GPUs the Trainer starts that layer; with `--use_cpu` it starts
    only torch.distributed (gloo), and ZeRO-3 would then see one process and refuse the batch size.
    """
    if training_args.world_size <= 1:  # reading it makes accelerate create the process group
        return
    import deepspeed

    deepspeed.init_distributed()


def is_zero_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether ZeRO-3 partitions the model's parameters (no rank holds them whole)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def gathered(params, modifier_rank: int | None = None):
    """Full ZeRO-3 parameters inside the block (on every rank); a no-op for anything else."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def full_shape(param: torch.Tensor) -> torch.Size:
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def read_fp32(param: torch.Tensor) -> torch.Tensor:
    """The full fp32 value of a trainable parameter: its ZeRO master copy (a collective call)."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param) if is_zero_param(param) else None
    return (value if value is not None else param.detach()).float().cpu()


def write(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set a trainable parameter everywhere it lives: the parameter (or its partitions) and its master."""
    from deepspeed.utils import safe_set_full_fp32_param

    with gathered([param], modifier_rank=0):
        param.data.copy_(value.to(param.device, param.dtype))
    if is_zero_param(param):
        safe_set_full_fp32_param(param, value.to(param.device, torch.float32))


def zero_unload(
    model: torch.nn.Module,
    momentum: float,
    mode: str,
    generator: torch.Generator | None,
    init: str = "gaussian",
    adapter_name: str = "default",
    compensation: dict[str, torch.Tensor] | None = None,
    keep_factors: bool = False,
) -> UnloadReport:
    """plora.unload for a model whose parameters DeepSpeed ZeRO manages. Every rank must call it.

    The same maths (plora.scaled_update, plora.next_factors, plora.compensated_add_) on the full fp32
    adapters; layers are visited in module order, so A is drawn in the order a single process draws it.
    """
    layers = list(lora_layers(model, adapter_name))
    if not layers:
        raise ValueError(f"the model has no LoRA layers for adapter {adapter_name!r}")
    factors = {name: (read_fp32(layer.lora_A[adapter_name].weight), read_fp32(layer.lora_B[adapter_name].weight))
               for name, layer in layers}  # fmt: skip
    for name, (a, b) in factors.items():  # checked before any write, as in plora.unload
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise NonFiniteAdapterError(f"{name} holds NaN or Inf; refusing to merge it")

    report = UnloadReport(momentum=momentum, mode=mode, factors={} if keep_factors else None)
    with torch.no_grad():
        for name, layer in layers:
            a, b = factors[name]
            coefficient = (1.0 - momentum) * layer.scaling[adapter_name]
            merged = scaled_update(a, b, coefficient, getattr(layer, "fan_in_fan_out", False))
            base = layer.get_base_layer().weight
            with gathered([base], modifier_rank=0):
                comp = None
                partitioned = hasattr(base, "ds_id")
                # Under ZeRO-3 only rank 0's write survives the gather, so only rank 0 keeps the buffers.
                if compensation is not None and needs_compensation(base) and (not partitioned or rank() == 0):
                    comp = compensation.setdefault(name, torch.zeros_like(base))
                compensated_add_(base, merged.to(base.device), comp)
            report.update_norms[name] = merged.norm().item()
            if keep_factors:
                report.factors[name] = (b * coefficient, a)
            new_a, new_b = next_factors(a, b, momentum, mode, generator, init)
            write(layer.lora_A[adapter_name].weight, new_a)
            write(layer.lora_B[adapter_name].weight, new_b)
    return report


def innermost_optimizer(optimizer):
    """accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> the torch optimizer holding the state."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def reset_zero_optimizer_state(optimizer, model=None, adapter_name: str = "default") -> int:
    """Zero every state tensor and step count of the optimizer DeepSpeed wraps (see the module note)."""
    inner = innermost_optimizer(optimizer)
    for state in inner.state.values():
        zero_state_(state)
    return len(inner.state)


def zero_reinit_adapters(model: torch.nn.Module, generator, init: str = "gaussian", adapter_name: str = "default"):
    """plora.reinit_adapters for ZeRO parameters: a fresh A (drawn in module order), B = 0, masters too."""
    for _, layer in lora_layers(model, adapter_name):
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        write(a, fresh_lora_a(full_shape(a), generator, init))
        write(b, torch.zeros(full_shape(b)))


ZERO_OPS = StageOps(unload=zero_unload, reinit=zero_reinit_adapters, reset=reset_zero_optimizer_state)
zero_next_stage = functools.partial(next_stage, ops=ZERO_OPS)


def check_only_adapters_train(model: torch.nn.Module, adapter_name: str = "default") -> None:
    """The optimizer reset under ZeRO zeroes all state: every trainable parameter must be an adapter factor."""
    adapters = set()
    for _, layer in lora_layers(model, adapter_name):
        adapters |= {id(layer.lora_A[adapter_name].weight), id(layer.lora_B[adapter_name].weight)}
    others = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in adapters]
    if others:
        raise ValueError(f"parameters besides the adapters train ({others[0]}, ...): not supported under DeepSpeed")
