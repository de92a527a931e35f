"""The training loss: the chunked LM head + cross-entropy equals the plain one; the labeled-positions
loss and padding-free batches give the full logits' loss and gradients; liger gets the model's forward."""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorForSeq2Seq

from fastchat_plora.args import TrainingArguments
from fastchat_plora.data import ChatRenderer, build_examples
from fastchat_plora.loss import linear_cross_entropy
from fastchat_plora.train_plora import make_collator
from fastchat_plora.trainer import PLoRATrainer
from tests.conftest import tiny_llama, tiny_lora


def plain(hidden, weight, targets):
    return torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, None])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_matches_plain_cross_entropy(chunk_rows, weight_trains):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen, requires_grad=True)
    weight = torch.randn(300, 16, generator=gen, requires_grad=weight_trains)
    targets = torch.randint(0, 300, (37,), generator=gen)
    grads = []
    for fn in (plain, lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows)):
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, targets)
        (loss * 0.25).backward()  # the Trainer scales the loss: backward must scale the stored grads
        grads.append((loss.detach(), hidden.grad, weight.grad))
    (ref_loss, ref_h, ref_w), (loss, h, w) = grads
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(h, ref_h)
    if weight_trains:
        torch.testing.assert_close(w, ref_w)
    else:
        assert w is None


def test_no_grad_gives_the_loss_alone():
    hidden, weight = torch.randn(5, 8), torch.randn(11, 8)
    targets = torch.tensor([0, 3, 10, 2, 2])
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, 2), plain(hidden, weight, targets))


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
