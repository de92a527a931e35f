"""The PLoRA unload where DeepSpeed ZeRO owns the weights: plora.py's maths through ZeRO's gather, read and write.

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

import atexit
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch

from fastchat_plora.plora import LocalWeights, lora_layers, zero_state_

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


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class ZeroWeights(LocalWeights):
    """The unload's weight access under DeepSpeed ZeRO (see the module note). Every rank must use it.

    Reads and writes are collective calls; plora.unload makes them in module order on every rank.
    """

    def read(self, param: torch.Tensor) -> torch.Tensor:
        """The full fp32 value of a trainable parameter: its ZeRO master copy, on the CPU."""
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(param) if is_zero_param(param) else None
        return (value if value is not None else param.detach()).float().cpu()

    def write(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Set a trainable parameter everywhere it lives: the parameter (or its partitions) and its master."""
        from deepspeed.utils import safe_set_full_fp32_param

        with torch.no_grad(), gathered([param], modifier_rank=0):
            param.copy_(value.to(param.device, param.dtype))
        if is_zero_param(param):
            safe_set_full_fp32_param(param, value.to(param.device, torch.float32))

    def shape(self, param: torch.Tensor) -> torch.Size:
        return param.ds_shape if hasattr(param, "ds_shape") else param.shape

    def compute_device(self, param: torch.Tensor) -> torch.device:
        return torch.device("cpu")  # `read` gathers the fp32 master onto the CPU

    def whole(self, weight: torch.Tensor) -> contextlib.AbstractContextManager:
        return gathered([weight], modifier_rank=0)

    def keeps_compensation(self, weight: torch.Tensor) -> bool:
        # Under ZeRO-3 only rank 0's write survives the gather, so only rank 0 keeps the buffers.
        return not hasattr(weight, "ds_id") or rank() == 0

    def reset_optimizer(self, optimizer, model=None, adapter_name: str = "default") -> int:
        """Zero every state tensor and step count of the optimizer DeepSpeed wraps (see the module note)."""
        inner = innermost_optimizer(optimizer)
        for state in inner.state.values():
            zero_state_(state)
        return len(inner.state)


def innermost_optimizer(optimizer):
    """accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> the torch optimizer holding the state."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def uses_zero(training_args) -> bool:
    return deepspeed_config(training_args) is not None


def weights_for(training_args, compensation: dict[str, torch.Tensor] | None = None) -> LocalWeights:
    """The unload's weight access for this run, chosen once: ZeRO's under DeepSpeed, else local."""
    cls = ZeroWeights if uses_zero(training_args) else LocalWeights
    return cls(compensation)


def check_only_adapters_train(model: torch.nn.Module, adapter_name: str = "default") -> None:
    """The optimizer reset under ZeRO zeroes all state: every trainable parameter must be an adapter factor."""
    adapters = set()
    for _, layer in lora_layers(model, adapter_name):
        adapters |= {id(layer.lora_A[adapter_name].weight), id(layer.lora_B[adapter_name].weight)}
    others = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in adapters]
    if others:
        raise ValueError(f"parameters besides the adapters train ({others[0]}, ...): not supported under DeepSpeed")


def close_process_group() -> bool:
    """End a multi-process run together: wait for every rank (rank 0 may still be writing the model),
    then tear torch.distributed down. True where there was a group to close."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return True


def exit_without_finalizing(code: int) -> NoReturn:
    """Leave a finished multi-process run's process with ``code``, skipping interpreter finalization.

    DeepSpeed keeps its process groups alive past ``destroy_process_group`` (measured: two gloo
    groups still referenced from ``deepspeed.utils.groups``, the engine, the ZeRO-3 optimizer and
    every partitioned parameter, after ``gc.collect()``), so their C++ backends are torn down while
    the interpreter finalizes, where a gloo thread that releases a tensor needs the GIL of a dying
    interpreter (the failure pytorch/pytorch PR 179291 describes). That is the likely cause of the
    abort seen twice in CI under ZeRO-3 after the model was saved ("terminate called without an
    active exception", SIGABRT), which fails a finished job; 12 reruns of that test did not bring it
    back, so the cause is inferred, not observed. The handlers registered with ``atexit`` (logging's
    flush, anything a library registered) run first, through CPython's ``atexit._run_exitfuncs``
    (there is no public way to run them early), while the interpreter is whole; only the C-level
    teardown is skipped.
    """
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
