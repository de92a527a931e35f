"""The Trainer glue: decide when a stage ends and call the core; restart the schedule per stage;
write checkpoints atomically with the state exact resume needs; stop cleanly when preempted.

No maths here: what an unload does lives in `plora.py`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import save_file
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback

from fastchat_plora.checkpoint import (
    STATE_FILE,
    load_merged_base_weights,
    load_plora_state,
    plora_state,
)
from fastchat_plora.data import IGNORE_INDEX
from fastchat_plora.distributed import is_partitioned
from fastchat_plora.export import save_stage
from fastchat_plora.head_loss import linear_cross_entropy
from fastchat_plora.plora import UnloadReport, next_stage, periodic_lr_lambda

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive stages ended with NaN or Inf in the adapters."""


class StopRequest:
    """Set by SIGTERM (cluster preemption): the callback then saves a checkpoint and stops."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        logger.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        self.requested = True

    def stopped_early(self, state) -> bool:
        return self.requested and state.global_step < state.max_steps


class PreemptionCallback(TrainerCallback):
    """After a stop request, have the Trainer save a checkpoint at the end of this step and stop."""

    def __init__(self, stop: StopRequest):
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.stopped_early(state):
            control.should_save = True
            control.should_training_stop = True


class RestoreBaseWeights(TrainerCallback):
    """DeepSpeed resume: after the Trainer loads DeepSpeed's checkpoint (adapters, optimizer), restore the
    merged base weights, which that checkpoint leaves out as frozen parameters."""

    def __init__(self, checkpoint: Path, compensation: dict[str, torch.Tensor]):
        self.checkpoint, self.compensation = checkpoint, compensation

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        load_merged_base_weights(self.checkpoint, model, self.compensation)


class PLoRACallback(TrainerCallback):
    """Unload at every stage boundary (every ``stage_steps`` optimizer steps) and once at the end.

    ``stage_steps=None`` is plain LoRA: no boundaries, only the final merge, so the saved model is
    the base plus the adapter. The final unload always merges the whole adapter (momentum 0),
    whatever the stage momentum, so the saved model computes what the trained model computes.
    Stage indices follow from the global step, so a resumed run needs no state from here.
    """

    def __init__(
        self,
        stage_steps: int | None,
        momentum: float = 0.0,
        mode: str = "preserve",
        init: str = "gaussian",
        seed: int = 0,
        events_path: str | Path | None = None,
        compensation: dict[str, torch.Tensor] | None = None,
        max_bad_stages: int = 3,
        stop: StopRequest | None = None,
        stage_factors_dir: str | Path | None = None,
        next_stage_fn=next_stage,
    ):
        self.stage_steps = stage_steps
        self.momentum, self.mode, self.init, self.seed = momentum, mode, init, seed
        self.events_path = Path(events_path) if events_path else None
        self.compensation = compensation
        self.max_bad_stages = max_bad_stages
        self.stop = stop
        self.stage_factors_dir = Path(stage_factors_dir) if stage_factors_dir else None
        self.next_stage = next_stage_fn  # the single-process core, or its ZeRO counterpart (distributed.py)
        self.bad_stages = 0
        self.events: list[dict] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if self.stage_steps and step % self.stage_steps == 0 and step < state.max_steps:
            self._unload(state, model, optimizer, step // self.stage_steps - 1, self.momentum, final=False)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.stop is not None and self.stop.stopped_early(state):
            return  # the checkpoint holds the live adapter; the resumed run finishes the stage
        step = state.global_step
        stage = (step - 1) // self.stage_steps if self.stage_steps else 0
        self._unload(state, model, None, stage, 0.0, final=True)

    def _unload(self, state, model, optimizer, stage: int, momentum: float, final: bool) -> None:
        keep_factors = self.stage_factors_dir is not None
        report = self.next_stage(
            model,
            optimizer,
            stage,
            self.seed,
            momentum,
            self.mode,
            self.init,
            compensation=self.compensation,
            keep_factors=keep_factors,
        )
        self._record(state, stage, report, final)
        if keep_factors and state.is_world_process_zero:  # a skipped stage: an empty file keeps the numbering
            save_stage(self.stage_factors_dir, stage, state.global_step, report.factors or {})
        if not report.skipped:
            self.bad_stages = 0
            return
        self.bad_stages += 1
        logger.error(
            "stage %d ended with NaN/Inf in the adapters: not merged, adapters re-initialised (%d in a row)",
            stage,
            self.bad_stages,
        )
        if self.bad_stages >= self.max_bad_stages:
            raise TrainingDiverged(
                f"{self.bad_stages} consecutive stages ended with non-finite adapters (at step {state.global_step}); "
                "lower --learning_rate or raise --max_bad_stages"
            )

    def _record(self, state, stage: int, report: UnloadReport, final: bool) -> None:
        event = {
            "step": state.global_step,
            "stage": stage,
            "final": final,
            "skipped_non_finite": report.skipped,
            "momentum": report.momentum,
            "momentum_mode": report.mode,
            "layers": len(report.update_norms),
            "update_norm": report.total_norm,
            "update_norms": report.update_norms,
        }
        self.events.append(event)
        logger.info(
            "unload at step %d (stage %d%s): |update| = %.4g over %d layers",
            event["step"],
            stage,
            ", final" if final else "",
            report.total_norm,
            event["layers"],
        )
        if self.events_path is not None and state.is_world_process_zero:
            with self.events_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")


class PLoRATrainer(Trainer):
    """The HF Trainer with a learning-rate schedule that restarts at every stage.

    The configured schedule is built for one stage's length and wrapped to repeat, so each stage
    re-runs it from its start (constant for the paper; warmup + cosine per stage as an option).
    """

    def __init__(
        self,
        *args,
        stage_steps: int | None = None,
        compensation: dict | None = None,
        labeled_logits_only: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.stage_steps = stage_steps
        self.compensation = {} if compensation is None else compensation
        self.labeled_logits_only = labeled_logits_only
        self._tokens = 0  # real (non-padding) tokens since the last log, a tensor once counting starts
        self._last_log = time.perf_counter()

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        self._tokens = self._tokens + (mask.sum() if mask is not None else inputs["input_ids"].numel())
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs also carry the stage index and the real (non-padding) tokens per second.

        Each process counts its own tokens, times the number of processes for the job's figure
        (data-parallel ranks see batches of like size). The count stays on the device between
        logs, so counting costs no synchronisation.
        """
        if "loss" in logs:
            now = time.perf_counter()
            tokens = int(self._tokens) * self.args.world_size  # data-parallel ranks see batches of like size
            logs["tokens_per_second"] = round(tokens / max(now - self._last_log, 1e-9), 1)
            self._tokens, self._last_log = 0, now
            if self.stage_steps:
                logs["plora_stage"] = (max(self.state.global_step, 1) - 1) // self.stage_steps
        super().log(logs, start_time)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Cross-entropy over the positions that carry a label only.

        The LM head of a small model with a large vocabulary (SmolLM2: 49k x 576, a fifth of the
        parameters) costs much of each step, and most positions (system prompt, question,
        padding) have no label. Running the head on labeled positions alone gives the same loss
        and gradients as the full logits, with less work and memory.

        A single process runs the decoder and then the head on exactly the labeled positions, in
        chunks that never hold all their logits at once (`head_loss.linear_cross_entropy`). A
        wrapped model (DDP, DeepSpeed) must be called through its wrapper, which is what
        synchronises the gradients, so there the head runs on every position (column) that some
        row of the batch labels, through the model's own `logits_to_keep`.
        """
        if not self.labeled_logits_only or return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.args.use_liger_kernel:  # liger's fused head + loss inside the model's forward does better
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        features = {k: v for k, v in inputs.items() if k != "labels"}
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        unwrapped = self.accelerator.unwrap_model(model)
        if model is unwrapped:
            causal_lm = unwrapped.get_base_model() if isinstance(unwrapped, PeftModel) else unwrapped
            hidden = causal_lm.get_decoder()(**features).last_hidden_state[:, :-1][keep]
            head = causal_lm.get_output_embeddings()
            if type(head) is torch.nn.Linear and head.bias is None:  # not adapted: the chunked head + loss
                loss = linear_cross_entropy(hidden, head.weight, targets[keep])
            else:
                loss = torch.nn.functional.cross_entropy(head(hidden).float(), targets[keep], reduction="sum")
        else:
            columns = keep.any(dim=0).nonzero().squeeze(1)
            logits = model(**features, logits_to_keep=columns).logits[keep[:, columns]]
            loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
        if num_items_in_batch is None:  # the Trainer then divides by the accumulation steps itself
            return loss / keep.sum()
        loss = loss / num_items_in_batch  # the count over all accumulated micro-batches (and devices)
        if self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # as the Trainer does for a model's own loss
        return loss

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # The base weights hold the merged stages, which PEFT's adapter loading knows nothing of.
        if isinstance(self.model, PeftModel):
            load_plora_state(Path(resume_from_checkpoint), self.model, self.compensation)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_checkpoint(self, model, trial) -> None:
        """Write checkpoint-N into a staging directory, then rename it into place.

        A crash during the save leaves the earlier checkpoints as they were, and a checkpoint-N
        that exists is complete. Rotation (`--save_total_limit`) runs after the rename.
        """
        run_dir = self.args.output_dir
        staging = os.path.join(run_dir, ".staging")
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()  # under DeepSpeed every rank writes its shards into staging
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        if isinstance(self.model, PeftModel) and (self.args.should_save or is_partitioned(self.model)):
            # The merged base weights, which PEFT's adapter checkpoint knows nothing of. Under ZeRO-3
            # every rank joins the gather; only the saving process writes.
            state = plora_state(self.model, self.compensation)
            if self.args.should_save:
                save_file(state, os.path.join(staging, name, STATE_FILE))
        self.accelerator.wait_for_everyone()  # every rank's shards are written before the rename
        if not self.args.should_save:
            return
        final = os.path.join(run_dir, name)
        if os.path.exists(final):  # the same step saved again (e.g. a stop request on a save step)
            shutil.rmtree(final)
        os.replace(os.path.join(staging, name), final)
        shutil.rmtree(staging, ignore_errors=True)
        rotate(run_dir, self.args.save_total_limit)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.stage_steps is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer or self.optimizer
        one_stage = super().create_scheduler(min(self.stage_steps, num_training_steps), optimizer)
        if not isinstance(one_stage, LambdaLR):
            raise ValueError(
                f"lr_scheduler_type={self.args.lr_scheduler_type!r} cannot restart per stage; "
                "use constant, linear, cosine or their warmup variants"
            )
        self.lr_scheduler = LambdaLR(optimizer, [periodic_lr_lambda(f, self.stage_steps) for f in one_stage.lr_lambdas])
        return self.lr_scheduler


def rotate(run_dir: str, save_total_limit: int | None) -> None:
    """Keep the newest `save_total_limit` checkpoints (by step number)."""
    if not save_total_limit or save_total_limit <= 0:
        return
    steps = sorted(
        int(p.name.split("-")[1]) for p in Path(run_dir).glob("checkpoint-*") if p.name.split("-")[1].isdigit()
    )
    for step in steps[:-save_total_limit]:
        shutil.rmtree(Path(run_dir) / f"checkpoint-{step}")
