"""The Trainer glue: decide when a stage ends and call the core; restart the schedule per stage.

No maths here: what an unload does lives in `plora.py`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback

from fastchat_plora.plora import UnloadReport, next_stage, periodic_lr_lambda

logger = logging.getLogger(__name__)


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
    ):
        self.stage_steps = stage_steps
        self.momentum, self.mode, self.init, self.seed = momentum, mode, init, seed
        self.events_path = Path(events_path) if events_path else None
        self.events: list[dict] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if self.stage_steps and step % self.stage_steps == 0 and step < state.max_steps:
            stage = step // self.stage_steps - 1
            report = next_stage(model, optimizer, stage, self.seed, self.momentum, self.mode, self.init)
            self._record(state, stage, report, final=False)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        stage = (step - 1) // self.stage_steps if self.stage_steps else 0
        report = next_stage(model, None, stage, self.seed, 0.0, self.mode, self.init)
        self._record(state, stage, report, final=True)

    def _record(self, state, stage: int, report: UnloadReport, final: bool) -> None:
        event = {
            "step": state.global_step,
            "stage": stage,
            "final": final,
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

    def __init__(self, *args, stage_steps: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage_steps = stage_steps

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
