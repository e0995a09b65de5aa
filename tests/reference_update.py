"""Slow, loop-based references for one topology update, shared by the parity and
engine-wiring tests. Written from docs/parity.md ("One parity topology update,
step by step"), not from the engine.

Inside, a mask is a python set of (row, col) positions and every score a python
float, computed link by link. Only the CH link-prediction scores come from
``hf_chts.topology.ch_scores`` (checked node by node in test_ch_scores.py), so
that exactly equal float32 scores tie the same way here and in the engine.
"""

from __future__ import annotations

import math

import torch
import transformers

from hf_chts import SparsifyConfig, sparsify
from hf_chts.engine import SparseTrainingEngine, UpdateStats
from hf_chts.topology.ch_scores import ch3_l3_path_scores, ch_l3n_scores

Position = tuple[int, int]


def tiny_llama(seed: int = 0, hidden: int = 4, ffn: int = 6, layers: int = 1):
    """A one-head LLaMA small enough to enumerate every removal outcome of its layers."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                      num_attention_heads=1, num_key_value_heads=1, vocab_size=16,
                                      bos_token_id=0, eos_token_id=1)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def live_positions(mask: torch.Tensor) -> set[Position]:
    rows, cols = mask.shape
    return {(i, j) for i in range(rows) for j in range(cols) if bool(mask[i, j])}


def to_mask(positions, shape) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    for i, j in positions:
        mask[i, j] = True
    return mask


def importance(weight: torch.Tensor, live: set[Position], alpha: float, eps: float = 1e-5) -> dict[Position, float]:
    """R_ij = |W_ij|/(2α + (1−α)(Σ_k|W_ik| + eps)) + |W_ij|/(2α + (1−α)(Σ_k|W_kj| + eps)) on the live links."""
    rows, cols = weight.shape
    magnitude = {(i, j): abs(float(weight[i, j])) if (i, j) in live else 0.0 for i in range(rows) for j in range(cols)}
    row_sum = [sum(magnitude[i, j] for j in range(cols)) for i in range(rows)]
    col_sum = [sum(magnitude[i, j] for i in range(rows)) for j in range(cols)]
    return {
        (i, j): magnitude[i, j] / (2 * alpha + (1 - alpha) * (row_sum[i] + eps))
        + magnitude[i, j] / (2 * alpha + (1 - alpha) * (col_sum[j] + eps))
        for (i, j) in live
    }


def top_k(scores: dict[Position, float], k: int, cols: int) -> set[Position]:
    """The k positions of largest score; ties go to the lowest flat index."""
    ranked = sorted(scores, key=lambda p: (-scores[p], p[0] * cols + p[1]))
    return set(ranked[:k])


def kept_set_distribution(probability_weight: dict[Position, float], n_keep: int) -> dict[frozenset, float]:
    """Exact law of the first ``n_keep`` links drawn one at a time without replacement,
    each draw ∝ ``probability_weight`` among the links not drawn yet.

    P(S) for a drawn set S: the sum over its last-drawn element i of
    P(S − i) · w_i / (Σ w − Σ_{S−i} w), by increasing set size.
    """
    items = sorted(probability_weight)
    total = sum(probability_weight.values())
    law = {frozenset(): 1.0}
    for _ in range(n_keep):
        nxt: dict[frozenset, float] = {}
        for drawn, p in law.items():
            left = total - sum(probability_weight[x] for x in drawn)
            for item in items:
                if item in drawn:
                    continue
                key = drawn | {item}
                nxt[key] = nxt.get(key, 0.0) + p * probability_weight[item] / left
        law = nxt
    return law


def regrowth_scores(live: set[Position], shape, rule: str) -> torch.Tensor:
    mask = to_mask(live, shape)
    if rule == "ch3_l3":
        return ch3_l3_path_scores(mask)
    return ch_l3n_scores(mask, {"ch2_l3n": "ch2", "ch3_l3n": "ch3"}[rule])


def regrowth_marginals(live: set[Position], n_grow: int, shape, rule: str, selection: str = "rigid",
                       temperature: float = 1.0) -> dict[Position, float]:
    """Probability that each empty position is grown. Rigid: the n_grow best positive
    scores (ties: lowest flat index); soft: n_grow positive-score positions drawn one at
    a time without replacement ∝ score^temperature. When too few scores are positive:
    all of them plus a uniform fill among the other empty positions."""
    if n_grow <= 0:
        return {}
    rows, cols = shape
    scores = regrowth_scores(live, shape, rule)
    empty = [(i, j) for i in range(rows) for j in range(cols) if (i, j) not in live]
    positive = {p: float(scores[p]) for p in empty if float(scores[p]) > 0}
    if len(positive) >= n_grow and selection == "rigid":
        return {p: 1.0 for p in top_k(positive, n_grow, cols)}
    if len(positive) >= n_grow:
        grown: dict[Position, float] = {}
        for drawn, p in kept_set_distribution({q: v ** temperature for q, v in positive.items()}, n_grow).items():
            for position in drawn:
                grown[position] = grown.get(position, 0.0) + p
        return grown
    zero = [p for p in empty if p not in positive]
    fill = (n_grow - len(positive)) / len(zero)
    return {**{p: 1.0 for p in positive}, **{p: fill for p in zero}}


def update_marginals(weight: torch.Tensor, mask: torch.Tensor, *, budget: int, prune: bool, prune_alpha: float,
                     zeta: float, temperature: float, removal_alpha: float, rule: str, selection: str = "rigid",
                     regrowth_temperature: float = 1.0) -> torch.Tensor:
    """P(link live after one update) for one layer without percolation (docs/parity.md steps 1-5).

    ``temperature=math.inf`` keeps the most important links (rigid removal).
    """
    shape = tuple(mask.shape)
    live = live_positions(mask)
    if prune and len(live) > budget:
        live = top_k(importance(weight, live, prune_alpha), budget, shape[1])
    n_keep = len(live) - math.floor(zeta * len(live))
    scores = importance(weight, live, removal_alpha)
    if math.isinf(temperature):
        law = {frozenset(top_k(scores, n_keep, shape[1])): 1.0}
    else:
        law = kept_set_distribution({p: scores[p] ** temperature for p in live}, n_keep)
    marginals = torch.zeros(shape, dtype=torch.float64)
    for kept, p in law.items():
        for position in kept:
            marginals[position] += p
        grown = regrowth_marginals(set(kept), budget - len(kept), shape, rule, selection, regrowth_temperature)
        for position, q in grown.items():
            marginals[position] += p * q
    return marginals


def random_live_set(shape, count: int, generator: torch.Generator, forced=(), forbidden=()) -> torch.Tensor:
    """A mask with exactly ``count`` live links: every ``forced`` position, the rest at random
    positions outside ``forbidden``."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for position in forced:
        mask[position] = True
    free = [(i, j) for i in range(shape[0]) for j in range(shape[1])
            if (i, j) not in set(forced) and (i, j) not in set(forbidden)]
    for index in torch.randperm(len(free), generator=generator)[: count - len(forced)].tolist():
        mask[free[index]] = True
    return mask


def sparse_engine(config: SparsifyConfig, *, seed: int, density: float, total_steps: int, hidden: int = 4,
                  ffn: int = 6, unread_mlp_neuron: bool = False) -> SparseTrainingEngine:
    """An engine on a tiny LLaMA whose targeted layers hold ``round(density·N)`` random links and
    random weights of magnitude 0.1-1.1. ``unread_mlp_neuron``: hidden neuron 0 of the MLP has no
    down link but two strong (5.0) gate and up links, so only percolation removes them."""
    model = tiny_llama(seed, hidden=hidden, ffn=ffn)
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".layers." not in name:
            continue
        if config.target_modules is not None and not name.endswith(tuple(config.target_modules)):
            continue
        weight = module.weight
        rows, cols = weight.shape
        with torch.no_grad():
            weight.copy_(torch.randn(weight.shape, generator=generator).sign()
                         * (0.1 + torch.rand(weight.shape, generator=generator)))
        count = math.floor(density * weight.numel() + 0.5)
        forced, forbidden = [], []
        if unread_mlp_neuron and name.endswith("down_proj"):
            forbidden = [(i, 0) for i in range(rows)]
        elif unread_mlp_neuron and name.endswith(("gate_proj", "up_proj")):
            forced, forbidden = [(0, 0), (0, 1)], [(0, j) for j in range(2, cols)]
            with torch.no_grad():
                weight[0, :2] = 5.0
        masks[name] = random_live_set((rows, cols), count, generator, forced, forbidden)
    sparsify(model, config, masks=masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return SparseTrainingEngine(model, total_steps=total_steps, optimizer=optimizer)


def live_frequencies(engine: SparseTrainingEngine, step: int, trials: int,
                     budgets: dict[str, int]) -> tuple[dict[str, torch.Tensor], UpdateStats]:
    """Run the update after ``step`` ``trials`` times from the engine's current weights and masks;
    return how often each link is live afterwards, asserting every layer ends at its budget."""
    saved = {name: (layer.weight.detach().clone(), layer.mask.clone()) for name, layer in engine.layers.items()}
    counts = {name: torch.zeros(mask.shape, dtype=torch.float64) for name, (_, mask) in saved.items()}
    for _ in range(trials):
        for name, layer in engine.layers.items():
            with torch.no_grad():
                layer.weight.copy_(saved[name][0])
            layer.set_mask(saved[name][1])
        engine.completed_steps = step
        stats = engine.update_topology()
        for name, layer in engine.layers.items():
            assert int(layer.mask.sum()) == budgets[name], name
            counts[name] += layer.mask.double()
    return {name: count / trials for name, count in counts.items()}, stats


def assert_close_in_distribution(frequency: torch.Tensor, probability: torch.Tensor, trials: int, what: str) -> None:
    """Every empirical frequency within 4.5 binomial standard errors (+0.02) of its probability."""
    tolerance = 4.5 * torch.sqrt((probability * (1 - probability)).clamp_min(0) / trials) + 0.02
    excess = float(((frequency - probability).abs() - tolerance).max())
    assert excess <= 0, f"{what}: empirical\n{frequency}\nreference\n{probability}"
