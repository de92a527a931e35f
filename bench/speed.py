"""Benchmark: our LoRA/PLoRA/full training path against plain HF Trainer + PEFT, same model and data.

    python -m bench.speed --data_path data/mix/mix.jsonl [--steps 16 --repeats 2]
    python -m bench.speed --random_tokens 512 [--modes lora,full]
    python -m bench.speed --data_path data/mix/mix.jsonl --allocator mimalloc

Each run is a separate process (so peak memory is that run's own), launched by this script in
rotating order (baseline, lora, plora, full, baseline, ...) so machine noise hits all alike. It
prints real (non-padding) tokens/s and peak resident memory per mode, the ratios the targets are
stated in, and the cost of one unload (timed in-process on the trained model) as a share of a
200-step stage. ``--allocator mimalloc`` starts every run on mimalloc (see allocator.py).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from transformers import TrainerCallback

from bench.allocator import preload_env

PAPER_STAGE_STEPS = 200
MODES = ("baseline", "lora", "plora", "full")


class StepClock(TrainerCallback):
    """Records (time, non-padding tokens seen) when training starts and at the end of every step."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), 0))

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), state.num_input_tokens_seen))


def run_one(mode: str, args: argparse.Namespace) -> dict:
    """Train `args.steps` steps in this process and report throughput, peak memory, unload cost.

    Modes: `baseline` is plain HF Trainer + PEFT LoRA as a user would write it (default collator,
    random batches, full logits); `lora`, `plora` and `full` are this project's training path
    (length-grouped batches, LM head on labeled positions only), with the same LoRA config.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer
    from transformers import TrainingArguments as HfTrainingArguments

    from fastchat_plora.adapters import add_adapters
    from fastchat_plora.args import ALL_LINEAR, TrainingArguments
    from fastchat_plora.callback import PLoRACallback
    from fastchat_plora.models import load_model, load_tokenizer, resolve_model_path
    from fastchat_plora.plora import StagePlan, next_stage
    from fastchat_plora.trainer import PLoRATrainer

    torch.manual_seed(0)
    path = resolve_model_path(args.model_name_or_path)
    tokenizer = load_tokenizer(path, args.model_max_length)
    model = load_model(path)
    if mode == "baseline":
        # The same adapter as ours (PEFT's default dropout is 0; ours, FastChat's, 0.05): the runs
        # then differ by the training path alone.
        config = LoraConfig(
            r=args.lora_r, lora_alpha=16, lora_dropout=args.lora_dropout, target_modules=ALL_LINEAR.split(","),
            task_type="CAUSAL_LM",
        )  # fmt: skip
        model = get_peft_model(model, config)
    elif mode != "full":
        model = add_adapters(model, r=args.lora_r, alpha=16, targets=ALL_LINEAR.split(","), dropout=args.lora_dropout,
                             generator=StagePlan().generator(0))  # fmt: skip
    # Every mode trains on the same steps x batch conversations, one epoch: the same work, batched
    # as each mode batches it (random and padded for the baseline, grouped by length for ours).
    dataset = bench_dataset(args, tokenizer)
    plan = StagePlan(steps=args.unload_every_steps if mode == "plora" else None)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        common = dict(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size, save_strategy="no",
            logging_steps=args.steps, report_to=[], disable_tqdm=True, include_num_input_tokens_seen="non_padding",
        )  # fmt: skip
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
        if mode == "baseline":
            trainer = Trainer(model=model, args=HfTrainingArguments(**common), train_dataset=dataset,
                              data_collator=collator, callbacks=[clock])  # fmt: skip
        else:
            callbacks = [clock] if mode == "full" else [PLoRACallback(plan), clock]
            trainer = PLoRATrainer(model=model, args=TrainingArguments(**common), train_dataset=dataset,
                                   data_collator=collator, callbacks=callbacks, plan=plan)  # fmt: skip
        trainer.train()
        (t0, n0), (t1, n1) = clock.marks[0], clock.marks[-1]
        step_seconds = (t1 - t0) / args.steps
        unload_seconds = []
        if mode != "baseline" and mode != "full":
            for stage in range(args.unload_repeats):
                start = time.perf_counter()
                next_stage(model, plan=plan, stage=stage, optimizer=trainer.optimizer)
                unload_seconds.append(time.perf_counter() - start)
    return {
        "mode": mode,
        "allocator": loaded_allocator(),
        "tokens_per_s": (n1 - n0) / (t1 - t0),
        "step_seconds": step_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "unload_seconds": statistics.median(unload_seconds) if unload_seconds else None,
    }


def loaded_allocator() -> str:
    """Which malloc this process runs on, read from its memory map (Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            return "mimalloc" if "libmimalloc" in maps.read() else "system"
    except OSError:
        return "system"


def bench_dataset(args: argparse.Namespace, tokenizer):
    """`steps x batch` examples: real conversations drawn from the data file, or random tokens.

    Random tokens (`--random_tokens L`): rows of exactly L uniformly drawn token ids, every position
    labeled, so there is no padding and no prompt masking: the pure compute-bound case.
    """
    from fastchat_plora.data import SupervisedDataset, make_dataset
    from fastchat_plora.sources import load_source

    count = args.steps * args.batch_size
    if args.random_tokens:
        rng = random.Random(0)
        rows = [[rng.randrange(len(tokenizer)) for _ in range(args.random_tokens)] for _ in range(count)]
        return SupervisedDataset([{"input_ids": row, "labels": list(row)} for row in rows])
    full_set = make_dataset(load_source(args.data_path), tokenizer, args.model_max_length)
    chosen = random.Random(0).sample(range(len(full_set)), count)
    return SupervisedDataset([full_set.examples[i] for i in chosen])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", help="conversations to train on (e.g. the mix); or --random_tokens")
    parser.add_argument("--random_tokens", type=int, default=None, help="rows of this many random tokens instead")
    parser.add_argument("--model_name_or_path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--model_max_length", type=int, default=512)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_dropout", type=float, default=0.05, help="for every LoRA run, the baseline's too")
    parser.add_argument("--unload_every_steps", type=int, default=4, help="plora stage length in the bench")
    parser.add_argument("--unload_repeats", type=int, default=5, help="unloads timed after training")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating")
    parser.add_argument("--modes", default="baseline,lora,plora,full", help="which runs, in this order")
    parser.add_argument("--allocator", choices=("system", "mimalloc"), default="system",
                        help="malloc for every run: the system's (glibc) or mimalloc (allocator.py)")  # fmt: skip
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if (args.data_path is None) == (args.random_tokens is None):
        print("error: give exactly one of --data_path and --random_tokens", file=sys.stderr)
        sys.exit(2)
    if args.worker:
        print(json.dumps(run_one(args.worker, args)))
        return
    argv = sys.argv[1:] if argv is None else argv
    modes = [m for m in args.modes.split(",") if m]
    try:
        env = preload_env(args.allocator)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    runs = []
    for i in range(args.repeats):
        for mode in modes:
            cmd = [sys.executable, "-m", "bench.speed", *argv, "--worker", mode]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(f"run {i + 1}/{args.repeats} {mode}: {runs[-1]['tokens_per_s']:.1f} tokens/s, "
                  f"peak {runs[-1]['peak_rss_mib']:.0f} MiB", flush=True)  # fmt: skip
    med = {
        m: {k: statistics.median(r[k] for r in runs if r["mode"] == m) for k in ("tokens_per_s", "step_seconds",
            "peak_rss_mib")} for m in modes
    }  # fmt: skip
    data = f"random tokens x {args.random_tokens}" if args.random_tokens else "real conversations"
    allocators = ",".join(sorted({r["allocator"] for r in runs}))
    print(f"\nembedded model, {data}, LoRA r{args.lora_r} on all 7 linear layers, batch {args.batch_size}, "
          f"{args.steps} steps, malloc {allocators}, median of {args.repeats} runs each:")  # fmt: skip
    for m in modes:
        print(f"  {m:8s}: {med[m]['tokens_per_s']:8.1f} real tokens/s, peak RSS {med[m]['peak_rss_mib']:7.0f} MiB, "
              f"{med[m]['step_seconds']:.2f} s/step")  # fmt: skip

    def ratio(a: str, b: str, key: str, target: str) -> None:
        if a in med and b in med:
            print(f"  {a}/{b} {key}: {med[a][key] / med[b][key]:.3f} ({target})")

    ratio("lora", "baseline", "tokens_per_s", "target >= 1.3")
    ratio("plora", "lora", "tokens_per_s", "target >= 0.98")
    ratio("plora", "lora", "peak_rss_mib", "target <= 1.01")
    ratio("lora", "full", "peak_rss_mib", "LoRA's memory against full fine-tuning's")
    unloads = [r["unload_seconds"] for r in runs if r["mode"] == "plora"]
    if unloads:
        unload = statistics.median(unloads)
        share = unload / (PAPER_STAGE_STEPS * med["plora"]["step_seconds"])
        print(f"  one unload: {unload * 1000:.1f} ms = {share:.3%} of a {PAPER_STAGE_STEPS}-step stage (target < 0.5%)")


if __name__ == "__main__":
    main()
