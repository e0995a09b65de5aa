"""Link regrowth: choose ``n_grow`` new links among the empty positions.

docs/algorithms.md#5-link-regrowth. Pure function: a mask in, a new mask and the flat indices
of the grown links out. Grown links start at weight 0 (the engine's job,
docs/algorithms.md §1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import as_bool_mask
from .ch_scores import ch3_l3_path_scores, ch_l3n_scores
from .sampling import uniform_sample, weighted_sample_without_replacement

__all__ = ["REGROWTH_METHODS", "SELECTIONS", "regrow", "select_candidates"]

REGROWTH_METHODS = ("ch2_l3n", "ch3_l3n", "ch3_l3", "random", "gradient")
SELECTIONS = ("soft", "rigid")


def _check_arguments(method: str, selection: str, temperature: float) -> None:
    if method not in REGROWTH_METHODS:
        raise ValueError(
            f"unknown regrowth method {method!r}; allowed values: {', '.join(REGROWTH_METHODS)}"
        )
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; allowed values: {', '.join(SELECTIONS)}")
    if temperature < 0 or math.isnan(temperature):
        raise ValueError(f"temperature must be >= 0 (or math.inf), got {temperature}")


def select_candidates(
    scores: Tensor,
    candidates: Tensor,
    n_grow: int,
    temperature: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Flat indices of ``n_grow`` candidates chosen by score (docs/algorithms.md §5.3).

    Candidates with a positive score are sampled without replacement
    ``∝ score^temperature`` (``math.inf``: top-k, i.e. rigid selection). When
    fewer than ``n_grow`` candidates have a positive score, all of them are
    taken and the rest is filled uniformly at random from the other candidates.
    """
    flat_candidates = candidates.flatten()
    flat_scores = torch.where(flat_candidates, scores.flatten().to(torch.float32),
                              torch.zeros((), dtype=torch.float32, device=scores.device))
    scored = flat_candidates & (flat_scores > 0)
    n_scored = int(scored.sum())
    if n_scored >= n_grow:
        return weighted_sample_without_replacement(flat_scores, n_grow, temperature, generator)
    all_scored = torch.nonzero(scored).flatten()
    filler = uniform_sample(flat_candidates & ~scored, n_grow - n_scored, generator)
    return torch.cat([all_scored, filler])


def _link_scores(mask: Tensor, method: str, weight_grad: Tensor | None,
                 ch_memory_budget_bytes: int | None) -> Tensor:
    if method == "ch2_l3n":
        return ch_l3n_scores(mask, "ch2", ch_memory_budget_bytes)
    if method == "ch3_l3n":
        return ch_l3n_scores(mask, "ch3", ch_memory_budget_bytes)
    if method == "ch3_l3":
        return ch3_l3_path_scores(mask)
    if method == "gradient":
        if weight_grad is None:
            raise ValueError("regrowth method 'gradient' needs weight_grad (the dense dL/dW)")
        if weight_grad.shape != mask.shape:
            raise ValueError(
                f"weight_grad shape {tuple(weight_grad.shape)} does not match mask shape "
                f"{tuple(mask.shape)}"
            )
        return weight_grad.detach().abs().to(torch.float32)
    raise AssertionError(f"no scores for method {method!r}")


def regrow(
    mask: Tensor,
    n_grow: int,
    method: str,
    *,
    generator: torch.Generator | None = None,
    selection: str = "soft",
    temperature: float = 1.0,
    weight_grad: Tensor | None = None,
    ch_memory_budget_bytes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Grow ``n_grow`` links at empty positions of ``mask`` (docs/algorithms.md §5).

    Methods:

    - ``"ch2_l3n"`` / ``"ch3_l3n"``: node-based CH scores; ``"ch3_l3"``: exact
      path-based CH3-L3 (small layers only). ``selection="soft"`` samples
      ``∝ S^temperature`` without replacement, ``"rigid"`` takes the top-k.
    - ``"random"`` (SET): uniform among the candidates.
    - ``"gradient"`` (RigL): top-k of ``|weight_grad|`` over the candidates
      (always rigid; ``selection``/``temperature`` are ignored).

    For score-based methods, when fewer than ``n_grow`` candidates have a
    positive score all of them are grown and the rest is filled uniformly at
    random. ``n_grow <= 0`` returns an unchanged copy of the mask and no
    indices. More links requested than empty positions raises ``ValueError``.

    Returns ``(new_mask, grown)``: a new boolean mask and the flat indices
    (into ``mask.flatten()``) of the grown links.
    """
    _check_arguments(method, selection, temperature)
    mask = as_bool_mask(mask)
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D (out × in), got shape {tuple(mask.shape)}")
    no_growth = torch.empty(0, dtype=torch.long, device=mask.device)
    if n_grow <= 0:
        return mask.clone(), no_growth
    candidates = ~mask
    n_candidates = int(candidates.sum())
    if n_grow > n_candidates:
        raise ValueError(f"cannot grow {n_grow} links: only {n_candidates} empty positions")

    if method == "random":
        grown = uniform_sample(candidates, n_grow, generator)
    else:
        scores = _link_scores(mask, method, weight_grad, ch_memory_budget_bytes)
        rigid = method == "gradient" or selection == "rigid"
        grown = select_candidates(scores, candidates, n_grow,
                                  math.inf if rigid else temperature, generator)

    new_mask = mask.reshape(-1).clone()  # row-major flat order, whatever the strides
    new_mask[grown] = True
    return new_mask.view(mask.shape), grown
