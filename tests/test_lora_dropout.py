"""The recomputed LoRA dropout: backward redraws forward's mask exactly, and no dropped-out copy is kept."""

from __future__ import annotations

import copy

import pytest
import torch

from fastchat_plora.lora_dropout import RecomputedDropoutLinear, cpu_dropout, recompute_lora_dropout
from fastchat_plora.plora import lora_layers
from tests.conftest import tiny_lora


def loss_and_grads(model, seed: int = 0):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class PlainCpuDropout(torch.nn.Module):
    """The same mask as ours, kept the way PEFT keeps it (no recompute): the reference."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return cpu_dropout(x, self.p) if self.training else x


def test_same_loss_and_gradients_as_dropout_kept_in_memory():
    reference = tiny_lora(dropout=0.3)  # B drawn at random: B = 0 would hide a wrong mask from A's gradients
    ours = copy.deepcopy(reference)
    assert recompute_lora_dropout(ours) == 14  # 2 layers x 7 linear
    for _, layer in lora_layers(reference):
        layer.lora_dropout["default"] = PlainCpuDropout(0.3)
    ref_loss, ref_grads = loss_and_grads(reference)
    loss, grads = loss_and_grads(ours)
    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:  # a mask redrawn differently in backward would change A's gradient
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0, msg=name)
    # and the dropout did something: another mask gives another loss
    other_loss, _ = loss_and_grads(ours, seed=1)
    assert other_loss != loss


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_cpu_dropout_drops_p_and_keeps_the_mean(p):
    x = torch.ones(1001, 999)  # an odd element count: the last int64 word is half used
    torch.manual_seed(0)
    out = cpu_dropout(x, p)
    assert abs((out == 0).float().mean().item() - p) < 2e-3
    assert abs(out.mean().item() - 1.0) < 5e-3
    # the keep scale is 1 / (1 - p) to float32 precision: p itself is not rounded
    assert torch.unique(out).tolist() == [0.0, pytest.approx(1 / (1 - p), rel=1e-7)]
    torch.manual_seed(0)
    assert torch.equal(cpu_dropout(x, p), out)


def test_state_dict_keys_and_parameters_are_peft_s():
    model = tiny_lora(dropout=0.1)
    keys = set(model.state_dict())
    a_before = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    recompute_lora_dropout(model)
    assert set(model.state_dict()) == keys
    a_after = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    assert all(a_after[n] is a_before[n] for n in a_before)  # an optimizer built before would still see them


def test_no_dropout_is_left_alone_and_eval_is_deterministic():
    model = tiny_lora(dropout=0.0)
    assert recompute_lora_dropout(model) == 0
    model = tiny_lora(dropout=0.5)
    recompute_lora_dropout(model)
    model.eval()
    ids = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_keeps_no_dropped_out_copy():
    """PEFT's dropout saves a dropped-out copy of the input per adapted layer for backward; ours saves none."""
    p = 0.05
    x = torch.randn(8, 64, requires_grad=True)
    linear = torch.nn.Linear(64, 4, bias=False)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    def run(layer, dropout):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(dropout(x * 1.0)).sum().backward()
        return [t for t in saved if t.shape == x.shape and t.dtype == x.dtype and not t.equal(x)]

    assert run(linear, torch.nn.Dropout(p))  # PEFT's: the dropped-out copy
    assert not run(RecomputedDropoutLinear(linear, p), torch.nn.Identity())
