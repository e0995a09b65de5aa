"""Schedules of docs/algorithms.md#6-schedules-and-the-update-step: density decay, removal fraction, removal
temperature and the optional LR re-warm-up. Pure functions of the step.

Steps are *optimizer* steps. A topology update happens after optimizer step
``t`` when ``t % update_interval == 0`` and ``t <= update_end``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from .config import LR_REWARMUP_MODES, SparsifyConfig
from .topology.removal import delta_to_temperature

logger = logging.getLogger(__name__)


def sigmoid_decay_progress(update_index: float, num_updates: int, k: float = 6.0) -> float:
    """``g(i) = (σ(k(i−m)/m) − ½)/(σ(k) − σ(−k)) + ½`` with ``m = n/2`` (docs/algorithms.md §6.4).

    ``g(0) = 0`` and ``g(n) = 1`` exactly; symmetric around ``m``.
    """
    if num_updates <= 0:
        raise ValueError(f"num_updates must be positive, got {num_updates}")
    if update_index <= 0:
        return 0.0
    if update_index >= num_updates:
        return 1.0
    half = num_updates / 2.0

    def sigmoid(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-x))

    return (sigmoid(k * (update_index - half) / half) - 0.5) / (sigmoid(k) - sigmoid(-k)) + 0.5


def cubic_decay_progress(update_index: float, num_updates: int) -> float:
    """GMP's cubic schedule as a progress in [0, 1]: ``1 − (1 − i/n)³`` (docs/algorithms.md §6.4)."""
    fraction = min(max(update_index / num_updates, 0.0), 1.0)
    return 1.0 - (1.0 - fraction) ** 3


def removal_fraction_at(step: int, zeta: float, update_end: int, kind: str = "cosine") -> float:
    """``ζ_t = ζ/2·(1 + cos(π·t/T_end))`` (cosine) or ``ζ`` (constant), 0 after ``T_end``."""
    if step > update_end or update_end <= 0:
        return 0.0
    if kind == "constant":
        return zeta
    return zeta / 2.0 * (1.0 + math.cos(math.pi * step / update_end))


def _window_fraction(step: int, update_end: int) -> float:
    return min(max(step / update_end, 0.0), 1.0) if update_end > 0 else 1.0


def temperature_at(step: int, start: float, end: float, update_end: int) -> float:
    """Removal temperature rising linearly from ``start`` to ``end`` over ``[0, T_end]``
    ("t_linear", docs/algorithms.md §6.3).

    An infinite end (δ_end = 1, rigid removal) gives ``inf`` throughout.
    """
    if math.isinf(end) or math.isinf(start):
        return math.inf
    return start + (end - start) * _window_fraction(step, update_end)


def delta_linear_temperature_at(step: int, delta_start: float, delta_end: float, update_end: int) -> float:
    """Removal temperature ``T = δ/(1−δ)`` with δ rising linearly from ``delta_start`` to
    ``delta_end`` over ``[0, T_end]`` (the paper's wording, "delta_linear"; docs/parity.md).

    ``δ = 1`` gives ``inf`` (rigid removal).
    """
    return delta_to_temperature(delta_start + (delta_end - delta_start) * _window_fraction(step, update_end))


def lr_rewarmup_multiplier(completed_steps: int, update_interval: int, warmup_steps: int, update_end: int,
                           mode: str = "after_update") -> float:
    """LR multiplier of the re-warm-up after topology updates (docs/algorithms.md §6.5), for the step after
    ``completed_steps`` steps.

    ``"after_update"``: ``min(1, j/w)`` for the ``j``-th step after the last topology
    update; 1 before the first update and once the last update lies beyond the
    update window. ``"every_cycle"`` (the released recipe, docs/parity.md):
    ``min(1, (c mod Δ)/w)`` at every step ``c`` of the whole run, so the step right
    after an update runs at LR 0 and the first cycle and the steps after the update
    window are re-warmed too. 1 whenever ``warmup_steps`` is 0.
    """
    if mode not in LR_REWARMUP_MODES:
        raise ValueError(f"unknown re-warm-up mode {mode!r}; expected one of {', '.join(LR_REWARMUP_MODES)}")
    if warmup_steps <= 0:
        return 1.0
    if mode == "every_cycle":
        return min(1.0, (completed_steps % update_interval) / warmup_steps)
    if completed_steps < update_interval:
        return 1.0
    last_update = (completed_steps // update_interval) * update_interval
    if last_update > update_end:
        return 1.0
    steps_since_update = completed_steps - last_update + 1
    return min(1.0, steps_since_update / warmup_steps)


@dataclass(frozen=True)
class SparseSchedule:
    """All step-dependent quantities of one run, sized from ``total_steps``.

    The decay window starts at the first multiple of Δ at or after
    ``decay_start_fraction·total`` and holds ``num_decay_updates`` updates;
    the last of them lies inside the window and inside the update window, so
    the final density is exactly the target (no 0.899-for-0.9 drift).
    """

    total_steps: int
    update_interval: int
    update_end: int
    decay_start: int
    num_decay_updates: int
    initial_density: float
    target_density: float
    kind: str
    sigmoid_k: float
    removal_fraction: float
    removal_fraction_kind: str
    temperature_start: float
    temperature_end: float
    temperature_schedule: str = "t_linear"
    delta_start: float = 0.5
    delta_end: float = 0.75

    @classmethod
    def from_config(cls, config: SparsifyConfig, total_steps: int, *, warn: bool = False) -> "SparseSchedule":
        """The schedule of a ``total_steps``-step run; ``ValueError`` when it holds no update. ``warn``: log
        :meth:`few_updates_message` (the engine does, once per run)."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive number of optimizer steps, got {total_steps!r}")
        interval = config.update_interval
        update_end = int(math.floor(config.update_end_fraction * total_steps))
        decay_start = int(math.ceil(config.decay_start_fraction * total_steps / interval)) * interval
        decay_end = int(math.floor(config.decay_end_fraction * total_steps))
        num_decay = (decay_end - decay_start) // interval
        kind = config.schedule if config.initial_density > config.target_density else "constant"
        if kind != "constant" and num_decay < 1:
            raise ValueError(
                f"the density decay window [{decay_start}, {decay_end}] of a {total_steps}-step run holds no topology "
                f"update at update_interval={interval}: lower update_interval, widen decay_end_fraction, or train longer"
            )
        if not config.is_dense and update_end < interval:
            raise ValueError(
                f"a {total_steps}-step run has no topology update: the first one would follow step {interval} "
                f"(update_interval) but updates stop at step {update_end} (update_end_fraction="
                f"{config.update_end_fraction}); lower update_interval or train longer"
            )
        t_start, t_end = config.removal_temperature_range
        schedule = cls(total_steps, interval, update_end, decay_start, max(num_decay, 1), config.initial_density,
                       config.target_density, kind, config.sigmoid_k, config.removal_fraction,
                       config.removal_fraction_schedule, t_start, t_end, config.removal_temperature_schedule,
                       config.removal_delta_start, config.removal_delta_end)
        message = schedule.few_updates_message() if warn and not config.is_dense else None
        if message:
            logger.warning(message)
        return schedule

    def few_updates_message(self) -> str | None:
        """A warning when the run holds only one or two topology updates (``None`` otherwise): with a density
        decay the density then falls to the target at once, i.e. one-shot pruning, not gradual sparse training."""
        updates = len(self.update_steps())
        decaying = self.kind != "constant"
        count = self.num_decay_updates if decaying else updates
        if count > 2:
            return None
        fix = (f"lower update_interval (e.g. to {max(1, self.update_end // 10)} for about 10 updates) or train longer "
               "(max_steps)")
        if decaying:
            return (f"hf_chts: the {self.kind} density schedule of this {self.total_steps}-step run has only {count} "
                    f"topology update(s) at update_interval={self.update_interval}: the density falls from "
                    f"{self.initial_density} to {self.target_density} at once. This is one-shot pruning, not "
                    f"gradual sparse training; {fix}")
        return (f"hf_chts: this {self.total_steps}-step run has only {count} topology update(s) at "
                f"update_interval={self.update_interval}: the topology barely evolves (close to one-shot, static "
                f"sparse training); {fix}")

    # ---------------------------------------------------------------- steps
    def is_update_step(self, step: int) -> bool:
        """True when a topology update follows optimizer step ``step`` (1-based count of completed steps)."""
        return step > 0 and step % self.update_interval == 0 and step <= self.update_end

    def update_steps(self) -> list[int]:
        return list(range(self.update_interval, self.update_end + 1, self.update_interval))

    def decay_index(self, step: int) -> int:
        """Update index ``i`` of docs/algorithms.md §6.4 inside the decay window, clipped to ``[0, n]``."""
        return min(max((step - self.decay_start) // self.update_interval, 0), self.num_decay_updates)

    def density_at(self, step: int) -> float:
        """Target density after the update at ``step`` (exactly ``target_density`` at the end)."""
        if self.kind == "constant":
            return self.target_density
        index = self.decay_index(step)
        if self.kind == "sigmoid":
            progress = sigmoid_decay_progress(index, self.num_decay_updates, self.sigmoid_k)
        else:
            progress = cubic_decay_progress(index, self.num_decay_updates)
        if progress >= 1.0:
            return self.target_density
        sparsity_init, sparsity_final = 1.0 - self.initial_density, 1.0 - self.target_density
        return 1.0 - (sparsity_init + (sparsity_final - sparsity_init) * progress)

    def removal_fraction_at(self, step: int) -> float:
        return removal_fraction_at(step, self.removal_fraction, self.update_end, self.removal_fraction_kind)

    def removal_temperature_at(self, step: int) -> float:
        """Soft-removal temperature of the update at ``step`` (docs/algorithms.md §6.3)."""
        if self.temperature_schedule == "delta_linear":
            return delta_linear_temperature_at(step, self.delta_start, self.delta_end, self.update_end)
        return temperature_at(step, self.temperature_start, self.temperature_end, self.update_end)
