"""CH link-prediction scores (docs/algorithms.md §5) against node-by-node references."""

from __future__ import annotations

import math

import pytest
import torch

from hf_chts.topology.ch_scores import ch3_l3_path_scores, ch_l3n_scores

# (out, in, density): O>I, O<I, O=I, tiny layers, very sparse and very dense ones.
SHAPES_AND_DENSITIES = [
    (1, 1, 0.5), (1, 6, 0.5), (6, 1, 0.5), (2, 2, 0.5), (3, 3, 0.6),
    (4, 7, 0.3), (7, 4, 0.3), (5, 5, 0.5), (8, 3, 0.7), (3, 8, 0.7),
    (10, 6, 0.2), (6, 10, 0.2), (9, 9, 0.35), (12, 5, 0.45), (5, 12, 0.45),
    (11, 13, 0.15), (13, 11, 0.25), (14, 14, 0.1), (8, 8, 0.9), (10, 4, 0.55),
    (4, 10, 0.8), (12, 12, 0.3), (7, 9, 0.5), (9, 7, 0.05),
]


def random_mask(n_out: int, n_in: int, density: float, seed: int) -> torch.Tensor:
    """Random bipartite mask; every third mask also gets an empty row and column."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_out, n_in, generator=generator) < density
    if seed % 3 == 0 and n_out > 1 and n_in > 1:
        mask[int(torch.randint(n_out, (1,), generator=generator))] = False
        mask[:, int(torch.randint(n_in, (1,), generator=generator))] = False
    return mask


def neighbour_sets(mask: torch.Tensor) -> tuple[list[set[int]], list[set[int]]]:
    """(columns linked to each row, rows linked to each column)."""
    rows = mask.tolist()
    cols_of_row = [{j for j, linked in enumerate(row) if linked} for row in rows]
    rows_of_col = [{i for i in range(len(rows)) if rows[i][j]} for j in range(mask.shape[1])]
    return cols_of_row, rows_of_col


def brute_force_ch_l3n(mask: torch.Tensor, variant: str) -> torch.Tensor:
    """Node-by-node CH-L3n of docs/algorithms.md §5, with python sets.

    S(u, v) = Σ_{b ∈ N(v), b ~ u} term(iLCL_u(b), eLCL_u(b)) + Σ_{a ∈ N(u), a ~ v} term(...)
    where b ~ u means b and u share a neighbour, iLCL_u(b) = |N(b) ∩ N(u)| and
    eLCL_u(b) = |N(b) \\ (N(u) ∪ {v})| (links leaving u's community, seed link excluded).
    """
    def term(internal: int, external: int) -> float:
        return (1 + internal) / (1 + external) if variant == "ch2" else 1 / (1 + external)

    cols_of_row, rows_of_col = neighbour_sets(mask)
    n_out, n_in = mask.shape
    scores = torch.zeros(n_out, n_in, dtype=torch.float64)
    for u in range(n_out):
        for v in range(n_in):
            if v in cols_of_row[u]:
                continue
            total = 0.0
            for b in rows_of_col[v]:
                internal = len(cols_of_row[b] & cols_of_row[u])
                if internal:
                    total += term(internal, len(cols_of_row[b] - cols_of_row[u] - {v}))
            for a in cols_of_row[u]:
                internal = len(rows_of_col[a] & rows_of_col[v])
                if internal:
                    total += term(internal, len(rows_of_col[a] - rows_of_col[v] - {u}))
            scores[u, v] = total
    return scores


def brute_force_ch3_l3(mask: torch.Tensor) -> torch.Tensor:
    """Path-based CH3-L3 by enumerating every path u – z1 – z2 – v with explicit loops.

    Local community = intermediate nodes of all the paths of (u, v);
    de(z) = links of z to nodes that are neither in the local community nor seeds.
    """
    m = mask.tolist()
    n_out, n_in = mask.shape
    scores = torch.zeros(n_out, n_in, dtype=torch.float64)
    for u in range(n_out):
        for v in range(n_in):
            if m[u][v]:
                continue
            paths = []
            for z1 in range(n_in):
                if not m[u][z1]:
                    continue
                for z2 in range(n_out):
                    if z2 != u and m[z2][z1] and m[z2][v]:
                        paths.append((z1, z2))
            community_cols = {z1 for z1, _ in paths}
            community_rows = {z2 for _, z2 in paths}
            total = 0.0
            for z1, z2 in paths:
                external_z1 = sum(1 for r in range(n_out)
                                  if m[r][z1] and r not in community_rows and r != u)
                external_z2 = sum(1 for c in range(n_in)
                                  if m[z2][c] and c not in community_cols and c != v)
                total += 1.0 / math.sqrt((1 + external_z1) * (1 + external_z2))
            scores[u, v] = total
    return scores


@pytest.mark.parametrize("variant", ["ch2", "ch3"])
def test_ch_l3n_matches_node_by_node_definition(variant):
    for seed, (n_out, n_in, density) in enumerate(SHAPES_AND_DENSITIES):
        mask = random_mask(n_out, n_in, density, seed)
        scores = ch_l3n_scores(mask, variant)
        assert scores.dtype == torch.float32 and scores.shape == mask.shape
        expected = brute_force_ch_l3n(mask, variant)
        torch.testing.assert_close(scores.double(), expected, rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"shape {(n_out, n_in)} seed {seed}: {m}")


def test_ch_l3n_has_positive_scores_on_most_test_graphs():
    """Guards the comparison above against being vacuous (all-zero scores)."""
    with_scores = sum(
        bool((brute_force_ch_l3n(random_mask(o, i, d, s), "ch2") > 0).any())
        for s, (o, i, d) in enumerate(SHAPES_AND_DENSITIES)
    )
    assert with_scores >= len(SHAPES_AND_DENSITIES) // 2


@pytest.mark.parametrize("variant", ["ch2", "ch3"])
def test_chunked_scores_equal_unchunked(variant):
    for seed, (n_out, n_in, density) in enumerate(SHAPES_AND_DENSITIES):
        mask = random_mask(n_out, n_in, density, seed)
        unchunked = ch_l3n_scores(mask, variant)
        for chunk_rows in (1, 2, 3, 5, 64):
            chunked = ch_l3n_scores(mask, variant, chunk_rows=chunk_rows)
            assert torch.equal(chunked, unchunked), (n_out, n_in, chunk_rows)
        tiny_budget = ch_l3n_scores(mask, variant, memory_budget_bytes=1)
        assert torch.equal(tiny_budget, unchunked)


def test_memory_budget_on_a_larger_layer_gives_same_scores():
    mask = random_mask(300, 170, 0.08, seed=1)
    unchunked = ch_l3n_scores(mask, "ch2")
    # room for the fixed O×I tensors plus a few dozen rows of temporaries
    budget = 16 * mask.numel() + 40 * (21 * 300 + 24 * 170)
    assert torch.equal(ch_l3n_scores(mask, "ch2", memory_budget_bytes=budget), unchunked)
    assert (unchunked > 0).sum() > 100


def test_scores_are_zero_on_existing_links_and_nonnegative():
    mask = random_mask(9, 11, 0.4, seed=5)
    for scores in (ch_l3n_scores(mask, "ch2"), ch_l3n_scores(mask, "ch3"),
                   ch3_l3_path_scores(mask)):
        assert torch.all(scores[mask] == 0)
        assert torch.all(scores >= 0)
        assert (scores > 0).any()


def test_ch3_scores_are_bounded_by_ch2_scores():
    """(1 + iLCL)/(1 + eLCL) >= 1/(1 + eLCL) term by term, strictly when iLCL > 0."""
    mask = random_mask(10, 12, 0.3, seed=7)
    ch2, ch3 = ch_l3n_scores(mask, "ch2"), ch_l3n_scores(mask, "ch3")
    assert torch.all(ch2 >= ch3)
    assert torch.equal(ch2 > 0, ch3 > 0)


def test_empty_and_full_masks():
    for shape in [(4, 6), (6, 4)]:
        empty = torch.zeros(shape, dtype=torch.bool)
        full = torch.ones(shape, dtype=torch.bool)
        for variant in ("ch2", "ch3"):
            assert torch.equal(ch_l3n_scores(empty, variant), torch.zeros(shape))
            assert torch.equal(ch_l3n_scores(full, variant), torch.zeros(shape))
        assert torch.equal(ch3_l3_path_scores(empty), torch.zeros(shape))


def test_invalid_variant_names_allowed_values():
    with pytest.raises(ValueError, match="ch2.*ch3"):
        ch_l3n_scores(torch.ones(2, 2, dtype=torch.bool), "ch4")


def test_ch3_l3_path_scores_match_path_enumeration():
    for seed, (n_out, n_in, density) in enumerate(SHAPES_AND_DENSITIES):
        mask = random_mask(n_out, n_in, density, seed)
        scores = ch3_l3_path_scores(mask)
        assert scores.dtype == torch.float32
        torch.testing.assert_close(scores.double(), brute_force_ch3_l3(mask),
                                   rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"shape {(n_out, n_in)} seed {seed}: {m}")


def test_ch3_l3_isolated_single_path_scores_one():
    """One path u–z1–z2–v whose intermediate nodes have no external links: 1/sqrt(1·1)."""
    mask = torch.tensor([[True, False],
                         [True, True]])  # u=row 0, z1=col 0, z2=row 1, v=col 1
    scores = ch3_l3_path_scores(mask)
    assert scores[0, 1].item() == pytest.approx(1.0)
    # an extra link of z1 to a new row adds one external link to z1: 1/sqrt(2·1)
    bigger = torch.tensor([[True, False],
                           [True, True],
                           [True, False]])
    assert ch3_l3_path_scores(bigger)[0, 1].item() == pytest.approx(1 / math.sqrt(2))
