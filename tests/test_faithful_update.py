"""The faithful topology update (docs/algorithms.md §1): weights and optimizer moments after an update.

A link that is live after this update's decay pruning and live again after the regrowth keeps its
weight and every optimizer moment unchanged, even when the ζ-removal cut it and the regrowth put it
back. Only links that were empty before the update, or that its decay pruning cut, start at exactly 0
with zero moments; ``UpdateStats.reset`` counts them.

The reference below is written from that rule: it recomputes the decay pruning with a slow loop
(relative importance, ties to the lowest flat index; tests/reference_update.py) and predicts every
weight and moment after the update from the state before it, given the final mask.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_chts import SparsifyConfig, sparsify
from hf_chts.engine import SparseTrainingEngine
from reference_update import importance, live_positions, tiny_llama, to_mask, top_k
from trainer_utils import PatternDataset, make_trainer

MOMENTS = ("exp_avg", "exp_avg_sq")


def reference_pruned_mask(weight: torch.Tensor, mask: torch.Tensor, budget: int, alpha: float) -> torch.Tensor:
    """The mask after decay pruning: the ``budget`` most important live links, or all of them if fewer."""
    live = live_positions(mask)
    if len(live) <= budget:
        return mask.clone()
    return to_mask(top_k(importance(weight, live, alpha), budget, mask.shape[1]), tuple(mask.shape))


def budget_of(config: SparsifyConfig, density: float, numel: int) -> int:
    exact = density * numel
    return math.floor(exact) if config.budget_rounding == "floor" else math.floor(exact + 0.5)


class StateRecorder:
    """Wraps ``engine.update_topology`` to record logical weights, moments and masks around each update."""

    def __init__(self, engine: SparseTrainingEngine, optimizer: torch.optim.Optimizer):
        self.engine, self.optimizer, self.updates = engine, optimizer, []
        original = engine.update_topology

        def recorded():
            before = self.snapshot()
            stats = original()
            self.updates.append((before, self.snapshot(), stats))
            return stats

        engine.update_topology = recorded

    def snapshot(self) -> dict[str, dict[str, torch.Tensor]]:
        state = {}
        for name, layer in self.engine.layers.items():
            optimizer_state = self.optimizer.state.get(layer.weight, {})
            moments = {key: optimizer_state[key] for key in MOMENTS if key in optimizer_state}
            state[name] = {"weight": layer.logical_weight().detach().clone(), "mask": layer.mask.clone(),
                           **{key: (value.t() if layer.transposed else value).clone() for key, value in moments.items()}}
        return state

    def check(self) -> dict[str, int]:
        """Assert the rule for every recorded update; return totals for the callers' own assertions."""
        totals = {"kept_regrown": 0, "reset": 0, "pruned_away": 0}
        config = self.engine.config
        for before, after, stats in self.updates:
            reset = 0
            for name, old in before.items():
                new = after[name]
                budget = budget_of(config, stats.target_density, old["mask"].numel())
                decaying = self.engine.schedule.kind != "constant" or config.budget_rounding == "nearest"
                pruned = (reference_pruned_mask(old["weight"], old["mask"], budget, config.prune_alpha)
                          if decaying else old["mask"])
                keep = new["mask"] & pruned
                for key in ("weight", *MOMENTS):
                    if key not in old:
                        continue
                    want = torch.where(keep, old[key], torch.zeros_like(old[key]))
                    assert torch.equal(new[key], want), f"{name} {key} after the update at step {stats.step}"
                reset += int((new["mask"] & ~keep).sum())
                totals["pruned_away"] += int((old["mask"] & ~pruned).sum())
            assert stats.reset == reset, f"UpdateStats.reset at step {stats.step}"
            totals["reset"] += reset
            # links the removal cut and the regrowth put back: the ones a reset-every-regrown-link engine would zero
            totals["kept_regrown"] += round(stats.overlap * stats.regrown)
        return totals


def train(config: SparsifyConfig, steps: int, seed: int = 0, lr: float = 1e-2):
    model = tiny_llama(seed, hidden=8, ffn=12)
    model.train()
    sparsify(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    engine = SparseTrainingEngine(model, total_steps=steps, optimizer=optimizer)
    recorder = StateRecorder(engine, optimizer)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 16, (4, 8), generator=generator)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        engine.step()
    return engine, recorder


CASES = {
    "set": dict(method="set", target_density=0.5),
    "rigl": dict(method="rigl", target_density=0.5),
    "cht": dict(method="cht", target_density=0.5),
    "chts": dict(method="chts", target_density=0.5),
    "chtss": dict(method="chtss", target_density=0.3),
    "gmp": dict(method="gmp", target_density=0.3),
    "chts-parity": dict(method="chts", target_density=0.5, parity=True),
    "chtss-parity": dict(method="chtss", target_density=0.3, initial_density=0.5, parity=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_update_keeps_weights_and_moments_of_links_cut_and_regrown(case):
    config = SparsifyConfig(**CASES[case], update_interval=3, removal_fraction=0.3, seed=1)
    engine, recorder = train(config, steps=24)
    assert len(recorder.updates) >= 4
    totals = recorder.check()
    if case != "gmp":  # GMP neither removes nor regrows
        assert totals["kept_regrown"] > 0, "no link was cut and regrown: the test would not see a reset"


def test_first_chtss_update_from_density_one_resets_at_most_the_decay_pruned_links():
    config = SparsifyConfig(method="chtss", target_density=0.3, update_interval=2, seed=0)
    engine, recorder = train(config, steps=40)
    before, _, first = recorder.updates[0]
    live_before = sum(int(state["mask"].sum()) for state in before.values())
    total = sum(state["mask"].numel() for state in before.values())
    assert live_before == total  # dense start
    decay_pruned = live_before - sum(budget_of(config, first.target_density, s["mask"].numel())
                                     for s in before.values())
    assert first.regrown > 0 and first.overlap > 0.9  # ζ-removal cut ~10 % of the links, regrowth put most back
    assert first.reset <= decay_pruned
    assert first.reset < first.regrown / 10
    recorder.check()
    # the stat is logged with the other sparsity metrics
    assert first.to_log()["sparsity/reset"] == float(first.reset)


def test_trainer_callback_update_is_faithful(tmp_path):
    model = tiny_llama(0, hidden=8, ffn=12)
    config = SparsifyConfig(method="chtss", target_density=0.3, update_interval=4, seed=0)
    trainer, callback = make_trainer(model, tmp_path, config, dataset=PatternDataset(vocab=16), max_steps=24,
                                     learning_rate=1e-2)
    recorders = []
    original = callback.on_train_begin

    def on_train_begin(*args, **kwargs):
        result = original(*args, **kwargs)
        recorders.append(StateRecorder(callback.engine, callback.engine.optimizer))
        return result

    callback.on_train_begin = on_train_begin
    trainer.train()
    (recorder,) = recorders
    assert len(recorder.updates) >= 3
    assert recorder.check()["kept_regrown"] > 0
    logged = [entry for entry in trainer.state.log_history if "sparsity/reset" in entry]
    assert [entry["sparsity/reset"] for entry in logged] == [float(s.reset) for _, _, s in recorder.updates]
