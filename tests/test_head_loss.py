"""The chunked LM head + cross-entropy equals the plain one: loss and gradients, any chunk size."""

from __future__ import annotations

import pytest
import torch

from fastchat_plora.head_loss import linear_cross_entropy


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
