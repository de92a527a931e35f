"""The callbacks: unload at stage boundaries, stop cleanly when preempted, restore merged weights.

The callbacks only decide when; what an unload does lives in `plora.py`, where the run's files
go in `rundir.py`, and the Trainer subclass (schedule, loss, atomic checkpoints) in `trainer.py`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from fastchat_plora.checkpoint import restore_base_weights
from fastchat_plora.plora import LOCAL, LocalWeights, StagePlan, UnloadReport, next_stage
from fastchat_plora.rundir import RunDir

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive stages ended with NaN or Inf in the adapters."""


class StopRequest:
    """A request to stop after the current step with a checkpoint: SIGTERM (cluster preemption), or
    the run's STOP file appearing (`touch OUTPUT_DIR/STOP`; launch/slurm.sbatch writes it when SLURM
    warns that the job's time is up). Ranks may see a signal at different steps, and a rank that
    stops alone leaves the others waiting in the next collective: `agree` turns the requests of all
    ranks into one decision, at the same step on every rank.
    """

    def __init__(self, stop_file: Path | None = None):
        self.stop_file = stop_file
        self.signalled = False  # this process got SIGTERM
        self.agreed = False  # every rank has decided to stop
        self._previous = None

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        logger.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        self.signalled = True

    def agree(self, device: torch.device | str = "cpu") -> bool:
        """Whether any rank was asked to stop: one all-reduce over the ranks (a 1-element tensor, once a step),
        nothing in a single process. Only rank 0 looks for the STOP file (one stat a step on a shared file
        system, not one per GPU). Reading the result waits for the device, which the Trainer does at every step
        anyway (its NaN/Inf check of the loss, `logging_nan_inf_filter`), so the check adds no stall."""
        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        looks = self.stop_file is not None and (not multi or dist.get_rank() == 0)
        wanted = self.signalled or (looks and self.stop_file.exists())
        if multi:
            flag = torch.tensor([int(wanted)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            wanted = bool(flag.item())
        self.agreed = self.agreed or wanted
        return self.agreed

    def stopped_early(self, state) -> bool:
        return self.agreed and state.global_step < state.max_steps


class PreemptionCallback(TrainerCallback):
    """After a stop request, have the Trainer save a checkpoint at the end of this step and stop.

    The decision is taken at every step end by all ranks together (`StopRequest.agree`), so every
    rank stops at the same step and joins the same checkpoint save.
    """

    def __init__(self, stop: StopRequest):
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        device = args.device if args is not None else "cpu"
        if self.stop.agree(device) and self.stop.stopped_early(state) and not control.should_training_stop:
            logger.warning("stop requested: every rank stops after step %d, with a checkpoint", state.global_step)
            control.should_save = True
            control.should_training_stop = True


class RestoreBaseWeights(TrainerCallback):
    """DeepSpeed resume: after the Trainer loads DeepSpeed's checkpoint (adapters, optimizer), bring the
    base weights to the checkpoint's merges (which that checkpoint leaves out as frozen parameters)."""

    def __init__(self, checkpoint: Path, weights: LocalWeights, base_checksum: str):
        self.checkpoint, self.weights, self.base_checksum = checkpoint, weights, base_checksum

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        restore_base_weights(self.checkpoint, model, self.weights, self.base_checksum)


class PLoRACallback(TrainerCallback):
    """Unload at every stage boundary of ``plan`` and merge the whole adapter once at the end.

    A plan without a stage length is plain LoRA: only the final merge, so the saved model is the
    base plus the adapter. Stage indices follow from the global step, so a resumed run needs no
    state from here. With ``run`` each unload is appended to the run's event log, and with
    ``save_stage_factors`` each merge's factors are written to its ``stages/`` (rank 0 only).

    With ``evaluate`` (the Trainer's, set once the Trainer exists) the held-out loss is computed
    just before each unload (logged as ``eval_before_unload_loss``) and, through the Trainer's own
    evaluation, just after it (``eval_loss`` at the same step). An unload that keeps the output
    (m = 0, or the ``preserve`` rule) must leave it unchanged: a live check of the unload.
    """

    PRESERVED_TOLERANCE = 1e-3  # relative; fp32 merges change the loss in the 6th digit, bf16 ones more

    def __init__(
        self,
        plan: StagePlan,
        weights: LocalWeights = LOCAL,
        *,
        run: RunDir | None = None,
        save_stage_factors: bool = False,
        stop: StopRequest | None = None,
        max_bad_stages: int = 3,
    ):
        self.plan, self.weights = plan, weights
        self.run, self.save_stage_factors = run, save_stage_factors
        self.stop = stop
        self.max_bad_stages = max_bad_stages
        self.bad_stages = 0
        self.events: list[dict] = []
        self.evaluate: Callable[..., dict] | None = None
        self._before: tuple[int, float] | None = None  # (step, held-out loss before its unload)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.plan.is_boundary(state.global_step, state.max_steps):
            return
        if self.evaluate is not None:
            loss = self.evaluate(metric_key_prefix="eval_before_unload")["eval_before_unload_loss"]
            self._before = (state.global_step, loss)
            control.should_evaluate = True  # the Trainer evaluates again after this step's unload
        self._unload(state, model, optimizer, final=False)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._before is None or self._before[0] != state.global_step or "eval_loss" not in (metrics or {}):
            return
        (step, before), after = self._before, metrics["eval_loss"]
        self._before = None
        logger.info("held-out loss at step %d: %.6g before the unload, %.6g after", step, before, after)
        keeps_output = self.plan.momentum == 0 or self.plan.mode == "preserve"
        if keeps_output and abs(after - before) > self.PRESERVED_TOLERANCE * abs(before):
            logger.warning(
                "the unload at step %d changed the held-out loss from %.6g to %.6g, though with momentum %g (%s) "
                "it keeps the model's output: check the merge (dtype, compensation)",
                step, before, after, self.plan.momentum, self.plan.mode,
            )  # fmt: skip

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.stop is not None and self.stop.stopped_early(state):
            return  # the checkpoint holds the live adapter; the resumed run finishes the stage
        self._unload(state, model, None, final=True)

    def _unload(self, state, model, optimizer, final: bool) -> None:
        stage = self.plan.stage_of(state.global_step)
        report = next_stage(model, plan=self.plan, stage=stage, optimizer=optimizer, weights=self.weights, final=final)
        self._record(state, stage, report, final)
        if self.save_stage_factors and self.run is not None and state.is_world_process_zero:
            self.run.save_stage(stage, state.global_step, report.factors, final=final)
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
        if self.run is not None and state.is_world_process_zero:
            self.run.append_event(event)


class SamplesCallback(TrainerCallback):
    """Greedy replies to a few fixed prompts before training, after every unload and at the end.

    Each round appends rows (step, stage, prompt, output) to the run's `samples.jsonl` (rank 0) and
    to ``rows``, which the W&B callback logs as a table. Every rank generates (under ZeRO-3 the
    layers are gathered for each forward, so all ranks must take part). Must come after the
    PLoRACallback, so that a boundary's replies are the merged model's. ``autocast`` (the
    Trainer's, set once it exists) gives the replies training's mixed precision.
    """

    def __init__(
        self,
        prompts: list[tuple[str, list[int]]],
        plan: StagePlan,
        *,
        run: RunDir | None = None,
        max_new_tokens: int = 64,
        synced_gpus: bool = False,
        stop: StopRequest | None = None,
    ):
        self.prompts, self.plan, self.run = prompts, plan, run
        self.max_new_tokens, self.synced_gpus, self.stop = max_new_tokens, synced_gpus, stop
        self.rows: list[dict] = []
        self.autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step == 0:
            self._sample(state, model, processing_class, stage=0)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.plan.is_boundary(state.global_step, state.max_steps):
            self._sample(state, model, processing_class, stage=self.plan.stage_of(state.global_step))

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.stop is None or not self.stop.stopped_early(state):
            stage = self.plan.stage_of(state.global_step)
            self._sample(state, model, processing_class, stage=stage, final=True)

    @torch.no_grad()
    def _sample(self, state, model, tokenizer, stage: int, final: bool = False) -> None:
        start, training = time.perf_counter(), model.training
        model.eval()
        device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows = []
        for text, ids in self.prompts:
            input_ids = torch.tensor([ids], device=device)
            with self.autocast():
                out = model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=self.max_new_tokens,
                    do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                    synced_gpus=self.synced_gpus,
                )  # fmt: skip
            reply = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
            rows.append({"step": state.global_step, "stage": stage, "final": final, "prompt": text, "output": reply})
        model.train(training)
        self.rows += rows
        if self.run is not None and state.is_world_process_zero:
            self.run.append_samples(rows)
        logger.info("samples at step %d: %d prompts in %.1f s", state.global_step, len(rows),
                    time.perf_counter() - start)  # fmt: skip
