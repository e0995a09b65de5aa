"""Initial sparse topologies (docs/algorithms.md §2): hf_chts.topology.init, .budgets, .bsf, and hf_chts.weight_init.

Behaviour is checked against slow, obvious references on small layers
(brute-force ring distances, numpy correlations, exact-fraction largest
remainder) and against ER statistics over several seeds.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from fractions import Fraction

import numpy as np
import pytest
import torch

from hf_chts.topology.budgets import allocate_links, count_links
from hf_chts.topology.bsf import bsf_mask
from hf_chts.topology.init import DEGREE_MODES, INIT_METHODS, brf_mask, bsw_mask, build_mask, csti_mask, er_mask
from hf_chts.weight_init import reinit_sparse_weight_


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def calibration(samples: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs with some shared structure (random mixing of latent factors)."""
    g = gen(seed)
    latent = torch.randn(samples, max(2, features // 2), generator=g)
    mixing = torch.randn(latent.shape[1], features, generator=g)
    return latent @ mixing + 0.5 * torch.randn(samples, features, generator=g)


def construction_view(mask: torch.Tensor) -> torch.Tensor:
    """The mask with the smaller side as rows (how bsw/brf are built)."""
    return mask.T if mask.shape[0] > mask.shape[1] else mask


def ring_distance(j: int, row: int, rows: int, cols: int) -> float:
    """Brute force: distance on the ring of ``cols`` columns between j and c_row = row·cols/rows."""
    centre = row * cols / rows
    d = abs(j - centre) % cols
    return min(d, cols - d)


def degree_variance(mask: torch.Tensor, dim: int) -> float:
    return float(mask.sum(dim).double().var(unbiased=False))


SHAPES = [(1, 9), (9, 1), (6, 6), (8, 21), (21, 8), (33, 17)]
DENSITIES = [0.05, 0.3, 0.5, 1.0]
RANDOM_CONFIGS = [
    ("er", {}),
    ("bsw", {"beta": 0.0}),
    ("bsw", {"beta": 0.25}),
    ("bsw", {"beta": 1.0}),
    ("brf", {"r": 0.0}),
    ("brf", {"r": 0.25, "degree_mode": "fixed"}),
    ("brf", {"r": 0.25, "degree_mode": "uniform"}),
    ("brf", {"r": 1.0}),
    ("bsf", {}),
    ("bsf", {"bsf_equal_partition": True}),
]


def config_id(config) -> str:
    method, kwargs = config
    return method + "".join(f"-{k}={v}" for k, v in kwargs.items())


# ---------------------------------------------------------------- budgets
@pytest.mark.parametrize("config", RANDOM_CONFIGS + [("csti", {})], ids=config_id)
def test_every_method_returns_exactly_round_density_times_numel(config):
    method, kwargs = config
    for out_features, in_features in SHAPES:
        for density in DENSITIES:
            if method == "csti":
                kwargs = {"calibration_inputs": calibration(40, in_features)}
            mask = build_mask(method, out_features, in_features, density, generator=gen(3), **kwargs)
            numel = out_features * in_features
            expected = math.floor(Fraction(str(density)) * numel + Fraction(1, 2))  # decimal density, half up
            assert mask.dtype == torch.bool
            assert mask.shape == (out_features, in_features)
            assert int(mask.sum()) == expected, (method, kwargs, out_features, in_features, density)


def test_count_links_rounds_half_up_and_validates():
    for numel in range(0, 40):
        for density in (0.1, 0.25, 0.5, 0.7, 1.0):
            exact = Fraction(str(density)) * numel  # the decimal the user wrote
            assert count_links(density, numel) == math.floor(exact + Fraction(1, 2))
    assert count_links(0.5, 5) == 3  # half up, where round() would give 2
    with pytest.raises(ValueError, match="density"):
        count_links(0.0, 10)
    with pytest.raises(ValueError, match="numel"):
        count_links(0.5, -1)


def test_dense_is_all_ones_whatever_the_density():
    mask = build_mask("dense", 7, 5, 0.3, generator=gen())
    assert mask.dtype == torch.bool and bool(mask.all()) and mask.shape == (7, 5)


def test_larger_layer_counts():
    out_features, in_features = 344, 128  # a 1/4-scale LLaMA-60M FFN
    expected = count_links(0.3, out_features * in_features)
    for method, kwargs in RANDOM_CONFIGS:
        mask = build_mask(method, out_features, in_features, 0.3, generator=gen(1), **kwargs)
        assert int(mask.sum()) == expected, (method, kwargs)


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize("config", RANDOM_CONFIGS, ids=config_id)
def test_deterministic_per_seed_and_different_across_seeds(config):
    method, kwargs = config
    # K = 298/24 is not an integer, so even the lattices draw which rows get ⌊K⌋+1
    first = build_mask(method, 24, 40, 0.31, generator=gen(11), **kwargs)
    again = build_mask(method, 24, 40, 0.31, generator=gen(11), **kwargs)
    assert torch.equal(first, again)
    others = [build_mask(method, 24, 40, 0.31, generator=gen(seed), **kwargs) for seed in range(12, 16)]
    assert all(not torch.equal(first, other) for other in others)


def test_csti_is_deterministic_without_generator():
    x = calibration(50, 16)
    assert torch.equal(csti_mask(20, 16, 90, x), csti_mask(20, 16, 90, x.clone()))


# ---------------------------------------------------------------- bsw
@pytest.mark.parametrize("shape", [(8, 21), (21, 8), (7, 7), (5, 50), (50, 5), (3, 10)])
@pytest.mark.parametrize("density", [0.1, 0.3, 0.55])
def test_bsw_beta0_is_a_wraparound_band_around_the_rectangular_diagonal(shape, density):
    mask = bsw_mask(*shape, count_links(density, shape[0] * shape[1]), 0.0, gen(5))
    lattice = construction_view(mask)
    rows, cols = lattice.shape
    n_links = int(mask.sum())
    k = n_links / rows
    for i in range(rows):
        linked = [j for j in range(cols) if lattice[i, j]]
        assert len(linked) in (math.floor(k), math.floor(k) + 1)
        for j in linked:
            assert ring_distance(j, i, rows, cols) <= k / 2 + 1
        if 0 < len(linked) < cols:  # one contiguous run on the ring
            run_starts = [j for j in linked if not lattice[i, (j - 1) % cols]]
            assert len(run_starts) == 1


def test_bsw_beta1_has_the_degree_spread_of_er_and_the_lattice_has_none():
    out_features, in_features, n_links = 32, 64, count_links(0.2, 32 * 64)
    seeds = range(8)
    lattice_var = [degree_variance(bsw_mask(out_features, in_features, n_links, 0.0, gen(s)), 1) for s in seeds]
    random_var = statistics.mean(
        degree_variance(bsw_mask(out_features, in_features, n_links, 1.0, gen(s)), 1) for s in seeds
    )
    er_var = statistics.mean(degree_variance(er_mask(out_features, in_features, n_links, gen(s)), 1) for s in seeds)
    assert max(lattice_var) <= 0.25  # degrees differ by at most one
    assert er_var > 10 * 0.25
    assert 0.5 < random_var / er_var < 2.0
    column_var = statistics.mean(
        degree_variance(bsw_mask(out_features, in_features, n_links, 1.0, gen(s)), 0) for s in seeds
    )
    er_column_var = statistics.mean(
        degree_variance(er_mask(out_features, in_features, n_links, gen(s)), 0) for s in seeds
    )
    assert 0.5 < column_var / er_column_var < 2.0


def test_bsw_rewires_about_a_beta_share_of_the_links():
    out_features, in_features, n_links = 40, 80, count_links(0.1, 40 * 80)
    k = n_links / out_features
    for beta in (0.25, 0.5):
        mask = bsw_mask(out_features, in_features, n_links, beta, gen(2))
        outside = sum(
            1
            for i, j in mask.nonzero().tolist()
            if ring_distance(j, i, out_features, in_features) > k / 2 + 1
        )
        # a dropped link lands outside the band with probability ~ 1 - k/in_features
        assert 0.6 * beta < outside / n_links < 1.2 * beta


# ---------------------------------------------------------------- brf
@pytest.mark.parametrize("shape", [(3, 10), (10, 3), (7, 7), (5, 23), (23, 5), (12, 40)])
@pytest.mark.parametrize("degree_mode", DEGREE_MODES)
def test_brf_r0_takes_exactly_the_nearest_columns(shape, degree_mode):
    mask = brf_mask(*shape, count_links(0.3, shape[0] * shape[1]), 0.0, degree_mode, gen(4))
    view = construction_view(mask)
    rows, cols = view.shape
    for i in range(rows):
        distances = [ring_distance(j, i, rows, cols) for j in range(cols)]
        chosen = [distances[j] for j in range(cols) if view[i, j]]
        others = [distances[j] for j in range(cols) if not view[i, j]]
        assert chosen, "every row has a link"
        # the chosen set is a set of nearest columns: sorted distances are the smallest ones
        assert sorted(chosen) == sorted(distances)[: len(chosen)]
        if others:
            assert max(chosen) <= min(others) + 1e-9


def test_brf_uses_the_real_valued_diagonal_not_an_integer_stride():
    # 3 x 10: c = 0, 3.33, 6.67; an integer stride (10 // 3 = 3) would centre row 2 at 6
    mask = brf_mask(3, 10, 3, 0.0, "fixed", gen())
    assert mask.nonzero().tolist() == [[0, 0], [1, 3], [2, 7]]


def test_brf_integer_stride_centres_rows_like_the_released_code():
    # 3 x 10 with the released integer stride 10 // 3 = 3: centres 0, 3, 6 (docs/parity.md)
    mask = brf_mask(3, 10, 3, 0.0, "fixed", gen(), centres="integer_stride")
    assert mask.nonzero().tolist() == [[0, 0], [1, 3], [2, 6]]


@pytest.mark.parametrize("shape", [(3, 10), (10, 3), (5, 23), (12, 40), (7, 7)])
def test_brf_integer_stride_r0_takes_the_nearest_columns_to_the_strided_centres(shape):
    mask = brf_mask(*shape, count_links(0.3, shape[0] * shape[1]), 0.0, "fixed", gen(5), centres="integer_stride")
    view = construction_view(mask)
    rows, cols = view.shape
    stride = max(1, cols // rows)
    for i in range(rows):
        centre = (i * stride) % cols
        distances = [min(abs(j - centre), cols - abs(j - centre)) for j in range(cols)]
        chosen = sorted(distances[j] for j in range(cols) if view[i, j])
        assert chosen == sorted(distances)[: len(chosen)], i
    with pytest.raises(ValueError, match="brf_centres"):
        build_mask("brf", 4, 8, 0.5, generator=gen(), brf_centres="ring")


@pytest.mark.parametrize("shape", [(10, 100), (100, 10), (16, 16), (1, 30), (30, 1)])
@pytest.mark.parametrize("density", [0.01, 0.1, 0.4, 1.0])
def test_brf_every_row_of_the_smaller_side_has_a_link(shape, density):
    n_links = count_links(density, shape[0] * shape[1])
    for degree_mode in DEGREE_MODES:
        view = construction_view(brf_mask(*shape, n_links, 0.25, degree_mode, gen(6)))
        if n_links >= view.shape[0]:
            assert int(view.sum(1).min()) >= 1
        if degree_mode == "fixed":
            k = n_links / view.shape[0]
            assert set(view.sum(1).tolist()) <= {math.floor(k), math.floor(k) + 1}


def test_brf_uniform_degrees_are_spread_and_fixed_degrees_are_not():
    n_links = count_links(0.1, 64 * 128)
    uniform = brf_mask(64, 128, n_links, 0.25, "uniform", gen(1))
    fixed = brf_mask(64, 128, n_links, 0.25, "fixed", gen(1))
    assert degree_variance(fixed, 1) <= 0.25
    # multinomial spread of the links beyond the first: variance ~ (n - rows)/rows
    expected = (n_links - 64) / 64 * (1 - 1 / 64)
    assert 0.5 * expected < degree_variance(uniform, 1) < 2.0 * expected


@pytest.mark.parametrize("r", [0.25, 0.5, 0.75])
def test_brf_column_probabilities_follow_the_power_law_of_distance(r):
    # 12 x 12, one link per row: the offset of row i's link from its centre c_i = i
    # is a single draw from p(d) ∝ (1 + d)^(-(1-r)/r), d the ring distance
    cols = 12
    counts = torch.zeros(cols)
    draws = 0
    for seed in range(250):
        mask = brf_mask(cols, cols, cols, r, "fixed", gen(seed))
        offsets = (mask.nonzero()[:, 1] - mask.nonzero()[:, 0]) % cols
        counts += torch.bincount(offsets, minlength=cols).float()
        draws += cols
    weights = torch.tensor(
        [(1 + min(j, cols - j)) ** (-(1 - r) / r) for j in range(cols)], dtype=torch.float64
    )
    expected = weights / weights.sum()
    observed = counts.double() / draws
    assert torch.allclose(observed, expected, atol=0.03)


def test_brf_locality_decreases_with_r_and_r1_is_er_like():
    out_features, in_features = 32, 96
    n_links = count_links(0.1, out_features * in_features)

    def mean_distance(mask):
        return statistics.mean(ring_distance(j, i, out_features, in_features) for i, j in mask.nonzero().tolist())

    spread = {
        r: mean_distance(brf_mask(out_features, in_features, n_links, r, "uniform", gen(3))) for r in (0.0, 0.25, 1.0)
    }
    assert spread[0.0] < spread[0.25] < spread[1.0]
    assert abs(spread[1.0] - in_features / 4) < 0.15 * in_features / 4  # uniform on the ring
    seeds = range(6)
    column_var = statistics.mean(
        degree_variance(brf_mask(out_features, in_features, n_links, 1.0, "uniform", gen(s)), 0) for s in seeds
    )
    er_column_var = statistics.mean(
        degree_variance(er_mask(out_features, in_features, n_links, gen(s)), 0) for s in seeds
    )
    assert 0.5 < column_var / er_column_var < 2.0


# ---------------------------------------------------------------- bsf
def node_degrees(mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([mask.sum(1), mask.sum(0)]).double()


def test_bsf_degree_distribution_is_heavy_tailed_compared_to_er():
    out_features, in_features = 200, 300
    n_links = count_links(0.02, out_features * in_features)
    bsf_max, er_max, bsf_cv, er_cv, bsf_hubs, er_hubs = [], [], [], [], [], []
    for seed in range(4):
        for mask, maxima, cvs, hubs in (
            (bsf_mask(out_features, in_features, n_links, gen(seed)), bsf_max, bsf_cv, bsf_hubs),
            (er_mask(out_features, in_features, n_links, gen(seed)), er_max, er_cv, er_hubs),
        ):
            degrees = node_degrees(mask)
            maxima.append(float(degrees.max()))
            cvs.append(float(degrees.std() / degrees.mean()))
            hubs.append(int((degrees > 4 * degrees.mean()).sum()))
    assert statistics.mean(bsf_max) > 3 * statistics.mean(er_max)
    assert statistics.mean(bsf_cv) > 1.8 * statistics.mean(er_cv)
    assert min(bsf_hubs) >= 3 and max(er_hubs) == 0


def test_bsf_equal_partition_equalises_inputs_and_keeps_output_degrees():
    for out_features, in_features, density in ((60, 90, 0.1), (90, 60, 0.1), (40, 40, 0.3), (30, 200, 0.02)):
        n_links = count_links(density, out_features * in_features)
        plain = bsf_mask(out_features, in_features, n_links, gen(8))
        equal = bsf_mask(out_features, in_features, n_links, gen(8), equal_partition=True)
        assert torch.equal(equal.sum(1), plain.sum(1))  # output (row) degrees kept
        column_degrees = set(equal.sum(0).tolist())
        assert column_degrees <= {n_links // in_features, -(-n_links // in_features)}
        if n_links >= in_features:
            assert min(column_degrees) >= 1
        assert not torch.equal(equal, plain)


def test_bsf_equal_partition_is_randomised_not_a_fixed_pattern():
    n_links = count_links(0.2, 30 * 50)
    a = bsf_mask(30, 50, n_links, gen(1), equal_partition=True)
    # laying rows on consecutive stretches of a column cycle leaves most row pairs disjoint;
    # after the degree-preserving swaps, disjoint pairs are as rare as in a random graph
    wide_rows = [i for i in range(30) if a[i].sum() >= 8]
    overlaps = [int((a[i] & a[j]).sum()) for i in wide_rows for j in wide_rows if i < j]
    assert len(overlaps) > 20
    assert sum(1 for o in overlaps if o == 0) / len(overlaps) < 0.3


# ---------------------------------------------------------------- csti
PLANTED = [(0, 5), (3, 9), (7, 11)]


def planted_calibration(samples: int = 500, features: int = 12) -> torch.Tensor:
    g = gen(21)
    x = torch.randn(samples, features, generator=g)
    for a, b in PLANTED:
        x[:, b] = x[:, a] + 0.1 * torch.randn(samples, generator=g)
    return x


def test_csti_picks_the_planted_correlated_pairs():
    x = planted_calibration()
    both_ways = {(a, b) for a, b in PLANTED} | {(b, a) for a, b in PLANTED}
    square = csti_mask(12, 12, 6, x)
    assert {tuple(p) for p in square.nonzero().tolist()} == both_ways
    # O = 2I: output o reads correlation row o mod I (the released code's tiling)
    tall = csti_mask(24, 12, 12, x)
    assert {tuple(p) for p in tall.nonzero().tolist()} == both_ways | {(o + 12, j) for o, j in both_ways}
    # O < I: the first O rows
    short = csti_mask(6, 12, 3, x)
    assert {tuple(p) for p in short.nonzero().tolist()} == {(0, 5), (5, 0), (3, 9)}
    via_build = build_mask("csti", 12, 12, 6 / 144, generator=gen(), calibration_inputs=x)
    assert torch.equal(via_build, square)


def test_csti_takes_the_top_absolute_correlations_of_a_numpy_reference():
    out_features, in_features, n_links = 15, 10, 40
    x = calibration(300, in_features, seed=4)
    correlation = np.abs(np.corrcoef(x.double().numpy(), rowvar=False))
    np.fill_diagonal(correlation, 0.0)
    scores = torch.from_numpy(correlation[np.arange(out_features) % in_features])
    mask = csti_mask(out_features, in_features, n_links, x)
    assert float(scores[mask].min()) >= float(scores[~mask].max()) - 1e-5


def test_csti_requires_matching_calibration_inputs():
    with pytest.raises(ValueError, match="calibration_inputs"):
        build_mask("csti", 4, 6, 0.5, generator=gen())
    with pytest.raises(ValueError, match="calibration_inputs"):
        csti_mask(4, 6, 12, torch.randn(10, 5))
    with pytest.raises(ValueError, match="calibration_inputs"):
        csti_mask(4, 6, 12, torch.randn(1, 6))


# ---------------------------------------------------------------- allocate_links
def largest_remainder_reference(total: int, sizes: list[int]) -> list[int]:
    capacity = sum(sizes)
    quotas = [Fraction(total * s, capacity) for s in sizes]
    shares = [math.floor(q) for q in quotas]
    order = sorted(range(len(sizes)), key=lambda b: (-(quotas[b] - shares[b]), b))
    for b in order[: total - sum(shares)]:
        shares[b] += 1
    return shares


def test_allocate_links_sums_exactly_respects_sizes_and_matches_reference():
    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.choice([0, 1, 7, 64, 513, 4096]) * rng.randint(1, 5) for _ in range(rng.randint(1, 5))]
        if sum(sizes) == 0:
            continue
        total = rng.randint(0, sum(sizes))
        shares = allocate_links(total, sizes)
        assert sum(shares) == total
        assert all(0 <= share <= size for share, size in zip(shares, sizes))
        assert all(abs(share - total * size / sum(sizes)) < 1 for share, size in zip(shares, sizes))
        assert shares == largest_remainder_reference(total, sizes)
    assert allocate_links(0, [0, 0]) == [0, 0]
    assert allocate_links(30, [10, 10, 10]) == [10, 10, 10]


def test_allocate_links_rejects_impossible_budgets():
    with pytest.raises(ValueError, match="total"):
        allocate_links(31, [10, 10, 10])
    with pytest.raises(ValueError, match="sizes"):
        allocate_links(3, [10, -1])


# ---------------------------------------------------------------- reinit
def varied_fan_in_mask(rows: int = 400, cols: int = 512, fan_ins=(4, 16, 64, 256)) -> torch.Tensor:
    g = gen(9)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        mask[i, torch.randperm(cols, generator=g)[: fan_ins[i % len(fan_ins)]]] = True
    return mask


@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_reinit_zeroes_masked_weights_and_scales_rows_by_live_fan_in(gain):
    fan_ins = (4, 16, 64, 256)
    mask = varied_fan_in_mask(fan_ins=fan_ins)
    weight = torch.randn(mask.shape)
    pointer = weight.data_ptr()
    reinit_sparse_weight_(weight, mask, gain=gain, generator=gen(2))
    assert weight.data_ptr() == pointer
    assert bool((weight[~mask] == 0).all())
    assert bool((weight[mask] != 0).all())
    for group, fan_in in enumerate(fan_ins):
        rows = weight[group :: len(fan_ins)]
        live = rows[mask[group :: len(fan_ins)]]
        target_std = gain / math.sqrt(fan_in)
        assert float(live.abs().max()) <= gain * math.sqrt(3 / fan_in) + 1e-6
        assert 0.9 < float(live.std()) / target_std < 1.1


def test_reinit_works_in_place_on_a_transposed_view_and_keeps_empty_rows_zero():
    mask = varied_fan_in_mask(rows=40, cols=64, fan_ins=(0, 8))
    stored = torch.randn(64, 40, dtype=torch.bfloat16)  # GPT-2 Conv1D layout: in x out
    reinit_sparse_weight_(stored.T, mask, generator=gen(1))
    logical = stored.T.float()
    assert bool((logical[~mask] == 0).all())
    assert bool((logical[0::2] == 0).all())  # rows with no live link
    assert float(logical[1::2][mask[1::2]].abs().max()) <= math.sqrt(3 / 8) * 1.01


def test_reinit_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="mask"):
        reinit_sparse_weight_(torch.zeros(3, 4), torch.ones(4, 3, dtype=torch.bool))


# ---------------------------------------------------------------- argument validation
@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"method": "magic"}, r"method must be one of er, bsw, brf, bsf, csti, dense"),
        ({"density": 0.0}, r"density"),
        ({"density": 1.5}, r"density"),
        ({"density": -0.2}, r"density"),
        ({"beta": -0.1}, r"beta"),
        ({"beta": 1.1}, r"beta"),
        ({"r": 1.5}, r"^r must be"),
        ({"r": -0.5}, r"^r must be"),
        ({"degree_mode": "gaussian"}, r"degree_mode.*uniform, fixed"),
        ({"out_features": 0}, r"out_features"),
        ({"in_features": -3}, r"in_features"),
    ],
)
def test_build_mask_rejects_bad_arguments_naming_them(kwargs, pattern):
    arguments = {"method": "bsw", "out_features": 4, "in_features": 6, "density": 0.5}
    arguments.update(kwargs)
    method = arguments.pop("method")
    out_features, in_features, density = (arguments.pop(k) for k in ("out_features", "in_features", "density"))
    with pytest.raises(ValueError, match=pattern):
        build_mask(method, out_features, in_features, density, generator=gen(), **arguments)


def test_builders_reject_bad_link_counts_and_parameters():
    with pytest.raises(ValueError, match="n_links"):
        er_mask(3, 3, 10, gen())
    with pytest.raises(ValueError, match="n_links"):
        bsf_mask(3, 3, -1, gen())
    with pytest.raises(ValueError, match="beta"):
        bsw_mask(3, 3, 4, 2.0, gen())
    with pytest.raises(ValueError, match="degree_mode"):
        brf_mask(3, 3, 4, 0.5, "normal", gen())
    assert set(INIT_METHODS) == {"er", "bsw", "brf", "bsf", "csti", "dense"}


# ---------------------------------------------------------------- speed
@pytest.mark.slow
def test_llama_1b_ffn_shape_is_fast():
    out_features, in_features = 5461, 2048
    expected = count_links(0.3, out_features * in_features)
    for method, kwargs in (("er", {}), ("bsw", {"beta": 0.25}), ("brf", {"r": 0.25})):
        start = time.perf_counter()
        mask = build_mask(method, out_features, in_features, 0.3, generator=gen(), **kwargs)
        elapsed = time.perf_counter() - start
        assert int(mask.sum()) == expected
        assert elapsed < 8.0, (method, elapsed)  # ~0.5-1.5 s on 2 idle cores; generous for loaded CI


def test_bsf_resort_aligns_hidden_degrees_and_keeps_links():
    from hf_chts.topology.bsf import resort_by_degree

    generator = torch.Generator().manual_seed(0)
    producer = bsf_mask(40, 16, 200, generator)       # F=40 hidden rows, reading 16 inputs
    consumer = bsf_mask(16, 40, 200, generator)       # 16 outputs reading the F=40 hidden neurons
    in_degree = producer.sum(1)
    resorted = resort_by_degree(in_degree, consumer)
    out_degree = resorted.sum(0)
    assert int(resorted.sum()) == int(consumer.sum())
    assert sorted(out_degree.tolist()) == sorted(consumer.sum(0).tolist())
    for j in range(40):  # slow, obvious check: a larger in-degree never gets a smaller out-degree
        for k in range(40):
            if in_degree[j] > in_degree[k]:
                assert out_degree[j] >= out_degree[k]
    before_violations = sum(
        1 for j in range(40) for k in range(40)
        if in_degree[j] > in_degree[k] and consumer.sum(0)[j] < consumer.sum(0)[k])
    assert before_violations > 0  # the raw BSF pair was not aligned, so the check above is meaningful
