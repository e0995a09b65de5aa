"""Network percolation (docs/algorithms.md#4-network-percolation) as a pure function of masks.

After soft removal some neurons have no live link on one side. Such a neuron
is *inactive*: whatever it receives is never read (no outgoing links) or it
only ever outputs its bias (no incoming links), so its links on the other side
are dead weight. Percolation removes them; regrowth then refills the budget.

Masks are boolean in the logical ``out x in`` layout (rows = outputs). The
neurons of a layer live on its *non-residual* side: rows of q/k/v/gate/up/
fc_in (and of fused qkv/gate_up), columns of o/down/fc_out. The residual
stream side (columns of the row roles, rows of the column roles) is never a
reason to remove a link.

Rules, all evaluated on the degrees *before* the pass (``has_x`` = the neuron
has at least one live link on its non-residual side):

* Attention (:class:`AttentionCoupling`, q head ``h`` uses kv head
  ``g(h) = h // (H // H_kv)``, ``p`` = RoPE partner, or the identity when
  ``rope_aware=False``, the released code's behaviour):

  - q row ``(h, i)`` lives iff ``has_q[h, i]`` and
    ``(has_k[g(h), i] or has_k[g(h), p[i]])``;
  - k row ``(g, i)`` lives iff ``has_k[g, i]`` and some q head ``h`` of group
    ``g`` has ``has_q[h, i] or has_q[h, p[i]]``;
  - v row ``(g, i)`` lives iff ``has_v[g, i]`` and some o column ``(h, i)``
    with ``h`` in group ``g`` has ``has_o``;
  - o column ``(h, i)`` lives iff ``has_o[h, i]`` and ``has_v[g(h), i]``.

* MLP (:class:`MLPCoupling`): hidden neuron ``j`` lives iff every input row
  ``j`` (gate and up, or fc_in) and the output column ``j`` have a link.

Dead rows lose all their row links, dead columns all their column links.
Layers without a coupling (unknown-architecture fallback) are unchanged.

Biases and q/k norms (docs/percolation.md):

* a row listed in ``constant_rows`` (its layer has a bias) outputs its bias
  even without input links, so on the *reading* side it counts as present:
  ``has_q``, ``has_k``, ``has_v`` and the MLP input rows are or-ed with it
  wherever another neuron's liveness depends on them. The row itself is
  never the reason to clear anything (it has no links to clear);
* with ``AttentionCoupling.qk_norm`` (a norm over whole q / k heads), every q
  and k row feeds the normalisation of its head, so q and k rows are never
  removed by the q/k rule; the v/o rule still applies.

Constant rows never change and a norm-coupled q/k row is never cleared, so
the fixpoint argument below holds unchanged.

Fixpoint
--------
One pass is a fixpoint when the topology is *separable*: no layer is
referenced on both axes and no (layer, axis, index) neuron is referenced
twice (true for every registry architecture: fused layers split their rows
into disjoint q/k/v or gate/up blocks). Then the liveness of a neuron in
coupling ``C`` can change only by ``C`` itself clearing it (clearing a row
only changes column degrees of that layer, which no coupling reads), and
within ``C`` the survivors justify each other:

* a surviving q row ``(h, i)`` had ``has_k[g, j]`` for some
  ``j in {i, p[i]}``; since ``p`` is an involution ``{j, p[j]} = {i, p[i]}``,
  so head ``h`` (alive at ``i``) keeps k row ``(g, j)`` alive; and a surviving
  k row ``(g, i)`` had a q row ``(h, m)``, ``m in {i, p[i]}``, whose k partner
  set contains ``i``, so that q row survives too;
* a surviving v row ``(g, i)`` had an o column ``(h, i)`` (``h`` in ``g``)
  with ``has_o``, which survives because ``has_v[g, i]``; a surviving o column
  keeps its v row alive by the same pair;
* a surviving MLP neuron had all its rows and its column live, and nothing
  else touched them.

So a second pass would remove nothing. For non-separable topologies (e.g. a
hand-built chain ``fc1 -> fc2 -> fc3`` where ``fc2`` has neurons on both sides)
one pass can expose new dead neurons, and :func:`percolate` iterates until a
pass removes nothing (at most one pass per removed link, in practice a few).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from hf_chts.architectures import COL_ROLES, AttentionCoupling, MLPCoupling, ModelTopology, NeuronRef

__all__ = ["PercolationResult", "percolate", "active_neurons"]

Masks = dict[str, torch.Tensor]
Coupling = AttentionCoupling | MLPCoupling
LinksOf = Callable[[NeuronRef], torch.Tensor]  # ref -> bool map shaped like ref.index
ConstantRows = Mapping[str, torch.Tensor]  # layer -> bool per output row: outputs a non-zero constant unlinked


@dataclass
class PercolationResult:
    """Outcome of :func:`percolate` (docs/algorithms.md §4).

    ``masks`` holds a new tensor for every layer given (inputs are never
    mutated); ``removed`` the number of links percolation removed per layer;
    ``active``/``total`` the live/all neurons per layer on its non-residual
    side, after percolation.
    """

    masks: dict[str, torch.Tensor]
    removed: dict[str, int]
    active: dict[str, int]
    total: dict[str, int]

    @property
    def anp(self) -> float:
        """Active-neuron post-percolation rate: ``sum(active) / sum(total)``
        over layers (NaN when there are no neurons)."""
        total = sum(self.total.values())
        return sum(self.active.values()) / total if total else math.nan


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
def percolate(masks: Masks, topology: ModelTopology, rope_aware: bool = True,
              constant_rows: ConstantRows | None = None) -> PercolationResult:
    """Remove the links of inactive neurons (docs/algorithms.md §4, docs/percolation.md).

    ``masks`` maps layer names to boolean ``out x in`` masks; only these
    layers are touched and returned (as copies). A coupling that references a
    layer missing from ``masks`` is skipped. ``rope_aware=False`` pairs q/k
    dims only with themselves (parity with the released code).
    ``constant_rows`` maps layer names to a boolean per output row that is
    True when the row outputs a non-zero constant without links (a bias, see
    :func:`hf_chts.architectures.constant_output_rows`); such a row keeps the
    neurons that read it alive.
    """
    for name, mask in masks.items():
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise TypeError(f"mask of {name!r} must be a 2-D bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
    new_masks = {name: mask.clone() for name, mask in masks.items()}
    couplings = [c for c in _couplings(topology) if all(ref.layer in masks for ref in _refs(c))]
    separable = _is_separable(couplings)
    touched: set[str] = set()
    constant_rows = {} if constant_rows is None else constant_rows
    while True:
        cleared = _percolation_pass(new_masks, couplings, rope_aware, constant_rows)
        touched |= cleared
        if separable or not cleared:
            break
    removed = {
        name: int(torch.count_nonzero(masks[name]) - torch.count_nonzero(new_masks[name])) if name in touched else 0
        for name in masks
    }
    active, total = active_neurons(new_masks, topology)
    return PercolationResult(new_masks, removed, active, total)


def active_neurons(masks: Masks, topology: ModelTopology) -> tuple[dict[str, int], dict[str, int]]:
    """``(active, total)`` neurons per layer on its non-residual side.

    Rows for row roles (and the ``linear`` fallback, or a layer unknown to
    ``topology``), columns for column roles. Nothing is removed.
    """
    active: dict[str, int] = {}
    total: dict[str, int] = {}
    for name, mask in masks.items():
        info = topology.layers.get(name)
        role = info.role if info is not None else "linear"
        axis = "col" if role in COL_ROLES else "row"  # ROW_ROLES and "linear" count output rows
        live = _live_along(mask, axis)
        active[name] = int(live.sum())
        total[name] = live.numel()
    return active, total


# --------------------------------------------------------------------------
# One pass
# --------------------------------------------------------------------------
def _percolation_pass(masks: Masks, couplings: list[Coupling], rope_aware: bool,
                      constant_rows: ConstantRows) -> set[str]:
    """Decide every coupling on the current degrees, then clear the dead
    neurons. Returns the names of the layers that lost links."""
    live_cache: dict[tuple[str, str], torch.Tensor] = {}

    def has_links(ref: NeuronRef) -> torch.Tensor:
        key = (ref.layer, ref.axis)
        if key not in live_cache:
            live_cache[key] = _live_along(masks[ref.layer], ref.axis)
        return live_cache[key][ref.index.to(live_cache[key].device)]

    def has_output(ref: NeuronRef) -> torch.Tensor:
        """A row ref's neurons that output something: live links or a constant (bias)."""
        links = has_links(ref)
        constant = constant_rows.get(ref.layer)
        if constant is None or ref.axis != "row":
            return links
        return links | constant.to(links.device)[ref.index.to(links.device)]

    to_clear: list[tuple[NeuronRef, torch.Tensor]] = []  # (ref, boolean "clear" map shaped like ref.index)
    for coupling in couplings:
        if isinstance(coupling, AttentionCoupling):
            to_clear.extend(_attention_dead(coupling, has_links, has_output, rope_aware))
        else:
            to_clear.extend(_mlp_dead(coupling, has_links, has_output))

    cleared: set[str] = set()
    for ref, dead_with_links in to_clear:
        if bool(dead_with_links.any()):
            _clear(masks[ref.layer], ref.axis, ref.index.to(dead_with_links.device)[dead_with_links])
            cleared.add(ref.layer)
    return cleared


def _attention_dead(coupling: AttentionCoupling, has_links: LinksOf, has_output: LinksOf,
                    rope_aware: bool) -> list[tuple[NeuronRef, torch.Tensor]]:
    """Neurons of one attention block that have links but are dead (docs/algorithms.md §4:
    q/k coupled at the same position with RoPE pairs and GQA, v -> o chain;
    biases and q/k norms as in docs/percolation.md)."""
    has_q, has_k = has_links(coupling.q), has_links(coupling.k)  # (H, d), (H_kv, d)
    has_v, has_o = has_links(coupling.v), has_links(coupling.o)  # (H_kv, d), (H, d)
    out_q, out_k, out_v = has_output(coupling.q), has_output(coupling.k), has_output(coupling.v)
    heads, kv_heads, head_dim = has_q.shape[0], has_k.shape[0], has_q.shape[1]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"num_heads={heads} is not a multiple of num_kv_heads={kv_heads}")
    group = heads // kv_heads
    if rope_aware:
        partner = coupling.rope_partner.to(has_q.device)
    else:
        partner = torch.arange(head_dim, device=has_q.device)

    def per_q_head(kv_map: torch.Tensor) -> torch.Tensor:  # (H_kv, d) -> (H, d)
        return kv_map.repeat_interleave(group, dim=0)

    def any_in_group(q_map: torch.Tensor) -> torch.Tensor:  # (H, d) -> (H_kv, d)
        return q_map.view(kv_heads, group, head_dim).any(dim=1)

    if coupling.qk_norm:  # every q (k) row feeds the norm of its whole head: none is dead weight
        q_alive, k_alive = has_q, has_k
    else:
        q_alive = has_q & per_q_head(out_k | out_k[:, partner])
        k_alive = has_k & any_in_group(out_q | out_q[:, partner])
    v_alive = has_v & any_in_group(has_o)
    o_alive = has_o & per_q_head(out_v)
    return [
        (coupling.q, has_q & ~q_alive),
        (coupling.k, has_k & ~k_alive),
        (coupling.v, has_v & ~v_alive),
        (coupling.o, has_o & ~o_alive),
    ]


def _mlp_dead(coupling: MLPCoupling, has_links: LinksOf, has_output: LinksOf) -> list[tuple[NeuronRef, torch.Tensor]]:
    """Hidden neurons of one MLP that have links but are dead (docs/algorithms.md §4: gate/up
    coupled by the product, both chained to the down column; an input row
    with a bias outputs it even without links, docs/percolation.md)."""
    alive = has_links(coupling.output)
    for ref in coupling.inputs:
        alive = alive & has_output(ref)
    dead = [(ref, has_links(ref) & ~alive) for ref in coupling.inputs]
    dead.append((coupling.output, has_links(coupling.output) & ~alive))
    return dead


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def _live_along(mask: torch.Tensor, axis: str) -> torch.Tensor:
    """Row (``axis="row"``) or column neurons with at least one live link."""
    if axis not in ("row", "col"):
        raise ValueError(f"axis must be 'row' or 'col', got {axis!r}")
    dim = 1 if axis == "row" else 0
    if mask.shape[dim] == 0:
        return torch.zeros(mask.shape[1 - dim], dtype=torch.bool, device=mask.device)
    return mask.amax(dim=dim)  # == mask.any(dim), several times faster on CPU for bool


def _clear(mask: torch.Tensor, axis: str, index: torch.Tensor) -> None:
    """Remove every link of the given rows or columns (in place)."""
    mask.index_fill_(0 if axis == "row" else 1, index.flatten(), False)


def _couplings(topology: ModelTopology) -> list[Coupling]:
    return [*topology.attention, *topology.mlp]


def _refs(coupling: Coupling) -> list[NeuronRef]:
    if isinstance(coupling, AttentionCoupling):
        return [coupling.q, coupling.k, coupling.v, coupling.o]
    return [*coupling.inputs, coupling.output]


def _is_separable(couplings: list[Coupling]) -> bool:
    """True when one pass is provably a fixpoint (see the module docstring):
    no layer has neurons on both axes and no neuron is referenced twice."""
    axes_of_layer: dict[str, set[str]] = {}
    indices: dict[tuple[str, str], list[torch.Tensor]] = {}
    for coupling in couplings:
        for ref in _refs(coupling):
            axes_of_layer.setdefault(ref.layer, set()).add(ref.axis)
            indices.setdefault((ref.layer, ref.axis), []).append(ref.index.flatten().cpu())
    if any(len(axes) > 1 for axes in axes_of_layer.values()):
        return False
    for parts in indices.values():
        flat = torch.cat(parts)
        if torch.unique(flat).numel() != flat.numel():
            return False
    return True
