"""The HF Trainer, adapted to PLoRA: a schedule that restarts every stage, the labeled-positions
loss, checkpoints written atomically with what exact resume needs, and real tokens/s in the logs."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import save_file
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer

from fastchat_plora.checkpoint import adapter_state, load_adapter, restore_base_weights, state_metadata
from fastchat_plora.distributed import is_partitioned
from fastchat_plora.loss import labeled_loss
from fastchat_plora.plora import LocalWeights, StagePlan, periodic_lr_lambda
from fastchat_plora.rundir import STAGING_DIR, STATE_FILE, RunDir


class PLoRATrainer(Trainer):
    """The HF Trainer with a learning-rate schedule that restarts at every stage of ``plan``.

    The configured schedule is built for one stage's length and wrapped to repeat, so each stage
    re-runs it from its start (constant for the paper; warmup + cosine per stage as an option).
    ``weights`` is the unload's weight access (and holds the compensation buffers);
    ``base_checksum`` identifies W_0 in checkpoints (`checkpoint.base_checksum`).
    """

    def __init__(
        self,
        *args,
        plan: StagePlan | None = None,
        weights: LocalWeights | None = None,
        base_checksum: str = "",
        labeled_logits_only: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.plan = plan or StagePlan()
        self.weights = weights or LocalWeights()
        self.base_checksum = base_checksum
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
            tokens = int(self._tokens) * self.args.world_size
            logs["tokens_per_second"] = round(tokens / max(now - self._last_log, 1e-9), 1)
            self._tokens, self._last_log = 0, now
            if self.plan.steps:
                logs["plora_stage"] = self.plan.stage_of(self.state.global_step)
        super().log(logs, start_time)

    def compute_loss_context_manager(self):
        """The Trainer's, inside the accelerator's autocast (--bf16/--fp16; nothing under DeepSpeed, which casts
        the model itself). accelerate autocasts only the top-level ``model.forward``, and `labeled_loss` calls the
        decoder directly: without this, fp32 weights with --bf16 would compute the loss in fp32."""
        stack = super().compute_loss_context_manager()
        stack.enter_context(self.accelerator.autocast())
        return stack

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Cross-entropy over the labeled positions only (`loss.labeled_loss`), normalised as the Trainer's.

        Under ``--use_liger_kernel`` the model's own forward gets the labels: liger's fused head +
        loss there does better on a GPU.
        """
        own_loss = not self.labeled_logits_only or self.args.use_liger_kernel
        if own_loss or return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, count = labeled_loss(model, inputs, wrapped=model is not self.accelerator.unwrap_model(model))
        if num_items_in_batch is None:  # the Trainer then divides by the accumulation steps itself
            return loss / count
        loss = loss / num_items_in_batch  # the count over all accumulated micro-batches (and devices)
        if self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # as the Trainer does for a model's own loss
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation is the held-out loss: the labeled-positions loss of training, no logits kept."""
        if not self.labeled_logits_only or self.args.use_liger_kernel or "labels" not in inputs:
            return super().prediction_step(model, inputs, True, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        # ZeRO-3 evaluates the bare model, whose partitioned head is whole only inside the model's own forward
        through_forward = model is not self.accelerator.unwrap_model(model) or is_partitioned(model)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, count = labeled_loss(model, inputs, wrapped=through_forward)
        return (loss / count).detach(), None, None

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        """The Trainer's evaluation; its time is left out of the training tokens/s."""
        start = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._last_log += time.perf_counter() - start

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # The base weights hold the merged stages, which PEFT's adapter loading knows nothing of:
        # they are replayed from W_0, then the live adapter is loaded.
        if isinstance(self.model, PeftModel):
            restore_base_weights(Path(resume_from_checkpoint), self.model, self.weights, self.base_checksum)
            load_adapter(Path(resume_from_checkpoint), self.model)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_checkpoint(self, model, trial) -> None:
        """Write checkpoint-N into a staging directory, then rename it into place.

        A crash during the save leaves the earlier checkpoints as they were, and a checkpoint-N
        that exists is complete. Rotation (`--save_total_limit`) runs after the rename.
        """
        run = RunDir(self.args.output_dir)
        staging = run.path / STAGING_DIR
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()  # under DeepSpeed every rank writes its shards into staging
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = str(run.path)
        if isinstance(self.model, PeftModel) and (self.args.should_save or is_partitioned(self.model)):
            # The live adapter and the stages it stands on (`checkpoint.py`). Under ZeRO-3 every rank
            # joins the gather; only the saving process hashes the stage files and writes.
            tensors = adapter_state(self.model)
            if self.args.should_save:
                metadata = state_metadata(run, self.base_checksum)
                save_file(tensors, str(staging / name / STATE_FILE), metadata=metadata)
        self.accelerator.wait_for_everyone()  # every rank's shards are written before the rename
        if not self.args.should_save:
            return
        final = run.checkpoint(self.state.global_step)
        if final.exists():  # the same step saved again (e.g. a stop request on a save step)
            shutil.rmtree(final)
        os.replace(staging / name, final)
        shutil.rmtree(staging, ignore_errors=True)
        run.rotate(self.args.save_total_limit)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.plan.steps is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer or self.optimizer
        one_stage = super().create_scheduler(min(self.plan.steps, num_training_steps), optimizer)
        if not isinstance(one_stage, LambdaLR):
            raise ValueError(
                f"lr_scheduler_type={self.args.lr_scheduler_type!r} cannot restart per stage; "
                "use constant, linear, cosine or their warmup variants"
            )
        self.lr_scheduler = LambdaLR(optimizer, [periodic_lr_lambda(f, self.plan.steps) for f in one_stage.lr_lambdas])
        return self.lr_scheduler
