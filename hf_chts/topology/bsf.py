"""Bipartite scale-free (BSF) initial topology and BSF neuron resorting.

docs/algorithms.md §2.2; CHTs paper §2.3, §3.1.1 (references in docs/algorithms.md#references).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import check_n_links, check_shape, checked_link_count, exponential_noise

__all__ = ["bsf_mask", "resort_by_degree"]

_BA_CHUNK_FRACTION = 32


def bsf_mask(
    out_features: int,
    in_features: int,
    n_links: int,
    generator: torch.Generator,
    equal_partition: bool = False,
) -> Tensor:
    """Bipartite scale free (CHTs paper §2.3 and §3.1.1, docs/algorithms.md §2.2).

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

    ``equal_partition`` (CHTs paper §3.1.1, "EP"): afterwards, keeping every
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
    check_shape(out_features, in_features)
    check_n_links(n_links, out_features, in_features)
    n_nodes = out_features + in_features
    sources, targets = _barabasi_albert_links(n_nodes, n_links, generator)
    link_rows, link_cols = _split_into_layers(sources, targets, out_features, in_features, generator)
    mask = torch.zeros(out_features, in_features, dtype=torch.bool)
    mask[link_rows, link_cols] = True
    _fill_preferentially_(mask, n_links - int(mask.sum()), generator)
    if equal_partition:
        mask = _equal_partition_of_inputs(mask, generator)
    return checked_link_count(mask, n_links)


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
            keys = weights.unsqueeze(0) / exponential_noise((stop - start, start), generator)
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
    keys = log_weight - torch.log(exponential_noise(mask.shape, generator))
    keys[mask] = -math.inf
    mask.view(-1)[keys.view(-1).topk(count).indices] = True


def _equal_partition_of_inputs(mask: Tensor, generator: torch.Generator) -> Tensor:
    """Same row degrees, column degrees ⌊n/I⌋ or ⌈n/I⌉ (CHTs paper §3.1.1, "equal partition").

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


def resort_by_degree(in_degree: Tensor, consumer_mask: Tensor) -> Tensor:
    """BSF "resorting of middle-layer neurons" (CHTs paper §3.1.1): permute the consumer's columns.

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
