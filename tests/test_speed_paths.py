"""The fast paths compute the same thing (labeled-logits-only loss, padding-free batches); the bench runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DataCollatorForSeq2Seq

from fastchat_plora.allocator import mimalloc_library
from fastchat_plora.args import TrainingArguments
from fastchat_plora.callback import PLoRATrainer
from fastchat_plora.data import ChatRenderer, build_examples
from fastchat_plora.train_plora import make_collator
from tests.conftest import tiny_llama, tiny_lora

REPO = Path(__file__).resolve().parent.parent

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}],
    [{"role": "user", "content": "Count to five, please, slowly."}, {"role": "assistant", "content": "1 2 3 4 5"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "A longer answer that goes on a while."},
     {"role": "user", "content": "More?"}, {"role": "assistant", "content": "Yes."}],
]  # fmt: skip


@pytest.fixture
def examples(tokenizer):
    examples, _ = build_examples(CONVERSATIONS, ChatRenderer(tokenizer), max_length=256, progress=False)
    return [{**e, "attention_mask": [1] * len(e["input_ids"])} for e in examples]


def loss_and_grads(model, trainer_kwargs, batch, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = PLoRATrainer(model=model, args=args, **trainer_kwargs)
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("lora", [False, True])
def test_labeled_logits_only_matches_full_logits(tokenizer, examples, tmp_path, lora):
    model = tiny_lora() if lora else tiny_llama()
    # the tiny models have a 256-token vocabulary: keep the ids inside it
    examples = [{k: [t % 256 if t != -100 else t for t in v] for k, v in e.items()} for e in examples]
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True)(examples)
    fast, fast_grads = loss_and_grads(model, {"labeled_logits_only": True}, dict(batch), tmp_path)
    full, full_grads = loss_and_grads(model, {"labeled_logits_only": False}, dict(batch), tmp_path)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("labeled_logits_only", [False, True])
def test_padding_free_batch_matches_padded_batch(tokenizer, examples, tmp_path, labeled_logits_only):
    model = tiny_llama(vocab_size=len(tokenizer)).float()
    padded = dict(make_collator(tokenizer, padding_free=False)(examples))
    flat = dict(make_collator(tokenizer, padding_free=True)(examples))
    assert flat["input_ids"].shape[0] == 1 and (padded["input_ids"] == tokenizer.pad_token_id).any()
    kwargs = {"labeled_logits_only": labeled_logits_only}
    loss_padded, grads_padded = loss_and_grads(model, kwargs, padded, tmp_path)
    loss_flat, grads_flat = loss_and_grads(model, kwargs, flat, tmp_path)
    torch.testing.assert_close(loss_flat, loss_padded, rtol=1e-5, atol=1e-6)
    for name in grads_padded:
        torch.testing.assert_close(grads_flat[name], grads_padded[name], rtol=1e-4, atol=1e-6)


def test_bench_runs_on_random_tokens_and_prints_the_ratios(tiny_model_dir):
    command = [sys.executable, "-m", "fastchat_plora.bench", "--model_name_or_path", str(tiny_model_dir),
               "--random_tokens", "24", "--steps", "4", "--batch_size", "2", "--repeats", "1",
               "--modes", "baseline,lora,plora,full", "--unload_every_steps", "2", "--unload_repeats", "1"]  # fmt: skip
    proc = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "random tokens x 24" in proc.stdout
    for line in ("lora/baseline tokens_per_s", "plora/lora peak_rss_mib", "lora/full peak_rss_mib", "one unload"):
        assert line in proc.stdout


def test_liger_kernel_leaves_the_loss_to_the_model(tokenizer, examples, tmp_path):
    """Under --use_liger_kernel the model's own forward gets the labels (liger's fused head + loss runs there)."""
    model = tiny_llama()
    examples = [{k: [t % 256 if t != -100 else t for t in v] for k, v in e.items()} for e in examples]
    batch = dict(DataCollatorForSeq2Seq(tokenizer, padding=True)(examples))
    trainer = PLoRATrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    trainer.compute_loss(model, dict(batch))
    assert seen == []  # ours: the decoder and the chunked head, not the model's forward
    trainer.args.use_liger_kernel = True  # set after construction: liger itself needs a GPU (Triton)
    loss = trainer.compute_loss(model, dict(batch))
    assert "labels" in seen[0]
    torch.testing.assert_close(loss, model(**batch).loss)


@pytest.mark.skipif(mimalloc_library() is None, reason="cmeel-mimalloc is not installed")
def test_bench_runs_every_mode_on_mimalloc_when_asked(tiny_model_dir):
    command = [sys.executable, "-m", "fastchat_plora.bench", "--model_name_or_path", str(tiny_model_dir),
               "--random_tokens", "16", "--steps", "2", "--batch_size", "2", "--repeats", "1", "--modes", "lora",
               "--allocator", "mimalloc"]  # fmt: skip
    proc = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "malloc mimalloc," in proc.stdout  # read from the run's own memory map


def test_bench_needs_exactly_one_data_source():
    proc = subprocess.run([sys.executable, "-m", "fastchat_plora.bench"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "exactly one of --data_path and --random_tokens" in proc.stderr
