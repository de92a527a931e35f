"""Weights & Biases for PLoRA runs, on top of the HF Trainer's own W&B integration.

The Trainer's WandbCallback already logs loss, learning rate, grad norm and the TrainingArguments.
This adds what is PLoRA's: the LoRA/PLoRA arguments in the run config, each unload (its step, stage
and update norms, total and by layer type) and the run's id in OUTPUT_DIR/wandb_run.json, so that
`eval/run_eval.py` can log evaluation metrics to the same run. With no API key the run is offline
(files under WANDB_DIR, `wandb sync` uploads them later), never a prompt that blocks a cluster job;
so is a run on a node that has a key but cannot reach the W&B server.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
from collections import defaultdict
from pathlib import Path

from transformers import TrainerCallback

from fastchat_plora.rundir import WANDB_RUN_FILE
from fastchat_plora.wandb_auth import has_api_key, wandb_server

logger = logging.getLogger(__name__)
DEFAULT_PROJECT = "fastchat-plora"
IDENTITY_KEYS = ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_RUN_GROUP", "WANDB_TAGS")  # this training run's alone


def wandb_reachable(timeout: float = 3.0) -> bool:
    """Whether the W&B server (WANDB_BASE_URL, default api.wandb.ai) accepts a connection: a compute
    node may hold an API key and have no route out, where `wandb.init` would fail the job."""
    url = wandb_server()
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def wandb_identity(run_dir: Path, resuming: bool, run_name: str | None, tags: list[str]) -> dict[str, str]:
    """Who this training run is on W&B, as the environment `wandb.init` reads.

    A resumed (or requeued) run continues the W&B run it started, whose id training keeps in
    OUTPUT_DIR/wandb_run.json, so its curves stay one run. Runs are grouped by experiment: the run
    name without its `-seedN` (the seeds of one config form one group); tags say mode and rank.
    """
    identity = {"WANDB_TAGS": ",".join(tags)}
    if run_name:
        identity["WANDB_RUN_GROUP"] = run_name.rsplit("-seed", 1)[0]
    saved = run_dir / WANDB_RUN_FILE
    if resuming and saved.is_file():
        identity["WANDB_RUN_ID"] = json.loads(saved.read_text())["id"]
        identity["WANDB_RESUME"] = "allow"
    return identity


def prepare_wandb(report_to: list[str] | str | None, identity: dict[str, str] | None = None) -> list[str] | None:
    """Before the Trainer starts W&B: check the package, pick offline mode without a key, name the
    project, and set the run's identity (`wandb_identity`; what the user set in the environment wins).

    Returns None when W&B is off, else the identity variables set here, for `finish_wandb` to
    clear. Raises ValueError (the user's input) when W&B is asked for but missing.
    """
    targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "wandb" not in targets and "all" not in targets:
        return None
    if importlib.util.find_spec("wandb") is None:
        if "all" in targets:
            return None
        raise ValueError("report_to=wandb needs the wandb package: pip install wandb")
    wanted = {"WANDB_PROJECT": DEFAULT_PROJECT, **(identity or {})}
    if not os.environ.get("WANDB_MODE") and not has_api_key():
        wanted["WANDB_MODE"] = "offline"
        logger.warning("W&B: no API key, logging offline (upload later with `wandb sync`)")
    elif not os.environ.get("WANDB_MODE") and not wandb_reachable():
        wanted["WANDB_MODE"] = "offline"
        logger.warning("W&B: an API key but no connection to the W&B server, logging offline (upload later "
                       "with `wandb sync`)")  # fmt: skip
    set_here = [key for key in wanted if not os.environ.get(key)]
    os.environ.update({key: wanted[key] for key in set_here})
    import wandb

    if wandb.run is None:  # W&B reads its environment once per process setup: make it read this run's
        wandb.teardown()
    return [key for key in set_here if key in IDENTITY_KEYS]


class WandbPLoRACallback(TrainerCallback):
    """Adds the PLoRA config and unload events to the run the Trainer's WandbCallback started.

    Must come after that callback (the Trainer puts its reporting callbacks before user ones), so the
    run exists by `on_train_begin`. Unload events are read from the PLoRACallback's event list;
    sample replies from the SamplesCallback's rows, logged as one table (`plora/samples`: step,
    stage, prompt, output) that grows with each round.
    """

    SAMPLE_COLUMNS = ("step", "stage", "prompt", "output")

    def __init__(
        self, config: dict, events: list[dict] | None, output_dir: str | Path, samples: list[dict] | None = None
    ):
        self.config = config
        self.events = events if events is not None else []
        self.samples = samples if samples is not None else []
        self.logged = self.samples_logged = 0
        self.output_dir = Path(output_dir)

    def on_train_begin(self, args, state, control, **kwargs):
        import wandb

        if wandb.run is None or not state.is_world_process_zero:
            return
        wandb.run.config.update(self.config, allow_val_change=True)
        info = {
            "id": wandb.run.id,
            "project": wandb.run.project,
            "entity": wandb.run.entity,
            "name": wandb.run.name,
            "dir": str(Path(wandb.run.dir).parents[2]),  # <dir>/wandb/<run>/files: what wandb.init(dir=) takes
            "offline": bool(wandb.run.offline),
        }
        (self.output_dir / WANDB_RUN_FILE).write_text(json.dumps(info, indent=2))

    def on_step_end(self, args, state, control, **kwargs):
        self._log_new_events(state)
        self._log_samples(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._log_new_events(state)
        self._log_samples(state)

    def _log_samples(self, state) -> None:
        import wandb

        if wandb.run is None or not state.is_world_process_zero or len(self.samples) == self.samples_logged:
            return
        # a W&B table is immutable once logged: each round logs the whole table so far
        rows = [[row[c] for c in self.SAMPLE_COLUMNS] for row in self.samples]
        wandb.log({"plora/samples": wandb.Table(columns=list(self.SAMPLE_COLUMNS), data=rows),
                   "train/global_step": state.global_step})  # fmt: skip
        self.samples_logged = len(self.samples)

    def _log_new_events(self, state) -> None:
        import wandb

        if wandb.run is None or not state.is_world_process_zero:
            return
        for event in self.events[self.logged :]:
            by_type = defaultdict(float)
            for layer, norm in event["update_norms"].items():
                by_type[layer.rsplit(".", 1)[-1]] += norm * norm
            record = {
                "plora/unload_stage": event["stage"],
                "plora/update_norm": event["update_norm"],
                "plora/final_merge": int(event["final"]),
                "plora/skipped_non_finite": int(event["skipped_non_finite"]),
                **{f"plora/update_norm/{t}": s**0.5 for t, s in by_type.items()},
                "train/global_step": event["step"],
            }
            wandb.log(record)
        self.logged = len(self.events)


def finish_wandb(set_here: list[str] | None = None) -> None:
    """Close the W&B run the Trainer opened (it leaves that to process exit), flushing offline files,
    and clear the run's identity from the environment, where `prepare_wandb` set it."""
    for key in set_here or []:
        os.environ.pop(key, None)
    if importlib.util.find_spec("wandb") is None:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish()
