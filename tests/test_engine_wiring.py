"""The engine feeds each topology step the configured knobs (removal, decay pruning, regrowth).

Each test compares what the engine did with a slow reference
(tests/reference_update.py) for the configured value and checks that another
value of the same knob would have given a different result, so a mis-wired
knob (magnitude instead of relative importance for the decay, a removal
temperature fixed at 1, another α or regrowth rule) fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_chts import SparsifyConfig
from hf_chts.topology.removal import delta_to_temperature
from reference_update import (
    assert_close_in_distribution, importance, live_frequencies, live_positions, sparse_engine, top_k, update_marginals,
)

TOTAL, INTERVAL = 60, 5
UPDATE_END = 45  # floor(0.75 · TOTAL)


def run_updates(engine, until: int) -> None:
    for step in range(INTERVAL, until + 1, INTERVAL):
        engine.completed_steps = step
        engine.update_topology()


@pytest.mark.parametrize("schedule", ["t_linear", "delta_linear"])
def test_update_stats_temperature_follows_the_schedule(schedule):
    delta_start, delta_end = 0.5, 0.9
    config = SparsifyConfig(method="chts", target_density=0.5, update_interval=INTERVAL, removal_delta_start=delta_start,
                            removal_delta_end=delta_end, removal_temperature_schedule=schedule)
    engine = sparse_engine(config, seed=0, density=0.5, total_steps=TOTAL, hidden=8, ffn=12)
    run_updates(engine, UPDATE_END)
    want = []
    for step in range(INTERVAL, UPDATE_END + 1, INTERVAL):
        fraction = step / UPDATE_END
        if schedule == "t_linear":  # T rises linearly from T(δ_start) = 1 to T(δ_end) = 9
            want.append(1 + (9 - 1) * fraction)
        else:  # δ rises linearly, T = δ/(1−δ)
            delta = delta_start + (delta_end - delta_start) * fraction
            want.append(delta / (1 - delta))
    got = [stats.temperature for stats in engine.history]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[-1] == pytest.approx(9.0) and len(set(round(t, 9) for t in got)) == len(got)


def test_delta_linear_and_t_linear_differ_inside_the_window():
    t_linear = sparse_engine(SparsifyConfig(method="chts", target_density=0.5, update_interval=INTERVAL),
                             seed=0, density=0.5, total_steps=TOTAL).schedule
    delta_linear = sparse_engine(SparsifyConfig(method="chts", target_density=0.5, update_interval=INTERVAL,
                                                removal_temperature_schedule="delta_linear"),
                                 seed=0, density=0.5, total_steps=TOTAL).schedule
    half = UPDATE_END / 2
    assert t_linear.removal_temperature_at(half) == pytest.approx(2.0)  # T 1 -> 3
    assert delta_linear.removal_temperature_at(half) == pytest.approx(delta_to_temperature(0.625))  # 1.667
    for step in (0, UPDATE_END):
        assert t_linear.removal_temperature_at(step) == pytest.approx(delta_linear.removal_temperature_at(step))


def test_decay_pruning_keeps_the_relative_importance_top_k():
    # ζ = 0: the update only prunes to the scheduled density (and regrows nothing)
    config = SparsifyConfig(method="chtss", initial_density=0.6, target_density=0.2, update_interval=INTERVAL,
                            removal_fraction=0.0, percolation=False)
    engine = sparse_engine(config, seed=1, density=0.6, total_steps=TOTAL, hidden=8, ffn=12)
    before = {name: (layer.weight.detach().clone(), live_positions(layer.mask)) for name, layer in engine.layers.items()}
    step = 4 * INTERVAL
    engine.completed_steps = step
    stats = engine.update_topology()
    magnitude_would_differ = False
    for name, layer in engine.layers.items():
        weight, live = before[name]
        budget = math.floor(stats.target_density * layer.mask.numel() + 0.5)
        assert budget < len(live)
        cols = weight.shape[1]
        relative = top_k(importance(weight, live, alpha=0.0), budget, cols)
        assert live_positions(layer.mask) == relative, name
        magnitude_would_differ |= top_k(importance(weight, live, alpha=1.0), budget, cols) != relative
    assert magnitude_would_differ


def deterministic_update(alpha: float, rule: str):
    """One chts update with rigid removal (T = ∞), no percolation and rigid regrowth."""
    config = SparsifyConfig(method="chts", target_density=0.3, update_interval=INTERVAL, removal_alpha=alpha,
                            removal_delta_start=1.0, removal_delta_end=1.0, regrowth=rule,
                            regrowth_selection="rigid", removal_fraction=0.2, percolation=False)
    engine = sparse_engine(config, seed=2, density=0.3, total_steps=TOTAL, hidden=8, ffn=12)
    before = {name: (layer.weight.detach().clone(), layer.mask.clone()) for name, layer in engine.layers.items()}
    engine.completed_steps = INTERVAL
    stats = engine.update_topology()
    assert math.isinf(stats.temperature)
    got = {name: layer.mask.clone() for name, layer in engine.layers.items()}
    want = {
        name: update_marginals(weight, mask, budget=int(mask.sum()), prune=False, prune_alpha=0.0,
                               zeta=stats.removal_fraction, temperature=math.inf, removal_alpha=alpha, rule=rule)
        for name, (weight, mask) in before.items()
    }
    return got, want


def test_removal_and_regrowth_use_the_configured_alpha_and_rule():
    combos = [(0.0, "ch2_l3n"), (0.5, "ch2_l3n"), (1.0, "ch2_l3n"), (1.0, "ch3_l3n"), (1.0, "ch3_l3")]
    references = []
    for alpha, rule in combos:
        got, want = deterministic_update(alpha, rule)
        for name, probability in want.items():
            decided = (probability == 0) | (probability == 1)  # a uniform fill is random
            assert torch.equal(got[name][decided], probability[decided] == 1), (alpha, rule, name)
        references.append(want)
    for i in range(len(combos)):
        for j in range(i + 1, len(combos)):
            assert any(not torch.equal(references[i][n], references[j][n]) for n in references[i]), (combos[i], combos[j])


@pytest.mark.slow  # the longest default-tier tests (5-10 s each); CI runs the slow tier too
def test_soft_removal_samples_at_the_scheduled_temperature_with_the_configured_alpha():
    # constant T = 0.85/0.15 = 5.67 and α = 0.5, rigid CH2-L3n regrowth, no percolation
    config = SparsifyConfig(method="chts", target_density=0.5, update_interval=INTERVAL, removal_alpha=0.5,
                            removal_delta_start=0.85, removal_delta_end=0.85, regrowth_selection="rigid",
                            removal_fraction=0.6, percolation=False, target_modules=["gate_proj", "down_proj"])
    engine = sparse_engine(config, seed=5, density=0.5, total_steps=TOTAL)
    step, trials = 2 * INTERVAL, 300
    temperature = 0.85 / 0.15
    zeta = 0.6 / 2 * (1 + math.cos(math.pi * step / UPDATE_END))

    def reference(at_temperature: float) -> dict[str, torch.Tensor]:
        return {name: update_marginals(layer.weight.detach().clone(), layer.mask.clone(), budget=int(layer.mask.sum()),
                                       prune=False, prune_alpha=0.0, zeta=zeta, temperature=at_temperature,
                                       removal_alpha=0.5, rule="ch2_l3n")
                for name, layer in engine.layers.items()}

    want, at_one = reference(temperature), reference(1.0)
    assert max(float((want[n] - at_one[n]).abs().max()) for n in want) > 0.3  # T = 1 would be visible
    frequencies, stats = live_frequencies(engine, step, trials, {n: int(l.mask.sum()) for n, l in engine.layers.items()})
    assert stats.temperature == pytest.approx(temperature)
    for name, probability in want.items():
        assert_close_in_distribution(frequencies[name], probability, trials, name)


@pytest.mark.parametrize("selection", ["soft", "rigid"])
def test_regrowth_samples_with_the_configured_selection(selection):
    # rigid removal (T = ∞), no percolation: only the regrowth is random, sampled ∝ CH2-L3n score
    config = SparsifyConfig(method="chts", target_density=0.5, update_interval=INTERVAL, removal_delta_start=1.0,
                            removal_delta_end=1.0, regrowth_selection=selection, removal_fraction=0.3,
                            percolation=False, target_modules=["gate_proj"])
    engine = sparse_engine(config, seed=6, density=0.5, total_steps=TOTAL)
    step, trials = INTERVAL, 300
    zeta = 0.3 / 2 * (1 + math.cos(math.pi * step / UPDATE_END))

    def reference(kind: str) -> dict[str, torch.Tensor]:
        return {name: update_marginals(layer.weight.detach().clone(), layer.mask.clone(), budget=int(layer.mask.sum()),
                                       prune=False, prune_alpha=0.0, zeta=zeta, temperature=math.inf,
                                       removal_alpha=1.0, rule="ch2_l3n", selection=kind)
                for name, layer in engine.layers.items()}

    want, other = reference(selection), reference("rigid" if selection == "soft" else "soft")
    assert max(float((want[n] - other[n]).abs().max()) for n in want) > 0.3  # the other selection would show
    frequencies, _ = live_frequencies(engine, step, trials, {n: int(l.mask.sum()) for n, l in engine.layers.items()})
    for name, probability in want.items():
        assert_close_in_distribution(frequencies[name], probability, trials, name)
