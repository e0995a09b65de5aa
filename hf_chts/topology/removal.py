"""Link removal: relative importance, soft (sampled) removal, RI pruning.

Implements docs/algorithms.md#3-link-removal. All functions are pure: weights and masks in, a
new mask out. Shapes are the logical ``O×I`` (out × in) layout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import as_bool_mask
from .sampling import weighted_sample_without_replacement

__all__ = [
    "removal_importance",
    "delta_to_temperature",
    "soft_removal",
    "prune_to_count",
]


def _check_same_shape(weight: Tensor, mask: Tensor) -> None:
    if weight.dim() != 2 or weight.shape != mask.shape:
        raise ValueError(
            f"weight and mask must be 2-D with the same shape, got {tuple(weight.shape)} "
            f"and {tuple(mask.shape)}"
        )


def removal_importance(weight: Tensor, mask: Tensor, alpha: float, eps: float = 1e-5) -> Tensor:
    """Link importance ``R`` of docs/algorithms.md §3.1 (float32, 0 outside the mask).

    ``R_ij = |W_ij| / (2α + (1−α)(|W_i*| + eps)) + |W_ij| / (2α + (1−α)(|W_*j| + eps))``
    where ``|W_i*|`` / ``|W_*j|`` are the row / column sums of ``|W|·M``.
    ``alpha = 1`` gives exactly ``|W|`` on the mask (weight magnitude, WM);
    ``alpha = 0`` gives relative importance (RI).
    """
    _check_same_shape(weight, mask)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    magnitude = weight.detach().abs().to(torch.float32)
    magnitude = torch.where(as_bool_mask(mask), magnitude, torch.zeros_like(magnitude))
    row_sums = magnitude.sum(dim=1, keepdim=True)
    col_sums = magnitude.sum(dim=0, keepdim=True)
    row_norm = 2 * alpha + (1 - alpha) * (row_sums + eps)
    col_norm = 2 * alpha + (1 - alpha) * (col_sums + eps)
    return magnitude / row_norm + magnitude / col_norm


def delta_to_temperature(delta: float) -> float:
    """Sampling temperature ``T = δ/(1−δ)`` (docs/algorithms.md §3.1); δ=1 → ∞, δ=0 → 0."""
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    if delta == 1.0:
        return math.inf
    return delta / (1.0 - delta)


def _keepable_importance(weight: Tensor, mask: Tensor, alpha: float) -> Tensor:
    """Importance of the live links, made strictly positive on the mask.

    A live link whose weight is exactly 0 (e.g. just regrown, docs/algorithms.md §1)
    has ``R == 0`` but must stay selectable, otherwise ``n_keep`` could exceed
    the number of samplable links. Such links get the smallest normal float32,
    which is below every positive importance, so the order among the other
    links is unchanged. Dead links stay at 0 and are never selected.
    """
    importance = removal_importance(weight, mask, alpha)
    live_without_importance = as_bool_mask(mask) & ~(importance > 0)
    return importance.masked_fill_(live_without_importance, torch.finfo(torch.float32).tiny)


def _check_keep_count(n_keep: int, mask: Tensor) -> None:
    live = int(as_bool_mask(mask).sum())
    if not 0 <= n_keep <= live:
        raise ValueError(f"n_keep must be in [0, nnz(mask)={live}], got {n_keep}")


def _mask_from_indices(indices: Tensor, like: Tensor) -> Tensor:
    new_mask = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    new_mask[indices] = True
    return new_mask.view(like.shape)


def soft_removal(
    weight: Tensor,
    mask: Tensor,
    n_keep: int,
    alpha: float,
    temperature: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Keep exactly ``n_keep`` live links, sampled without replacement ∝ ``R^T``.

    docs/algorithms.md §3.3 (WM-soft for ``alpha=1``). ``temperature=math.inf`` keeps
    the top-``n_keep`` by importance (rigid magnitude removal), ``0`` keeps a
    uniformly random subset. Returns a new boolean mask that is a subset of
    ``mask``.
    """
    _check_same_shape(weight, mask)
    _check_keep_count(n_keep, mask)
    importance = _keepable_importance(weight, mask, alpha)
    kept = weighted_sample_without_replacement(importance, n_keep, temperature, generator)
    return _mask_from_indices(kept, mask)


def prune_to_count(weight: Tensor, mask: Tensor, n_keep: int, alpha: float) -> Tensor:
    """Deterministically keep the ``n_keep`` most important live links.

    Used for the density decay of CHTss (docs/algorithms.md §3.3 and §6.6, "RI top-k" with
    ``alpha=0``); importance as in docs/algorithms.md §3.1. Ties are broken by lowest flat index.
    """
    _check_same_shape(weight, mask)
    _check_keep_count(n_keep, mask)
    importance = _keepable_importance(weight, mask, alpha)
    kept = weighted_sample_without_replacement(importance, n_keep, temperature=math.inf)
    return _mask_from_indices(kept, mask)
