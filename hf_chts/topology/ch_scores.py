"""Cannistraci-Hebb (CH) link-prediction scores on a bipartite layer mask.

docs/algorithms.md §5.1 and §5.2. A layer mask ``M`` (``O×I``) is a bipartite graph: row
(output) nodes ``u`` and column (input) nodes ``v``; ``M[u, v] = 1`` is a link.
``N(x)`` is the neighbour set of a node. Every score is returned as an
``O×I`` float32 tensor that is 0 on existing links.

Node-based CH-L3n (``ch_l3n_scores``), the matrix form of docs/algorithms.md §5.1::

    P_out = M Mᵀ, P_in = Mᵀ M, B = 1[P ≠ 0], deg_out = M·1, deg_in = Mᵀ·1
    E_out[u, b] = B_out[u, b]·(deg_out[b] − P_out[u, b]);  E = max(E, 1) − 1
    CH2: W = (P + B)/(E + 1)        CH3: W = B/(E + 1)
    S = W_out M + (W_in Mᵀ)ᵀ;       S ← S·(1 − M)

Node-by-node, for a candidate ``(u, v)`` with ``M[u, v] = 0``::

    S(u, v) = Σ_{b ∈ N(v), b ~ u} (1 + iLCL_u(b)) / (1 + eLCL_u(b))      (row side, W_out M)
            + Σ_{a ∈ N(u), a ~ v} (1 + iLCL_v(a)) / (1 + eLCL_v(a))      (column side, W_in Mᵀ)

with (row side; the column side is the mirror image)

- ``b ~ u``: ``P_out[u, b] ≠ 0``, i.e. ``b`` and ``u`` share a neighbour, so
  there is a length-3 path ``u – z1 – b – v``;
- ``iLCL_u(b) = P_out[u, b] = |N(b) ∩ N(u)|``: ``b``'s links into the local
  community on ``u``'s side (the intermediate nodes ``z1``);
- ``eLCL_u(b) = deg(b) − P_out[u, b] − 1 = |N(b) \\ (N(u) ∪ {v})|``: ``b``'s
  links leaving the local community, not counting the seed link ``b – v``
  (``v ∈ N(b)`` and ``v ∉ N(u)``, so ``deg(b) − P_out[u, b] ≥ 1`` and the
  ``max(E, 1) − 1`` of the formula is exactly this "−1 for the seed link");
- CH3-L3n uses ``1 / (1 + eLCL)`` instead of ``(1 + iLCL)/(1 + eLCL)``.

The diagonal ``P_out[u, u] = deg(u)`` never reaches a candidate score: in
``(W_out M)[u, v] = Σ_b W_out[u, b] M[b, v]`` the ``b = u`` term is multiplied
by ``M[u, v] = 0``. It only affects existing links, which are zeroed. The
matrix formula is therefore implemented literally, diagonal included.

Path-based CH3-L3 (``ch3_l3_path_scores``, CHT) is the reference of the CHTs
paper (Eq. 3 with δ = 0.5), following the authors' released CH_L3 code::

    CH3-L3(u, v) = Σ_{paths u – z1 – z2 – v} 1 / sqrt((1 + de(z1)) (1 + de(z2)))

where the local community of ``(u, v)`` is the set of intermediate nodes of
all length-3 paths between them and ``de(z)`` counts the links of ``z`` that
go neither to the local community nor to the seeds ``u``, ``v``. In a
bipartite layer ``z1 ∈ N(u)`` is a column node whose only local-community
neighbours are rows in ``N(v)``, hence ``de(z1) = deg(z1) − |N(z1) ∩ N(v)| − 1``
and symmetrically ``de(z2) = deg(z2) − |N(z2) ∩ N(u)| − 1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import as_bool_mask

__all__ = ["CH_VARIANTS", "ch_l3n_scores", "ch3_l3_path_scores", "score_memory_bytes"]

CH_VARIANTS = ("ch2", "ch3")

# Bytes per element of the O×I tensors held for the whole computation:
# the mask as float32, its transposed copy, as float64, and the float32 scores.
_FIXED_BYTES_PER_LINK = 4 + 4 + 8 + 4
# Bytes per element of one chunk row of the square (O×O or I×I) temporaries: common-neighbour
# counts, B, the zeros of `where`, external links before and after clamping, the numerator,
# the float32 weights and their float64 copy.
_SQUARE_BYTES_PER_ENTRY = 4 + 1 + 4 + 4 + 4 + 4 + 4 + 8
# Bytes per element of one chunk row of the product side (column pass, the larger one): the
# float64 product, the float64 copy of the scores block, their float64 sum and its float32 result.
_PRODUCT_BYTES_PER_ENTRY = 8 + 8 + 8 + 4


def score_memory_bytes(rows: int, cols: int, chunk_rows: int | None = None) -> int:
    """Upper estimate of the bytes of ``ch_l3n_scores``' large temporaries for a ``rows×cols`` layer.

    ``chunk_rows``: rows of the larger side per block (all at once by default). Counts every
    position as a link (the per-link part is an upper bound); the same constants drive the
    chunk planner, so benchmarks can size a memory budget from this.
    """
    side, other = max(rows, cols), min(rows, cols)
    block = chunk_rows or side
    return (_FIXED_BYTES_PER_LINK * rows * cols
            + block * (_SQUARE_BYTES_PER_ENTRY * side + _PRODUCT_BYTES_PER_ENTRY * other))


def _check_variant(variant: str) -> str:
    if variant not in CH_VARIANTS:
        raise ValueError(f"unknown CH variant {variant!r}; allowed values: {', '.join(CH_VARIANTS)}")
    return variant


def _check_mask(mask: Tensor) -> Tensor:
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D (out × in), got shape {tuple(mask.shape)}")
    return as_bool_mask(mask)


def _rows_per_chunk(n_rows: int, n_other: int, n_links: int,
                    memory_budget_bytes: int | None, chunk_rows: int | None) -> int:
    """Rows of the square product computed at once (all of them when unbounded)."""
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        return min(chunk_rows, max(n_rows, 1))
    if memory_budget_bytes is None:
        return max(n_rows, 1)
    # 20% headroom for the allocator and small temporaries (measured: the counted tensors alone
    # came to ~85% of the peak on a 2048×5461 layer)
    available = 0.8 * memory_budget_bytes - _FIXED_BYTES_PER_LINK * n_links
    bytes_per_row = _SQUARE_BYTES_PER_ENTRY * n_rows + _PRODUCT_BYTES_PER_ENTRY * n_other
    return int(min(max(available // bytes_per_row, 1), max(n_rows, 1)))


def _node_weights(common: Tensor, degree: Tensor, variant: str) -> Tensor:
    """``W`` of docs/algorithms.md §5.1 (``Wt`` there) for a block of rows of ``P``, in float32.

    ``common[u, b]`` is ``P[u, b]`` (integer-valued); ``degree[b]`` the degree of node ``b``.
    """
    linked = common != 0
    external = torch.where(linked, degree.unsqueeze(0) - common, torch.zeros_like(common))
    external = external.clamp_min(1.0) - 1.0
    numerator = common + linked if variant == "ch2" else linked.to(common.dtype)
    return numerator / (external + 1.0)


def ch_l3n_scores(
    mask: Tensor,
    variant: str = "ch2",
    memory_budget_bytes: int | None = None,
    *,
    chunk_rows: int | None = None,
) -> Tensor:
    """Node-based CH2-L3n / CH3-L3n scores of every candidate link (docs/algorithms.md §5.1).

    Returns an ``O×I`` float32 tensor, 0 on existing links. See the module
    docstring for the node-by-node meaning.

    Memory: the ``O×O`` and ``I×I`` products are computed in blocks of rows.
    ``chunk_rows`` fixes the block size; otherwise it is derived from
    ``memory_budget_bytes`` (``None``: one block, no chunking). Common-neighbour
    counts are exact integers in float32 and the final products accumulate in
    float64, so the result does not depend on the block size.
    """
    variant = _check_variant(variant)
    mask = _check_mask(mask)
    n_out, n_in = mask.shape
    links = mask.to(torch.float32)
    links64 = links.to(torch.float64)
    links_t = links.t().contiguous()
    deg_out = links.sum(dim=1)
    deg_in = links.sum(dim=0)
    scores = torch.zeros(n_out, n_in, dtype=torch.float32, device=mask.device)

    out_block = _rows_per_chunk(n_out, n_in, mask.numel(), memory_budget_bytes, chunk_rows)
    for start in range(0, n_out, out_block):
        rows = slice(start, start + out_block)
        weights = _node_weights(links[rows] @ links_t, deg_out, variant)  # block × O
        scores[rows] = (weights.to(torch.float64) @ links64).to(torch.float32)

    in_block = _rows_per_chunk(n_in, n_out, mask.numel(), memory_budget_bytes, chunk_rows)
    for start in range(0, n_in, in_block):
        cols = slice(start, start + in_block)
        weights = _node_weights(links_t[cols] @ links, deg_in, variant)  # block × I
        column_side = (weights.to(torch.float64) @ links64.t()).t()  # O × block
        scores[:, cols] = (scores[:, cols].to(torch.float64) + column_side).to(torch.float32)

    return scores.masked_fill_(mask, 0.0)


def ch3_l3_path_scores(mask: Tensor) -> Tensor:
    """Exact path-based CH3-L3 scores (CHT; docs/algorithms.md §5.2, CHTs paper Eq. 3).

    Sums ``1/sqrt((1 + de(z1))(1 + de(z2)))`` over every length-3 path
    ``u – z1 – z2 – v`` (definition of ``de`` in the module docstring).
    With ``1 + de(z1) = deg(z1) − P_in[z1, v]`` and
    ``1 + de(z2) = deg(z2) − P_out[z2, u]`` the score of row ``u`` is

        S[u, v] = Σ_{z1 ∈ N(u)} g[z1, v] · Σ_{z2} M[z2, z1] f_u[z2] M[z2, v]

    with ``g = 1/sqrt(deg_in − P_in)`` and ``f_u = 1/sqrt(deg_out − P_out[:, u])``,
    computed one row ``u`` at a time in float64. O(O · d · I · O): a
    reference for small layers and tests, not for LLM-sized layers.
    """
    mask = _check_mask(mask)
    links = mask.to(torch.float64)
    deg_out = links.sum(dim=1)
    deg_in = links.sum(dim=0)
    common_out = links @ links.t()  # P_out, O×O
    common_in = links.t() @ links  # P_in, I×I
    inv_sqrt_in = _inverse_sqrt_positive(deg_in.unsqueeze(1) - common_in)  # g[z1, v]

    scores = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
    for u in range(mask.shape[0]):
        first_hops = torch.nonzero(mask[u]).flatten()  # z1 ∈ N(u)
        if first_hops.numel() == 0:
            continue
        inv_sqrt_out = _inverse_sqrt_positive(deg_out - common_out[:, u])  # f_u[z2]
        # paths[z1, v] = Σ_{z2} M[z2, z1] f_u[z2] M[z2, v] for z1 ∈ N(u)
        paths = (links[:, first_hops] * inv_sqrt_out.unsqueeze(1)).t() @ links
        scores[u] = (paths * inv_sqrt_in[first_hops]).sum(dim=0)
    return scores.masked_fill_(mask, 0.0).to(torch.float32)


def _inverse_sqrt_positive(values: Tensor) -> Tensor:
    """``1/sqrt(x)`` where ``x > 0``, else 0 (such entries lie on no candidate path)."""
    positive = values > 0
    return torch.where(positive, values.clamp_min(1.0).rsqrt(), torch.zeros_like(values))
