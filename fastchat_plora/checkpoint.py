"""What exact resume of a LoRA/PLoRA run needs beyond the HF checkpoint.

The HF Trainer's checkpoint of a PEFT model holds the live adapter, the optimizer, the scheduler,
the RNG states and the step (from which the stage index and the data position follow). It does not
hold the base weights that earlier stages were merged into. Those are W_0, the model the run
starts from, plus every merge so far, and the run already keeps each merge's factors in
RUN/stages/ (`rundir.py`). So `plora_state.safetensors` holds only the live adapter and, in its
metadata, which stage files the checkpoint stands on (index and sha256) and a checksum of W_0.
Resuming loads W_0, checks it, replays those stages through `plora.replay` (the same compensated
merges in the same order: the same bits) and goes on. A checkpoint is then the adapter's size
instead of the model's (26 GB at LLaMA-7B with all seven linear layers adapted).

Checkpoints of the earlier layout, with the merged base weights in them (`base::<layer>` tensors),
are still read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fastchat_plora.distributed import gathered
from fastchat_plora.plora import LocalWeights, lora_layers, replay
from fastchat_plora.rundir import STATE_FILE, RunDir

logger = logging.getLogger(__name__)
STATE_FORMAT = "stage-replay-1"
BASE_SAMPLE = 4096  # values of each adapted weight that go into the base checksum


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed into this run; the message says why."""


def base_checksum(model: torch.nn.Module) -> str:
    """sha256 over a fixed sample of every adapted base weight: each layer's name, dtype, shape and
    every k-th of its values (k chosen so about 4,096 are read). Cheap, and it tells two bases apart.

    Under ZeRO-3 every rank must call it (each weight is gathered in turn).
    """
    digest = hashlib.sha256()
    for name, layer in lora_layers(model):
        weight = layer.get_base_layer().weight
        with gathered([weight]):
            flat = weight.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // BASE_SAMPLE)].contiguous().cpu()
            digest.update(f"{name}:{weight.dtype}:{tuple(weight.shape)}:".encode())
            digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The live adapter's tensors for ``plora_state.safetensors``. Under ZeRO-3 every rank must call it."""
    tensors = {}
    for name, layer in lora_layers(model):
        factors = {"lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight}
        with gathered(factors.values()):
            for kind, tensor in factors.items():
                value = tensor.detach().contiguous().cpu()
                # a gathered ZeRO-3 tensor is released on exit: keep a copy of it
                tensors[f"{kind}::{name}"] = value.clone() if hasattr(tensor, "ds_id") else value
    return tensors


def state_metadata(run: RunDir, base_sum: str) -> dict[str, str]:
    """The metadata of ``plora_state.safetensors``: the stages merged so far, W_0's checksum.

    The stages are the run's stage files on disk (the unload of a boundary step writes its file
    before that step's checkpoint is saved). Only the process that writes the checkpoint needs it.
    """
    stages = [[int(p.stem.split("-")[1]), file_sha256(p)] for p in run.stage_files()]
    return {"format": STATE_FORMAT, "base_checksum": base_sum, "stages": json.dumps(stages)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_state(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    file = Path(checkpoint) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{checkpoint} is not a LoRA/PLoRA checkpoint of this project (no {STATE_FILE})")
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata() or {}
    return load_file(str(file)), metadata


def check_resumable(checkpoint: Path, model: torch.nn.Module, base_sum: str) -> list[int]:
    """Refuse, before anything is written, a checkpoint this run cannot resume; returns the stages it replays.

    It must adapt the same layers, have started from the same W_0 (by checksum), and every stage
    file it stands on must be there, unchanged. Checkpoints of the earlier layout replay nothing.
    """
    return verified_state(Path(checkpoint), model, base_sum)[2]


def verified_state(checkpoint: Path, model: torch.nn.Module, base_sum: str) -> tuple[dict, dict, list[int]]:
    """(tensors, metadata, stages to replay) of a checkpoint that `check_resumable` accepts."""
    saved, metadata = read_state(checkpoint)
    check_layers(checkpoint, saved, model)
    if metadata.get("format") != STATE_FORMAT:
        return saved, metadata, []
    if metadata["base_checksum"] != base_sum:
        raise CheckpointError(
            f"resume_from_checkpoint={checkpoint}: the run started from other base weights than "
            "--model_name_or_path gives now (their checksums differ); resume with the run's own base model"
        )
    run, stages = RunDir(checkpoint.parent), []
    for stage, checksum in json.loads(metadata["stages"]):
        path = run.stage_file(stage)
        if not path.is_file() or file_sha256(path) != checksum:
            state = "is missing" if not path.is_file() else "has changed since the checkpoint was saved"
            raise CheckpointError(f"resume_from_checkpoint={checkpoint}: the stage file {path} it replays {state}")
        stages.append(stage)
    return saved, metadata, stages


def restore_base_weights(checkpoint: Path, model: torch.nn.Module, weights: LocalWeights, base_sum: str) -> int:
    """Bring the base weights from W_0 to what they were at ``checkpoint``; returns the stages replayed.

    New layout: replay the stage files it stands on (checked again first). Earlier layout: copy the
    merged weights and compensation buffers it holds. Every rank calls this under ZeRO.
    """
    checkpoint = Path(checkpoint)
    saved, metadata, stages = verified_state(checkpoint, model, base_sum)
    if metadata.get("format") != STATE_FORMAT:
        copy_merged_weights(saved, model, weights)
        return 0
    run, start = RunDir(checkpoint.parent), time.perf_counter()
    count = replay(model, (run.stage_factors(stage) for stage in stages), weights=weights)
    logger.info("resume: replayed %d stage(s) into the base weights in %.2f s", count, time.perf_counter() - start)
    return count


def copy_merged_weights(saved: dict, model: torch.nn.Module, weights: LocalWeights) -> None:
    """The earlier layout: the checkpoint holds each adapted layer's merged base weight (and Kahan buffer)."""
    with torch.no_grad():
        for name, layer in lora_layers(model):
            base = layer.get_base_layer().weight
            with gathered([base], modifier_rank=0):
                base.copy_(saved[f"base::{name}"].to(base.device, base.dtype))
            if f"comp::{name}" in saved:
                weights.load_buffer(name, base, saved[f"comp::{name}"].to(base.device))


def check_layers(checkpoint: Path, saved: dict, model: torch.nn.Module) -> dict:
    """The model's LoRA layers, once the checkpoint is known to adapt exactly these."""
    layers = dict(lora_layers(model))
    names = {key.split("::", 1)[1] for key in saved if key.startswith("lora_A::")}
    if names != set(layers):
        raise CheckpointError(
            f"checkpoint {checkpoint} adapts other layers than this run ({len(names)} vs {len(layers)})"
        )
    return layers


def load_adapter(checkpoint: Path, model: torch.nn.Module) -> None:
    """Copy the checkpoint's live adapter into the model in place (Parameter objects kept); fail on any mismatch."""
    saved, _ = read_state(checkpoint)
    layers = check_layers(checkpoint, saved, model)
    adapters = {key: value for key, value in saved.items() if key.startswith(("lora_A::", "lora_B::"))}
    with torch.no_grad():
        for key, value in adapters.items():
            kind, name = key.split("::", 1)
            target = getattr(layers[name], kind)["default"].weight
            if target.shape != value.shape:
                shapes = f"{tuple(value.shape)} there, {tuple(target.shape)} in this run"
                raise CheckpointError(f"checkpoint {checkpoint}: {key} has shape {shapes}")
            target.copy_(value)
