"""Command-line and YAML arguments: the dataclasses, the parser, and the value checks.

A config file's keys are exactly the flag names; flags given on the command line override it. Its
values reach the dataclasses as YAML typed them (as HF's `parse_yaml_file` passes them), so a
mapping such as `lr_scheduler_kwargs: {min_lr: 1.0e-6}` works; a value of the wrong simple type is
an error naming the key. This module describes and checks values only: finding checkpoints is
`rundir.py`'s, and DeepSpeed's files are `distributed.py`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, IntervalStrategy
from transformers import TrainingArguments as HfTrainingArguments

from fastchat_plora.data import check_conv_template
from fastchat_plora.models import DTYPES, compute_dtype, flash_attention_available, known_attention
from fastchat_plora.plora import DEFAULT_INIT, INIT_METHODS, MOMENTUM_MODES

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # the paper's seven layers
FINETUNE_MODES = ("full", "lora", "plora")
INCLUDE_KEY = "include"  # a config key that reads another config first


class ConfigError(ValueError):
    """An argument or config value that cannot work; the message names the key and the value."""


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id, local HF directory or .gguf file. Default: the embedded SmolLM2-135M-Instruct."},
    )
    model_dtype: str = field(
        default="float32",
        metadata={"help": f"Dtype the base weights are loaded in: {', '.join(DTYPES)}. Use --bf16 for autocast."},
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "Attention kernel: auto (flash_attention_2 where flash-attn runs: an Ampere or newer GPU, "
            "bf16/fp16 compute; else sdpa), or any name transformers takes: sdpa, eager, flash_attention_2, "
            "flash_attention_3, flex_attention, a hub kernel such as kernels-community/flash-attn2."
        },
    )


@dataclass
class DataArguments:
    data_path: list[str] | None = field(
        default=None,
        metadata={
            "help": "Training data: files (JSON or JSONL; ShareGPT, OpenAI messages or Alpaca records) or "
            "hub:ID[:SPLIT]; several make a seeded mix, each optionally =COUNT or =WEIGHT (docs/data.md)."
        },
    )
    conv_template: str | None = field(
        default=None,
        metadata={
            "help": "FastChat template name (e.g. vicuna_v1.1, FastChat's format for LLaMA); the saved tokenizer then "
            "carries a chat template that renders the same. Default: the tokenizer's own chat template."
        },
    )
    model_max_length: int = field(default=1024, metadata={"help": "Conversations are truncated to this many tokens."})
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Train on the first N conversations only (the mix files are shuffled when built)."},
    )
    eval_data_path: list[str] | None = field(
        default=None,
        metadata={
            "help": "Held-out conversations (the formats and mixes of data_path): their loss is computed at every "
            "stage boundary, before and after the unload, and every --eval_steps."
        },
    )
    eval_holdout: int | None = field(
        default=None,
        metadata={"help": "Hold out the last N conversations of the training data as eval data instead."},
    )
    sample_prompts: int = field(
        default=0,
        metadata={
            "help": "Greedy replies to N fixed prompts (the first N eval conversations, or --sample_prompts_file) "
            "before training, after every unload and at the end, in OUTPUT_DIR/samples.jsonl and a W&B table. "
            "0: off (all of the file's prompts when a file is given)."
        },
    )
    sample_prompts_file: str | None = field(
        default=None,
        metadata={
            "help": "Prompts for --sample_prompts: conversations in a data_path format (each up to its first "
            "reply), or a .txt file with one user message a line."
        },
    )
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Length limit of each sample reply."})


@dataclass
class LoraArguments:
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r (the paper: 1 and 8)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_dropout_recompute: bool = field(
        default=True,
        metadata={"help": "Redraw the LoRA dropout mask in backward instead of keeping a dropped-out copy of each "
                  "adapted layer's input (same results, much less activation memory)."},
    )  # fmt: skip
    lora_target_modules: str = field(
        default=ALL_LINEAR, metadata={"help": "Comma-separated module names to adapt (default: all seven linear)."}
    )
    lora_init: str = field(
        default=DEFAULT_INIT, metadata={"help": f"How A is drawn at each stage: {', '.join(INIT_METHODS)}."}
    )

    @property
    def targets(self) -> list[str]:
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]


@dataclass
class PLoRAArguments:
    finetune_mode: str = field(
        default="plora", metadata={"help": "full (all weights), lora (one adapter), or plora (periodic unloading)."}
    )
    unload_every_steps: int | None = field(
        default=None, metadata={"help": "plora: unload every K optimizer steps (give this or the next)."}
    )
    unload_every_samples: int | None = field(
        default=None,
        metadata={
            "help": "plora: unload every N training samples, counted in optimizer steps. Default, when neither "
            "this nor unload_every_steps is given: the paper's 4800."
        },
    )
    unload_momentum: float = field(
        default=0.0, metadata={"help": "Momentum m in [0, 1): merge (1 - m) of B·A, keep the rest in the adapter."}
    )
    momentum_mode: str = field(
        default="preserve",
        metadata={
            "help": "preserve: adapter keeps m·BA, output unchanged; paper: A,B scaled by m (keeps m²·BA); "
            "refresh: B scaled by m, A <- m·A + (1 - m)·A_new (a fresh draw)."
        },
    )
    merge_compensation: str = field(
        default="auto",
        metadata={
            "help": "Kahan-compensated merges into bf16/fp16 base weights (auto: on for those dtypes; on; off). "
            "Costs one buffer of the weights' dtype per adapted weight."
        },
    )
    save_stage_factors: bool = field(
        default=True,
        metadata={
            "help": "Keep each merge's factors in OUTPUT_DIR/stages/ (fp32; per stage, the adapter's size): "
            "checkpoints resume by replaying them, and python -m fastchat_plora.export writes the whole update "
            "as one LoRA adapter from them."
        },
    )
    max_bad_stages: int = field(
        default=3, metadata={"help": "Stop after this many consecutive stages end with NaN/Inf adapters."}
    )


@dataclass
class TrainingArguments(HfTrainingArguments):
    """HF's TrainingArguments with the paper's defaults and the flags transformers 5 dropped."""

    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (paper: 1e-4)."})
    lr_scheduler_type: str = field(
        default="constant", metadata={"help": "Schedule; in plora mode it restarts at every stage (paper: constant)."}
    )
    adam_beta2: float = field(default=0.99, metadata={"help": "AdamW beta2 (paper: 0.99)."})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N steps."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an --output_dir that already holds a run."}
    )
    if "train_sampling_strategy" in {f.name for f in dataclasses.fields(HfTrainingArguments)}:  # transformers 5
        train_sampling_strategy: str = field(
            default="group_by_length",
            metadata={
                "help": "HF's sampler: group_by_length (default here: batches of similar length, less padding), "
                "random, sequential, batch_rebalance."
            },
        )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Concatenate each batch into one row with per-conversation positions, no padding "
            "(pays off with --attn_implementation flash_attention_2; SDPA then needs a dense block mask)."
        },
    )
    labeled_logits_only: bool = field(
        default=True, metadata={"help": "Run the LM head and the loss on labeled positions only."}
    )


ARG_CLASSES = (ModelArguments, DataArguments, LoraArguments, PLoRAArguments, TrainingArguments)


def arg_types() -> dict[str, object]:
    """Flag name -> the type its dataclass field declares, resolved."""
    types = {}
    for cls in ARG_CLASSES:
        hints = typing.get_type_hints(cls)
        types.update({f.name: hints.get(f.name, object) for f in dataclasses.fields(cls) if f.init})
    return types


def field_names() -> set[str]:
    return set(arg_types())


def load_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config whose keys are flag names; unknown keys are errors naming the key.

    `include: other.yaml` (a path relative to this file, or a list of them) reads shared settings
    first; this file's own keys override them. The experiment configs use it so that each file
    shows only what sets its run apart.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"config {path} includes itself (through {' -> '.join(str(p) for p in _seen)})")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(config, dict):
        raise ConfigError(f"config {path} must be a mapping of flag names to values")
    includes = config.pop(INCLUDE_KEY, None) or []
    merged = {}
    for included in [includes] if isinstance(includes, str) else includes:
        merged.update(load_config(path.parent / included, (*_seen, path.resolve())))
    types = arg_types()
    for key, value in config.items():
        if key not in types:
            raise ConfigError(f"unknown config key {key!r} in {path}")
        check_value_type(key, value, types[key], path)
    if isinstance(config.get("lora_target_modules"), list):
        config["lora_target_modules"] = ",".join(config["lora_target_modules"])
    for key in ("data_path", "eval_data_path"):  # one source, or a list of them
        if isinstance(config.get(key), str):
            config[key] = [config[key]]
    merged.update(config)
    return merged


SIMPLE_TYPES = {int: (int,), float: (int, float), bool: (bool,)}


def check_value_type(key: str, value: object, declared: object, path: Path) -> None:
    """A YAML value of the wrong simple type (`lora_r: 8.5`, `max_steps: many`) is an error naming the key.

    Strings are left to argparse, which converts them as it converts flags; mappings and lists go
    to the dataclass as they are, as HF's own YAML parsing passes them.
    """
    if value is None or isinstance(value, (str, dict, list)):
        return
    options = [t for t in (typing.get_args(declared) or (declared,)) if t is not type(None)]
    accepted = tuple(a for t in options for a in SIMPLE_TYPES.get(t, (object,)))
    if isinstance(value, bool) and bool not in options and object not in accepted:
        accepted = ()  # YAML's true/false is no number
    if not isinstance(value, accepted):
        expected = " or ".join(getattr(t, "__name__", str(t)) for t in options)
        raise ConfigError(f"{key}={value!r} in {path}: expected {expected}")


def parse_args(argv: list[str] | None = None) -> tuple:
    """Parse flags over an optional --config YAML; returns the five argument dataclasses.

    The config's entries become the parser's defaults, so flags given on the command line override
    them, and they reach the dataclasses typed as YAML typed them.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--deepspeed", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = HfArgumentParser(ARG_CLASSES)
    parser.add_argument("--config", default=None, help="YAML file whose keys are these flag names.")
    config = load_config(known.config) if known.config else {}
    if known.config:
        # the W&B run (and any other tracker) is named after the config and the seed unless told otherwise
        parser.set_defaults(run_name=Path(known.config).stem, **config)
    deepspeed = config.get("deepspeed") if known.deepspeed is None else known.deepspeed  # "" turns it off
    if deepspeed and importlib.util.find_spec("deepspeed") is None:  # else TrainingArguments' traceback
        raise ConfigError(f"deepspeed={deepspeed} needs the deepspeed package: pip install -e '.[gpu]'")
    if isinstance(deepspeed, str) and deepspeed and not Path(deepspeed).is_file():  # else accelerate's traceback
        raise ConfigError(f"deepspeed={deepspeed}: no such config file")
    parsed = parser.parse_args_into_dataclasses(args=argv)[: len(ARG_CLASSES)]
    training = parsed[-1]
    if known.config and training.run_name == Path(known.config).stem:
        training.run_name = f"{training.run_name}-seed{training.seed}"
    if training.eval_steps is not None and training.eval_strategy == IntervalStrategy.NO:
        # --eval_steps alone asks for evaluation every that many steps (HF's would ignore it)
        training.eval_strategy, training.do_eval = IntervalStrategy.STEPS, True
        if training.eval_steps > 1:
            training.eval_steps = int(training.eval_steps)
    return tuple(parsed)


def validate(model_args, data_args, lora_args, plora_args, training_args, elsewhere: bool = False) -> None:
    """Check every argument that can be checked before loading anything; raise ConfigError.

    elsewhere: the run will start on another machine (a login node checking a GPU job), so what depends
    on this machine's GPU is not checked.
    """
    mode = plora_args.finetune_mode
    if mode not in FINETUNE_MODES:
        raise ConfigError(f"finetune_mode={mode!r}: expected one of {FINETUNE_MODES}")
    if model_args.model_dtype not in DTYPES:
        raise ConfigError(f"model_dtype={model_args.model_dtype!r}: expected one of {tuple(DTYPES)}")
    check_attention(model_args, training_args, elsewhere)
    if mode == "full" and model_args.model_dtype != "float32" and not training_args.deepspeed:
        raise ConfigError(
            f"finetune_mode=full with model_dtype={model_args.model_dtype}: AdamW would update those weights "
            "with no fp32 master copy (small updates round away); use --deepspeed configs/ds/zero3.json (fp32 "
            "masters and Adam state partitioned across the GPUs: what a 7B model needs), or, where fp32 weights, "
            "gradients and Adam state fit on each device (16 bytes a parameter: up to about 4B parameters on an "
            "80 GB card, before activations), --model_dtype float32 --bf16 True"
        )
    if not data_args.data_path:
        raise ConfigError("data_path is required (a JSON/JSONL file of conversations, e.g. the mix of data_prep/)")
    if data_args.conv_template is not None:
        check_conv_template(data_args.conv_template)
    if data_args.model_max_length <= 0:
        raise ConfigError(f"model_max_length={data_args.model_max_length}: must be positive")
    if data_args.max_train_samples is not None and data_args.max_train_samples <= 0:
        raise ConfigError(f"max_train_samples={data_args.max_train_samples}: must be positive")
    check_eval(data_args, training_args)
    if data_args.sample_prompts < 0:
        raise ConfigError(f"sample_prompts={data_args.sample_prompts}: must be 0 (off) or positive")
    if data_args.sample_max_new_tokens <= 0:
        raise ConfigError(f"sample_max_new_tokens={data_args.sample_max_new_tokens}: must be positive")
    has_eval_data = data_args.eval_holdout is not None or bool(data_args.eval_data_path)
    if data_args.sample_prompts and not (data_args.sample_prompts_file or has_eval_data):
        raise ConfigError(
            f"sample_prompts={data_args.sample_prompts} takes its prompts from eval data: pass --eval_data_path, "
            "--eval_holdout or --sample_prompts_file"
        )
    if mode != "full":
        if lora_args.lora_r <= 0:
            raise ConfigError(f"lora_r={lora_args.lora_r}: must be a positive integer")
        if not 0.0 <= lora_args.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={lora_args.lora_dropout}: must be in [0, 1)")
        if not lora_args.targets:
            raise ConfigError(f"lora_target_modules={lora_args.lora_target_modules!r}: names no module")
        if lora_args.lora_init not in INIT_METHODS:
            raise ConfigError(f"lora_init={lora_args.lora_init!r}: expected one of {INIT_METHODS}")
    if mode == "plora":
        steps, samples = plora_args.unload_every_steps, plora_args.unload_every_samples
        if steps is not None and samples is not None:
            raise ConfigError(
                f"plora mode takes one of unload_every_steps and unload_every_samples, not both "
                f"(got unload_every_steps={steps}, unload_every_samples={samples})"
            )
        for key, value in (("unload_every_steps", steps), ("unload_every_samples", samples)):
            if value is not None and value <= 0:
                raise ConfigError(f"{key}={value}: must be positive")
        if not 0.0 <= plora_args.unload_momentum < 1.0:
            raise ConfigError(f"unload_momentum={plora_args.unload_momentum}: must be in [0, 1)")
        if plora_args.momentum_mode not in MOMENTUM_MODES:
            raise ConfigError(f"momentum_mode={plora_args.momentum_mode!r}: expected one of {MOMENTUM_MODES}")
    if mode != "full" and not plora_args.save_stage_factors and training_args.save_strategy != "no":
        raise ConfigError(
            "save_stage_factors=False with checkpoints: a LoRA/PLoRA checkpoint replays the stage files on resume; "
            "keep --save_stage_factors True or pass --save_strategy no"
        )
    if plora_args.merge_compensation not in ("auto", "on", "off"):
        raise ConfigError(f"merge_compensation={plora_args.merge_compensation!r}: expected auto, on or off")
    if plora_args.max_bad_stages < 1:
        raise ConfigError(f"max_bad_stages={plora_args.max_bad_stages}: must be at least 1")
    if training_args.output_dir is None:
        raise ConfigError("output_dir is required")


def check_attention(model_args, training_args, elsewhere: bool = False) -> None:
    """An attention transformers knows; flash-attention only where it is installed (and, unless the run
    starts elsewhere, a CUDA GPU is here), on bf16/fp16 compute."""
    attention = model_args.attn_implementation
    if not known_attention(attention):
        raise ConfigError(
            f"attn_implementation={attention!r}: transformers has no such attention; expected auto, eager, sdpa, "
            "flash_attention_2, flash_attention_3, flex_attention or a hub kernel (org/name)"
        )
    installed = importlib.util.find_spec("flash_attn") is not None if elsewhere else flash_attention_available()
    if attention == "flash_attention_2" and not installed:
        raise ConfigError(
            "attn_implementation=flash_attention_2 needs flash-attn on a CUDA GPU "
            "(pip install flash-attn --no-build-isolation, docs/clusters.md); use auto or sdpa"
        )
    compute = compute_dtype(model_args.model_dtype, training_args.bf16, training_args.fp16)
    if attention.startswith("flash_attention") and compute == torch.float32:
        raise ConfigError(
            f"attn_implementation={attention} with model_dtype={model_args.model_dtype} and no --bf16/--fp16: the "
            "layers would compute in fp32, which flash-attention does not take; add --bf16 True, or use sdpa"
        )


def check_eval(data_args, training_args) -> None:
    """Eval data from one place, and eval steps only with eval data."""
    holdout, has_path = data_args.eval_holdout, bool(data_args.eval_data_path)
    if holdout is not None and has_path:
        raise ConfigError(f"eval_holdout={holdout} and eval_data_path: give one of them")
    if holdout is not None and holdout <= 0:
        raise ConfigError(f"eval_holdout={holdout}: must be positive")
    strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    if (strategy != "no" or training_args.eval_steps is not None) and holdout is None and not has_path:
        raise ConfigError(
            f"eval_strategy={strategy} (eval_steps={training_args.eval_steps}) needs eval data: "
            "pass --eval_data_path FILE or --eval_holdout N"
        )


def check_configs(paths: list[str], flags: list[str] = ()) -> list[tuple]:
    """Parse and validate configs as a run would, each with `flags` after it, without loading anything;
    return each one's argument dataclasses; raise ConfigError.

    Used by the launch scripts before they start a job. Without a GPU here (a login node) the job is
    checked as one that starts elsewhere: --use_cpu is added, since TrainingArguments refuses a GPU
    config's bf16 there, and flash-attn need only be installed.
    """
    import os
    import tempfile

    import torch

    here = torch.cuda.is_available()
    device_flags = [] if here else ["--use_cpu", "True"]
    checked = []
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"config not found: {path}")
        with tempfile.TemporaryDirectory() as scratch:
            args = parse_args(["--config", path, "--output_dir", os.path.join(scratch, "run"), *device_flags, *flags])
        validate(*args, elsewhere=not here)
        checked.append(args)
    return checked


if __name__ == "__main__":
    try:
        check_configs(sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{len(sys.argv) - 1} config(s) valid")
