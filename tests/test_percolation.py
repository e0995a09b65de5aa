"""Network percolation (docs/algorithms.md §4) against a naive loop reference."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from hf_chts.architectures import (
    COL_ROLES,
    AttentionCoupling,
    MLPCoupling,
    ModelTopology,
    NeuronRef,
    RowBlock,
    SparseLayerInfo,
    build_topology,
    rope_partner,
)
from hf_chts.topology.percolation import PercolationResult, active_neurons, percolate

HIDDEN = 16  # residual stream width of the hand-built blocks
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
FFN = 12


# --------------------------------------------------------------------------
# Hand-built topologies
# --------------------------------------------------------------------------
def _layer(name: str, role: str, rows: int) -> SparseLayerInfo:
    return SparseLayerInfo(name, role, 0, [RowBlock(role, torch.arange(rows))])


def separate_topology(rotary_dim: int = HEAD_DIM) -> ModelTopology:
    """LLaMA-like block: q/k/v/o and gate/up/down as separate layers, GQA 4:2."""
    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    layers = {
        "q": _layer("q", "q", q_rows),
        "k": _layer("k", "k", kv_rows),
        "v": _layer("v", "v", kv_rows),
        "o": _layer("o", "o", HIDDEN),
        "gate": _layer("gate", "gate", FFN),
        "up": _layer("up", "up", FFN),
        "down": _layer("down", "down", HIDDEN),
    }
    attention = AttentionCoupling(
        NeuronRef("q", "row", torch.arange(q_rows).view(HEADS, HEAD_DIM)),
        NeuronRef("k", "row", torch.arange(kv_rows).view(KV_HEADS, HEAD_DIM)),
        NeuronRef("v", "row", torch.arange(kv_rows).view(KV_HEADS, HEAD_DIM)),
        NeuronRef("o", "col", torch.arange(q_rows).view(HEADS, HEAD_DIM)),
        rope_partner(HEAD_DIM, rotary_dim),
    )
    mlp = MLPCoupling(
        [NeuronRef("gate", "row", torch.arange(FFN)), NeuronRef("up", "row", torch.arange(FFN))],
        NeuronRef("down", "col", torch.arange(FFN)),
    )
    return ModelTopology("hand", layers, [attention], [mlp], known_architecture=True)


def separate_shapes() -> dict[str, tuple[int, int]]:
    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    return {
        "q": (q_rows, HIDDEN),
        "k": (kv_rows, HIDDEN),
        "v": (kv_rows, HIDDEN),
        "o": (HIDDEN, q_rows),
        "gate": (FFN, HIDDEN),
        "up": (FFN, HIDDEN),
        "down": (HIDDEN, FFN),
    }


def fused_topology(rotary_dim: int = HEAD_DIM) -> ModelTopology:
    """Phi-3-like block: one fused qkv layer with permuted row blocks, fused gate_up."""
    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    order = torch.randperm(q_rows + 2 * kv_rows, generator=torch.Generator().manual_seed(7))
    q, k, v = order[:q_rows], order[q_rows : q_rows + kv_rows], order[q_rows + kv_rows :]
    layers = {
        "qkv": SparseLayerInfo("qkv", "qkv", 0, [RowBlock("q", q), RowBlock("k", k), RowBlock("v", v)]),
        "o": _layer("o", "o", HIDDEN),
        "gate_up": SparseLayerInfo(
            "gate_up", "gate_up", 0, [RowBlock("gate", torch.arange(FFN)), RowBlock("up", torch.arange(FFN, 2 * FFN))]
        ),
        "down": _layer("down", "down", HIDDEN),
    }
    attention = AttentionCoupling(
        NeuronRef("qkv", "row", q.view(HEADS, HEAD_DIM)),
        NeuronRef("qkv", "row", k.view(KV_HEADS, HEAD_DIM)),
        NeuronRef("qkv", "row", v.view(KV_HEADS, HEAD_DIM)),
        NeuronRef("o", "col", torch.arange(q_rows).view(HEADS, HEAD_DIM).flip(0)),
        rope_partner(HEAD_DIM, rotary_dim),
    )
    mlp = MLPCoupling(
        [NeuronRef("gate_up", "row", torch.arange(FFN)), NeuronRef("gate_up", "row", torch.arange(FFN, 2 * FFN))],
        NeuronRef("down", "col", torch.arange(FFN)),
    )
    return ModelTopology("hand_fused", layers, [attention], [mlp], known_architecture=True)


def fused_shapes() -> dict[str, tuple[int, int]]:
    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    return {"qkv": (q_rows + 2 * kv_rows, HIDDEN), "o": (HIDDEN, q_rows), "gate_up": (2 * FFN, HIDDEN), "down": (HIDDEN, FFN)}


def random_masks(shapes: dict[str, tuple[int, int]], seed: int) -> dict[str, torch.Tensor]:
    """Sparse random masks with planted empty rows and columns."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, (rows, cols) in shapes.items():
        density = 0.03 + 0.3 * torch.rand((), generator=gen).item()
        mask = torch.rand(rows, cols, generator=gen) < density
        mask[torch.rand(rows, generator=gen) < 0.15] = False
        mask[:, torch.rand(cols, generator=gen) < 0.15] = False
        masks[name] = mask
    return masks


def full_masks(shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    return {name: torch.ones(rows, cols, dtype=torch.bool) for name, (rows, cols) in shapes.items()}


# --------------------------------------------------------------------------
# Naive reference: the rules of docs/algorithms.md §4 with explicit loops, applied
# until nothing changes (so it also checks the one-pass fixpoint claim).
# --------------------------------------------------------------------------
def reference_percolate(masks, topology, rope_aware=True, constant_rows=None):
    """``constant_rows``: rows that output their bias without links (docs/percolation.md);
    a coupling with ``qk_norm`` never loses q or k rows to the q/k rule."""
    masks = {name: mask.clone() for name, mask in masks.items()}
    constant_rows = constant_rows or {}
    while True:
        row_live = {name: [bool(x) for x in mask.any(dim=1)] for name, mask in masks.items()}
        col_live = {name: [bool(x) for x in mask.any(dim=0)] for name, mask in masks.items()}

        def has(ref, *position):
            index = int(ref.index[position])
            return (row_live if ref.axis == "row" else col_live)[ref.layer][index]

        def outputs(ref, *position):  # live links, or a row that outputs its bias
            constant = constant_rows.get(ref.layer)
            biased = ref.axis == "row" and constant is not None and bool(constant[int(ref.index[position])])
            return has(ref, *position) or biased

        kill = []  # (layer, axis, index)

        def kill_ref(ref, *position):
            kill.append((ref.layer, ref.axis, int(ref.index[position])))

        for c in topology.attention:
            if not all(r.layer in masks for r in (c.q, c.k, c.v, c.o)):
                continue
            heads, kv_heads, dim = c.q.index.shape[0], c.k.index.shape[0], c.q.index.shape[1]
            group = heads // kv_heads
            partner = [int(p) for p in c.rope_partner] if rope_aware else list(range(dim))
            for h in range(heads):
                g = h // group
                for i in range(dim):
                    if has(c.q, h, i) and not c.qk_norm and not (outputs(c.k, g, i) or outputs(c.k, g, partner[i])):
                        kill_ref(c.q, h, i)
                    if has(c.o, h, i) and not outputs(c.v, g, i):
                        kill_ref(c.o, h, i)
            for g in range(kv_heads):
                group_heads = [h for h in range(heads) if h // group == g]
                for i in range(dim):
                    if (has(c.k, g, i) and not c.qk_norm
                            and not any(outputs(c.q, h, i) or outputs(c.q, h, partner[i]) for h in group_heads)):
                        kill_ref(c.k, g, i)
                    if has(c.v, g, i) and not any(has(c.o, h, i) for h in group_heads):
                        kill_ref(c.v, g, i)
        for c in topology.mlp:
            refs = [*c.inputs, c.output]
            if not all(r.layer in masks for r in refs):
                continue
            for j in range(c.output.index.shape[0]):
                alive = has(c.output, j) and all(outputs(r, j) for r in c.inputs)
                if not alive:
                    for r in refs:
                        if has(r, j):
                            kill_ref(r, j)
        if not kill:
            return masks
        for layer, axis, index in kill:
            if axis == "row":
                masks[layer][index, :] = False
            else:
                masks[layer][:, index] = False


def assert_same_masks(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"layer {name} differs"


def row_empty(mask: torch.Tensor, row: int) -> bool:
    return not bool(mask[row].any())


def col_empty(mask: torch.Tensor, col: int) -> bool:
    return not bool(mask[:, col].any())


# --------------------------------------------------------------------------
# Random masks vs the reference
# --------------------------------------------------------------------------
TOPOLOGIES = {
    "separate_full_rope": (lambda: separate_topology(HEAD_DIM), separate_shapes),
    "separate_partial_rope": (lambda: separate_topology(4), separate_shapes),
    "separate_no_rope": (lambda: separate_topology(0), separate_shapes),
    "fused_full_rope": (lambda: fused_topology(HEAD_DIM), fused_shapes),
    "fused_partial_rope": (lambda: fused_topology(4), fused_shapes),
}


@pytest.mark.parametrize("rope_aware", [True, False])
@pytest.mark.parametrize("kind", sorted(TOPOLOGIES))
def test_matches_reference_on_random_masks(kind: str, rope_aware: bool) -> None:
    make_topology, make_shapes = TOPOLOGIES[kind]
    topology, shapes = make_topology(), make_shapes()
    removed_something = 0
    for seed in range(40):
        masks = random_masks(shapes, seed)
        result = percolate(masks, topology, rope_aware=rope_aware)
        want = reference_percolate(masks, topology, rope_aware=rope_aware)
        assert_same_masks(result.masks, want)
        for name in masks:
            assert result.removed[name] == int(masks[name].sum()) - int(want[name].sum())
        removed_something += sum(result.removed.values()) > 0
    assert removed_something > 20  # the random cases exercise removal


def random_constant_rows(shapes: dict[str, tuple[int, int]], seed: int) -> dict[str, torch.Tensor]:
    """Biased rows for about half of the layers, each row biased with probability 1/2."""
    generator = torch.Generator().manual_seed(1000 + seed)
    return {name: torch.rand(rows, generator=generator) < 0.5
            for name, (rows, _) in sorted(shapes.items()) if torch.rand(1, generator=generator) < 0.5}


def with_qk_norm(topology: ModelTopology) -> ModelTopology:
    return dataclasses.replace(topology, attention=[dataclasses.replace(c, qk_norm=True) for c in topology.attention])


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("kind", sorted(TOPOLOGIES))
def test_biases_and_qk_norms_match_reference_on_random_masks(kind: str, qk_norm: bool) -> None:
    make_topology, make_shapes = TOPOLOGIES[kind]
    topology, shapes = make_topology(), make_shapes()
    topology = with_qk_norm(topology) if qk_norm else topology
    kept_by_bias = 0
    for seed in range(30):
        masks, constant = random_masks(shapes, seed), random_constant_rows(shapes, seed)
        result = percolate(masks, topology, rope_aware=True, constant_rows=constant)
        assert_same_masks(result.masks, reference_percolate(masks, topology, True, constant))
        unbiased = percolate(masks, topology, rope_aware=True)
        kept_by_bias += sum(int(result.masks[n].sum() - unbiased.masks[n].sum()) for n in masks)
        second = percolate(result.masks, topology, rope_aware=True, constant_rows=constant)
        assert sum(second.removed.values()) == 0  # still a one-pass fixpoint
    assert kept_by_bias > 0  # biased rows kept links the plain rule removes


def test_a_biased_q_row_without_links_keeps_its_k_rows_and_a_biased_v_row_its_o_columns() -> None:
    topology, shapes = separate_topology(0), separate_shapes()
    masks = full_masks(shapes)
    masks["q"][:HEAD_DIM].zero_()  # every dim of q head 0 ...
    masks["q"][HEAD_DIM:2 * HEAD_DIM].zero_()  # ... and of q head 1: nothing reads kv head 0 through links
    masks["v"][3].zero_()  # v row (0, 3) has no links
    plain = percolate(masks, topology).masks
    assert row_empty(plain["k"], 0) and col_empty(plain["o"], 3) and col_empty(plain["o"], HEAD_DIM + 3)
    constant = {"q": torch.zeros(HEADS * HEAD_DIM, dtype=torch.bool), "v": torch.zeros(KV_HEADS * HEAD_DIM, dtype=torch.bool)}
    constant["q"][0] = True  # q row (0, 0) outputs its bias
    constant["v"][3] = True
    biased = percolate(masks, topology, constant_rows=constant).masks
    assert torch.equal(biased["k"][0], masks["k"][0])  # k row (0, 0) is read by the bias of q (0, 0)
    assert row_empty(biased["k"], 1)  # q rows (0, 1), (1, 1) are unbiased and empty
    assert torch.equal(biased["o"][:, 3], masks["o"][:, 3]) and torch.equal(biased["o"][:, HEAD_DIM + 3], masks["o"][:, HEAD_DIM + 3])


def test_qk_norm_keeps_q_and_k_rows_but_not_the_v_o_chain() -> None:
    topology, shapes = with_qk_norm(separate_topology()), separate_shapes()
    masks = full_masks(shapes)
    masks["k"][:HEAD_DIM].zero_()  # kv head 0 has no k links: its q rows would die without the norm
    masks["v"][2].zero_()
    result = percolate(masks, topology).masks
    assert torch.equal(result["q"], masks["q"])
    assert col_empty(result["o"], 2) and col_empty(result["o"], HEAD_DIM + 2)
    assert row_empty(percolate(masks, separate_topology()).masks["q"], 0)


def test_rope_aware_and_parity_differ_somewhere() -> None:
    topology, shapes = separate_topology(HEAD_DIM), separate_shapes()
    differ = sum(
        not torch.equal(percolate(m, topology, True).masks["q"], percolate(m, topology, False).masks["q"])
        for m in (random_masks(shapes, seed) for seed in range(40))
    )
    assert differ > 0


@pytest.mark.parametrize("kind", sorted(TOPOLOGIES))
def test_one_pass_is_a_fixpoint(kind: str) -> None:
    make_topology, make_shapes = TOPOLOGIES[kind]
    topology = make_topology()
    for seed in range(20):
        for rope_aware in (True, False):
            first = percolate(random_masks(make_shapes(), seed), topology, rope_aware)
            second = percolate(first.masks, topology, rope_aware)
            assert sum(second.removed.values()) == 0
            assert_same_masks(second.masks, first.masks)


def test_inputs_are_not_mutated_and_outputs_are_new_tensors() -> None:
    topology, shapes = separate_topology(), separate_shapes()
    masks = random_masks(shapes, 3)
    before = {name: mask.clone() for name, mask in masks.items()}
    result = percolate(masks, topology)
    assert sum(result.removed.values()) > 0
    assert_same_masks(masks, before)
    for name in masks:
        assert result.masks[name].data_ptr() != masks[name].data_ptr()
        assert result.masks[name].dtype == torch.bool


# --------------------------------------------------------------------------
# Planted dead neurons
# --------------------------------------------------------------------------
def test_empty_down_column_clears_gate_and_up_rows() -> None:
    topology, shapes = separate_topology(), separate_shapes()
    masks = full_masks(shapes)
    masks["down"][:, 5] = False
    result = percolate(masks, topology)
    assert row_empty(result.masks["gate"], 5) and row_empty(result.masks["up"], 5)
    assert result.removed == {"q": 0, "k": 0, "v": 0, "o": 0, "gate": HIDDEN, "up": HIDDEN, "down": 0}
    assert result.active["gate"] == result.active["up"] == result.active["down"] == FFN - 1


def test_empty_gate_row_clears_up_row_and_down_column() -> None:
    topology, shapes = separate_topology(), separate_shapes()
    masks = full_masks(shapes)
    masks["gate"][7] = False
    result = percolate(masks, topology)
    assert row_empty(result.masks["up"], 7) and col_empty(result.masks["down"], 7)
    assert result.removed["up"] == HIDDEN and result.removed["down"] == HIDDEN
    assert sum(result.removed.values()) == 2 * HIDDEN


def test_empty_fused_up_row_clears_gate_row_and_down_column() -> None:
    topology, shapes = fused_topology(), fused_shapes()
    masks = full_masks(shapes)
    masks["gate_up"][FFN + 2] = False  # up neuron 2
    result = percolate(masks, topology)
    assert row_empty(result.masks["gate_up"], 2) and col_empty(result.masks["down"], 2)
    assert result.removed == {"qkv": 0, "o": 0, "gate_up": HIDDEN, "down": HIDDEN}


def test_empty_v_row_clears_o_columns_of_every_q_head_in_its_group() -> None:
    topology, shapes = separate_topology(), separate_shapes()
    masks = full_masks(shapes)
    g, i = 1, 3
    masks["v"][g * HEAD_DIM + i] = False
    result = percolate(masks, topology)
    group = HEADS // KV_HEADS
    for h in range(HEADS):
        dead = h // group == g
        assert col_empty(result.masks["o"], h * HEAD_DIM + i) == dead
    assert result.removed["o"] == group * HIDDEN
    assert sum(result.removed.values()) == group * HIDDEN


def test_v_row_dies_only_when_all_o_columns_of_its_group_are_empty() -> None:
    topology, shapes = separate_topology(), separate_shapes()
    masks = full_masks(shapes)
    i = 6
    masks["o"][:, 0 * HEAD_DIM + i] = False  # head 0 (group 0) only
    result = percolate(masks, topology)
    assert not row_empty(result.masks["v"], 0 * HEAD_DIM + i)
    masks["o"][:, 1 * HEAD_DIM + i] = False  # head 1: now all of group 0
    result = percolate(masks, topology)
    assert row_empty(result.masks["v"], 0 * HEAD_DIM + i)
    assert not row_empty(result.masks["v"], 1 * HEAD_DIM + i)
    assert result.removed["v"] == HIDDEN


def test_empty_fused_v_row_clears_o_columns_through_the_index_maps() -> None:
    topology, shapes = fused_topology(), fused_shapes()
    coupling = topology.attention[0]
    masks = full_masks(shapes)
    masks["qkv"][int(coupling.v.index[0, 4])] = False
    result = percolate(masks, topology)
    for h in (0, 1):  # group 0
        assert col_empty(result.masks["o"], int(coupling.o.index[h, 4]))
    assert result.removed["o"] == 2 * HIDDEN and result.removed["qkv"] == 0


# --------------------------------------------------------------------------
# RoPE pairing and GQA
# --------------------------------------------------------------------------
@pytest.mark.parametrize("rope_aware, q_survives", [(True, True), (False, False)])
def test_q_row_survives_through_rope_partner_only_when_rope_aware(rope_aware: bool, q_survives: bool) -> None:
    topology, shapes = separate_topology(), separate_shapes()
    partner = topology.attention[0].rope_partner
    masks = full_masks(shapes)
    i = 2
    assert int(partner[i]) == i + HEAD_DIM // 2
    for g in range(KV_HEADS):
        masks["k"][g * HEAD_DIM + i] = False  # k row i empty, k row partner(i) alive
    result = percolate(masks, topology, rope_aware=rope_aware)
    for h in range(HEADS):
        assert row_empty(result.masks["q"], h * HEAD_DIM + i) != q_survives
    assert result.removed["q"] == (0 if q_survives else HEADS * HIDDEN)


def test_q_row_dies_when_both_rope_k_rows_are_empty() -> None:
    topology, shapes = separate_topology(), separate_shapes()
    masks = full_masks(shapes)
    i = 1
    p = int(topology.attention[0].rope_partner[i])
    masks["k"][0 * HEAD_DIM + i] = False
    masks["k"][0 * HEAD_DIM + p] = False
    result = percolate(masks, topology, rope_aware=True)
    for h in range(HEADS):
        in_group_0 = h < HEADS // KV_HEADS
        assert row_empty(result.masks["q"], h * HEAD_DIM + i) == in_group_0
        assert row_empty(result.masks["q"], h * HEAD_DIM + p) == in_group_0


def test_non_rotary_dims_pair_with_themselves() -> None:
    topology, shapes = separate_topology(rotary_dim=4), separate_shapes()
    masks = full_masks(shapes)
    i = 6  # beyond rotary_dim: not rotated
    masks["k"][1 * HEAD_DIM + i] = False
    result = percolate(masks, topology, rope_aware=True)
    assert row_empty(result.masks["q"], 2 * HEAD_DIM + i) and row_empty(result.masks["q"], 3 * HEAD_DIM + i)
    assert result.removed["q"] == 2 * HIDDEN


def test_k_row_alive_while_any_q_head_of_its_group_uses_it() -> None:
    topology, shapes = separate_topology(), separate_shapes()
    masks = full_masks(shapes)
    g, i = 1, 5
    p = int(topology.attention[0].rope_partner[i])
    group_heads = [h for h in range(HEADS) if h // (HEADS // KV_HEADS) == g]
    for h in group_heads[:-1]:  # every head but one: rows i and partner(i) empty
        masks["q"][h * HEAD_DIM + i] = False
        masks["q"][h * HEAD_DIM + p] = False
    result = percolate(masks, topology)
    assert not row_empty(result.masks["k"], g * HEAD_DIM + i)
    assert sum(result.removed.values()) == 0

    last = group_heads[-1]
    masks["q"][last * HEAD_DIM + i] = False  # partner row still alive: k row i still used (RoPE)
    assert not row_empty(percolate(masks, topology).masks["k"], g * HEAD_DIM + i)
    assert row_empty(percolate(masks, topology, rope_aware=False).masks["k"], g * HEAD_DIM + i)

    masks["q"][last * HEAD_DIM + p] = False  # now no q head of the group uses dims i/p
    result = percolate(masks, topology)
    assert row_empty(result.masks["k"], g * HEAD_DIM + i) and row_empty(result.masks["k"], g * HEAD_DIM + p)
    other = 1 - g
    assert not row_empty(result.masks["k"], other * HEAD_DIM + i)
    assert result.removed["k"] == 2 * HIDDEN


# --------------------------------------------------------------------------
# The residual stream side is never a reason for removal
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["separate_full_rope", "fused_partial_rope"])
def test_every_removed_link_lies_in_a_dead_neuron(kind: str) -> None:
    make_topology, make_shapes = TOPOLOGIES[kind]
    topology = make_topology()
    for seed in range(30):
        masks = random_masks(make_shapes(), seed)
        result = percolate(masks, topology)
        for name, before in masks.items():
            after = result.masks[name]
            assert not bool((after & ~before).any()), "percolation never adds links"
            removed = before & ~after
            if not removed.any():
                continue
            role = topology.layers[name].role
            if role in COL_ROLES:  # neurons are columns: every touched column is now empty
                touched = removed.any(dim=0)
                assert not after[:, touched].any()
            else:  # neurons are rows
                touched = removed.any(dim=1)
                assert not after[touched].any()


def test_empty_residual_columns_and_rows_remove_nothing() -> None:
    topology, shapes = separate_topology(), separate_shapes()
    masks = full_masks(shapes)
    for name in ("q", "k", "v", "gate", "up"):
        masks[name][:, 3] = False  # residual input column of row roles
    for name in ("o", "down"):
        masks[name][3] = False  # residual output row of column roles
    result = percolate(masks, topology)
    assert sum(result.removed.values()) == 0
    assert result.anp == 1.0


# --------------------------------------------------------------------------
# Fallback layers, missing layers, chains, counting
# --------------------------------------------------------------------------
def test_uncoupled_layers_are_returned_unchanged() -> None:
    layers = {"a": _layer("a", "linear", 6), "b": _layer("b", "linear", 5)}
    topology = ModelTopology("mystery", layers, [], [], known_architecture=False)
    masks = {"a": torch.zeros(6, 5, dtype=torch.bool), "b": torch.ones(5, 6, dtype=torch.bool)}
    masks["a"][0, 0] = True
    result = percolate(masks, topology)
    assert_same_masks(result.masks, masks)
    assert result.removed == {"a": 0, "b": 0}
    assert result.active == {"a": 1, "b": 5} and result.total == {"a": 6, "b": 5}
    assert math.isclose(result.anp, 6 / 11)


def test_non_bool_masks_are_refused() -> None:
    topology, shapes = separate_topology(), separate_shapes()
    masks = full_masks(shapes)
    masks["q"] = masks["q"].float()
    with pytest.raises(TypeError, match="'q'"):
        percolate(masks, topology)


def test_coupling_with_a_missing_layer_is_skipped() -> None:
    topology, shapes = separate_topology(), separate_shapes()
    masks = full_masks(shapes)
    masks["down"][:, 0] = False
    masks["v"][0] = False
    del masks["gate"]
    del masks["o"]
    result = percolate(masks, topology)
    assert set(result.masks) == set(masks)
    assert sum(result.removed.values()) == 0


def test_non_separable_chain_iterates_to_a_fixpoint() -> None:
    """fc2 has neurons on both axes: killing its row b empties its column a,
    which only a second pass can see (fc3 col b -> fc2 row b -> fc1 row a)."""
    layers = {n: _layer(n, r, 4) for n, r in (("fc1", "fc_in"), ("fc2", "linear"), ("fc3", "fc_out"))}
    chain = [
        MLPCoupling([NeuronRef("fc1", "row", torch.arange(4))], NeuronRef("fc2", "col", torch.arange(4))),
        MLPCoupling([NeuronRef("fc2", "row", torch.arange(4))], NeuronRef("fc3", "col", torch.arange(4))),
    ]
    topology = ModelTopology("chain", layers, [], chain, known_architecture=True)
    masks = {name: torch.eye(4, dtype=torch.bool) for name in layers}
    assert int(masks["fc2"][:, 0].sum()) == 1  # fc2 column 0 only reaches fc2 row 0
    masks["fc3"][:, 0] = False  # fc3 column 0 empty -> fc2 row 0 dies -> fc2 column 0 empty -> fc1 row 0 dies
    result = percolate(masks, topology)
    assert row_empty(result.masks["fc2"], 0) and row_empty(result.masks["fc1"], 0)
    assert_same_masks(result.masks, reference_percolate(masks, topology))
    assert sum(percolate(result.masks, topology).removed.values()) == 0


def test_active_and_total_count_the_non_residual_side() -> None:
    topology, shapes = separate_topology(), separate_shapes()
    masks = full_masks(shapes)
    masks["q"][[0, 9]] = False
    masks["o"][:, [1]] = False
    active, total = active_neurons(masks, topology)
    assert total == {"q": 32, "k": 16, "v": 16, "o": 32, "gate": FFN, "up": FFN, "down": FFN}
    assert active["q"] == 30 and active["o"] == 31 and active["down"] == FFN


def test_result_counts_are_after_percolation_and_anp_is_their_ratio() -> None:
    topology, shapes = separate_topology(), separate_shapes()
    for seed in range(10):
        masks = random_masks(shapes, seed)
        result = percolate(masks, topology)
        active, total = active_neurons(result.masks, topology)
        assert result.active == active and result.total == total
        assert math.isclose(result.anp, sum(active.values()) / sum(total.values()))
    assert isinstance(result, PercolationResult)
    assert math.isnan(PercolationResult({}, {}, {}, {}).anp)


# --------------------------------------------------------------------------
# Topologies of real (tiny, random) HF models
# --------------------------------------------------------------------------
def _tiny_model(model_type: str) -> nn.Module:
    import transformers

    if model_type == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=1, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    elif model_type == "phi3":
        config = transformers.Phi3Config(
            hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        )
    else:
        config = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64
        )
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2"])
def test_matches_reference_on_real_model_topologies(model_type: str) -> None:
    from transformers.pytorch_utils import Conv1D

    model = _tiny_model(model_type)
    selected = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and (".layers." in name or ".h." in name)
    }
    topology = build_topology(model, selected)
    assert len(topology.attention) == 1 and len(topology.mlp) == 1
    shapes = {}
    for name, module in selected.items():
        out_in = (module.out_features, module.in_features) if isinstance(module, nn.Linear) else tuple(module.weight.shape[::-1])
        shapes[name] = out_in
    for seed in range(8):
        masks = random_masks(shapes, seed)
        for rope_aware in (True, False):
            result = percolate(masks, topology, rope_aware)
            assert_same_masks(result.masks, reference_percolate(masks, topology, rope_aware))
