"""Benchmark: PLoRA against plain LoRA on the same model, data and steps, with the real training path.

    python -m fastchat_plora.bench --data_path data/gsm8k_train.jsonl [--steps 12 --repeats 2]

Each run is a separate process (so peak memory is that run's own), launched by this script in
alternating order (lora, plora, lora, plora, ...) so machine noise hits both alike. It prints real
(non-padding) tokens/s and peak resident memory per mode, the PLoRA/LoRA ratios, and the cost of
one unload (timed in-process on the same model) as a share of a 200-step stage.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from transformers import TrainerCallback

PAPER_STAGE_STEPS = 200


class StepClock(TrainerCallback):
    """Records (time, non-padding tokens seen) at the end of every optimizer step."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), state.num_input_tokens_seen))


def run_one(mode: str, args: argparse.Namespace) -> dict:
    """Train `args.steps` steps in this process and report throughput, peak memory, unload cost."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from fastchat_plora.args import LoraArguments, TrainingArguments
    from fastchat_plora.callback import PLoRACallback, PLoRATrainer
    from fastchat_plora.data import make_dataset
    from fastchat_plora.models import load_model, load_tokenizer, resolve_model_path
    from fastchat_plora.plora import next_stage
    from fastchat_plora.train_plora import add_adapters

    torch.manual_seed(0)
    path = resolve_model_path(args.model_name_or_path)
    tokenizer = load_tokenizer(path, args.model_max_length)
    model = add_adapters(load_model(path), LoraArguments(lora_r=args.lora_r), seed=0)
    dataset = make_dataset(args.data_path, tokenizer, args.model_max_length)
    stage_steps = args.unload_every_steps if mode == "plora" else None
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            save_strategy="no",
            logging_steps=args.steps,
            report_to=[],
            disable_tqdm=True,
            include_num_input_tokens_seen="non_padding",
        )
        trainer = PLoRATrainer(
            model=model,
            args=training_args,
            train_dataset=dataset,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
            callbacks=[PLoRACallback(stage_steps), clock],
            stage_steps=stage_steps,
        )
        trainer.train()
        # The first step pays one-off costs (allocations, kernel selection); time from its end.
        (t0, n0), (t1, n1) = clock.marks[0], clock.marks[-1]
        step_seconds = (t1 - t0) / (len(clock.marks) - 1)
        unload_seconds = []
        for stage in range(args.unload_repeats):
            start = time.perf_counter()
            next_stage(model, trainer.optimizer, stage, seed=0)
            unload_seconds.append(time.perf_counter() - start)
    return {
        "mode": mode,
        "tokens_per_s": (n1 - n0) / (t1 - t0),
        "step_seconds": step_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "unload_seconds": statistics.median(unload_seconds),
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", required=True, help="ShareGPT JSONL to train on (e.g. GSM8K train)")
    parser.add_argument("--model_name_or_path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--model_max_length", type=int, default=512)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--unload_every_steps", type=int, default=4, help="plora stage length in the bench")
    parser.add_argument("--unload_repeats", type=int, default=5, help="unloads timed after training")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating")
    parser.add_argument("--worker", choices=["lora", "plora"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker:
        print(json.dumps(run_one(args.worker, args)))
        return
    argv = sys.argv[1:] if argv is None else argv
    runs = []
    for i in range(args.repeats):
        for mode in ("lora", "plora"):
            cmd = [sys.executable, "-m", "fastchat_plora.bench", *argv, "--worker", mode]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(
                f"run {i + 1}/{args.repeats} {mode}: {runs[-1]['tokens_per_s']:.1f} tokens/s, "
                f"peak {runs[-1]['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    by_mode = {m: [r for r in runs if r["mode"] == m] for m in ("lora", "plora")}
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "mode"} for m, rs in by_mode.items()}
    unload_share = med["plora"]["unload_seconds"] / (PAPER_STAGE_STEPS * med["plora"]["step_seconds"])
    print(
        f"\nembedded model, LoRA r{args.lora_r} on all 7 linear layers, batch {args.batch_size}, "
        f"{args.steps} steps, median of {args.repeats} runs each:"
    )
    for m in ("lora", "plora"):
        print(
            f"  {m:5s}: {med[m]['tokens_per_s']:8.1f} real tokens/s, peak RSS {med[m]['peak_rss_mib']:7.0f} MiB, "
            f"{med[m]['step_seconds']:.2f} s/step"
        )
    print(f"  plora/lora tokens/s: {med['plora']['tokens_per_s'] / med['lora']['tokens_per_s']:.3f} (target >= 0.98)")
    print(f"  plora/lora peak RSS: {med['plora']['peak_rss_mib'] / med['lora']['peak_rss_mib']:.3f} (target <= 1.01)")
    print(
        f"  one unload: {med['plora']['unload_seconds'] * 1000:.1f} ms = {unload_share:.3%} of a "
        f"{PAPER_STAGE_STEPS}-step stage (target < 1%)"
    )


if __name__ == "__main__":
    main()
