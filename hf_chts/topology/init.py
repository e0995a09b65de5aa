"""Initial sparse topologies of a layer (docs/algorithms.md#2-initial-topology).

Every builder is a pure function ``(shape, link budget, generator) -> mask``:
a ``torch.bool`` tensor of the logical ``out_features x in_features`` shape
(the ``nn.Linear`` layout) holding exactly the requested number of links, the
same for the same generator state, on the CPU.

Methods (docs/algorithms.md §2.2; papers: [CHTs-2024] §2.3, §2.4, §3.1 and, for BRF,
[CHTss-2025], listed in docs/algorithms.md#references):

* ``er``    uniform random links (SET's default).
* ``bsw``   bipartite small world: a wrap-around band around the rectangular
            diagonal, then Watts–Strogatz rewiring with probability ``beta``.
* ``brf``   bipartite receptive field: each row samples its columns with
            ``p ∝ (1 + ring distance to the row's diagonal centre)^(-(1-r)/r)``.
* ``bsf``   bipartite scale free: Barabási–Albert graph on the ``O + I`` neurons,
            split into the two layers, same-layer links rewired across
            (:mod:`hf_chts.topology.bsf`).
* ``csti``  correlated sparse topological initialisation: the links with the
            largest |Pearson correlation| of the layer's input features.
* ``dense`` all ones.

"Rows of the construction" (bsw, brf) are the smaller side of the layer: the
lattice is built on the ``min(O, I) x max(O, I)`` matrix and transposed back
when ``O > I``. Row ``i`` of that matrix has its diagonal centre at the real
number ``c_i = i · max/min`` and distances are taken on the ring of ``max``
columns (wrap-around). BRF's ``centres="integer_stride"`` puts it at
``(i · ⌊max/min⌋) mod max`` instead, as the authors' released code does
(docs/parity.md).

Link budgets (:func:`~hf_chts.topology.budgets.count_links`) live in
:mod:`hf_chts.topology.budgets`; sparse weight re-initialisation in
:mod:`hf_chts.weight_init`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .budgets import count_links
from .bsf import bsf_mask
from .common import (
    check_density, check_n_links, check_shape, check_unit_interval, checked_link_count, exponential_noise,
)

__all__ = [
    "INIT_METHODS",
    "DEGREE_MODES",
    "BRF_CENTRES",
    "build_mask",
    "er_mask",
    "bsw_mask",
    "brf_mask",
    "bsf_mask",
    "csti_mask",
    "dense_mask",
]

INIT_METHODS: tuple[str, ...] = ("er", "bsw", "brf", "bsf", "csti", "dense")


DEGREE_MODES: tuple[str, ...] = ("uniform", "fixed")

#: where BRF centres construction row ``i``: the real-valued diagonal, or the released code's integer stride
BRF_CENTRES: tuple[str, ...] = ("diagonal", "integer_stride")


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
    brf_centres: str = "diagonal",
) -> Tensor:
    """Initial mask ``[out_features, in_features]`` of one layer (docs/algorithms.md §2).

    Holds exactly ``count_links(density, out_features·in_features)`` links,
    except ``method="dense"``, which is all ones whatever the density. Every
    argument is validated whatever the method, so a bad configuration fails
    at once.

    Raises:
        ValueError: unknown ``method`` (the message lists the allowed ones),
            ``density`` outside (0, 1], ``beta`` or ``r`` outside [0, 1],
            ``degree_mode`` not in ``DEGREE_MODES``, ``brf_centres`` not in
            ``BRF_CENTRES``, non-positive sizes, and for ``csti`` a missing or
            mis-shaped ``calibration_inputs``.
    """
    if method not in INIT_METHODS:
        raise ValueError(f"method must be one of {', '.join(INIT_METHODS)}; got {method!r}")
    check_shape(out_features, in_features)
    check_density(density)
    check_unit_interval("beta", beta)
    check_unit_interval("r", r)
    _check_degree_mode(degree_mode)
    _check_brf_centres(brf_centres)
    if method == "dense":
        return dense_mask(out_features, in_features)
    n_links = count_links(density, out_features * in_features)
    if method == "er":
        return er_mask(out_features, in_features, n_links, generator)
    if method == "bsw":
        return bsw_mask(out_features, in_features, n_links, beta, generator)
    if method == "brf":
        return brf_mask(out_features, in_features, n_links, r, degree_mode, generator, centres=brf_centres)
    if method == "bsf":
        return bsf_mask(out_features, in_features, n_links, generator, equal_partition=bsf_equal_partition)
    return csti_mask(out_features, in_features, n_links, calibration_inputs)


def dense_mask(out_features: int, in_features: int) -> Tensor:
    """All links present (dense start of CHTss, docs/algorithms.md §2)."""
    check_shape(out_features, in_features)
    return torch.ones(out_features, in_features, dtype=torch.bool)


def er_mask(out_features: int, in_features: int, n_links: int, generator: torch.Generator) -> Tensor:
    """Erdős–Rényi: ``n_links`` positions drawn uniformly without replacement (SET)."""
    check_shape(out_features, in_features)
    check_n_links(n_links, out_features, in_features)
    mask = torch.zeros(out_features, in_features, dtype=torch.bool)
    chosen = torch.randperm(out_features * in_features, generator=generator)[:n_links]
    mask.view(-1)[chosen] = True
    return checked_link_count(mask, n_links)


def bsw_mask(
    out_features: int, in_features: int, n_links: int, beta: float, generator: torch.Generator
) -> Tensor:
    """Bipartite small world (CHTs paper §2.3, docs/algorithms.md §2.2).

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
    check_shape(out_features, in_features)
    check_n_links(n_links, out_features, in_features)
    check_unit_interval("beta", beta)
    rows, cols, transposed = _construction_shape(out_features, in_features)
    degrees = _split_evenly(n_links, rows, generator)
    mask = _diagonal_band(rows, cols, degrees)
    if beta > 0 and n_links > 0:
        _rewire_uniformly_(mask, beta, generator)
    return checked_link_count(_to_layer_layout(mask, transposed), n_links)


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


def brf_mask(
    out_features: int,
    in_features: int,
    n_links: int,
    r: float,
    degree_mode: str,
    generator: torch.Generator,
    centres: str = "diagonal",
) -> Tensor:
    """Bipartite receptive field (CHTss/BRF paper, docs/algorithms.md §2.2).

    On the ``min x max`` construction:

    * degrees: every row gets 1 link, then ``"uniform"`` spreads the other
      ``n_links - rows`` links uniformly at random over the rows (a multinomial
      draw, rows capped at ``max`` columns, overflow re-spread over the rows
      with room); ``"fixed"`` gives ⌊K⌋ or ⌊K⌋+1 (a random subset gets +1).
      If ``n_links < rows`` a random subset of ``n_links`` rows gets one link.
    * columns: row ``i`` samples its ``k_i`` columns without replacement with
      ``p_j ∝ (1 + d_ij)^(-(1-r)/r)``, ``d_ij`` the ring distance between
      column ``j`` and ``c_i = i·max/min`` (``centres="integer_stride"``:
      ``c_i = (i·⌊max/min⌋) mod max``, the released code's centres, docs/parity.md).
      Exponential ("Gumbel") top-k:
      keys ``log p_ij - log E_ij``, ``E ~ Exp(1)``, one ``[rows, cols]`` matrix,
      then the ``k_i`` largest keys of each row. ``r = 0`` is the limit
      (the ``k_i`` nearest columns, no randomness, ties to a fixed order);
      ``r = 1`` has exponent 0, i.e. uniform columns (ER within each row).

    Cost: O(rows · cols) memory (float64 distances, float32 keys) and one
    per-row top-k; about 1 s for 2048 x 5461 on two CPU cores.
    """
    check_shape(out_features, in_features)
    check_n_links(n_links, out_features, in_features)
    check_unit_interval("r", r)
    _check_degree_mode(degree_mode)
    _check_brf_centres(centres)
    rows, cols, transposed = _construction_shape(out_features, in_features)
    if n_links < rows:
        degrees = torch.zeros(rows, dtype=torch.long)
        degrees[torch.randperm(rows, generator=generator)[:n_links]] = 1
    elif degree_mode == "fixed":
        degrees = _split_evenly(n_links, rows, generator)
    else:
        degrees = _at_least_one_then_uniform(n_links, rows, cols, generator)
    keys = _receptive_field_keys(rows, cols, r, generator, _centres(rows, cols, centres))
    mask = _top_per_row(keys, degrees)
    return checked_link_count(_to_layer_layout(mask, transposed), n_links)


def _receptive_field_keys(rows: int, cols: int, r: float, generator: torch.Generator, centres: Tensor) -> Tensor:
    """Sampling keys ``log p_ij - log E_ij`` of BRF; plain ``-d_ij`` at the ``r = 0`` limit."""
    distance = _ring_distance(cols, centres)
    if r == 0.0:
        return -distance
    exponent = (1.0 - r) / r
    log_weight = (-exponent * torch.log1p(distance)).to(torch.float32)
    return log_weight - torch.log(exponential_noise((rows, cols), generator))


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


def csti_mask(out_features: int, in_features: int, n_links: int, calibration_inputs: Tensor | None) -> Tensor:
    """Correlated sparse topological initialisation (CHTs paper §2.4; CHT, ICLR 2024; docs/algorithms.md §2.2).

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
    check_shape(out_features, in_features)
    check_n_links(n_links, out_features, in_features)
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
    return checked_link_count(mask, n_links)


def _abs_pearson_without_diagonal(samples: Tensor) -> Tensor:
    """``|corr|`` between the columns of ``[samples, features]``; NaN -> 0, diagonal -> 0."""
    centred = samples.detach().to(torch.float64 if samples.dtype == torch.float64 else torch.float32).cpu()
    centred = centred - centred.mean(0, keepdim=True)
    norms = centred.norm(dim=0)
    correlation = (centred.T @ centred) / (norms.unsqueeze(1) * norms.unsqueeze(0))
    correlation = torch.nan_to_num(correlation.abs(), nan=0.0, posinf=0.0).clamp_(max=1.0)
    correlation.fill_diagonal_(0.0)
    return correlation


def _construction_shape(out_features: int, in_features: int) -> tuple[int, int, bool]:
    """``(rows, cols, transposed)``: rows are the smaller side (docs/algorithms.md §2)."""
    if out_features > in_features:
        return in_features, out_features, True
    return out_features, in_features, False


def _to_layer_layout(mask: Tensor, transposed: bool) -> Tensor:
    return mask.T.contiguous() if transposed else mask


def _diagonal_centres(rows: int, cols: int) -> Tensor:
    """Real-valued diagonal position ``c_i = i · cols / rows`` of each construction row."""
    return torch.arange(rows, dtype=torch.float64) * (cols / rows)


def _centres(rows: int, cols: int, kind: str) -> Tensor:
    """BRF row centres: the real diagonal, or ``(i·⌊cols/rows⌋) mod cols`` (released code)."""
    if kind == "integer_stride":
        return (torch.arange(rows, dtype=torch.float64) * max(1, cols // rows)) % cols
    return _diagonal_centres(rows, cols)


def _ring_distance(cols: int, centres: Tensor) -> Tensor:
    """``d_ij``: distance on the ring of ``cols`` columns between column ``j`` and ``centres[i]``."""
    # c_i and j both lie in [0, cols), so |j - c_i| < cols and one wrap is enough
    offset = (torch.arange(cols, dtype=torch.float64).unsqueeze(0) - centres.unsqueeze(1)).abs_()
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


def _check_brf_centres(centres: str) -> None:
    if centres not in BRF_CENTRES:
        raise ValueError(f"brf_centres must be one of {', '.join(BRF_CENTRES)}; got {centres!r}")


def _check_degree_mode(degree_mode: str) -> None:
    if degree_mode not in DEGREE_MODES:
        raise ValueError(f"degree_mode must be one of {', '.join(DEGREE_MODES)}; got {degree_mode!r}")
