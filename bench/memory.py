"""Per-GPU memory of a training run, by part, before any GPU is touched.

    python -m bench.memory --model llama-7b --finetune_mode plora --lora_r 8 \
        --per_device_train_batch_size 3 --model_max_length 2048 --gpus 8 [--card_gib 80] [--activation_checkpointing]
    python -m bench.memory --calibrate        # re-measure the activation table below on this CPU

The model is built on the meta device from its config (a hub id, a local directory, or the built-in
shape ``llama-7b``: no weights are read), and the parts are added up for plain data parallel (DDP),
ZeRO-2 and ZeRO-3 at ``--gpus`` GPUs:

- weights: the base weights (ZeRO-3: a 1/G share);
- trainable + AdamW: the trainable parameters, their gradients and AdamW's two moments (ZeRO: the
  fp32 masters, moments and gradient partitions are 1/G shares; DDP: a gradient bucket copy too);
- compensation: the Kahan buffers of bf16/fp16 merges, one per adapted weight, shared out among the
  ranks (`distributed.py`);
- activations: tokens x layers x the bytes a token keeps per layer (`ACTIVATIONS`, calibrated), or
  with --activation_checkpointing each layer's input plus one layer's activations;
- head + loss: the LM head and cross-entropy's working memory (one process: labeled positions
  only, 64 MiB of logits at a time; DDP/ZeRO: the logits of the labeled positions, in full);
- workspace: ZeRO-3's gathered layers, and a fixed allowance for cuBLAS workspaces, communication
  buckets and allocator rounding on a GPU.

It prints each part in GiB and the largest per-device batch that fits ``--card_gib``. What it counts is
what ``torch.cuda.max_memory_allocated`` counts; the CUDA context and NCCL's own buffers (about 1 GiB)
come on top. ``--measure`` runs the training briefly instead (tiny models, a GPU, or the CPU: live
tensors plus the step's peak) and prints the measured peak beside the estimate.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

GIB = 2**30
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {  # built-in shapes, so that the tables need no download; tiny-llama for --measure on a CPU
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "tiny-llama": dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}  # fmt: skip
# Bytes a token keeps for backward in one decoder layer: per unit of hidden size (h), of the key/value
# width (kv), of the MLP width (i), per LoRA rank per adapted layer (r), and a constant. Keyed by
# (weights' dtype, compute dtype, what trains). Measured with `calibrate` (saved tensors, counted once
# per storage, over 2 and 4 layers and 256 and 512 tokens of tiny LLaMAs of four shapes, SDPA on the
# CPU): every coefficient came out a whole number of bytes. The residual stream stays in the weights'
# dtype, the norms keep an fp32 copy of their input, and full fine-tuning also keeps the norms' inputs
# for their weights' gradients.
ACTIVATIONS = {
    ("bf16", "bf16", "adapters"): dict(h=16, kv=4, i=8, r=2, const=24),  # the paper's LoRA/PLoRA
    ("fp32", "bf16", "adapters"): dict(h=24, kv=4, i=8, r=2, const=24),  # small configs with --bf16
    ("fp32", "fp32", "adapters"): dict(h=24, kv=8, i=16, r=4, const=24),  # the CPU
    ("bf16", "bf16", "full"): dict(h=20, kv=4, i=8, r=0, const=24),  # ZeRO full fine-tuning
    ("fp32", "bf16", "full"): dict(h=30, kv=4, i=8, r=0, const=24),
    ("fp32", "fp32", "full"): dict(h=32, kv=8, i=16, r=0, const=24),
}
GPU_WORKSPACE = 1.0 * GIB  # cuBLAS workspaces, communication buckets, allocator rounding (checked on a GPU)
LOSS_CHUNK = 64 * 2**20  # loss.CHUNK_BYTES: the fp32 logits the one-process head holds at a time


@dataclass
class Run:
    """What the estimate needs of a run: the model's shape and the training settings."""

    config: object  # a transformers PretrainedConfig
    finetune_mode: str = "plora"
    lora_r: int = 8
    targets: tuple[str, ...] = LINEAR
    batch: int = 3
    length: int = 2048
    gpus: int = 8
    weights_dtype: str = "bf16"
    compute: str = "bf16"
    activation_checkpointing: bool = False
    compensation: bool = True
    device: str = "cuda"


COUNTS: dict[tuple, tuple[int, int, dict[str, int]]] = {}  # the estimate is asked for many batch sizes


def parameter_counts(config, adapters: bool, r: int, targets: tuple[str, ...]) -> tuple[int, int, dict[str, int]]:
    """(trainable, frozen, adapted weight sizes by layer) of the model as training adapts it, built on the meta
    device: shapes only, nothing read."""
    key = (config.to_json_string(), adapters, r, targets)
    if key not in COUNTS:
        COUNTS[key] = meta_counts(config, adapters, r, targets)
    return COUNTS[key]


def meta_counts(config, adapters: bool, r: int, targets: tuple[str, ...]) -> tuple[int, int, dict[str, int]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if adapters:
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, target_modules=list(targets)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if adapters else model.num_parameters()
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) if adapters else 0
    return trainable, frozen, adapted_weights(model) if adapters else {}


def adapted_weights(model) -> dict[str, int]:
    """Layer name -> element count of the adapted base weights."""
    from peft.tuners.lora import LoraLayer

    return {n: m.get_base_layer().weight.numel() for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def largest_share(sizes: dict[str, int], ranks: int) -> int:
    """The most elements one rank keeps when ``sizes`` are shared out as training shares them."""
    from fastchat_plora.distributed import share_out

    load = [0] * ranks
    for name, rank in share_out(sizes, ranks).items():
        load[rank] += sizes[name]
    return max(load)


BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def estimate(run: Run, strategy: str) -> dict[str, float]:
    """Per-GPU bytes by part for ``strategy`` (single, ddp, zero2, zero3); see the module docstring.

    Full fine-tuning without ZeRO keeps fp32 weights (bf16 ones would have no fp32 master: training
    refuses them), computing in bf16 under autocast.
    """
    if run.finetune_mode == "full" and strategy in ("single", "ddp") and run.weights_dtype != "fp32":
        run = dataclasses.replace(run, weights_dtype="fp32")
    c, g = run.config, run.gpus if strategy != "single" else 1
    adapters = run.finetune_mode != "full"
    trainable, frozen, adapted = parameter_counts(c, adapters, run.lora_r, run.targets)
    w = BYTES[run.weights_dtype]
    zero3 = strategy == "zero3"
    parts = {"weights": (frozen if adapters else 0) * w / (g if zero3 else 1)}
    if strategy in ("ddp", "single"):  # fp32 trainables (adapters, or fp32 weights), gradients, 2 moments, buckets
        bucket = 4 if strategy == "ddp" else 0
        parts["trainable + AdamW"] = trainable * (4 + 4 + 8 + bucket)
    else:  # bf16 params and gradients (ZeRO-3: partitioned), fp32 masters + moments + gradient partitions
        parts["trainable + AdamW"] = trainable * ((2 + 2) / (g if zero3 else 1) + (4 + 8 + 4) / g)
    sizes = adapted if adapters and run.compensation and w == 2 else {}
    parts["compensation"] = 2 * (sum(sizes.values()) / g if zero3 else largest_share(sizes, g))
    parts["activations"] = activations(run)
    parts["head + loss"] = head_and_loss(run, wrapped=strategy != "single")
    layer = (frozen + trainable) / c.num_hidden_layers
    workspace = GPU_WORKSPACE if run.device == "cuda" else 0.0
    parts["workspace"] = workspace + (2 * layer * w if zero3 else 0.0)  # ZeRO-3: this layer and the prefetched one
    if not adapters and run.weights_dtype == "fp32" and run.compute != "fp32":
        parts["workspace"] += 2 * (frozen + trainable)  # autocast's bf16 copies of the weights, for one step
    return parts


def per_token_per_layer(run: Run) -> float:
    c = run.config
    kind = "adapters" if run.finetune_mode != "full" else "full"
    coefficients = ACTIVATIONS[(run.weights_dtype if run.weights_dtype != "fp16" else "bf16", run.compute, kind)]
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    r = run.lora_r * len(run.targets) if kind == "adapters" else 0
    return (coefficients["h"] * c.hidden_size + coefficients["kv"] * kv + coefficients["i"] * c.intermediate_size
            + coefficients["r"] * r + coefficients["const"])  # fmt: skip


def activations(run: Run) -> float:
    tokens, layers = run.batch * run.length, run.config.num_hidden_layers
    full = per_token_per_layer(run)
    if not run.activation_checkpointing:
        return tokens * layers * full
    return tokens * (layers * BYTES[run.weights_dtype] * run.config.hidden_size + full)  # inputs + one layer


def head_and_loss(run: Run, wrapped: bool) -> float:
    """Upper bound: every position labeled. One process: the labeled hidden states, their gradient and a 64 MiB
    chunk of logits; wrapped (DDP, ZeRO): the logits in the compute dtype, an fp32 copy and its gradient."""
    tokens, c = run.batch * run.length, run.config
    if wrapped:
        return tokens * c.vocab_size * (BYTES[run.compute] + 4 + 4)
    return tokens * c.hidden_size * 2 * BYTES[run.compute] + min(LOSS_CHUNK, tokens * c.vocab_size * 4)


def largest_batch(run: Run, strategy: str, card: float, most: int = 1024) -> int:
    """The largest per-device batch (up to ``most``) whose estimate fits ``card`` bytes; 0 when not even 1 fits."""
    low, high = 0, most  # the estimate grows with the batch: bisect
    while low < high:
        batch = (low + high + 1) // 2
        if sum(estimate(dataclasses.replace(run, batch=batch), strategy).values()) <= card:
            low = batch
        else:
            high = batch - 1
    return low


def load_config(name: str):
    from transformers import AutoConfig, LlamaConfig

    if name in SHAPES:
        return LlamaConfig(**SHAPES[name])
    return AutoConfig.from_pretrained(name)


def table(run: Run, card_gib: float) -> str:
    strategies = ("ddp", "zero2", "zero3") if run.gpus > 1 else ("single",)
    estimates = {s: estimate(run, s) for s in strategies}
    lines = ["| part (GiB per GPU) | " + " | ".join(strategies) + " |", "|---|" + "---|" * len(strategies)]
    for part in estimates[strategies[0]]:
        lines.append(f"| {part} | " + " | ".join(f"{estimates[s][part] / GIB:.2f}" for s in strategies) + " |")
    totals = [f"**{sum(estimates[s].values()) / GIB:.1f}**" for s in strategies]
    lines.append("| **total** | " + " | ".join(totals) + " |")
    fits = [largest_batch(run, s, card_gib * GIB) for s in strategies]
    lines.append(f"| largest batch on {card_gib:g} GiB | " + " | ".join(map(str, fits)) + " |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-7b", help=f"hub id, local directory, or a built-in shape: "
                        f"{', '.join(SHAPES)}")  # fmt: skip
    parser.add_argument("--finetune_mode", default="plora", choices=("full", "lora", "plora"))
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_target_modules", default=",".join(LINEAR))
    parser.add_argument("--per_device_train_batch_size", type=int, default=3)
    parser.add_argument("--model_max_length", type=int, default=2048, help="tokens per row (rows padded to it)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in the job (nodes x GPUs per node)")
    parser.add_argument("--model_dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--compute", default="bf16", choices=("bf16", "fp32"),
                        help="the layers' compute dtype (bf16: --bf16 or bf16 weights)")  # fmt: skip
    parser.add_argument("--activation_checkpointing", action="store_true")
    parser.add_argument("--merge_compensation", default="auto", choices=("auto", "off"))
    parser.add_argument("--card_gib", type=float, default=80.0, help="memory of one GPU, for the largest batch")
    parser.add_argument("--calibrate", action="store_true", help="measure the ACTIVATIONS table on this CPU")
    parser.add_argument(
        "--measure",
        action="store_true",
        help="also train 3 steps of random tokens on one device "
        "(a GPU if there is one; PLoRA unloads inside) and print the measured peak beside the estimate",
    )
    return parser.parse_args(argv)


def run_from(args: argparse.Namespace) -> Run:
    weights = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[args.model_dtype]
    for value, name in ((args.lora_r, "lora_r"), (args.per_device_train_batch_size, "per_device_train_batch_size"),
                        (args.model_max_length, "model_max_length"), (args.gpus, "gpus")):  # fmt: skip
        if value <= 0:
            raise ValueError(f"{name}={value}: must be positive")
    return Run(
        config=load_config(args.model), finetune_mode=args.finetune_mode, lora_r=args.lora_r,
        targets=tuple(t for t in args.lora_target_modules.split(",") if t), batch=args.per_device_train_batch_size,
        length=args.model_max_length, gpus=args.gpus, weights_dtype=weights,
        compute="bf16" if weights != "fp32" else args.compute, activation_checkpointing=args.activation_checkpointing,
        compensation=args.merge_compensation == "auto",
    )  # fmt: skip


def tiny_config(hidden: int, kv_heads: int, intermediate: int, layers: int, vocab: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=False)  # fmt: skip


def saved_bytes(config, weights: str, compute: str, trains: str, tokens: int, r: int = 2) -> int:
    """Bytes the decoder keeps for backward over one row of ``tokens`` tokens, each storage counted once."""
    from transformers import AutoModelForCausalLM

    from fastchat_plora.adapters import add_adapters, compute_in_input_dtype
    from fastchat_plora.plora import stage_generator

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if weights == "fp32" else torch.bfloat16)
    if trains == "adapters":
        model = add_adapters(model, r=r, alpha=2 * r, targets=list(LINEAR), generator=stage_generator(0, 0))
        if weights != "fp32":
            compute_in_input_dtype(model)
        model = model.get_base_model()
    storages: dict[int, int] = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    # bf16 compute is autocast's, but for full fine-tuning of bf16 weights (DeepSpeed: bf16 through and through)
    autocast = torch.autocast(
        "cpu", dtype=torch.bfloat16, enabled=compute == "bf16" and (weights, trains) != ("bf16", "full")
    )
    with autocast, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model.model(input_ids=ids)
    return sum(storages.values())


def calibrate(weights: str, compute: str, trains: str) -> dict[str, float]:
    """The ACTIVATIONS entry, measured: per layer and per token (differences over 2 and 4 layers and 256 and
    512 tokens remove what is per model or per layer, e.g. the weights the matmuls keep) for four shapes,
    and rank 2 against rank 4 for the adapters' own term."""

    def per_token_per_layer(hidden=64, kv_heads=2, intermediate=128, r=2):
        def per_layer(tokens):
            two, four = (saved_bytes(tiny_config(hidden, kv_heads, intermediate, n), weights, compute, trains,
                                     tokens, r) for n in (2, 4))  # fmt: skip
            return (four - two) / 2

        return (per_layer(512) - per_layer(256)) / 256

    base = per_token_per_layer()  # h 64, kv 32, i 128, r 2
    kv = (per_token_per_layer(kv_heads=4) - base) / 32
    i = (per_token_per_layer(intermediate=256) - base) / 128
    h = (per_token_per_layer(hidden=128) - base - 32 * kv) / 64  # kv doubles with h (4 heads)
    r = (per_token_per_layer(r=4) - base) / (2 * len(LINEAR)) if trains == "adapters" else 0.0
    const = base - 64 * h - 32 * kv - 128 * i - 2 * len(LINEAR) * r
    return {"h": h, "kv": kv, "i": i, "r": r, "const": const}


def print_calibration() -> None:
    for key in ACTIVATIONS:
        measured = calibrate(*key)
        print(f"{key}: " + ", ".join(f"{name}={value:g}" for name, value in measured.items()))


def measure(run: Run, steps: int = 3) -> float:
    """Peak bytes of ``steps`` training steps in this process, our Trainer on random tokens (every position
    labeled; PLoRA unloads after step ``steps - 1``, inside the window).

    On a GPU (``run.device == "cuda"``): ``torch.cuda.max_memory_allocated``. On the CPU: the live tensors
    (weights, adapters, AdamW state, Kahan buffers) when the last step starts, plus the most that step's
    allocations held at once (the CPU allocator's own events, through the profiler).
    """
    import tempfile

    from transformers import AutoModelForCausalLM

    from fastchat_plora.adapters import add_adapters, compute_in_input_dtype
    from fastchat_plora.args import TrainingArguments
    from fastchat_plora.callback import PLoRACallback
    from fastchat_plora.data import SupervisedDataset
    from fastchat_plora.plora import LocalWeights, StagePlan
    from fastchat_plora.trainer import PLoRATrainer

    torch.manual_seed(0)
    cuda = run.device == "cuda"
    model = AutoModelForCausalLM.from_config(run.config, dtype=torch.float32 if run.weights_dtype == "fp32" else
                                             torch.bfloat16).to("cuda" if cuda else "cpu")  # fmt: skip
    weights, plan = LocalWeights({} if run.compensation else None), StagePlan(steps=steps - 1)
    callbacks = [PeakOnCpu(steps, weights)] if not cuda else []
    if run.finetune_mode != "full":
        model = add_adapters(model, r=run.lora_r, alpha=16, targets=list(run.targets), generator=plan.generator(0))
        if run.weights_dtype != "fp32" and run.compute == "bf16":
            compute_in_input_dtype(model)
        weights.allocate(model)
        callbacks += [PLoRACallback(plan, weights)] if run.finetune_mode == "plora" else []
    rows = torch.randint(0, run.config.vocab_size, (steps * run.batch, run.length)).tolist()
    dataset = SupervisedDataset([{"input_ids": row, "labels": list(row)} for row in rows])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=run.batch,
                                     save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=not cuda,
                                     bf16=run.compute == "bf16", train_sampling_strategy="sequential",
                                     logging_steps=steps)  # fmt: skip
        trainer = PLoRATrainer(model=model, args=training, train_dataset=dataset, callbacks=callbacks, weights=weights,
                               plan=plan if run.finetune_mode == "plora" else None)  # fmt: skip
        trainer.train()
    return torch.cuda.max_memory_allocated() if cuda else callbacks[0].peak


class PeakOnCpu(TrainerCallback):
    """The live tensors when the last step starts plus the most that step's allocations held at once."""

    def __init__(self, steps: int, weights):
        self.steps, self.weights, self.peak = steps, weights, 0

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step != self.steps - 1:
            return
        from torch.profiler import ProfilerActivity, profile

        state_tensors = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        buffers = list((self.weights.compensation or {}).values())
        live = [*model.parameters(), *model.buffers(), *state_tensors, *buffers]
        self.peak = sum(t.numel() * t.element_size() for t in live)
        self.profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.profile.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.steps:
            return
        self.profile.__exit__(None, None, None)
        held = most = 0
        for event in sorted(self.profile.events(), key=lambda e: e.time_range.start):
            held += event.self_cpu_memory_usage
            most = max(most, held)
        self.peak += most


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.calibrate:
        print_calibration()
        return 0
    try:
        run = run_from(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    rank = f" r {run.lora_r}" if run.finetune_mode != "full" else ""
    checkpointing = ", activation checkpointing" if run.activation_checkpointing else ""
    print(
        f"{args.model}, {args.finetune_mode}{rank}, {run.batch} x {run.length} tokens per GPU, {run.gpus} GPUs, "
        f"weights {run.weights_dtype}, compute {run.compute}{checkpointing}"
    )
    print(table(run, args.card_gib))
    if args.measure:
        run.device = "cuda" if torch.cuda.is_available() else "cpu"
        estimated = sum(estimate(run, "single").values())
        measured = measure(run)
        print(
            f"one process on the {run.device}: measured peak {measured / GIB:.3f} GiB, estimate "
            f"{estimated / GIB:.3f} GiB (estimate / measured {estimated / measured:.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
