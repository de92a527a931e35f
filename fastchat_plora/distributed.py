"""The PLoRA unload with several processes: plora.py's maths through data parallel's and DeepSpeed ZeRO's weights.

Data parallel (torchrun, DDP) and ZeRO-2 replicate the base weights: every rank holds the same
weights and adapters, draws the same A from the same (seed, stage) generator, and makes the same
merge. fp32 weights need nothing more. bf16/fp16 weights are merged with Kahan compensation, one
buffer of the weight's size per adapted layer (12 GiB at LLaMA-7B with all seven layers): rather
than every rank keeping every buffer, each rank keeps those of a share of the layers (balanced by
size), merges those layers and broadcasts them (`ShardedWeights`). At 8 GPUs that is 1.5 GiB of
buffers per GPU instead of 12, for one broadcast of the bf16 weights per unload (13 GB at 7B: a
fraction of a second over NVLink, about 0.1% of a 200-step stage). Keeping the buffers in pinned
host memory instead would cost each rank 12 GiB of host RAM (96 GiB per 8-GPU node) and 24 GB of
PCIe traffic per unload.

ZeRO breaks two more assumptions of the single-process core:

- ZeRO-1/2 keep fp32 master copies of the trainable parameters (the adapters) in the optimizer, and
  copy them over the parameters after every step: a plain write to A or B would be undone at the
  next step. The new A and B go into the master copies through DeepSpeed's `safe_set_full_fp32_param`
  as well as into the parameters; they are read, whole, from the masters, on the device.
- ZeRO-3 also partitions every parameter, frozen base weights included. The merge is partition-local:
  every rank computes the (adapter-sized) product, takes the slice of it that its own partition of
  the weight holds, and adds it there with its own slice of the Kahan buffer: no weight is gathered
  or broadcast, and each rank keeps 1/world of the buffers.

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

from fastchat_plora.plora import LocalWeights, compensated_add_, lora_layers, needs_compensation, zero_state_

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


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


class ShardedWeights(LocalWeights):
    """Replicated weights on several ranks (DDP, ZeRO-2): the Kahan buffers of the bf16/fp16 weights are
    shared out among the ranks (see the module note); every rank must call `allocate`, then every merge."""

    def __init__(self, compensation: dict[str, torch.Tensor] | None = None):
        super().__init__(compensation)
        self.owners: dict[str, int] = {}

    def allocate(self, model: torch.nn.Module, adapter_name: str = "default") -> int:
        """Share the compensated layers out among the ranks (`share_out`), then create this rank's buffers."""
        if self.compensation is not None:
            weights = {name: layer.get_base_layer().weight for name, layer in lora_layers(model, adapter_name)}
            shared = {n: w.numel() for n, w in weights.items() if needs_compensation(w) and not hasattr(w, "ds_id")}
            self.owners = share_out(shared, world_size())
        return super().allocate(model, adapter_name)

    def keeps(self, name: str, weight: torch.Tensor) -> bool:
        return self.owners.get(name, 0) == rank()

    def shared(self, weight: torch.Tensor) -> bool:
        """Whether one rank merges ``weight`` for all (a compensated merge); else every rank merges it alike."""
        return self.compensation is not None and needs_compensation(weight)

    def merge(self, name: str, weight: torch.Tensor, first_row: int, update: torch.Tensor) -> None:
        """The owner merges with its buffer; without compensation every rank merges."""
        if not self.shared(weight):
            super().merge(name, weight, first_row, update)
        elif name not in self.owners:
            raise RuntimeError(f"{name}: no rank owns its Kahan buffer; call allocate(model) before training")
        elif self.owners[name] == rank():
            super().merge(name, weight, first_row, update)

    def merged(self, name: str, weight: torch.Tensor) -> None:
        """The owner's merged weight goes to every rank."""
        if self.shared(weight):
            torch.distributed.broadcast(weight, src=self.owners[name])


def share_out(sizes: dict[str, int], ranks: int) -> dict[str, int]:
    """name -> rank: largest first, each to the rank holding the fewest elements so far. Deterministic, so
    every rank computes the same owners."""
    load, owners = [0] * ranks, {}
    for name, size in sorted(sizes.items(), key=lambda item: -item[1]):
        owners[name] = min(range(ranks), key=load.__getitem__)
        load[owners[name]] += size
    return owners


class ZeroWeights(ShardedWeights):
    """The unload's weight access under DeepSpeed ZeRO (see the module note). Every rank must use it.

    Reads and writes are collective calls; plora.unload makes them in module order on every rank.
    """

    def read(self, param: torch.Tensor) -> torch.Tensor:
        """The full fp32 value of a trainable parameter: its ZeRO master copy, gathered on its device."""
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(param) if is_zero_param(param) else None
        return (value if value is not None else param.detach()).float()

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
        return param.ds_tensor.device if hasattr(param, "ds_tensor") else param.device

    def keeps(self, name: str, weight: torch.Tensor) -> bool:
        return hasattr(weight, "ds_id") or super().keeps(name, weight)  # ZeRO-3: every rank its own slice

    def new_buffer(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(weight.ds_tensor if hasattr(weight, "ds_id") else weight)

    def load_buffer(self, name: str, weight: torch.Tensor, value: torch.Tensor) -> None:
        if (buffer := self.buffer(name, weight)) is not None and hasattr(weight, "ds_id"):
            start, count = partition_range(weight)
            buffer[:count].copy_(value.reshape(-1)[start : start + count])
        elif buffer is not None:
            buffer.copy_(value)

    def merge(self, name: str, weight: torch.Tensor, first_row: int, update: torch.Tensor) -> None:
        """ZeRO-3: add the part of this block of rows that lies in this rank's partition of the weight, with
        the same part of its buffer; else as data parallel."""
        if not hasattr(weight, "ds_id"):
            super().merge(name, weight, first_row, update)
            return
        start, count = partition_range(weight)
        block_start = first_row * update.shape[1]
        low, high = max(start, block_start), min(start + count, block_start + update.numel())
        if low >= high:
            return
        part, buffer = weight.ds_tensor[low - start : high - start], self.buffer(name, weight)
        mine = update.reshape(-1)[low - block_start : high - block_start].to(part.device)
        compensated_add_(part, mine, None if buffer is None else buffer[low - start : high - start])

    def merged(self, name: str, weight: torch.Tensor) -> None:
        if hasattr(weight, "ds_id"):
            refresh_whole(weight)
        else:
            super().merged(name, weight)

    def reset_optimizer(self, optimizer, model=None, adapter_name: str = "default") -> int:
        """Zero every state tensor and step count of the optimizer DeepSpeed wraps (see the module note)."""
        inner = innermost_optimizer(optimizer)
        for state in inner.state.values():
            zero_state_(state)
        return len(inner.state)


def partition_range(weight: torch.Tensor) -> tuple[int, int]:
    """(first element, element count) of the flattened ZeRO-3 weight that this rank's partition holds.

    DeepSpeed pads the flat weight to a multiple of the world size and gives rank k the elements
    [k * n, (k + 1) * n), n = the partition size; the last ranks' partitions end in padding.
    """
    import deepspeed.comm

    size = weight.ds_tensor.ds_numel
    start = size * deepspeed.comm.get_rank(group=weight.ds_process_group)
    return start, max(0, min(size, weight.ds_numel - start))


def refresh_whole(weight: torch.Tensor) -> None:
    """A ZeRO-3 weight held whole at this moment (a persistent one) takes its updated partitions again."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if weight.ds_status == ZeroParamStatus.AVAILABLE:
        weight.partition()  # drops the whole copy, keeps the (updated) partition
        if getattr(weight, "ds_persist", False):
            weight.all_gather()


def innermost_optimizer(optimizer):
    """accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> the torch optimizer holding the state."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def uses_zero(training_args) -> bool:
    return deepspeed_config(training_args) is not None


def weights_for(training_args, compensation: dict[str, torch.Tensor] | None = None) -> LocalWeights:
    """The unload's weight access for this run, chosen once: ZeRO's under DeepSpeed, shared-out Kahan
    buffers under plain data parallel, else local."""
    if uses_zero(training_args):
        return ZeroWeights(compensation)
    return ShardedWeights(compensation) if training_args.world_size > 1 else LocalWeights(compensation)


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
