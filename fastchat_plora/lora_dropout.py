"""LoRA dropout that keeps no copy of the layer input: the masked input is recomputed in backward.

PEFT computes ``lora_B(lora_A(dropout(x)))``. The dropped-out input is a new tensor per adapted
layer, and ``lora_A`` saves it for its weight gradient, so with dropout on every one of the seven
linear layers holds its own full-size copy of its input (q, k and v three copies of the same one)
plus the dropout mask: on the embedded model at 4 x 352 tokens, 3.8 GB of saved activations
against 2.6 GB without dropout, more than full fine-tuning's gradients and Adam state.

`RecomputedDropoutLinear` replaces ``lora_A`` (same weight Parameter, same state-dict key) and runs
dropout + A under non-reentrant activation checkpointing: only ``x``, which the three projections
share, and the RNG state are kept; backward redraws the same mask and recomputes A's rank-r
output, a matmul r / out_features the size of the base layer's. PEFT's dropout becomes Identity.
On GPUs the mask comes from ``F.dropout``, as in ``nn.Dropout``. On the CPU it comes from
`cpu_dropout`: PyTorch's CPU dropout draws each element's Bernoulli one at a time from the
Mersenne Twister (about 5 ns an element, a quarter of a LoRA step on the embedded model with the
recompute); drawing 31 random bits per element in bulk is faster with the same distribution
(measured on one 1408 x 576 mask, 2 cores: F.dropout 4.4-7.4 ms, `cpu_dropout` 3.1 ms; 15-bit
draws were 2.3 ms but rounded p, 0.05 to 0.049988, so they went). Written here because neither
PEFT nor the fused-kernel packages offer a memory-light LoRA dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastchat_plora.plora import lora_layers


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout from 31 uniform random bits per element, drawn two to an int64.

    An element is dropped when its bits fall below p * 2^31: p is kept to within 2^-31 (finer than
    a float32 uniform draw resolves), so the mask has F.dropout's distribution. Kept values are
    scaled by the inverse of that keep probability, so the expectation is x. Deterministic under
    the global CPU generator, which activation checkpointing saves and restores.
    """
    cut = round(p * 2**31)
    words = torch.empty((x.numel() + 1) // 2, dtype=torch.int64).random_()  # uniform on [0, 2^63)
    # both 32-bit halves of a word hold 31 uniform bits below their sign bit (bit 63 is always 0)
    bits = words.view(torch.int32)[: x.numel()].view(x.shape).bitwise_and_(2**31 - 1)
    return x * (bits >= cut) * (2**31 / (2**31 - cut))


class RecomputedDropoutLinear(torch.nn.Linear):
    """``linear(dropout(x))`` that saves x, not the dropped-out copy, for backward."""

    def __init__(self, linear: torch.nn.Linear, p: float):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters, not copies
        self.p = p

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        dropped = cpu_dropout(x, self.p) if x.device.type == "cpu" else F.dropout(x, self.p, training=True)
        return F.linear(dropped, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.p > 0):
            return F.linear(x, self.weight, self.bias)
        if not torch.is_grad_enabled():
            return self._dropped(x)
        return checkpoint(self._dropped, x, use_reentrant=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p} (recomputed in backward)"


def recompute_lora_dropout(model: torch.nn.Module, adapter_name: str = "default") -> int:
    """Swap PEFT's dropout + A for `RecomputedDropoutLinear` in every adapted layer; returns how many.

    Layers without dropout (p = 0, PEFT's Identity) are left as they are.
    """
    count = 0
    for _, layer in lora_layers(model, adapter_name):
        dropout = layer.lora_dropout[adapter_name]
        if not isinstance(dropout, torch.nn.Dropout) or dropout.p == 0:
            continue
        layer.lora_A[adapter_name] = RecomputedDropoutLinear(layer.lora_A[adapter_name], dropout.p)
        layer.lora_dropout[adapter_name] = torch.nn.Identity()
        count += 1
    return count
