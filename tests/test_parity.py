"""parity=True reproduces the released LLaMA recipe (docs/parity.md).

The engine's parity update is compared, in distribution, with a slow loop-based
reference of one parity topology update (tests/reference_update.py): decay
pruning by relative importance, soft removal ∝ |W|^T with T = 1 + 8·t/T_end,
no percolation, budgets rounded down, rigid CH2-L3n regrowth. The removal is
random, so the reference enumerates every outcome exactly and the test compares
the probability of each link being live after the update with its frequency
over many engine updates from the same state.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_chts import SparsifyConfig, sparsify
from hf_chts.engine import SparseTrainingEngine
from reference_update import assert_close_in_distribution, live_frequencies, sparse_engine, tiny_llama, update_marginals

TOTAL, INTERVAL, UPDATE_END, STEP = 100, 10, 75, 40
MLP = ("gate_proj", "up_proj", "down_proj")  # the coupled layers; attention adds run time, nothing new
TRIALS = 600


def sigmoid_progress(i: int, n: int, k: float = 6.0) -> float:
    """Sigmoid decay progress g(i) = (σ(k(i−m)/m) − ½)/(σ(k) − σ(−k)) + ½, m = n/2."""
    sigma = lambda x: 1 / (1 + math.exp(-x))
    return (sigma(k * (i - n / 2) / (n / 2)) - 0.5) / (sigma(k) - sigma(-k)) + 0.5


def sigmoid_density(step: int, initial: float, target: float, n: int) -> float:
    """Scheduled density after the update at ``step`` (update index step/Δ of n)."""
    return initial + (target - initial) * sigmoid_progress(step // INTERVAL, n)


def build(method: str, initial: float, target: float, seed: int):
    """Tiny MLP-only LLaMA at ``initial`` density whose hidden neuron 0 has no down link (a neuron
    percolation would remove) and two strong gate/up links (it survives pruning and removal)."""
    config = SparsifyConfig(method=method, parity=True, initial_density=initial, target_density=target,
                            update_interval=INTERVAL, removal_fraction=0.9, seed=seed, target_modules=list(MLP))
    return sparse_engine(config, seed=seed, density=initial, total_steps=TOTAL, unread_mlp_neuron=True)


@pytest.mark.parametrize("method,initial,target", [("chtss", 0.5, 0.25), ("chts", 0.33, 0.33)])
def test_one_parity_update_matches_the_slow_reference_in_distribution(method, initial, target):
    engine = build(method, initial, target, seed=3)
    layers = engine.layers
    saved = {name: (layer.weight.detach().clone(), layer.mask.clone()) for name, layer in layers.items()}
    assert all(int(m.sum()) == math.floor(initial * m.numel() + 0.5) for _, m in saved.values())

    decaying = method == "chtss"
    density = sigmoid_density(STEP, initial, target, UPDATE_END // INTERVAL) if decaying else target
    temperature = 1 + 8 * STEP / UPDATE_END
    zeta = 0.9 / 2 * (1 + math.cos(math.pi * STEP / UPDATE_END))
    budgets = {name: math.floor(density * mask.numel()) for name, (_, mask) in saved.items()}
    assert any(b != math.floor(density * m.numel() + 0.5) for b, (_, m) in zip(budgets.values(), saved.values()))
    reference = {
        name: update_marginals(weight, mask, budget=budgets[name], prune=decaying, prune_alpha=0.0, zeta=zeta,
                               temperature=temperature, removal_alpha=1.0, rule="ch2_l3n")
        for name, (weight, mask) in saved.items()
    }

    frequencies, stats = live_frequencies(engine, STEP, TRIALS, budgets)  # budgets: rounded down, exactly
    assert stats.temperature == pytest.approx(temperature)
    assert stats.removal_fraction == pytest.approx(zeta)
    assert stats.target_density == pytest.approx(density)

    for name, want in reference.items():
        assert_close_in_distribution(frequencies[name], want, TRIALS, name)
    # the neuron percolation would have removed keeps its links (no percolation in parity)
    gate = next(n for n in reference if n.endswith("gate_proj"))
    assert float(reference[gate][0, :2].min()) > 0.5


def lr_of_released_recipe(c: int, warmup: int, total: int, interval: int, rewarm: int) -> float:
    """LambdaLR factor of the released cosine-with-restarts schedule, with a linear global decay
    instead of the cosine: global(c) · min(1, (c mod Δ)/w)."""
    global_factor = c / warmup if c < warmup else max(0.0, (total - c) / (total - warmup))
    local = (c % interval) / rewarm if c % interval < rewarm else 1.0
    return global_factor * local


def test_parity_lr_rewarms_after_every_cycle_for_the_whole_run():
    from transformers import get_linear_schedule_with_warmup

    model = tiny_llama(0, hidden=8, ffn=12)
    model.train()
    total, interval = 60, 10
    sparsify(model, SparsifyConfig(method="chts", target_density=0.5, update_interval=interval, parity=True,
                                   lr_rewarmup_steps=4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = get_linear_schedule_with_warmup(optimizer, 5, total)
    engine = SparseTrainingEngine(model, total_steps=total, optimizer=optimizer, lr_scheduler=scheduler)
    used = []
    generator = torch.Generator().manual_seed(0)
    for _ in range(total):
        used.append(optimizer.param_groups[0]["lr"])
        ids = torch.randint(0, 16, (2, 6), generator=generator)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        engine.step()
    want = [0.5 * lr_of_released_recipe(c, 5, total, interval, 4) for c in range(total)]
    assert used == pytest.approx(want, abs=1e-12)
    assert engine.schedule.update_end == 45 and used[50] == 0.0  # re-warmed after the update window too
    assert [s.step for s in engine.history] == [10, 20, 30, 40]


def test_parity_allows_a_decay_window_past_the_updates_and_stops_short_of_the_target():
    config = SparsifyConfig(method="chtss", parity=True, initial_density=0.5, target_density=0.1,
                            update_interval=100, removal_fraction=0.1, decay_end_fraction=0.8)
    from hf_chts.schedules import SparseSchedule

    schedule = SparseSchedule.from_config(config, 10_000)
    assert schedule.update_end == 7500 and schedule.num_decay_updates == 80
    final = schedule.density_at(schedule.update_steps()[-1])
    assert final == pytest.approx(0.5 + (0.1 - 0.5) * sigmoid_progress(75, 80), abs=1e-12)
    assert 0.1 < final < 0.102  # sparsity 0.899..., as the released run ends
    with pytest.raises(ValueError, match="decay_end_fraction"):
        SparsifyConfig(method="chtss", initial_density=0.5, target_density=0.1, decay_end_fraction=0.8)


def test_parity_starts_from_the_released_brf_centres():
    from hf_chts.topology.init import build_mask

    masks = {}
    for parity in (False, True):
        model = tiny_llama(0, hidden=8, ffn=20)
        config = SparsifyConfig(method="chts", target_density=0.3, init="brf", init_r=0.0, init_degree_mode="fixed",
                                parity=parity, target_modules=["gate_proj"])
        sparsify(model, config)
        masks[parity] = model.model.layers[0].mlp.gate_proj.mask.clone()
    for parity, centres in ((False, "diagonal"), (True, "integer_stride")):
        want = build_mask("brf", 20, 8, 0.3, generator=torch.Generator().manual_seed(0), r=0.0, degree_mode="fixed",
                          brf_centres=centres)
        assert torch.equal(masks[parity], want), centres
    assert not torch.equal(masks[False], masks[True])  # 20 x 8: stride 2 instead of 2.5
