"""Link removal (docs/algorithms.md §3): importance, soft removal, RI pruning."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from scipy import stats

from hf_chts.topology.removal import (
    delta_to_temperature,
    prune_to_count,
    removal_importance,
    soft_removal,
)


def random_layer(n_out: int, n_in: int, density: float, seed: int,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and mask pair with exact zeros outside the mask (docs/algorithms.md §1)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_out, n_in, generator=generator) < density
    weight = torch.randn(n_out, n_in, generator=generator) * mask
    return weight.to(dtype), mask


def naive_importance(weight: torch.Tensor, mask: torch.Tensor, alpha: float,
                     eps: float = 1e-5) -> torch.Tensor:
    """R_ij of docs/algorithms.md §3.1 with explicit loops in float64."""
    w = weight.double().abs().tolist()
    m = mask.tolist()
    n_out, n_in = mask.shape
    row_sums = [sum(w[i][j] for j in range(n_in) if m[i][j]) for i in range(n_out)]
    col_sums = [sum(w[i][j] for i in range(n_out) if m[i][j]) for j in range(n_in)]
    result = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        for j in range(n_in):
            if m[i][j]:
                result[i, j] = (w[i][j] / (2 * alpha + (1 - alpha) * (row_sums[i] + eps))
                                + w[i][j] / (2 * alpha + (1 - alpha) * (col_sums[j] + eps)))
    return result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_alpha_one_is_weight_magnitude(dtype):
    weight, mask = random_layer(7, 11, 0.5, seed=0, dtype=dtype)
    weight[~mask] = 5.0  # values outside the mask must not leak in
    importance = removal_importance(weight, mask, alpha=1.0)
    assert importance.dtype == torch.float32
    assert torch.equal(importance, weight.float().abs() * mask)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8])
def test_importance_matches_naive_loops(alpha):
    for seed, shape in enumerate([(5, 9), (9, 5), (6, 6), (1, 4)]):
        weight, mask = random_layer(*shape, 0.6, seed=seed)
        torch.testing.assert_close(removal_importance(weight, mask, alpha).double(),
                                   naive_importance(weight, mask, alpha), rtol=1e-5, atol=1e-7)


def test_relative_importance_favours_links_of_weak_neurons():
    """RI (α=0): the same |w| matters more on a row whose other links are small."""
    weight = torch.tensor([[1.0, 0.0, 0.1], [0.0, 1.0, 10.0]])
    mask = weight != 0
    importance = removal_importance(weight, mask, alpha=0.0)
    assert importance[0, 0] > importance[1, 1]
    assert torch.equal(importance[~mask], torch.zeros(int((~mask).sum())))


def test_delta_to_temperature():
    assert delta_to_temperature(0.5) == pytest.approx(1.0)
    assert delta_to_temperature(0.75) == pytest.approx(3.0)
    assert delta_to_temperature(0.9) == pytest.approx(9.0)
    assert delta_to_temperature(0.0) == 0.0
    assert delta_to_temperature(1.0) == math.inf
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError):
            delta_to_temperature(bad)


@pytest.mark.parametrize("temperature", [0.0, 1.0, 3.0, math.inf])
def test_soft_removal_keeps_exactly_n_keep_live_links(temperature):
    weight, mask = random_layer(12, 20, 0.3, seed=1)
    live = int(mask.sum())
    generator = torch.Generator().manual_seed(0)
    for n_keep in (0, 1, live // 2, live - 1, live):
        kept = soft_removal(weight, mask, n_keep, alpha=1.0, temperature=temperature,
                            generator=generator)
        assert kept.dtype == torch.bool and kept.shape == mask.shape
        assert int(kept.sum()) == n_keep
        assert not bool((kept & ~mask).any())  # never resurrects a dead link


def test_soft_removal_does_not_modify_its_inputs():
    weight, mask = random_layer(6, 8, 0.5, seed=2)
    weight_before, mask_before = weight.clone(), mask.clone()
    soft_removal(weight, mask, 3, alpha=0.5, temperature=1.0)
    assert torch.equal(weight, weight_before) and torch.equal(mask, mask_before)


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_delta_one_is_top_k_by_importance(alpha):
    weight, mask = random_layer(10, 15, 0.4, seed=3)
    n_keep = int(mask.sum()) // 3
    kept = soft_removal(weight, mask, n_keep, alpha, delta_to_temperature(1.0),
                        torch.Generator().manual_seed(0))
    importance = removal_importance(weight, mask, alpha)
    top = torch.topk(importance.flatten(), n_keep).indices
    assert set(torch.nonzero(kept.flatten()).flatten().tolist()) == set(top.tolist())
    assert torch.equal(kept, prune_to_count(weight, mask, n_keep, alpha))


@pytest.mark.slow  # the longest default-tier tests (5-10 s each); CI runs the slow tier too
def test_soft_removal_keep_frequencies_follow_importance_to_the_temperature():
    weight = torch.tensor([[0.5, 1.0, 0.0], [2.0, 0.0, 3.0]])
    mask = weight != 0
    temperature = 2.0
    importance = removal_importance(weight, mask, alpha=1.0)
    live = torch.nonzero(mask.flatten()).flatten().tolist()
    generator = torch.Generator().manual_seed(7)
    draws = 20_000
    counts = Counter()
    for _ in range(draws):
        counts[torch.nonzero(soft_removal(weight, mask, 1, 1.0, temperature, generator)
                             .flatten()).item()] += 1
    weights = [importance.flatten()[i].item() ** temperature for i in live]
    expected = [w / sum(weights) * draws for w in weights]
    assert set(counts) == set(live)
    assert stats.chisquare([counts[i] for i in live], expected).pvalue > 1e-3


def test_zero_weight_live_links_are_removable_and_keepable():
    weight, mask = random_layer(8, 9, 0.6, seed=4)
    live = torch.nonzero(mask.flatten()).flatten()
    regrown = live[::3]  # live links with weight exactly 0, like freshly regrown ones
    weight.view(-1)[regrown] = 0.0
    n_positive = int(mask.sum()) - regrown.numel()
    for temperature in (1.0, math.inf):
        everything = soft_removal(weight, mask, int(mask.sum()), 1.0, temperature)
        assert torch.equal(everything, mask)
    # rigid: all positive-importance links first, then 2 zero-weight ones
    kept = soft_removal(weight, mask, n_positive + 2, 1.0, math.inf)
    assert bool(kept[weight != 0].all())
    assert int((kept & (weight == 0)).sum()) == 2
    assert torch.equal(prune_to_count(weight, mask, n_positive + 2, 0.0)[weight != 0],
                       torch.ones(n_positive, dtype=torch.bool))
    # all-zero weights: removal is uniform but still exact in count
    zeros = torch.zeros_like(weight)
    assert int(soft_removal(zeros, mask, 5, 1.0, 1.0).sum()) == 5


def test_n_keep_out_of_range_raises():
    weight, mask = random_layer(4, 4, 0.5, seed=5)
    for n_keep in (-1, int(mask.sum()) + 1):
        with pytest.raises(ValueError):
            soft_removal(weight, mask, n_keep, 1.0, 1.0)
        with pytest.raises(ValueError):
            prune_to_count(weight, mask, n_keep, 0.0)


def test_prune_to_count_keeps_the_most_important_links():
    for seed, alpha in enumerate([0.0, 0.5, 1.0]):
        weight, mask = random_layer(9, 13, 0.5, seed=10 + seed)
        n_keep = int(mask.sum()) * 2 // 3
        kept = prune_to_count(weight, mask, n_keep, alpha)
        importance = naive_importance(weight, mask, alpha)
        assert int(kept.sum()) == n_keep and not bool((kept & ~mask).any())
        dropped = mask & ~kept
        assert importance[kept].min() >= importance[dropped].max()
        assert torch.equal(kept, prune_to_count(weight, mask, n_keep, alpha))  # deterministic
