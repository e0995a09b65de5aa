import math

import pytest

from hf_chts import SparsifyConfig
from hf_chts.schedules import (
    SparseSchedule, cubic_decay_progress, delta_linear_temperature_at, lr_rewarmup_multiplier, removal_fraction_at,
    sigmoid_decay_progress, temperature_at,
)
from hf_chts.topology.budgets import link_budget


def reference_sigmoid_progress(i, n, k):
    sigma = lambda x: 1 / (1 + math.exp(-x))
    m = n / 2
    return (sigma(k * (i - m) / m) - 0.5) / (sigma(k) - sigma(-k)) + 0.5


@pytest.mark.parametrize("n,k", [(30, 6.0), (80, 6.0), (7, 3.0), (1, 6.0)])
def test_sigmoid_endpoints_symmetry_and_formula(n, k):
    assert sigmoid_decay_progress(0, n, k) == 0.0
    assert sigmoid_decay_progress(n, n, k) == 1.0
    for i in range(1, n):
        value = sigmoid_decay_progress(i, n, k)
        assert math.isclose(value, reference_sigmoid_progress(i, n, k), rel_tol=1e-12)
        assert math.isclose(value + sigmoid_decay_progress(n - i, n, k), 1.0, abs_tol=1e-12)
    values = [sigmoid_decay_progress(i, n, k) for i in range(n + 1)]
    assert values == sorted(values)


def test_worked_values_of_algorithms_section_6():
    # decay from density 1.0 to 0.3 over n = 30 updates, k = 6
    schedule = SparseSchedule.from_config(
        SparsifyConfig(method="chtss", target_density=0.3, update_interval=10, decay_end_fraction=0.75), 400)
    assert schedule.num_decay_updates == 30
    worked = {0: 1.0, 3: 0.9960, 6: 0.9830, 9: 0.9432, 12: 0.8389, 15: 0.65, 18: 0.4611, 21: 0.3568,
              24: 0.3170, 27: 0.3040, 30: 0.3}
    for update, density in worked.items():
        assert abs(schedule.density_at(update * 10) - density) < 6e-5, update
    # the authors' recipe: sparsity 0.5 -> 0.9, n = 80, Δ = 100
    recipe = SparseSchedule.from_config(
        SparsifyConfig(method="chtss", target_density=0.1, initial_density=0.5, update_interval=100), 10_667)
    assert recipe.num_decay_updates == 80
    for step, sparsity in zip(range(1000, 8000, 1000), [0.5034, 0.5181, 0.5723, 0.7, 0.8277, 0.8819, 0.8966]):
        assert abs((1 - recipe.density_at(step)) - sparsity) < 6e-5, step
    assert recipe.density_at(8000) == 0.1


@pytest.mark.parametrize("total,interval", [(1000, 100), (997, 30), (413, 7), (250, 9)])
def test_final_density_is_exactly_the_target_when_window_is_uneven(total, interval):
    config = SparsifyConfig(method="chtss", target_density=0.1, update_interval=interval)
    schedule = SparseSchedule.from_config(config, total)
    updates = schedule.update_steps()
    densities = [schedule.density_at(step) for step in updates]
    assert densities[-1] == 0.1  # exactly, not 0.0999...
    last_decay_step = schedule.decay_start + schedule.num_decay_updates * interval
    assert last_decay_step in updates  # the target is reached at a real update, inside the update window
    assert schedule.density_at(last_decay_step - interval) > 0.1
    assert all(a >= b for a, b in zip(densities, densities[1:]))


def test_window_without_updates_is_a_clear_error():
    with pytest.raises(ValueError, match="update_interval"):
        SparseSchedule.from_config(SparsifyConfig(method="chtss", update_interval=100), 50)


def test_cubic_and_constant():
    assert cubic_decay_progress(0, 10) == 0.0 and cubic_decay_progress(10, 10) == 1.0
    assert math.isclose(cubic_decay_progress(5, 10), 1 - 0.5**3)
    gmp = SparseSchedule.from_config(SparsifyConfig(method="gmp", target_density=0.2, update_interval=10), 400)
    n = gmp.num_decay_updates
    for i in range(n + 1):
        expected = 1 - (0.8 + (0.0 - 0.8) * (1 - i / n) ** 3)
        assert math.isclose(gmp.density_at(i * 10), expected, abs_tol=1e-12) or i == n
    chts = SparseSchedule.from_config(SparsifyConfig(method="chts", target_density=0.2, update_interval=10), 400)
    assert {chts.density_at(s) for s in chts.update_steps()} == {0.2}


def test_removal_fraction_cosine_and_temperature_linear():
    assert removal_fraction_at(0, 0.1, 300) == 0.1
    assert math.isclose(removal_fraction_at(150, 0.1, 300), 0.05)
    assert removal_fraction_at(300, 0.1, 300) < 1e-12 and removal_fraction_at(301, 0.1, 300) == 0.0
    assert removal_fraction_at(100, 0.1, 300, "constant") == 0.1
    assert temperature_at(0, 1.0, 3.0, 300) == 1.0 and temperature_at(150, 1.0, 3.0, 300) == 2.0
    assert temperature_at(300, 1.0, 9.0, 300) == 9.0 and temperature_at(500, 1.0, 9.0, 300) == 9.0
    assert temperature_at(10, 1.0, math.inf, 300) == math.inf


def test_update_steps_stop_at_update_end():
    schedule = SparseSchedule.from_config(SparsifyConfig(method="chts", update_interval=25), 200)
    assert schedule.update_end == 150
    assert schedule.update_steps() == [25, 50, 75, 100, 125, 150]
    assert [s for s in range(1, 201) if schedule.is_update_step(s)] == schedule.update_steps()


def test_lr_rewarmup_multiplier():
    values = [lr_rewarmup_multiplier(c, 10, 4, 50) for c in range(0, 70)]
    assert values[:10] == [1.0] * 10  # no update yet
    assert values[10:15] == [0.25, 0.5, 0.75, 1.0, 1.0]  # after the update at step 10
    assert values[20] == 0.25 and values[50] == 0.25
    assert values[60] == 1.0  # update window over
    assert lr_rewarmup_multiplier(12, 10, 0, 50) == 1.0


def test_lr_rewarmup_every_cycle_is_the_released_factor_for_the_whole_run():
    values = [lr_rewarmup_multiplier(c, 10, 4, 50, mode="every_cycle") for c in range(0, 80)]
    for c, value in enumerate(values):  # min(1, (c mod Δ)/w), in the first cycle and after the window too
        assert value == ((c % 10) / 4 if c % 10 < 4 else 1.0), c
    assert values[60:64] == [0.0, 0.25, 0.5, 0.75]
    assert lr_rewarmup_multiplier(70, 10, 0, 50, mode="every_cycle") == 1.0
    with pytest.raises(ValueError, match="every_cycle"):
        lr_rewarmup_multiplier(3, 10, 4, 50, mode="cyclic")


def test_link_budget_rounds_to_nearest_or_down():
    assert [link_budget(0.3, n) for n in (16, 24, 25)] == [5, 7, 8]
    assert [link_budget(0.3, n, "floor") for n in (16, 24, 25)] == [4, 7, 7]
    assert link_budget(1.0, 24, "floor") == 24 and link_budget(0.5, 5, "nearest") == 3
    with pytest.raises(ValueError, match="rounding"):
        link_budget(0.3, 10, "up")


def test_delta_linear_temperature():
    for step in range(0, 101, 5):
        delta = 0.5 + (0.9 - 0.5) * step / 100
        assert delta_linear_temperature_at(step, 0.5, 0.9, 100) == pytest.approx(delta / (1 - delta), rel=1e-12)
    assert delta_linear_temperature_at(200, 0.5, 0.9, 100) == pytest.approx(9.0)  # clipped after the window
    assert delta_linear_temperature_at(50, 0.5, 1.0, 100) == pytest.approx(3.0)
    assert delta_linear_temperature_at(100, 0.5, 1.0, 100) == math.inf
