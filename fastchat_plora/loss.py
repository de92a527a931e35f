"""The training loss: cross-entropy on the labeled positions only, and the LM head in chunks.

Most positions of a chat example (system prompt, question, padding) carry no label, and the LM head
of a small model with a large vocabulary (SmolLM2: 49k x 576, a fifth of the parameters) costs much
of each step. `labeled_loss` runs the head on labeled positions only: the same loss and gradients
as the full logits, with less work and memory.

The head itself runs in chunks of rows, never holding every position's logits at once.

For N labeled positions and a vocabulary of V, the plain ``cross_entropy(head(hidden))`` keeps the
N x V fp32 log-probabilities for backward and makes two more N x V tensors there: on the embedded
model (V = 49,152) that is 0.6 GB per 1,000 labeled tokens. Here each chunk's logits live only
while that chunk is processed: the forward pass computes the chunk's loss and, at once, its
gradients with respect to the hidden states (and the head weight, when it trains), and backward
only scales what forward stored. Same FLOPs as the unfused head, nothing recomputed.

liger-kernel's fused linear cross-entropy does this in Triton on GPUs (pass ``--use_liger_kernel``
there); this is the same algorithm in plain PyTorch, for the CPU and for GPUs without liger.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastchat_plora.data import IGNORE_INDEX

CHUNK_BYTES = 64 * 2**20  # one chunk's fp32 logits


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, t = hidden[rows], targets[rows]
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
            if not (want_hidden or want_weight):
                continue
            # d(-log softmax(logits)[t]) / d logits = softmax - onehot(t), built in the logits' memory
            grad_logits = logits.sub_(lse.unsqueeze(1)).exp_()
            grad_logits[torch.arange(len(t), device=t.device), t] -= 1.0
            if want_hidden:
                grad_hidden[rows] = grad_logits.to(weight.dtype) @ weight
            if want_weight:
                grad_weight.addmm_(grad_logits.T, h.float())
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """sum over rows of cross_entropy(hidden @ weight.T, targets), computed ``chunk_rows`` rows at a time.

    ``hidden`` is (N, d) for N positions that all carry a target, ``weight`` the head's (V, d).
    The default chunk holds about 64 MiB of fp32 logits.
    """
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)


def labeled_loss(model: torch.nn.Module, inputs: dict, wrapped: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the token cross-entropies over the labeled positions, how many there are).

    A model in this process alone (``wrapped`` False; a PEFT model or a plain causal LM) runs its
    decoder, then the chunked head on exactly the labeled positions. A model wrapped by DDP or
    DeepSpeed (``wrapped``) must be called through its wrapper, which is what synchronises the
    gradients, so there the head runs on every position (column) that some row of the batch
    labels, through the model's own `logits_to_keep`.
    """
    features = {k: v for k, v in inputs.items() if k != "labels"}
    targets = inputs["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    if wrapped:
        columns = keep.any(dim=0).nonzero().squeeze(1)
        logits = model(**features, logits_to_keep=columns).logits[keep[:, columns]]
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), keep.sum()
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT's, or the model
    hidden = causal_lm.get_decoder()(**features).last_hidden_state[:, :-1][keep]
    head = causal_lm.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None:  # not adapted: the chunked head + loss
        return linear_cross_entropy(hidden, head.weight, targets[keep]), keep.sum()
    return F.cross_entropy(head(hidden).float(), targets[keep], reduction="sum"), keep.sum()
