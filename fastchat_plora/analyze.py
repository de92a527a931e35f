"""The rank of an update W_T - W_0, measured against the rounding floor of the stored weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RankReport:
    numerical_rank: int
    tolerance: float
    top_singular_values: list[float]


def update_rank(w_final: torch.Tensor, w_initial: torch.Tensor, storage_dtype: torch.dtype, top: int = 5) -> RankReport:
    """Numerical rank of W_T - W_0, computed in fp64.

    A singular value counts when it exceeds (sqrt(m) + sqrt(n)) * eps(storage dtype) * rms(W_T).
    Rounding W_T to its storage dtype once adds an error of at most half a rounding step per
    entry (std <= eps * |w| / sqrt(12)), and a random m x n matrix of such entries has spectral
    norm about std * (sqrt(m) + sqrt(n)): the tolerance sits ~3.5x above that noise floor. So a
    single rounding is not counted as rank, while every real stage's contribution is; rounding
    noise accumulated over many plain bf16 merges rises above it and shows up as extra rank.
    """
    delta = w_final.double() - w_initial.double()
    sigma = torch.linalg.svdvals(delta)
    m, n = delta.shape
    rms = w_final.double().pow(2).mean().sqrt().item()
    tol = (m**0.5 + n**0.5) * torch.finfo(storage_dtype).eps * rms
    return RankReport(int((sigma > tol).sum()), tol, sigma[:top].tolist())
