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

    A singular value counts when it exceeds max(m, n) * eps(storage dtype) * sigma_max(W_T):
    the size that rounding W_T to its storage dtype can reach, so the rounding noise of
    repeated merges is not counted as rank while every real stage's contribution is.
    """
    delta = w_final.double() - w_initial.double()
    sigma = torch.linalg.svdvals(delta)
    tol = max(delta.shape) * torch.finfo(storage_dtype).eps * torch.linalg.matrix_norm(w_final.double(), ord=2).item()
    return RankReport(int((sigma > tol).sum()), tol, sigma[:top].tolist())
