"""Initial sparse topologies of a layer (ALGORITHMS.md §2) and sparse weight re-initialisation.

Every builder is a pure function ``(shape, link budget, generator) -> mask``:
a ``torch.bool`` tensor of the logical ``out_features x in_features`` shape
(the ``nn.Linear`` layout) holding exactly the requested number of links, the
same for the same generator state, on the CPU.

Methods (ALGORITHMS.md §2; paper: papers/chts-soft-rule-2024.txt §2.3, §2.4,
§3.1; BRF: CHTss/BRF paper, NeurIPS 2025):

* ``er``    uniform random links (SET's default).
* ``bsw``   bipartite small world: a wrap-around band around the rectangular
            diagonal, then Watts–Strogatz rewiring with probability ``beta``.
* ``brf``   bipartite receptive field: each row samples its columns with
            ``p ∝ (1 + ring distance to the row's diagonal centre)^(-(1-r)/r)``.
* ``bsf``   bipartite scale free: Barabási–Albert graph on the ``O + I`` neurons,
            split into the two layers, same-layer links rewired across.
* ``csti``  correlated sparse topological initialisation: the links with the
            largest |Pearson correlation| of the layer's input features.
* ``dense`` all ones.

"Rows of the construction" (bsw, brf) are the smaller side of the layer: the
lattice is built on the ``min(O, I) x max(O, I)`` matrix and transposed back
when ``O > I``. Row ``i`` of that matrix has its diagonal centre at the real
number ``c_i = i · max/min`` and distances are taken on the ring of ``max``
columns (wrap-around).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "METHODS",
    "DEGREE_MODES",
    "count_links",
    "allocate_links",
    "build_mask",
    "er_mask",
    "bsw_mask",
    "brf_mask",
    "bsf_mask",
    "csti_mask",
    "dense_mask",
    "reinit_sparse_weight_",
]

METHODS: tuple[str, ...] = ("er", "bsw", "brf", "bsf", "csti", "dense")
DEGREE_MODES: tuple[str, ...] = ("uniform", "fixed")

# BA growth: a chunk of newcomers adds at most 1/_BA_CHUNK_FRACTION of the nodes present.
_BA_CHUNK_FRACTION = 32


# ----------------------------------------------------------------- budgets
def count_links(density: float, numel: int) -> int:
    """Number of links of a layer with ``numel`` entries at ``density``: ``round(density · numel)``.

    Rounds half up (``floor(density · numel + 0.5)``), not Python's
    round-half-even, so that e.g. ``count_links(0.5, 5) == 3``.
    """
    _check_density(density)
    if isinstance(numel, bool) or not isinstance(numel, numbers.Integral) or numel < 0:
        raise ValueError(f"numel must be an int >= 0, got {numel!r}")
    return min(int(numel), int(math.floor(density * numel + 0.5)))


def allocate_links(total: int, sizes: Sequence[int]) -> list[int]:
    """Split a link budget over row blocks in proportion to their sizes (largest remainder).

    Used for fused layers (q|k|v, gate|up): each block gets ``floor(total·size/Σsize)``
    links, and the links left over go one each to the blocks with the largest
    remainders (ties: the earlier block). The result sums exactly to ``total``
    and never exceeds a block's ``size``. Exact integer arithmetic.
    """
    sizes = [int(s) for s in sizes]
    if any(s < 0 for s in sizes):
        raise ValueError(f"sizes must all be >= 0, got {sizes}")
    capacity = sum(sizes)
    if isinstance(total, bool) or not isinstance(total, numbers.Integral) or not 0 <= total <= capacity:
        raise ValueError(f"total must be an int in [0, sum(sizes)={capacity}], got {total!r}")
    if capacity == 0:
        return [0] * len(sizes)
    total = int(total)
    shares = [total * s // capacity for s in sizes]
    remainders = [total * s % capacity for s in sizes]
    leftover = total - sum(shares)  # < number of blocks with a positive remainder
    by_remainder = sorted(range(len(sizes)), key=lambda b: (-remainders[b], b))
    for block in by_remainder[:leftover]:
        shares[block] += 1
    return shares


# ----------------------------------------------------------------- dispatch
def build_mask(
    method: str,
    out_features: int,
    in_features: int,
    density: float,
    *,
    generator: torch.Generator,
    beta: float = 0.25,
    r: float = 0.25,
    degree_mode: str = "uniform",
    bsf_equal_partition: bool = False,
    calibration_inputs: Tensor | None = None,
) -> Tensor:
    """Initial mask ``[out_features, in_features]`` of one layer (ALGORITHMS.md §2).

    Holds exactly ``count_links(density, out_features·in_features)`` links,
    except ``method="dense"``, which is all ones whatever the density. Every
    argument is validated whatever the method, so a bad configuration fails
    at once.

    Raises:
        ValueError: unknown ``method`` (the message lists the allowed ones),
            ``density`` outside (0, 1], ``beta`` or ``r`` outside [0, 1],
            ``degree_mode`` not in ``DEGREE_MODES``, non-positive sizes, and
            for ``csti`` a missing or mis-shaped ``calibration_inputs``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    _check_shape(out_features, in_features)
    _check_density(density)
    _check_unit_interval("beta", beta)
    _check_unit_interval("r", r)
    _check_degree_mode(degree_mode)
    if method == "dense":
        return dense_mask(out_features, in_features)
    n_links = count_links(density, out_features * in_features)
    if method == "er":
        return er_mask(out_features, in_features, n_links, generator)
    if method == "bsw":
        return bsw_mask(out_features, in_features, n_links, beta, generator)
    if method == "brf":
        return brf_mask(out_features, in_features, n_links, r, degree_mode, generator)
    if method == "bsf":
        return bsf_mask(out_features, in_features, n_links, generator, equal_partition=bsf_equal_partition)
    return csti_mask(out_features, in_features, n_links, calibration_inputs)


def dense_mask(out_features: int, in_features: int) -> Tensor:
    """All links present (dense start of CHTss, ALGORITHMS.md §2)."""
    _check_shape(out_features, in_features)
    return torch.ones(out_features, in_features, dtype=torch.bool)


# ----------------------------------------------------------------- er
def er_mask(out_features: int, in_features: int, n_links: int, generator: torch.Generator) -> Tensor:
    """Erdős–Rényi: ``n_links`` positions drawn uniformly without replacement (SET)."""
    _check_shape(out_features, in_features)
    _check_n_links(n_links, out_features, in_features)
    mask = torch.zeros(out_features, in_features, dtype=torch.bool)
    chosen = torch.randperm(out_features * in_features, generator=generator)[:n_links]
    mask.view(-1)[chosen] = True
    return _checked(mask, n_links)


# ----------------------------------------------------------------- bsw
def bsw_mask(
    out_features: int, in_features: int, n_links: int, beta: float, generator: torch.Generator
) -> Tensor:
    """Bipartite small world (paper §2.3, ALGORITHMS.md §2).

    1. Lattice: on the ``min x max`` construction, row ``i`` gets ``k_i`` of
       ⌊K⌋ or ⌊K⌋+1 (``K = n_links / min``; the rows with +1 are a random
       subset, so the total is exactly ``n_links``) consecutive columns, the
       window of ``k_i`` columns centred closest to ``c_i = i·max/min``, with
       wrap-around: every link lies within ring distance ``k_i/2`` of ``c_i``.
    2. Rewiring: every link is dropped independently with probability ``beta``
       and as many links are added uniformly at random among the positions
       that are then empty (dropped positions included), as in the released
       CHT code. ``beta=0`` keeps the lattice; ``beta=1`` redraws every link
       uniformly, i.e. gives exactly the ER distribution.
    """
    _check_shape(out_features, in_features)
    _check_n_links(n_links, out_features, in_features)
    _check_unit_interval("beta", beta)
    rows, cols, transposed = _construction_shape(out_features, in_features)
    degrees = _split_evenly(n_links, rows, generator)
    mask = _diagonal_band(rows, cols, degrees)
    if beta > 0 and n_links > 0:
        _rewire_uniformly_(mask, beta, generator)
    return _checked(_to_layer_layout(mask, transposed), n_links)


def _diagonal_band(rows: int, cols: int, degrees: Tensor) -> Tensor:
    """Row ``i`` takes the ``degrees[i]`` consecutive columns (mod ``cols``) nearest to ``c_i``."""
    centres = _diagonal_centres(rows, cols)
    # the window [s, s + k - 1] whose midpoint s + (k-1)/2 is the nearest to c_i
    starts = torch.floor(centres - (degrees.to(torch.float64) - 1) / 2 + 0.5).to(torch.long)
    offsets = torch.remainder(torch.arange(cols).unsqueeze(0) - starts.unsqueeze(1), cols)
    return offsets < degrees.unsqueeze(1)


def _rewire_uniformly_(mask: Tensor, beta: float, generator: torch.Generator) -> None:
    """Drop each link with probability ``beta``; re-add as many uniformly among empty positions."""
    live = mask.view(-1).nonzero().squeeze(1)
    dropped = live[torch.rand(live.numel(), generator=generator, dtype=torch.float64) < beta]
    mask.view(-1)[dropped] = False
    mask.view(-1)[_uniform_among(~mask.view(-1), dropped.numel(), generator)] = True


# ----------------------------------------------------------------- brf
def brf_mask(
    out_features: int,
    in_features: int,
    n_links: int,
    r: float,
    degree_mode: str,
    generator: torch.Generator,
) -> Tensor:
    """Bipartite receptive field (CHTss/BRF paper, ALGORITHMS.md §2).

    On the ``min x max`` construction:

    * degrees: every row gets 1 link, then ``"uniform"`` spreads the other
      ``n_links - rows`` links uniformly at random over the rows (a multinomial
      draw, rows capped at ``max`` columns, overflow re-spread over the rows
      with room); ``"fixed"`` gives ⌊K⌋ or ⌊K⌋+1 (a random subset gets +1).
      If ``n_links < rows`` a random subset of ``n_links`` rows gets one link.
    * columns: row ``i`` samples its ``k_i`` columns without replacement with
      ``p_j ∝ (1 + d_ij)^(-(1-r)/r)``, ``d_ij`` the ring distance between
      column ``j`` and ``c_i = i·max/min``. Exponential ("Gumbel") top-k:
      keys ``log p_ij - log E_ij``, ``E ~ Exp(1)``, one ``[rows, cols]`` matrix,
      then the ``k_i`` largest keys of each row. ``r = 0`` is the limit
      (the ``k_i`` nearest columns, no randomness, ties to a fixed order);
      ``r = 1`` has exponent 0, i.e. uniform columns (ER within each row).

    Cost: O(rows · cols) memory (float64 distances, float32 keys) and one
    per-row top-k; about 1 s for 2048 x 5461 on two CPU cores.
    """
    _check_shape(out_features, in_features)
    _check_n_links(n_links, out_features, in_features)
    _check_unit_interval("r", r)
    _check_degree_mode(degree_mode)
    rows, cols, transposed = _construction_shape(out_features, in_features)
    if n_links < rows:
        degrees = torch.zeros(rows, dtype=torch.long)
        degrees[torch.randperm(rows, generator=generator)[:n_links]] = 1
    elif degree_mode == "fixed":
        degrees = _split_evenly(n_links, rows, generator)
    else:
        degrees = _at_least_one_then_uniform(n_links, rows, cols, generator)
    keys = _receptive_field_keys(rows, cols, r, generator)
    mask = _top_per_row(keys, degrees)
    return _checked(_to_layer_layout(mask, transposed), n_links)


def _receptive_field_keys(rows: int, cols: int, r: float, generator: torch.Generator) -> Tensor:
    """Sampling keys ``log p_ij - log E_ij`` of BRF; plain ``-d_ij`` at the ``r = 0`` limit."""
    distance = _ring_distance_to_diagonal(rows, cols)
    if r == 0.0:
        return -distance
    exponent = (1.0 - r) / r
    log_weight = (-exponent * torch.log1p(distance)).to(torch.float32)
    return log_weight - torch.log(_exponential((rows, cols), generator))


def _at_least_one_then_uniform(total: int, rows: int, cap: int, generator: torch.Generator) -> Tensor:
    """Degrees: 1 per row, the rest assigned to uniformly random rows, none above ``cap``."""
    degrees = torch.ones(rows, dtype=torch.long)
    remaining = total - rows
    while remaining > 0:
        open_rows = (degrees < cap).nonzero().squeeze(1)
        room = int((cap - degrees[open_rows]).sum())
        if remaining >= room:  # only possible when it fills every row exactly
            degrees[open_rows] = cap
            break
        picks = open_rows[torch.randint(open_rows.numel(), (remaining,), generator=generator)]
        degrees += torch.bincount(picks, minlength=rows)
        overflow = (degrees - cap).clamp_min(0)
        degrees -= overflow
        remaining = int(overflow.sum())
    return degrees


# ----------------------------------------------------------------- bsf
def bsf_mask(
    out_features: int,
    in_features: int,
    n_links: int,
    generator: torch.Generator,
    equal_partition: bool = False,
) -> Tensor:
    """Bipartite scale free (paper §2.3 and §3.1.1, ALGORITHMS.md §2).

    1. Barabási–Albert growth on the ``N = O + I`` neurons with exactly
       ``n_links`` links: node ``t`` attaches ``m_t`` links to distinct earlier
       nodes drawn without replacement with probability ∝ degree.
       ``m_t = min(t, λ)`` (+1 for a random subset of the nodes above λ),
       λ the level making ``Σ m_t = n_links``, so the first nodes form the
       seed clique, as in the released code (``m ≈ n_links / N``). Newcomers
       arrive in small chunks (see :func:`_barabasi_albert_links`).
    2. The neurons are split at random into ``O`` outputs and ``I`` inputs.
       Cross links are kept. Same-side links are rewired across keeping
       degrees: an output–output link ``(a1, a2)`` and an input–input link
       ``(b1, b2)`` become ``(a1, b1)`` and ``(a2, b2)`` (every degree kept).
       Same-side links left unpaired become one cross link each, from one of
       their endpoints to a node of the other side drawn ∝ its degree (the
       released code's rule; the other endpoint loses one degree).
    3. Duplicates created by the rewiring are filled back, preferentially:
       among empty positions with probability ∝ (deg_row + 1)(deg_col + 1)
       (exponential top-k), so the result has exactly ``n_links`` links.

    ``equal_partition`` (paper §3.1.1, "EP"): afterwards, keeping every
    output neuron's (row's) degree, the links are redrawn so that every
    input neuron (column) has ⌊n/I⌋ or ⌈n/I⌉ links (degree >= 1 whenever
    ``n_links >= in_features``): rows in random order take the columns with
    the most remaining room, ties broken at random.
    The paper's other BSF option, degree "resorting" of neurons between
    consecutive layers, needs two layers and is not done here.

    Cost: step 1 draws O((O + I)²) random keys in about 30 vectorised chunks
    per doubling of the node count; steps 2–3 are vectorised over the links;
    equal partition is one Python step (a top-k over ``I``) per output row.
    About 2–3 s for 2048 x 5461 at density 0.3 on two CPU cores.
    """
    _check_shape(out_features, in_features)
    _check_n_links(n_links, out_features, in_features)
    n_nodes = out_features + in_features
    sources, targets = _barabasi_albert_links(n_nodes, n_links, generator)
    link_rows, link_cols = _split_into_layers(sources, targets, out_features, in_features, generator)
    mask = torch.zeros(out_features, in_features, dtype=torch.bool)
    mask[link_rows, link_cols] = True
    _fill_preferentially_(mask, n_links - int(mask.sum()), generator)
    if equal_partition:
        mask = _equal_partition_of_inputs(mask, generator)
    return _checked(mask, n_links)


def _ba_links_per_node(n_nodes: int, n_links: int, generator: torch.Generator) -> Tensor:
    """``m_t`` (links node ``t`` attaches to earlier nodes): water-filled under ``m_t <= t``, Σ = n_links."""
    capacity = torch.arange(n_nodes)

    def total_at(level: int) -> int:
        return int(capacity.clamp(max=level).sum())

    low, high = 0, max(n_nodes - 1, 0)  # total_at(high) = N(N-1)/2 >= O·I >= n_links
    while low < high:
        middle = (low + high + 1) // 2
        if total_at(middle) <= n_links:
            low = middle
        else:
            high = middle - 1
    per_node = capacity.clamp(max=low)
    rest = n_links - int(per_node.sum())  # < number of nodes with capacity > low
    above_level = (capacity > low).nonzero().squeeze(1)
    per_node[above_level[torch.randperm(above_level.numel(), generator=generator)[:rest]]] += 1
    return per_node


def _barabasi_albert_links(n_nodes: int, n_links: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Links ``(sources, targets)`` of a BA graph grown with preferential attachment ∝ degree.

    The first nodes, which attach to every earlier node (``m_t = t``), form the
    seed clique. After it, nodes arrive in chunks of at most 1/32 of the nodes
    already present; each node of a chunk draws its ``m_t`` distinct targets
    among the nodes present before the chunk, ∝ their degree at the start of
    the chunk (exponential top-k, vectorised over the chunk). Exact BA is
    the chunk size 1; the chunks only delay degree updates by < 1/32 of the
    growth and remove links inside a chunk, and make the growth about
    30 vectorised steps per doubling of the node count instead of one
    Python step per node.
    """
    per_node = _ba_links_per_node(n_nodes, n_links, generator)
    seed_size = n_nodes
    below_capacity = (per_node < torch.arange(n_nodes)).nonzero()
    if below_capacity.numel():
        seed_size = int(below_capacity[0])
    seed_sources, seed_targets = torch.tril_indices(seed_size, seed_size, offset=-1)
    sources, targets = [seed_sources], [seed_targets]
    degree = torch.zeros(n_nodes, dtype=torch.float32)
    degree[:seed_size] = seed_size - 1
    start = seed_size
    while start < n_nodes:
        stop = min(n_nodes, start + max(1, start // _BA_CHUNK_FRACTION))
        counts = per_node[start:stop]
        if int(counts.max()) > 0:
            weights = degree[:start]
            if int((weights > 0).sum()) < int(counts.max()):  # tiny budgets: too few nodes with links yet
                weights = weights + 1.0
            # argmax of w / E  ==  argmax of log w - log E: successive sampling ∝ w
            keys = weights.unsqueeze(0) / _exponential((stop - start, start), generator)
            best = keys.topk(int(counts.max()), dim=1).indices
            taken = torch.arange(best.shape[1]).unsqueeze(0) < counts.unsqueeze(1)
            target = best[taken]
            sources.append(torch.arange(start, stop).unsqueeze(1).expand_as(best)[taken])
            targets.append(target)
            degree += torch.bincount(target, minlength=n_nodes).to(degree.dtype)
            degree[start:stop] += counts.to(degree.dtype)
        start = stop
    return torch.cat(sources), torch.cat(targets)


def _split_into_layers(
    sources: Tensor, targets: Tensor, out_features: int, in_features: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Assign the BA nodes to the two layers at random and rewire same-layer links across.

    Returns ``(row, col)`` index lists with exactly as many entries as links
    (possibly with repeats, removed by the caller).
    """
    n_nodes = out_features + in_features
    order = torch.randperm(n_nodes, generator=generator)
    is_output = torch.zeros(n_nodes, dtype=torch.bool)
    is_output[order[:out_features]] = True
    local = torch.empty(n_nodes, dtype=torch.long)
    local[order[:out_features]] = torch.arange(out_features)
    local[order[out_features:]] = torch.arange(in_features)

    # random orientation and order, so growth time carries no bias into the pairing
    flip = torch.rand(sources.numel(), generator=generator) < 0.5
    first, second = torch.where(flip, targets, sources), torch.where(flip, sources, targets)
    shuffle = torch.randperm(sources.numel(), generator=generator)
    first, second = first[shuffle], second[shuffle]

    first_out, second_out = is_output[first], is_output[second]
    cross = first_out != second_out
    out_out = first_out & second_out
    in_in = ~first_out & ~second_out
    link_rows = [local[torch.where(first_out, first, second)[cross]]]
    link_cols = [local[torch.where(first_out, second, first)[cross]]]

    a1, a2 = local[first[out_out]], local[second[out_out]]
    b1, b2 = local[first[in_in]], local[second[in_in]]
    paired = min(a1.numel(), b1.numel())
    link_rows += [a1[:paired], a2[:paired]]
    link_cols += [b1[:paired], b2[:paired]]

    row_degree = torch.bincount(torch.cat(link_rows), minlength=out_features).to(torch.float64)
    col_degree = torch.bincount(torch.cat(link_cols), minlength=in_features).to(torch.float64)
    leftover_outputs = a1[paired:]  # one endpoint of each unpaired output-output link
    leftover_inputs = b1[paired:]
    link_rows += [leftover_outputs, _draw_by_degree(row_degree, leftover_inputs.numel(), generator)]
    link_cols += [_draw_by_degree(col_degree, leftover_outputs.numel(), generator), leftover_inputs]
    return torch.cat(link_rows), torch.cat(link_cols)


def _draw_by_degree(degree: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` nodes drawn with replacement ∝ degree (uniformly if no node has links)."""
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    weights = degree if float(degree.sum()) > 0 else torch.ones_like(degree)
    return torch.multinomial(weights, count, replacement=True, generator=generator)


def _fill_preferentially_(mask: Tensor, count: int, generator: torch.Generator) -> None:
    """Add ``count`` links at empty positions, drawn without replacement ∝ (deg_row+1)(deg_col+1)."""
    if count <= 0:
        return
    log_weight = (
        torch.log1p(mask.sum(1, dtype=torch.float32)).unsqueeze(1)
        + torch.log1p(mask.sum(0, dtype=torch.float32)).unsqueeze(0)
    )
    keys = log_weight - torch.log(_exponential(mask.shape, generator))
    keys[mask] = -math.inf
    mask.view(-1)[keys.view(-1).topk(count).indices] = True


def _equal_partition_of_inputs(mask: Tensor, generator: torch.Generator) -> Tensor:
    """Same row degrees, column degrees ⌊n/I⌋ or ⌈n/I⌉ (paper §3.1.1, "equal partition").

    Rows, in random order, take their links among the columns with the most
    remaining room (random tie-breaking): the bipartite Havel–Hakimi (Ryser)
    construction, which realises any feasible pair of degree sequences, so
    every column ends exactly at its target. One Python step per row.
    """
    n_rows, n_cols = mask.shape
    row_degree = mask.sum(1).tolist()
    n_links = sum(row_degree)
    room = torch.full((n_cols,), float(n_links // n_cols), dtype=torch.float64)
    room[torch.randperm(n_cols, generator=generator)[: n_links % n_cols]] += 1.0
    # float32 draws in [0, 1 - 2^-24], added in float64: exact, so never worth a unit of room
    tie_breaks = torch.rand(n_rows, n_cols, generator=generator)
    result = torch.zeros_like(mask)
    for row in torch.randperm(n_rows, generator=generator).tolist():
        if row_degree[row] == 0:
            continue
        chosen = (room + tie_breaks[row].to(torch.float64)).topk(row_degree[row]).indices
        result[row, chosen] = True
        room[chosen] -= 1.0
    assert int(room.abs().sum()) == 0, "equal partition left column room unfilled"
    return result


# ----------------------------------------------------------------- csti
def csti_mask(out_features: int, in_features: int, n_links: int, calibration_inputs: Tensor | None) -> Tensor:
    """Correlated sparse topological initialisation (paper §2.4; CHT, ICLR 2024).

    The paper: "CSTI generates the adjacency matrix by computing the Pearson
    correlation between each input feature across the calibration dataset and
    then selects the predetermined number of links ... as the existing
    connections". The ``I x I`` matrix ``|corr|`` of the input features (NaN,
    from constant features, set to 0; diagonal set to 0, as in the released
    code) is mapped to the ``O x I`` layer by giving output neuron ``o`` the
    row ``o mod I``: ``score[o, j] = |corr[o mod I, j]|``. For ``O = k·I`` this
    is the released code's tiling of the correlation matrix ("2x of the
    dimension"); for ``O < I`` the first ``O`` rows are used. The links are
    the ``n_links`` largest scores (exact top-k; ties resolved by
    ``torch.topk``, deterministic). No randomness.

    Args:
        calibration_inputs: ``[samples, in_features]`` inputs of the layer
            (leading dimensions are flattened), at least 2 samples.
    """
    _check_shape(out_features, in_features)
    _check_n_links(n_links, out_features, in_features)
    if calibration_inputs is None:
        raise ValueError("calibration_inputs is required for method 'csti' (a [samples, in_features] tensor)")
    if not isinstance(calibration_inputs, Tensor) or calibration_inputs.dim() < 2:
        raise ValueError("calibration_inputs must be a tensor of shape [samples, in_features]")
    if calibration_inputs.shape[-1] != in_features:
        raise ValueError(
            f"calibration_inputs must have in_features={in_features} columns, "
            f"got shape {tuple(calibration_inputs.shape)}"
        )
    samples = calibration_inputs.reshape(-1, in_features)
    if samples.shape[0] < 2:
        raise ValueError(f"calibration_inputs needs at least 2 samples, got {samples.shape[0]}")
    correlation = _abs_pearson_without_diagonal(samples)
    scores = correlation[torch.arange(out_features) % in_features]
    mask = torch.zeros(out_features, in_features, dtype=torch.bool)
    mask.view(-1)[scores.reshape(-1).topk(n_links).indices] = True
    return _checked(mask, n_links)


def _abs_pearson_without_diagonal(samples: Tensor) -> Tensor:
    """``|corr|`` between the columns of ``[samples, features]``; NaN -> 0, diagonal -> 0."""
    centred = samples.detach().to(torch.float64 if samples.dtype == torch.float64 else torch.float32).cpu()
    centred = centred - centred.mean(0, keepdim=True)
    norms = centred.norm(dim=0)
    correlation = (centred.T @ centred) / (norms.unsqueeze(1) * norms.unsqueeze(0))
    correlation = torch.nan_to_num(correlation.abs(), nan=0.0, posinf=0.0).clamp_(max=1.0)
    correlation.fill_diagonal_(0.0)
    return correlation


# ----------------------------------------------------------------- resort
def resort_by_degree(in_degree: Tensor, consumer_mask: Tensor) -> Tensor:
    """BSF "resorting of middle-layer neurons" (paper §3.1.1): permute the consumer's columns.

    ``in_degree[j]`` is the number of links hidden neuron ``j`` receives (its row
    degree in the producing layer(s)); ``consumer_mask`` is the ``O x F`` mask of
    the layer reading those neurons. The columns are permuted so that the neuron
    with the k-th largest in-degree gets the k-th largest out-degree (hubs meet
    hubs, which increases the credit-assignment paths). Link count and the
    multiset of column degrees are unchanged. Ties keep their original order.
    """
    if consumer_mask.dim() != 2 or consumer_mask.shape[1] != in_degree.numel():
        raise ValueError(
            f"consumer_mask must be O x F with F = len(in_degree) = {in_degree.numel()}, got {tuple(consumer_mask.shape)}"
        )
    out_degree = consumer_mask.sum(0)
    by_in = torch.sort(in_degree.to(torch.float64), descending=True, stable=True).indices
    by_out = torch.sort(out_degree.to(torch.float64), descending=True, stable=True).indices
    resorted = torch.empty_like(consumer_mask)
    resorted[:, by_in] = consumer_mask[:, by_out]
    return resorted


# ----------------------------------------------------------------- weights
@torch.no_grad()
def reinit_sparse_weight_(
    weight: Tensor, mask: Tensor, *, gain: float = 1.0, generator: torch.Generator | None = None
) -> None:
    """Re-initialise a sparse weight in place for its live fan-in.

    The CHTs paper text gives no weight-initialisation formula; its
    predecessor CHT (Zhang et al., ICLR 2024, ref. [9]) introduced sparse
    weight initialisation (SWI): scale the initial weights by the fan-in a
    neuron really has after sparsification, ``std = gain / sqrt(live fan-in)``,
    instead of the dense ``in_features`` (the released code uses
    ``sqrt(2 / (links / out))``, a ReLU gain with the layer's mean fan-in).
    Here each row ``o`` (output neuron, ``weight`` in the logical ``out x in``
    layout, e.g. ``conv1d.weight.T`` for GPT-2) gets live weights drawn from
    ``U(-b_o, b_o)`` with ``b_o = gain · sqrt(3 / fan_in_o)`` (a kaiming-uniform
    shape: std ``gain / sqrt(fan_in_o)``), ``fan_in_o`` the live links of the row.
    ``gain = 1`` keeps the pre-activation variance of unit-variance inputs;
    ``gain = sqrt(2)`` is SWI's ReLU scale. Masked weights are set to 0; rows
    without links stay 0.
    """
    if weight.dim() != 2 or tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal weight shape {tuple(weight.shape)} (2-D)")
    if not gain > 0:
        raise ValueError(f"gain must be > 0, got {gain}")
    live = mask.to(device=weight.device, dtype=torch.bool)
    fan_in = live.sum(1, dtype=torch.float32)
    bound = gain * torch.sqrt(3.0 / fan_in.clamp_min(1.0))
    uniform = torch.empty(weight.shape, dtype=torch.float32)
    uniform.uniform_(-1.0, 1.0, generator=generator)
    values = uniform.to(weight.device) * bound.unsqueeze(1) * live
    weight.copy_(values.to(weight.dtype))


# ----------------------------------------------------------------- helpers
def _construction_shape(out_features: int, in_features: int) -> tuple[int, int, bool]:
    """``(rows, cols, transposed)``: rows are the smaller side (ALGORITHMS.md §2)."""
    if out_features > in_features:
        return in_features, out_features, True
    return out_features, in_features, False


def _to_layer_layout(mask: Tensor, transposed: bool) -> Tensor:
    return mask.T.contiguous() if transposed else mask


def _diagonal_centres(rows: int, cols: int) -> Tensor:
    """Real-valued diagonal position ``c_i = i · cols / rows`` of each construction row."""
    return torch.arange(rows, dtype=torch.float64) * (cols / rows)


def _ring_distance_to_diagonal(rows: int, cols: int) -> Tensor:
    """``d_ij``: distance on the ring of ``cols`` columns between column ``j`` and ``c_i``."""
    # c_i and j both lie in [0, cols), so |j - c_i| < cols and one wrap is enough
    offset = (torch.arange(cols, dtype=torch.float64).unsqueeze(0) - _diagonal_centres(rows, cols).unsqueeze(1)).abs_()
    return torch.minimum(offset, cols - offset)


def _split_evenly(total: int, rows: int, generator: torch.Generator) -> Tensor:
    """Degrees ⌊total/rows⌋ or +1 (a random subset of rows gets the +1), summing to ``total``."""
    degrees = torch.full((rows,), total // rows, dtype=torch.long)
    degrees[torch.randperm(rows, generator=generator)[: total % rows]] += 1
    return degrees


def _top_per_row(keys: Tensor, degrees: Tensor) -> Tensor:
    """Boolean mask holding, in each row ``i``, the ``degrees[i]`` largest keys of that row."""
    mask = torch.zeros(keys.shape, dtype=torch.bool)
    widest = int(degrees.max()) if degrees.numel() else 0
    if widest == 0:
        return mask
    best = keys.topk(widest, dim=1, sorted=True).indices
    taken = torch.arange(widest).unsqueeze(0) < degrees.unsqueeze(1)
    mask.scatter_(1, best, taken)
    return mask


def _uniform_among(candidates: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` flat indices drawn uniformly without replacement among the True entries."""
    positions = candidates.nonzero().squeeze(1)
    return positions[torch.randperm(positions.numel(), generator=generator)[:count]]


def _exponential(shape: tuple[int, ...] | torch.Size, generator: torch.Generator) -> Tensor:
    """E ~ Exp(1) as ``-log U`` (U uniform on [0, 1)), float32, positive and finite.

    ``-log U`` is several times faster than ``Tensor.exponential_`` on CPU;
    U < 1 keeps E > 0, and the clamp turns the U = 0 case into a finite key.
    """
    noise = torch.rand(tuple(shape), dtype=torch.float32, generator=generator).log_().neg_()
    return noise.clamp_(max=torch.finfo(torch.float32).max)


def _checked(mask: Tensor, n_links: int) -> Tensor:
    count = int(mask.sum())
    assert count == n_links, f"topology builder produced {count} links instead of {n_links}"
    return mask


def _check_shape(out_features: int, in_features: int) -> None:
    for name, value in (("out_features", out_features), ("in_features", in_features)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_n_links(n_links: int, out_features: int, in_features: int) -> None:
    numel = out_features * in_features
    if isinstance(n_links, bool) or not isinstance(n_links, numbers.Integral) or not 0 <= n_links <= numel:
        raise ValueError(f"n_links must be an int in [0, {numel}] (out_features·in_features), got {n_links!r}")


def _check_density(density: float) -> None:
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")


def _check_unit_interval(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_degree_mode(degree_mode: str) -> None:
    if degree_mode not in DEGREE_MODES:
        raise ValueError(f"degree_mode must be one of {', '.join(DEGREE_MODES)}; got {degree_mode!r}")
