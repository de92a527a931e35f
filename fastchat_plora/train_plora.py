"""Fine-tune a causal LM with full fine-tuning, LoRA or PeriodicLoRA (PLoRA).

    python -m fastchat_plora.train_plora --config configs/demo_smollm2_gsm8k.yaml --output_dir runs/demo
    plora-train --data_path mix.jsonl --output_dir out --finetune_mode plora --unload_every_samples 4800

Reads top to bottom: parse -> model -> adapters -> data -> trainer + PLoRA callback -> train -> save.
The output directory ends as a plain HF model (base plus every merged update), with the unload
events (`unload_events.jsonl`), the arguments (`run_args.json`) and a summary (`summary.json`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, PreTrainedModel

from fastchat_plora.analyze import update_rank
from fastchat_plora.args import ConfigError, parse_args, resolve_resume, target_modules, validate
from fastchat_plora.callback import (
    PLoRACallback,
    PLoRATrainer,
    PreemptionCallback,
    RestoreBaseWeights,
    StopRequest,
    TrainingDiverged,
)
from fastchat_plora.checkpoint import latest_checkpoint
from fastchat_plora.data import load_conversations, make_dataset
from fastchat_plora.distributed import (
    check_only_adapters_train,
    deepspeed_config,
    gathered,
    init_deepspeed_comm,
    zero_next_stage,
)
from fastchat_plora.export import trim_stages
from fastchat_plora.lora_dropout import recompute_lora_dropout
from fastchat_plora.models import DTYPES, load_model, load_tokenizer, resolve_model_path, save_model
from fastchat_plora.plora import next_stage, reinit_adapters, stage_generator, steps_per_stage
from fastchat_plora.tracking import WandbPLoRACallback, finish_wandb, prepare_wandb

logger = logging.getLogger("fastchat_plora")
EVENTS_FILE = "unload_events.jsonl"
PREEMPTED_EXIT = 143  # 128 + SIGTERM: stopped on request, checkpoint saved, not finished


def add_adapters(model: PreTrainedModel, lora_args, seed: int) -> torch.nn.Module:
    """Wrap the model with LoRA adapters on the target modules; stage 0's A comes from (seed, 0)."""
    targets = target_modules(lora_args)
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        raise ConfigError(f"lora_target_modules: {','.join(missing)} matches no layer of the model")
    config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    if lora_args.lora_dropout_recompute:
        recompute_lora_dropout(model)
    # Draw the first adapter from the stage generator too, so every rank and every rerun agree.
    reinit_adapters(model, stage_generator(seed, 0), lora_args.lora_init)
    return model


def probe_layer(model: torch.nn.Module, lora_args) -> tuple[str, torch.Tensor]:
    """The first adapted weight (or the first linear weight in full mode) and a copy of it, W_0."""
    targets = set(target_modules(lora_args))
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            weight = module.get_base_layer().weight if hasattr(module, "get_base_layer") else module.weight
            with gathered([weight]):
                return name.removeprefix("base_model.model."), weight.detach().float().cpu().clone()
    raise ConfigError("no target layer to measure the update rank on")


def make_collator(tokenizer, padding_free: bool):
    """Padded batches (labels padded with -100), or one padding-free row per batch."""
    if padding_free:
        # position_ids restart at every conversation; attention then stays within each one
        return DataCollatorWithFlattening(return_position_ids=True)
    return DataCollatorForSeq2Seq(tokenizer, padding=True)


def plora_callback(lora_args, plora_args, training_args, stage_steps, compensation, stop, zero) -> PLoRACallback:
    """The unloads: when (stage_steps), how (momentum, mode, init; ZeRO-aware under DeepSpeed), records where."""
    output_dir = Path(training_args.output_dir)
    return PLoRACallback(
        stage_steps,
        plora_args.unload_momentum,
        plora_args.momentum_mode,
        lora_args.lora_init,
        training_args.seed,
        output_dir / EVENTS_FILE,
        compensation,
        plora_args.max_bad_stages,
        stop,
        output_dir if plora_args.save_stage_factors else None,
        zero_next_stage if zero else next_stage,
    )


def stage_length(plora_args, training_args) -> int | None:
    if plora_args.finetune_mode != "plora":
        return None
    global_batch = (
        training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size
    )
    return steps_per_stage(plora_args.unload_every_steps, plora_args.unload_every_samples, global_batch)


def loss_by_stage(log_history: list[dict], stage_steps: int | None) -> dict[int, float]:
    """Mean logged training loss per stage (a single stage 0 for full and lora)."""
    losses = defaultdict(list)
    for entry in log_history:
        if "loss" in entry:
            losses[(entry["step"] - 1) // stage_steps if stage_steps else 0].append(entry["loss"])
    return {stage: sum(v) / len(v) for stage, v in sorted(losses.items())}


def main(model_args, data_args, lora_args, plora_args, training_args) -> dict:
    """Train and save; returns the run summary. Every check runs before output_dir is written."""
    validate(model_args, data_args, lora_args, plora_args, training_args)
    mode = plora_args.finetune_mode
    zero = deepspeed_config(training_args) is not None
    if zero:
        init_deepspeed_comm(training_args)
    resume = resolve_resume(training_args)

    conversations = load_conversations(data_args.data_path)  # bad data fails before any model loads
    if data_args.max_train_samples is not None:
        conversations = conversations[: data_args.max_train_samples]
    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_path, data_args.model_max_length)
    model = load_model(model_path, model_args.model_dtype, model_args.attn_implementation)
    if mode != "full":
        model = add_adapters(model, lora_args, training_args.seed)
        if zero:
            check_only_adapters_train(model)
    probe_name, w0 = probe_layer(model, lora_args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dataset = make_dataset(conversations, tokenizer, data_args.model_max_length, data_args.conv_template)
    stage_steps = stage_length(plora_args, training_args)

    wandb_on = prepare_wandb(training_args.report_to)  # offline without a key; an error without the package

    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if training_args.process_index == 0:  # one process tidies the shared output directory
        trim_events(output_dir / EVENTS_FILE, resume)
        trim_stages(output_dir, checkpoint_step(resume) if resume else None)
    compensation = {} if wants_compensation(plora_args, model_args) else None
    stop = StopRequest()
    callbacks = [PreemptionCallback(stop)]
    if mode != "full":
        callbacks.append(plora_callback(lora_args, plora_args, training_args, stage_steps, compensation, stop, zero))
        if zero and resume:
            callbacks.append(RestoreBaseWeights(resume, compensation if compensation is not None else {}))
    if wandb_on:
        config = {"trainable_parameters": trainable}
        for group in (model_args, data_args, lora_args, plora_args):
            config.update(dataclasses.asdict(group))
        events = callbacks[-1].events if mode != "full" else None
        callbacks.append(WandbPLoRACallback(config, events, output_dir))
    trainer = PLoRATrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=make_collator(tokenizer, training_args.padding_free),
        processing_class=tokenizer,
        callbacks=callbacks,
        stage_steps=stage_steps,
        compensation=compensation,
        labeled_logits_only=training_args.labeled_logits_only,
    )
    stop.install()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        stop.uninstall()
        if wandb_on:
            finish_wandb()
    if stop.stopped_early(trainer.state):
        checkpoint = latest_checkpoint(output_dir)
        return {"preempted": True, "steps": trainer.state.global_step, "checkpoint": str(checkpoint)}

    # The callback's final unload left every adapter merged and B = 0; drop the LoRA layers.
    final_model = model.unload() if mode != "full" else model
    with gathered(final_model.parameters()):  # ZeRO-3: every weight whole on every rank, for rank 0 to save
        if trainer.is_world_process_zero():
            save_model(final_model, tokenizer, output_dir)
        summary = summarize(trainer, result, mode, stage_steps, trainable, probe_name, w0, final_model)
    if trainer.is_world_process_zero():
        write_run_files(output_dir, (model_args, data_args, lora_args, plora_args, training_args), summary)
        (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return summary


def wants_compensation(plora_args, model_args) -> bool:
    """Compensated merges: asked for, or by default for bf16/fp16 base weights."""
    if plora_args.merge_compensation == "auto":
        return DTYPES[model_args.model_dtype] != torch.float32
    return plora_args.merge_compensation == "on"


def summarize(trainer, result, mode, stage_steps, trainable, probe_name, w0, final_model) -> dict:
    """The run summary: steps, stages, losses, and the rank of W_T - W_0 for the probed layer."""
    w_final = final_model.get_submodule(probe_name).weight
    rank = update_rank(w_final.detach().cpu(), w0, w_final.dtype)
    return {
        "finetune_mode": mode,
        "trainable_parameters": trainable,
        "output_dir": trainer.args.output_dir,
        "steps": trainer.state.global_step,
        "stage_steps": stage_steps,
        "stages": -(-trainer.state.global_step // stage_steps) if stage_steps else 1,
        "train_loss": result.training_loss,
        "loss_by_stage": loss_by_stage(trainer.state.log_history, stage_steps),
        "rank_probe": {"layer": probe_name, **dataclasses.asdict(rank)},
    }


def trim_events(path: Path, resume: Path | None) -> None:
    """A fresh run starts a fresh event log; a resumed one drops events after its checkpoint's step."""
    if resume is None or not path.is_file():
        path.unlink(missing_ok=True)
        return
    step = checkpoint_step(resume)
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def checkpoint_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


def write_run_files(output_dir: Path, arg_objects: tuple, summary: dict) -> None:
    args = {}
    for obj in arg_objects:
        args.update(obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj))
    (output_dir / "run_args.json").write_text(json.dumps(args, indent=2, default=str))
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def format_summary(summary: dict) -> str:
    if summary.get("preempted"):
        return (
            f"stopped by SIGTERM after step {summary['steps']}; checkpoint {summary['checkpoint']}\n"
            "resume with --resume_from_checkpoint latest"
        )
    probe = summary["rank_probe"]
    lines = [
        f"{summary['finetune_mode']}: {summary['steps']} steps in {summary['stages']} stage(s), "
        f"mean train loss {summary['train_loss']:.4f}",
        "loss by stage: " + ", ".join(f"{s}: {v:.4f}" for s, v in summary["loss_by_stage"].items()),
        f"rank of W_T - W_0 for {probe['layer']}: {probe['numerical_rank']} "
        f"(top singular values {', '.join(f'{x:.3g}' for x in probe['top_singular_values'])})",
        f"model saved to {summary['output_dir']} (a plain HF model: AutoModelForCausalLM.from_pretrained)",
    ]
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        # TrainingArguments checks its own values (bf16 without support, bad strategies) with
        # ValueError while parsing: those are the user's input too.
        args = parse_args(argv)
        summary = main(*args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError and DataError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if args[4].process_index == 0:
        print("\n" + format_summary(summary))
    return PREEMPTED_EXIT if summary.get("preempted") else 0


if __name__ == "__main__":
    sys.exit(cli())
