"""The run directory: what training writes into OUTPUT_DIR, where, and how it is found again.

One module owns the contract, written down for readers outside the package in
docs/run_directory.md (`eval/` reads these files and imports nothing from here):

    OUTPUT_DIR/
      config.json, model.safetensors, tokenizer files   the final model, a plain HF model directory
      run_args.json          every argument of the run, plus `base_model`: the model it started from
      summary.json           steps, stages, losses, the rank probe (written last: a finished run)
      log_history.json       the Trainer's logs
      unload_events.jsonl    one line per unload: step, stage, final, momentum, update norms
      stages/stage-NNNNN.safetensors   each merge's factors (c_t B_t, A_t), metadata stage and step
      checkpoint-N/          complete once trainer_state.json is in it (the Trainer writes it last)
        plora_state.safetensors   LoRA/PLoRA only: the live adapter; metadata: the stage files it
                                  stands on (index, sha256) and a checksum of W_0
      .staging/              a checkpoint being written; renamed to checkpoint-N when complete
      wandb_run.json         the W&B run that trained the model, for evaluation to log into
      samples.jsonl          sample replies to fixed prompts, by step (--sample_prompts)
      STOP                   written by a user or launch script: stop after this step with a checkpoint
      run_identity.json      model, mode, rank, stage settings, seed...: a resume must match them
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

EVENTS_FILE = "unload_events.jsonl"
SAMPLES_FILE = "samples.jsonl"  # greedy replies to fixed prompts, by step
STAGES_DIR = "stages"
RUN_ARGS_FILE = "run_args.json"
SUMMARY_FILE = "summary.json"
LOG_HISTORY_FILE = "log_history.json"
WANDB_RUN_FILE = "wandb_run.json"
STATE_FILE = "plora_state.safetensors"  # inside a LoRA/PLoRA checkpoint-N
STAGING_DIR = ".staging"
STOP_FILE = "STOP"
IDENTITY_FILE = "run_identity.json"  # the settings that make a run this run, written at its start
# what a run writes before its first checkpoint: a directory holding only these is an unfinished run
BEFORE_FIRST_CHECKPOINT = {STAGES_DIR, EVENTS_FILE, SAMPLES_FILE, WANDB_RUN_FILE, STAGING_DIR, STOP_FILE, IDENTITY_FILE}
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "trainer_state.json"  # written last by the HF Trainer
PEFT_PREFIX = "base_model.model."  # PEFT's module names over the wrapped model's own
logger = logging.getLogger(__name__)


class RunDirError(ValueError):
    """A run directory, or a checkpoint in one, that cannot be used as asked; the message says why."""


def is_complete(checkpoint: Path) -> bool:
    return (Path(checkpoint) / COMPLETE_MARKER).is_file()


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a complete checkpoint was saved at."""
    return json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text())["global_step"]


class RunDir:
    """One training run's output directory (see the module docstring for its files)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoint(self, step: int) -> Path:
        return self.path / f"checkpoint-{step}"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, in step order; half-written ones never count."""
        found = []
        for path in self.path.glob("checkpoint-*"):
            match = CHECKPOINT_RE.match(path.name)
            if match and path.is_dir() and is_complete(path):
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def rotate(self, keep: int | None) -> None:
        """Keep the newest ``keep`` checkpoint directories (by step number); None or 0 keeps all."""
        if not keep or keep <= 0:
            return
        steps = sorted(int(m.group(1)) for p in self.path.glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name)))
        for step in steps[:-keep]:
            shutil.rmtree(self.checkpoint(step))

    def resume_point(self, value: str | bool | None) -> Path | None:
        """The checkpoint ``--resume_from_checkpoint value`` names: a path, `latest` (also `true`), or
        `auto`: the latest complete checkpoint when there is one, else None (start fresh)."""
        if not value or str(value).lower() == "false":
            return None
        if str(value).lower() in ("latest", "true", "auto"):
            self.warn_incomplete_checkpoints()
            found = self.latest_checkpoint()
            if found is None and str(value).lower() != "auto":
                raise RunDirError(f"resume_from_checkpoint={value}: no complete checkpoint in {self.path}")
            return found
        path = Path(value)
        if not path.is_dir():
            raise RunDirError(f"resume_from_checkpoint={value}: no such directory")
        if not is_complete(path):
            raise RunDirError(f"resume_from_checkpoint={value}: not a complete checkpoint (no {COMPLETE_MARKER})")
        return path

    def warn_incomplete_checkpoints(self) -> None:
        incomplete = [p.name for p in self.path.glob("checkpoint-*") if p.is_dir() and not is_complete(p)]
        if incomplete:
            logger.warning("%s: %s not complete (no %s), passed over", self.path, ", ".join(sorted(incomplete)),
                           COMPLETE_MARKER)  # fmt: skip

    def check_writable(self, overwrite: bool, resuming: bool, auto: bool = False) -> None:
        """Refuse to write into a directory that already holds a run, unless resuming or overwriting.

        ``auto`` (resume if possible) without a checkpoint to resume accepts a directory holding only
        what a run writes before its first checkpoint: that run is started over.
        """
        if self.path.is_file():
            raise RunDirError(f"output_dir={str(self.path)!r} is a file")
        entries = {entry.name for entry in os.scandir(self.path)} if self.path.is_dir() else set()
        if auto and not resuming:
            others = sorted(entries - BEFORE_FIRST_CHECKPOINT)
            if others and not overwrite:
                raise RunDirError(
                    f"output_dir={str(self.path)!r} holds {others[0]!r} and no checkpoint: not an unfinished run "
                    "to resume; pass another --output_dir, or --overwrite_output_dir"
                )
            return
        if entries and not (overwrite or resuming):
            raise RunDirError(
                f"output_dir={str(self.path)!r} already holds a run; pass --overwrite_output_dir or "
                "--resume_from_checkpoint"
            )

    @property
    def stop_file(self) -> Path:
        return self.path / STOP_FILE

    def write_identity(self, identity: dict) -> None:
        (self.path / IDENTITY_FILE).write_text(json.dumps(identity, indent=2))

    def check_identity(self, identity: dict) -> None:
        """Refuse to go on with a run that other settings started (a directory without the file passes)."""
        path = self.path / IDENTITY_FILE
        if not path.is_file():
            return
        saved = json.loads(path.read_text())
        for key, value in identity.items():
            if key in saved and saved[key] != value:
                raise RunDirError(
                    f"output_dir={str(self.path)!r} holds a run with {key}={saved[key]!r}, this one has "
                    f"{key}={value!r}: pass that run's own settings, or another --output_dir"
                )

    # -- unload events and stage factors ---------------------------------------------------------
    @property
    def events_file(self) -> Path:
        return self.path / EVENTS_FILE

    def append_event(self, event: dict) -> None:
        with self.events_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")

    def events(self) -> list[dict]:
        return read_jsonl(self.events_file)

    @property
    def samples_file(self) -> Path:
        return self.path / SAMPLES_FILE

    def append_samples(self, rows: list[dict]) -> None:
        with self.samples_file.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

    def stage_file(self, stage: int) -> Path:
        return self.path / STAGES_DIR / f"stage-{stage:05d}.safetensors"

    def save_stage(
        self, stage: int, step: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], final: bool = False
    ) -> None:
        """One stage's merged factors, layer -> (c * B, A), under the plain model's module names.

        A skipped stage (non-finite adapters) gets an empty file, which keeps the numbering. ``final``
        marks the merge that ends the run (a resumed run that goes on replaces it).
        """
        tensors = {}
        for name, (b, a) in factors.items():
            name = name.removeprefix(PEFT_PREFIX)
            tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = a.contiguous(), b.contiguous()
        path = self.stage_file(stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"stage": str(stage), "step": str(step), "final": str(int(final))})
        tmp.replace(path)

    def stage_factors(self, stage: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One stage's merged factors, layer -> (c * B, A), under PEFT's module names as the unload reported them."""
        tensors = read_tensors(self.stage_file(stage))
        layers = [key.removesuffix(".lora_A") for key in tensors if key.endswith(".lora_A")]
        return {PEFT_PREFIX + layer: (tensors[f"{layer}.lora_B"], tensors[f"{layer}.lora_A"]) for layer in layers}

    def stage_files(self) -> list[Path]:
        return sorted((self.path / STAGES_DIR).glob("stage-*.safetensors"))

    def load_stages(self) -> list[dict[str, torch.Tensor]]:
        """Every stage's factors in stage order; fails unless they are stages 0..T-1 without gaps."""
        paths = self.stage_files()
        if not paths:
            raise RunDirError(f"{self.path / STAGES_DIR} holds no stage factors (train with --save_stage_factors True)")
        stages = [int(p.stem.split("-")[1]) for p in paths]
        if stages != list(range(len(paths))):
            raise RunDirError(
                f"{self.path / STAGES_DIR}: stage files {stages} are not 0..{len(paths) - 1} without gaps"
            )
        return [read_tensors(path) for path in paths]

    def prepare(self, writer: bool, resume: Path | None, started: float, identity: dict) -> None:
        """Make the directory; the ``writer`` (one process of a job) trims it to ``resume`` and records the
        run's identity."""
        self.path.mkdir(parents=True, exist_ok=True)
        if writer:
            self.trim(resume, started)
            self.write_identity(identity)

    def trim(self, resume: Path | None, started: float | None = None) -> None:
        """Forget what came after the checkpoint a run resumes from: all of it for a fresh run.

        Unload events, samples and stage files after its step go, and so does a final merge (the run
        goes on past it); earlier ones are the resumed run's own. A STOP file older than ``started``
        (the process's start, as time.time()) asked an earlier attempt to stop and goes too; a newer
        one asks this attempt.
        """
        last_step = checkpoint_step(resume) if resume is not None else None
        if self.stop_file.exists() and (started is None or self.stop_file.stat().st_mtime < started):
            self.stop_file.unlink()
        for log in (self.events_file, self.samples_file):
            if last_step is None:
                log.unlink(missing_ok=True)
            elif log.is_file():
                kept = [e for e in read_jsonl(log) if e["step"] <= last_step and not e.get("final")]
                log.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in kept))
        for path in self.stage_files():
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata()
            if last_step is None or int(metadata["step"]) > last_step or metadata.get("final") == "1":
                path.unlink()

    # -- run files ------------------------------------------------------------------------------
    def write_run_files(self, args: dict, summary: dict, log_history: list[dict]) -> None:
        """The run's arguments, logs and summary; the summary last, since it marks a finished run."""
        (self.path / RUN_ARGS_FILE).write_text(json.dumps(args, indent=2, default=str))
        (self.path / LOG_HISTORY_FILE).write_text(json.dumps(log_history, indent=1))
        (self.path / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))

    def summary(self) -> dict | None:
        """The summary of a finished run, None while it has not finished."""
        path = self.path / SUMMARY_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def run_args(self) -> dict:
        path = self.path / RUN_ARGS_FILE
        if not path.is_file():
            raise RunDirError(f"{self.path} has no {RUN_ARGS_FILE}: not a finished run of this project")
        return json.loads(path.read_text())

    def base_model(self) -> str | None:
        """The model the run started from, as the run resolved it; None means the embedded default
        (an older run that did not record the resolved path)."""
        args = self.run_args()
        return args.get("base_model") or args.get("model_name_or_path")
