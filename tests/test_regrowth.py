"""Link regrowth (docs/algorithms.md §5): counts, candidates, selection rules, determinism."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from scipy import stats

from hf_chts.topology.ch_scores import ch3_l3_path_scores, ch_l3n_scores
from hf_chts.topology.regrowth import REGROWTH_METHODS, regrow

CH_SCORES = {
    "ch2_l3n": lambda mask: ch_l3n_scores(mask, "ch2"),
    "ch3_l3n": lambda mask: ch_l3n_scores(mask, "ch3"),
    "ch3_l3": ch3_l3_path_scores,
}


def random_mask(n_out: int, n_in: int, density: float, seed: int) -> torch.Tensor:
    return torch.rand(n_out, n_in, generator=torch.Generator().manual_seed(seed)) < density


def random_grad(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def grow(mask: torch.Tensor, n_grow: int, method: str, seed: int = 0, **kwargs):
    if method == "gradient" and "weight_grad" not in kwargs:
        kwargs["weight_grad"] = random_grad(tuple(mask.shape), seed=99)
    return regrow(mask, n_grow, method, generator=torch.Generator().manual_seed(seed), **kwargs)


def assert_valid_growth(mask, new_mask, grown, n_grow):
    assert new_mask.dtype == torch.bool and new_mask.shape == mask.shape
    assert grown.dtype == torch.long and grown.numel() == n_grow
    assert grown.unique().numel() == n_grow
    assert not bool(mask.flatten()[grown].any())  # only former candidates
    expected = mask.clone().flatten()
    expected[grown] = True
    assert torch.equal(new_mask.flatten(), expected)
    assert int(new_mask.sum()) == int(mask.sum()) + n_grow


@pytest.mark.parametrize("method", REGROWTH_METHODS)
@pytest.mark.parametrize("selection", ["soft", "rigid"])
def test_exact_counts_on_candidates_only(method, selection):
    for seed, shape in enumerate([(10, 16), (16, 10), (12, 12)]):
        mask = random_mask(*shape, 0.3, seed)
        n_candidates = int((~mask).sum())
        for n_grow in (1, 5, n_candidates // 2, n_candidates):
            new_mask, grown = grow(mask, n_grow, method, seed, selection=selection)
            assert_valid_growth(mask, new_mask, grown, n_grow)


@pytest.mark.parametrize("method", REGROWTH_METHODS)
def test_zero_or_negative_count_is_a_no_op(method):
    mask = random_mask(8, 9, 0.4, seed=1)
    before = mask.clone()
    for n_grow in (0, -3):
        new_mask, grown = grow(mask, n_grow, method)
        assert torch.equal(new_mask, mask) and grown.numel() == 0 and grown.dtype == torch.long
        new_mask[0, 0] = not bool(new_mask[0, 0])  # the result does not alias the input
        assert torch.equal(mask, before)


def test_too_many_links_and_bad_arguments_raise():
    mask = random_mask(5, 6, 0.5, seed=2)
    n_candidates = int((~mask).sum())
    for method in REGROWTH_METHODS:
        with pytest.raises(ValueError):
            grow(mask, n_candidates + 1, method)
    with pytest.raises(ValueError, match="gradient"):
        regrow(mask, 2, "gradient")
    with pytest.raises(ValueError, match="ch2_l3n"):
        regrow(mask, 2, "magic")
    with pytest.raises(ValueError, match="soft"):
        regrow(mask, 2, "ch2_l3n", selection="greedy")


@pytest.mark.parametrize("method", ["ch2_l3n", "ch3_l3n", "ch3_l3"])
def test_rigid_selection_takes_top_scores(method):
    mask = random_mask(14, 18, 0.2, seed=3)
    scores = CH_SCORES[method](mask)
    n_positive = int((scores > 0).sum())
    n_grow = n_positive // 2
    new_mask, grown = grow(mask, n_grow, method, selection="rigid")
    assert_valid_growth(mask, new_mask, grown, n_grow)
    candidate_scores = scores.flatten()[(~mask).flatten()]
    expected_top = torch.topk(candidate_scores, n_grow).values.sort().values
    assert torch.equal(scores.flatten()[grown].sort().values, expected_top)
    not_grown = (~new_mask).flatten()
    assert scores.flatten()[grown].min() >= scores.flatten()[not_grown].max()


@pytest.mark.parametrize("method", ["ch2_l3n", "ch3_l3"])
def test_too_few_positive_scores_are_all_taken_then_filled_at_random(method):
    # one 3×3 block (CH scores only inside it) plus isolated links elsewhere
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[:3, :3] = torch.rand(3, 3, generator=torch.Generator().manual_seed(0)) < 0.6
    mask[0, 0] = mask[1, 0] = mask[0, 1] = True
    mask[7, 10] = True
    scores = CH_SCORES[method](mask)
    positive = set(torch.nonzero(scores.flatten() > 0).flatten().tolist())
    assert 0 < len(positive) < 9
    n_grow = len(positive) + 4
    fillers = set()
    for seed in range(5):
        new_mask, grown = grow(mask, n_grow, method, seed=seed)
        assert_valid_growth(mask, new_mask, grown, n_grow)
        grown_set = set(grown.tolist())
        assert positive <= grown_set
        fillers.add(frozenset(grown_set - positive))
    assert len(fillers) > 1  # the fill is random, not e.g. the lowest indices


@pytest.mark.slow  # the longest default-tier tests (5-10 s each); CI runs the slow tier too
def test_soft_selection_frequencies_follow_scores():
    mask = random_mask(5, 6, 0.4, seed=4)
    scores = ch_l3n_scores(mask, "ch2").flatten()
    positive = torch.nonzero(scores > 0).flatten().tolist()
    assert len(positive) >= 3
    generator = torch.Generator().manual_seed(5)
    draws = 5_000
    counts = Counter(regrow(mask, 1, "ch2_l3n", generator=generator)[1].item()
                     for _ in range(draws))
    assert set(counts) <= set(positive)
    weights = [scores[i].item() for i in positive]
    expected = [w / sum(weights) * draws for w in weights]
    assert stats.chisquare([counts[i] for i in positive], expected).pvalue > 1e-3


def test_soft_temperature_is_passed_to_the_sampler():
    mask = random_mask(5, 6, 0.4, seed=4)
    scores = ch_l3n_scores(mask, "ch2").flatten()
    positive = torch.nonzero(scores > 0).flatten().tolist()
    generator = torch.Generator().manual_seed(6)
    draws = 5_000
    counts = Counter(regrow(mask, 1, "ch2_l3n", generator=generator, temperature=3.0)[1].item()
                     for _ in range(draws))
    weights = [scores[i].item() ** 3 for i in positive]
    expected = [w / sum(weights) * draws for w in weights]
    assert stats.chisquare([counts[i] for i in positive], expected).pvalue > 1e-3


def test_gradient_takes_top_absolute_gradient_among_candidates():
    mask = random_mask(9, 11, 0.5, seed=6)
    grad = random_grad((9, 11), seed=7)
    grad[mask] = 100.0  # large gradients on existing links must be ignored
    for n_grow in (1, 10, int((~mask).sum())):
        new_mask, grown = regrow(mask, n_grow, "gradient", weight_grad=grad)
        assert_valid_growth(mask, new_mask, grown, n_grow)
        candidate_magnitude = torch.where(~mask, grad.abs(), torch.full_like(grad, -1.0)).flatten()
        top = torch.topk(candidate_magnitude, n_grow).indices
        assert set(grown.tolist()) == set(top.tolist())


def test_random_regrowth_is_uniform_over_candidates():
    mask = random_mask(3, 4, 0.5, seed=8)
    candidates = torch.nonzero((~mask).flatten()).flatten().tolist()
    generator = torch.Generator().manual_seed(9)
    draws = 10_000
    counts = Counter(regrow(mask, 1, "random", generator=generator)[1].item() for _ in range(draws))
    assert set(counts) == set(candidates)
    assert stats.chisquare([counts[i] for i in candidates]).pvalue > 1e-3


@pytest.mark.parametrize("method", REGROWTH_METHODS)
def test_same_seed_same_growth(method):
    mask = random_mask(12, 15, 0.25, seed=10)
    first = grow(mask, 20, method, seed=3)
    again = grow(mask, 20, method, seed=3)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    if method in ("random", "ch2_l3n", "ch3_l3n", "ch3_l3"):
        other = grow(mask, 20, method, seed=4)
        assert not torch.equal(first[0], other[0])


def test_memory_budget_does_not_change_the_growth():
    mask = random_mask(40, 30, 0.15, seed=11)
    free = grow(mask, 25, "ch2_l3n", seed=1)
    tight = grow(mask, 25, "ch2_l3n", seed=1, ch_memory_budget_bytes=1)
    assert torch.equal(free[0], tight[0]) and torch.equal(free[1], tight[1])


def test_infinite_temperature_soft_equals_rigid():
    mask = random_mask(10, 10, 0.3, seed=12)
    soft = grow(mask, 8, "ch3_l3n", seed=0, temperature=math.inf)
    rigid = grow(mask, 8, "ch3_l3n", seed=1, selection="rigid")
    assert torch.equal(soft[0], rigid[0])


@pytest.mark.parametrize("method", ["ch2_l3n", "random", "ch3_l3"])
def test_transposed_view_mask_behaves_like_a_contiguous_one(method):
    """GPT-2 Conv1D layers hand over a transposed view of their (in × out) mask."""
    mask = random_mask(9, 7, 0.3, seed=13)
    view = mask.t().contiguous().t()
    assert not view.is_contiguous()
    expected_mask, expected_grown = grow(mask, 6, method, seed=2)
    new_mask, grown = grow(view, 6, method, seed=2)
    assert torch.equal(new_mask, expected_mask) and torch.equal(grown, expected_grown)
    assert bool(new_mask.reshape(-1)[grown].all())
