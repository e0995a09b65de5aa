"""Sampling without replacement (docs/algorithms.md §3.2): distribution, top-k limit, edge cases."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from scipy import stats

from hf_chts.topology.sampling import uniform_sample, weighted_sample_without_replacement

N_DRAWS = 20_000
# A fixed seed makes every statistical test deterministic; the threshold only
# has to reject a wrong distribution, which gives p-values of ~0.
MIN_P_VALUE = 1e-3


def draw_many(scores: torch.Tensor, k: int, temperature: float, seed: int) -> list[tuple[int, ...]]:
    generator = torch.Generator().manual_seed(seed)
    return [tuple(weighted_sample_without_replacement(scores, k, temperature, generator).tolist())
            for _ in range(N_DRAWS)]


def successive_sampling_probabilities(weights: list[float]) -> dict[frozenset, float]:
    """Exact P(unordered pair) when drawing 2 items without replacement ∝ weights."""
    total = sum(weights)
    probabilities: dict[frozenset, float] = {}
    for i, j in itertools.permutations(range(len(weights)), 2):
        if weights[i] == 0 or weights[j] == 0:
            continue
        p = weights[i] / total * weights[j] / (total - weights[i])
        key = frozenset((i, j))
        probabilities[key] = probabilities.get(key, 0.0) + p
    return probabilities


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_first_pick_frequencies_follow_scores_to_the_temperature(temperature):
    scores = torch.tensor([0.5, 1.0, 2.0, 3.0, 6.0])
    picks = Counter(draw[0] for draw in draw_many(scores, 1, temperature, seed=11))
    weights = scores.double() ** temperature
    expected = (weights / weights.sum() * N_DRAWS).tolist()
    observed = [picks[i] for i in range(len(scores))]
    assert stats.chisquare(observed, expected).pvalue > MIN_P_VALUE


def test_first_pick_rejects_the_wrong_temperature():
    """The chi-square check above is sharp enough to see T=1 vs T=2."""
    scores = torch.tensor([0.5, 1.0, 2.0, 3.0, 6.0])
    picks = Counter(draw[0] for draw in draw_many(scores, 1, 1.0, seed=3))
    wrong = scores.double() ** 2
    expected = (wrong / wrong.sum() * N_DRAWS).tolist()
    assert stats.chisquare([picks[i] for i in range(5)], expected).pvalue < 1e-6


def test_unordered_pair_distribution_matches_successive_sampling_and_multinomial():
    scores = torch.tensor([1.0, 0.0, 2.0, 3.0, 4.0, 0.5])
    pairs = Counter(frozenset(draw) for draw in draw_many(scores, 2, 1.0, seed=5))
    exact = successive_sampling_probabilities(scores.tolist())
    assert set(pairs) <= set(exact)  # index 1 (score 0) never appears
    keys = sorted(exact, key=sorted)
    observed = [pairs[key] for key in keys]
    assert stats.chisquare(observed, [exact[key] * N_DRAWS for key in keys]).pvalue > MIN_P_VALUE

    generator = torch.Generator().manual_seed(6)
    reference = Counter(
        frozenset(torch.multinomial(scores, 2, replacement=False, generator=generator).tolist())
        for _ in range(N_DRAWS)
    )
    table = [observed, [reference[key] for key in keys]]
    assert stats.chi2_contingency(table).pvalue > MIN_P_VALUE


def test_temperature_zero_is_uniform_over_positive_scores():
    scores = torch.tensor([0.01, 0.0, 100.0, 5.0, -3.0])
    picks = Counter(draw[0] for draw in draw_many(scores, 1, 0.0, seed=2))
    assert set(picks) == {0, 2, 3}
    assert stats.chisquare([picks[0], picks[2], picks[3]]).pvalue > MIN_P_VALUE


def test_infinite_temperature_is_exact_topk():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(1000, generator=generator)
    for k in (1, 7, 100, 1000):
        chosen = weighted_sample_without_replacement(scores, k, math.inf, generator)
        assert set(chosen.tolist()) == set(torch.topk(scores, k).indices.tolist())


def test_infinite_temperature_breaks_ties_by_lowest_index():
    scores = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0])
    chosen = weighted_sample_without_replacement(scores, 4, math.inf)
    assert sorted(chosen.tolist()) == [1, 2, 3, 4]


def test_two_dimensional_scores_give_flat_indices():
    scores = torch.zeros(4, 5)
    scores[2, 3] = 1.0
    scores[0, 4] = 2.0
    chosen = weighted_sample_without_replacement(scores, 2, 1.0, torch.Generator().manual_seed(0))
    assert sorted(chosen.tolist()) == [4, 13]


def test_nonpositive_scores_are_never_chosen_and_k_is_checked():
    scores = torch.tensor([0.0, -1.0, 2.0, float("nan"), 1e-30, 3.0])
    generator = torch.Generator().manual_seed(1)
    for _ in range(200):
        assert set(weighted_sample_without_replacement(scores, 3, 1.0, generator).tolist()) == {2, 4, 5}
    with pytest.raises(ValueError):
        weighted_sample_without_replacement(scores, 4, 1.0, generator)
    with pytest.raises(ValueError):
        weighted_sample_without_replacement(scores, -1, 1.0, generator)
    with pytest.raises(ValueError):
        weighted_sample_without_replacement(scores, 1, -1.0, generator)


def test_k_zero_returns_empty_long_tensor():
    empty = weighted_sample_without_replacement(torch.rand(10), 0)
    assert empty.dtype == torch.long and empty.numel() == 0
    assert uniform_sample(torch.ones(3, dtype=torch.bool), 0).numel() == 0


def test_same_seed_same_sample_float32_and_float64():
    for dtype in (torch.float32, torch.float64):
        scores = torch.rand(500, generator=torch.Generator().manual_seed(9)).to(dtype)
        first = weighted_sample_without_replacement(scores, 50, 1.0, torch.Generator().manual_seed(4))
        again = weighted_sample_without_replacement(scores, 50, 1.0, torch.Generator().manual_seed(4))
        other = weighted_sample_without_replacement(scores, 50, 1.0, torch.Generator().manual_seed(5))
        assert torch.equal(first, again)
        assert not torch.equal(first.sort().values, other.sort().values)


def test_more_than_2_pow_24_entries():
    n = 2**24 + 10
    scores = torch.ones(n)
    scores[-10:] = 1e6  # the last entries, beyond multinomial's limit, must be reachable
    chosen = weighted_sample_without_replacement(scores, 1000, 1.0, torch.Generator().manual_seed(0))
    assert chosen.numel() == 1000 and chosen.unique().numel() == 1000
    assert int(chosen.min()) >= 0 and int(chosen.max()) < n
    assert set(range(n - 10, n)) <= set(chosen.tolist())

    candidates = torch.zeros(n, dtype=torch.bool)
    candidates[-20:] = True
    picked = uniform_sample(candidates, 15, torch.Generator().manual_seed(0))
    assert picked.unique().numel() == 15 and bool(candidates[picked].all())


def test_uniform_sample_is_uniform_over_candidates():
    candidates = torch.tensor([[True, False, True], [False, True, True]])
    generator = torch.Generator().manual_seed(8)
    picks = Counter(uniform_sample(candidates, 1, generator).item() for _ in range(N_DRAWS))
    assert set(picks) == {0, 2, 4, 5}
    assert stats.chisquare([picks[i] for i in (0, 2, 4, 5)]).pvalue > MIN_P_VALUE

    chosen = uniform_sample(candidates, 4, generator)
    assert sorted(chosen.tolist()) == [0, 2, 4, 5]
    with pytest.raises(ValueError):
        uniform_sample(candidates, 5, generator)
