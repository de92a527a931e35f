"""Fine-tune a causal LM with full fine-tuning, LoRA or PeriodicLoRA (PLoRA).

    python -m fastchat_plora.train_plora --config configs/demo_smollm2_gsm8k.yaml --output_dir runs/demo
    plora-train --data_path mix.jsonl --output_dir out --finetune_mode plora --unload_every_samples 4800

Reads top to bottom: check -> data -> model -> adapters -> trainer + callbacks -> train -> save.
The output directory ends as a plain HF model (base plus every merged update) with the run's
files beside it (`rundir.py`, docs/run_directory.md).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections import defaultdict

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

from fastchat_plora.adapters import add_adapters, compute_in_input_dtype, probe_layer
from fastchat_plora.args import parse_args, validate
from fastchat_plora.callback import (
    PLoRACallback,
    PreemptionCallback,
    RestoreBaseWeights,
    SamplesCallback,
    StopRequest,
    TrainingDiverged,
)
from fastchat_plora.checkpoint import base_checksum, check_resumable
from fastchat_plora.data import ChatRenderer, generation_prompts, make_dataset, use_prompt_format
from fastchat_plora.distributed import (
    check_only_adapters_train,
    check_supported,
    close_process_group,
    exit_without_finalizing,
    gathered,
    init_deepspeed_comm,
    uses_zero,
    weights_for,
)
from fastchat_plora.models import (
    DTYPES,
    compute_dtype,
    load_model,
    load_tokenizer,
    resolve_attention,
    resolve_model_path,
    save_model,
)
from fastchat_plora.plora import PAPER_STAGE_SAMPLES, StagePlan, steps_per_stage, update_rank
from fastchat_plora.rundir import RunDir
from fastchat_plora.sources import hold_out, load_prompts, load_training_data
from fastchat_plora.tracking import WandbPLoRACallback, finish_wandb, prepare_wandb, wandb_identity
from fastchat_plora.trainer import PLoRATrainer

logger = logging.getLogger("fastchat_plora")
PREEMPTED_EXIT = 143  # 128 + SIGTERM: stopped on request, checkpoint saved, not finished


def main(model_args, data_args, lora_args, plora_args, training_args) -> dict:
    """Train and save; returns the run summary. Every check runs before output_dir is written."""
    started, args = time.time(), (model_args, data_args, lora_args, plora_args, training_args)
    validate(*args)
    check_supported(training_args, plora_args.finetune_mode)  # a distributed setup the unload cannot work under
    run, settings = RunDir(training_args.output_dir), run_identity(args)
    resume, finished = resume_point(run, training_args, settings)
    if finished is not None:  # `auto` on a run that has finished: a requeued job with nothing left to do
        return finished
    if uses_zero(training_args):
        init_deepspeed_comm(training_args)
    conversations, held_out, samples = load_data(data_args, training_args.seed)  # bad data fails first

    model_path, tokenizer, model = load_base(model_args, data_args, training_args)
    adapted, plan = plora_args.finetune_mode != "full", stage_plan(lora_args, plora_args, training_args)
    weights = weights_for(training_args, {} if wants_compensation(plora_args, model_args) else None)
    if adapted:
        model = adapt(model, lora_args, plan, training_args)
        allocate_buffers(weights, model)  # from step 0: a run they do not fit fails now, not at the first unload
    probe = probe_layer(model, lora_args.targets)
    base_sum = base_checksum(model) if adapted else ""  # identifies W_0 in checkpoints
    if adapted and resume:
        check_resumable(resume, model, base_sum)  # before the run directory is touched
    trainable = trainable_parameters(model)
    dataset, eval_dataset = (
        make_dataset(c, tokenizer, data_args.model_max_length, data_args.conv_template) if c else None
        for c in (conversations, held_out)
    )
    prompts = generation_prompts(samples, ChatRenderer(tokenizer, data_args.conv_template))
    tags = [plora_args.finetune_mode] + ([f"r{lora_args.lora_r}"] if adapted else [])
    identity = wandb_identity(run.path, resume is not None, training_args.run_name, tags)
    wandb_env = prepare_wandb(training_args.report_to, identity)  # offline without a key; error without the package

    run.prepare(training_args.process_index == 0, resume, started, settings)
    stop = StopRequest(run.stop_file)
    callbacks = make_callbacks(args, plan, weights, run, stop, resume=resume, base_sum=base_sum,
                               wandb=wandb_env is not None, trainable=trainable, prompts=prompts)  # fmt: skip
    trainer = PLoRATrainer(
        model=model, args=training_args, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
        callbacks=list(callbacks.values()), data_collator=make_collator(tokenizer, training_args.padding_free),
        plan=plan if adapted else None, weights=weights, base_checksum=base_sum,
        labeled_logits_only=training_args.labeled_logits_only,
    )  # fmt: skip
    connect(callbacks, trainer)
    result = train(trainer, stop, resume, wandb_env)
    if stop.stopped_early(trainer.state):
        return {"preempted": True, "steps": trainer.state.global_step, "checkpoint": str(run.latest_checkpoint())}
    # The callback's final unload left every adapter merged and B = 0; drop the LoRA layers.
    final_model = model.unload() if adapted else model
    with gathered(final_model.parameters()):  # ZeRO-3: every weight whole on every rank, for rank 0 to save
        summary = summarize(trainer, result, plora_args.finetune_mode, plan, trainable, probe, final_model)
        if trainer.is_world_process_zero():
            save_run(run, trainer, final_model, tokenizer, summary, {"base_model": model_path, **as_dict(args)})
    return summary


def allocate_buffers(weights, model) -> None:
    """The Kahan buffers of the compensated merges this process keeps, created now (`plora.LocalWeights`)."""
    size = weights.allocate(model)
    if size:
        logger.info("merge compensation: %.3f MiB of Kahan buffers on this process", size / 2**20)


def load_base(model_args, data_args, training_args) -> tuple[str, object, torch.nn.Module]:
    """(model path, tokenizer, model): the prompt format is checked before the model loads, and `auto`
    attention is chosen for the dtype the layers will compute in."""
    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_path, data_args.model_max_length)
    use_prompt_format(tokenizer, data_args.conv_template, model_path)  # a missing format fails before any load
    compute = compute_dtype(model_args.model_dtype, training_args.bf16, training_args.fp16)
    attention = resolve_attention(model_args.attn_implementation, compute)
    return model_path, tokenizer, load_model(model_path, model_args.model_dtype, attention)


def connect(callbacks: dict, trainer: PLoRATrainer) -> None:
    """What the callbacks need of the Trainer once it exists: its evaluation (the held-out loss on both
    sides of every unload) and its mixed precision (sample replies)."""
    if trainer.eval_dataset is not None and "unloads" in callbacks:
        callbacks["unloads"].evaluate = trainer.evaluate
    if "samples" in callbacks:
        callbacks["samples"].autocast = trainer.accelerator.autocast


def train(trainer: PLoRATrainer, stop: StopRequest, resume, wandb_env):
    """trainer.train with the stop request (SIGTERM, the STOP file) listened to, and W&B closed whatever happens."""
    stop.install()
    try:
        return trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        stop.uninstall()
        if wandb_env is not None:
            finish_wandb(wandb_env)


def make_callbacks(
    args: tuple, plan, weights, run: RunDir, stop, *, resume, base_sum: str, wandb: bool, trainable: int, prompts
) -> dict:
    """Preemption; in lora/plora mode the unloads (and, resuming under ZeRO, the merged weights' restore);
    sample replies; the PLoRA keys, config and samples in W&B. Held by name, in the order they must run."""
    _, data_args, _, plora_args, training_args = args
    callbacks = {"preemption": PreemptionCallback(stop)}
    if plora_args.finetune_mode != "full":
        callbacks["unloads"] = PLoRACallback(
            plan, weights, run=run, save_stage_factors=plora_args.save_stage_factors, stop=stop,
            max_bad_stages=plora_args.max_bad_stages,
        )  # fmt: skip
        if resume and uses_zero(training_args):
            callbacks["restore"] = RestoreBaseWeights(resume, weights, base_sum)
    if prompts:  # after the unloads: a boundary's replies are the merged model's
        callbacks["samples"] = SamplesCallback(
            prompts, plan if plora_args.finetune_mode == "plora" else StagePlan(), run=run, stop=stop,
            max_new_tokens=data_args.sample_max_new_tokens, synced_gpus=uses_zero(training_args),
        )  # fmt: skip
    if wandb:
        config = {"trainable_parameters": trainable, **as_dict(args[:4])}
        events = callbacks["unloads"].events if "unloads" in callbacks else None
        samples = callbacks["samples"].rows if "samples" in callbacks else None
        callbacks["wandb"] = WandbPLoRACallback(config, events, run.path, samples)
    return callbacks


def resume_point(run: RunDir, training_args, settings: dict):
    """(the checkpoint this run resumes from or None, the summary of a finished run under `auto`),
    once the run directory is known to be this run's to write into."""
    auto = str(training_args.resume_from_checkpoint).lower() == "auto"
    if auto and (finished := run.summary()) is not None:
        run.check_identity(settings)
        logger.info("%s holds a finished run: nothing to resume", run.path)
        return None, finished
    resume = run.resume_point(training_args.resume_from_checkpoint)
    run.check_writable(training_args.overwrite_output_dir, resuming=resume is not None, auto=auto)
    if resume is not None:
        run.check_identity(settings)
    return resume, None


IDENTITY = {  # the settings a resumed run must share with the run it goes on with
    "model_name_or_path", "model_dtype", "finetune_mode", "lora_r", "lora_alpha", "lora_target_modules", "lora_init",
    "unload_every_steps", "unload_every_samples", "unload_momentum", "momentum_mode", "seed",
}  # fmt: skip


def run_identity(args: tuple) -> dict:
    return {key: value for key, value in as_dict(args).items() if key in IDENTITY}


def load_data(data_args, seed: int) -> tuple[list, list | None, list]:
    """The training conversations, the held-out ones (None without eval data), and the conversations
    whose prompts the sample replies answer (none when they are off)."""
    conversations = load_training_data(data_args.data_path, seed)
    held_out = None
    if data_args.eval_holdout:
        conversations, held_out = hold_out(conversations, data_args.eval_holdout)
    elif data_args.eval_data_path:
        held_out = load_training_data(data_args.eval_data_path, seed)
    samples, count = held_out or [], data_args.sample_prompts
    if data_args.sample_prompts_file:
        samples = load_prompts(data_args.sample_prompts_file)
        count = count or len(samples)
    return conversations[: data_args.max_train_samples], held_out, samples[:count]


def as_dict(arg_groups: tuple) -> dict:
    return {
        k: v for g in arg_groups for k, v in (g.to_dict() if hasattr(g, "to_dict") else dataclasses.asdict(g)).items()
    }


def save_run(run: RunDir, trainer, model, tokenizer, summary: dict, recorded_args: dict) -> None:
    """The final model (a plain HF model directory) and the run's files beside it."""
    save_model(model, tokenizer, run.path)
    run.write_run_files(recorded_args, summary, trainer.state.log_history)


def adapt(model, lora_args, plan: StagePlan, training_args):
    """The model with LoRA adapters; stage 0's A comes from the plan's generator, like every later stage's.

    On a bf16/fp16 base under --bf16/--fp16 the adapters take the layer input as it is (no fp32 copy per
    layer, `adapters.compute_in_input_dtype`); data parallel gets the DDP settings of a PEFT model.
    """
    low_precision = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    model = add_adapters(
        model, r=lora_args.lora_r, alpha=lora_args.lora_alpha, targets=lora_args.targets,
        generator=plan.generator(0), dropout=lora_args.lora_dropout, init=plan.init,
        recompute_dropout=lora_args.lora_dropout_recompute,
    )  # fmt: skip
    if low_precision and (training_args.bf16 or training_args.fp16 or uses_zero(training_args)):
        compute_in_input_dtype(model, adapters_in_base_dtype=uses_zero(training_args))
    if uses_zero(training_args):
        check_only_adapters_train(model)
    ddp_settings(training_args)
    return model


def ddp_settings(training_args) -> None:
    """DDP for an adapted model, unless set by the user: every adapter takes part in every step, so DDP need not
    search the graph for unused parameters (HF turns the search on for any model that is not a PreTrainedModel, as
    a PEFT model is not), and no buffer changes in training (the rotary frequencies), so none is broadcast."""
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = False
    if training_args.ddp_broadcast_buffers is None:
        training_args.ddp_broadcast_buffers = False


def stage_plan(lora_args, plora_args, training_args) -> StagePlan:
    """The stage arithmetic of this run; plain LoRA (and full fine-tuning) is one stage."""
    steps = None
    if plora_args.finetune_mode == "plora":
        global_batch = (
            training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps
            * training_args.world_size
        )
        every_steps, every_samples = plora_args.unload_every_steps, plora_args.unload_every_samples
        if every_steps is None and every_samples is None:
            every_samples = PAPER_STAGE_SAMPLES
            logger.info("plora: unloading every %d samples, the paper's stage length (--unload_every_samples)",
                        every_samples)  # fmt: skip
        steps = steps_per_stage(every_steps, every_samples, global_batch)
    return StagePlan(
        steps=steps,
        momentum=plora_args.unload_momentum,
        mode=plora_args.momentum_mode,
        init=lora_args.lora_init,
        seed=training_args.seed,
    )


def wants_compensation(plora_args, model_args) -> bool:
    """Compensated merges: asked for, or by default for bf16/fp16 base weights."""
    if plora_args.merge_compensation == "auto":
        return DTYPES[model_args.model_dtype] != torch.float32
    return plora_args.merge_compensation == "on"


def make_collator(tokenizer, padding_free: bool):
    """Padded batches (labels padded with -100), or one padding-free row per batch."""
    if padding_free:
        # position_ids restart at every conversation; attention then stays within each one
        return DataCollatorWithFlattening(return_position_ids=True)
    return DataCollatorForSeq2Seq(tokenizer, padding=True)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def loss_by_stage(log_history: list[dict], plan: StagePlan) -> dict[int, float]:
    """Mean logged training loss per stage (a single stage 0 for full and lora)."""
    losses = defaultdict(list)
    for entry in log_history:
        if "loss" in entry:
            losses[plan.stage_of(entry["step"])].append(entry["loss"])
    return {stage: sum(v) / len(v) for stage, v in sorted(losses.items())}


def summarize(trainer, result, mode: str, plan: StagePlan, trainable: int, probe: tuple, final_model) -> dict:
    """The run summary: steps, stages, losses, and the rank of W_T - W_0 for the probed layer."""
    probe_name, w0 = probe
    w_final = final_model.get_submodule(probe_name).weight
    rank = None
    if trainer.is_world_process_zero():  # one SVD, on the rank that reports it
        rank = dataclasses.asdict(update_rank(w_final.detach().cpu(), w0, w_final.dtype))
    plan = plan if mode == "plora" else StagePlan()
    return {
        "finetune_mode": mode,
        "trainable_parameters": trainable,
        "output_dir": trainer.args.output_dir,
        "steps": trainer.state.global_step,
        "stage_steps": plan.steps,
        "stages": plan.count(trainer.state.global_step),
        "train_loss": result.training_loss,
        "loss_by_stage": loss_by_stage(trainer.state.log_history, plan),
        "rank_probe": {"layer": probe_name, **(rank or {})},
    }


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
        model_args, data_args, lora_args, plora_args, training_args = parse_args(argv)
        summary = main(model_args, data_args, lora_args, plora_args, training_args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, DataError, RunDirError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    closed = close_process_group()
    if training_args.process_index == 0:
        print("\n" + format_summary(summary))
    code = PREEMPTED_EXIT if summary.get("preempted") else 0
    if closed:
        exit_without_finalizing(code)
    return code


if __name__ == "__main__":
    sys.exit(cli())
