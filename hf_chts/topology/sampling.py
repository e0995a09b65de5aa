"""Sampling without replacement for link removal and regrowth.

docs/algorithms.md §3.2: soft removal (§3) and soft regrowth (§5) draw links without
replacement with probability ``p_i ∝ score_i ** T``. ``torch.multinomial``
refuses more than 2**24 categories (a 7B FFN layer has 45 M entries), so the
draw is done with the exponential ("Gumbel") top-k trick:

    keys_i = T · log(score_i) − log(E_i),   E_i ~ Exp(1)
    chosen = top-k(keys)

which has the same distribution as successive sampling without replacement
(``torch.multinomial(..., replacement=False)``), needs O(N) memory and becomes
exact top-k as T → ∞.

Precision note: keys are float32 (float64 for float64 scores). On layers with
tens of millions of entries a few keys next to the selection threshold can
round to the same float32 value; which of those is taken is then decided by
``torch.topk``. The effect on the sampled distribution is negligible.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["weighted_sample_without_replacement", "uniform_sample", "exact_topk"]


def _key_dtype(scores: Tensor) -> torch.dtype:
    """float64 for float64 input, float32 for everything else (docs/algorithms.md §3.2)."""
    return torch.float64 if scores.dtype == torch.float64 else torch.float32


def _empty_indices(device: torch.device) -> Tensor:
    return torch.empty(0, dtype=torch.long, device=device)


def _check_count(k: int, available: int, what: str) -> None:
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k > available:
        raise ValueError(f"cannot sample k={k} entries: only {available} {what}")


def _standard_exponential(n: int, dtype: torch.dtype, device: torch.device,
                          generator: torch.Generator | None) -> Tensor:
    """E ~ Exp(1), strictly positive (a 0 would give an infinite key).

    Drawn on the generator's device (the engine's generator lives on the CPU so
    every rank and every device type draws the same numbers), then moved.
    """
    draw_device = generator.device if generator is not None else device
    noise = torch.empty(n, dtype=dtype, device=draw_device).exponential_(generator=generator).to(device)
    return noise.clamp_min_(torch.finfo(dtype).tiny)


def exact_topk(keys: Tensor, k: int) -> Tensor:
    """Flat indices of the k largest entries of ``keys``, ties broken by lowest index.

    Deterministic, O(N): everything strictly above the k-th value is taken, the
    remaining places go to the lowest-index entries equal to the k-th value.
    """
    flat = keys.flatten()
    if k == 0:
        return _empty_indices(flat.device)
    threshold = torch.topk(flat, k, sorted=False).values.min()
    above = torch.nonzero(flat > threshold).flatten()
    at_threshold = torch.nonzero(flat == threshold).flatten()[: k - above.numel()]
    return torch.cat([above, at_threshold])


def weighted_sample_without_replacement(
    scores: Tensor,
    k: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample ``k`` distinct flat indices of ``scores`` with ``p_i ∝ scores_i ** temperature``.

    docs/algorithms.md §3.2: exponential top-k, ``topk(T·log(s) − log(E))`` with
    ``E ~ Exp(1)`` drawn from ``generator``.

    - ``temperature == math.inf``: exact top-k by score (deterministic, ties
      broken by lowest index).
    - ``temperature == 0``: uniform among the entries with positive score.
    - Entries with score <= 0 (or NaN) are never chosen; ``k`` larger than the
      number of positive entries raises ``ValueError`` (callers fill the rest).

    Returns a LongTensor of ``k`` indices into ``scores.flatten()``, in no
    particular order.
    """
    if temperature < 0 or math.isnan(temperature):
        raise ValueError(f"temperature must be >= 0 (or math.inf), got {temperature}")
    flat = scores.detach().flatten()
    if not flat.is_floating_point() or flat.dtype != _key_dtype(flat):
        flat = flat.to(_key_dtype(flat))
    positive = flat > 0
    _check_count(k, int(positive.sum()), "entries have a positive score")
    if k == 0:
        return _empty_indices(flat.device)

    if math.isinf(temperature):
        keys = torch.where(positive, flat, torch.full_like(flat, -math.inf))
        return exact_topk(keys, k)

    # keys = T·log(s) − log(E), built in place to keep the memory at O(N).
    keys = _standard_exponential(flat.numel(), flat.dtype, flat.device, generator)
    keys.log_().neg_()
    if temperature != 0:
        keys.add_(torch.log(flat.clamp_min(torch.finfo(flat.dtype).tiny)), alpha=temperature)
    keys.masked_fill_(~positive, -math.inf)
    return torch.topk(keys, k, sorted=False).indices


def uniform_sample(
    candidates: Tensor,
    k: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``k`` distinct flat indices of True entries of ``candidates``, uniformly at random.

    Exponential top-k with equal weights (the k smallest of i.i.d. Exp(1)
    draws), so it has no 2**24 limit and O(N) memory. Raises ``ValueError``
    if ``k`` exceeds the number of candidates.
    """
    flat = candidates.flatten()
    if flat.dtype != torch.bool:
        flat = flat != 0
    _check_count(k, int(flat.sum()), "candidates are True")
    if k == 0:
        return _empty_indices(flat.device)
    keys = _standard_exponential(flat.numel(), torch.float32, flat.device, generator)
    keys.neg_().masked_fill_(~flat, -math.inf)
    return torch.topk(keys, k, sorted=False).indices
