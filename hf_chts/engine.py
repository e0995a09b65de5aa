"""``SparseTrainingEngine``: owns the masks' evolution, the step counter and the RNG.

At every update step (docs/algorithms.md#66-one-topology-update) it runs, for every sparsified layer
(each row block of a fused layer on its own):

1. prune to the scheduled density by importance top-k (docs/algorithms.md §3.3, α = ``prune_alpha``;
   with rounded-down budgets only on a decaying schedule, docs/parity.md),
2. soft (or rigid) removal of a fraction ζ_t of the live links (docs/algorithms.md §3.3),
3. network percolation over the coupled layers of the model (docs/algorithms.md §4; rows with a
   bias and q/k-norm heads as in docs/percolation.md),
4. regrowth back to the scheduled density (docs/algorithms.md §5),

then writes the masks into the layers, zeroes the weights and the optimizer
moments of removed and regrown links, and records per-update statistics.

Usage in a hand-written loop::

    engine = SparseTrainingEngine(model, config, total_steps=num_steps, optimizer=optimizer)
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step(); optimizer.zero_grad()
        engine.step()              # after optimizer.step()
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .architectures import constant_output_rows
from .config import SparsifyConfig
from .config_changes import check_resume_config
from .deepspeed_check import refuse_deepspeed
from .layers import SparseLayerMixin, sparse_layers, zero_masked_
from .model import sparsify
from .schedules import SparseSchedule, lr_rewarmup_multiplier
from .state import find_state, unwrap_model
from .topology.budgets import allocate_links, link_budget
from .topology.percolation import active_neurons, percolate
from .topology.regrowth import regrow
from .topology.removal import prune_to_count, soft_removal

logger = logging.getLogger(__name__)

ENGINE_STATE_VERSION = 1

#: Optimizers whose step leaves a weight at exactly 0 when its gradient and its state are 0 (plain and
#: decoupled weight decay of 0 is 0; Adam's 0 / (sqrt(0) + eps) is 0). With masked gradients and the
#: state of cut links zeroed, masked weights stay 0 without a per-step re-mask (docs/algorithms.md §1);
#: any other optimizer gets its weights multiplied by the masks after every step.
ZERO_PRESERVING_OPTIMIZERS = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
    torch.optim.RAdam, torch.optim.Adagrad, torch.optim.RMSprop,
)


@dataclass
class UpdateStats:
    """What one topology update did."""

    step: int
    target_density: float
    density: float
    anp: float
    removed: int
    regrown: int
    overlap: float  # |removed ∩ regrown| / |regrown| (epitopological local minimum indicator)
    reset: int  # links that start at weight 0 with zero moments: empty before the update or cut by decay pruning
    removal_fraction: float
    temperature: float
    seconds: float
    layer_density: dict[str, float] = field(default_factory=dict)

    def to_log(self, prefix: str = "sparsity/", per_layer: bool = True) -> dict[str, float]:
        """Flat metrics for ``Trainer.log`` / ``accelerator.log``."""
        logs = {
            f"{prefix}density": self.density,
            f"{prefix}target_density": self.target_density,
            f"{prefix}anp": self.anp,
            f"{prefix}removed": float(self.removed),
            f"{prefix}regrown": float(self.regrown),
            f"{prefix}overlap": self.overlap,
            f"{prefix}reset": float(self.reset),
            f"{prefix}removal_fraction": self.removal_fraction,
            f"{prefix}update_seconds": self.seconds,
        }
        if per_layer:
            logs.update({f"{prefix}layer/{name}": value for name, value in self.layer_density.items()})
        return logs


class SparseTrainingEngine:
    """The per-update algorithm over all sparsified layers of one model.

    Args:
        model: the model (sparsified already, or sparsified here with ``config``);
            wrappers such as DDP or peft are looked through.
        config: used only when the model is not sparsified yet.
        total_steps: optimizer steps of the whole run; sizes every schedule.
        optimizer: if given, the engine masks gradients before and weights after
            each ``optimizer.step()`` and resets the moments of changed links.
        lr_scheduler: if given and ``config.lr_rewarmup_steps > 0``, its LR is
            multiplied by the re-warm-up factor after each update.
    """

    def __init__(self, model: nn.Module, config: SparsifyConfig | None = None, *, total_steps: int,
                 optimizer: torch.optim.Optimizer | None = None, lr_scheduler=None) -> None:
        refuse_deepspeed("SparseTrainingEngine", model=model, optimizer=optimizer)
        if find_state(model) is None:
            sparsify(unwrap_model(model), config)
        state = find_state(model)
        if config is not None and config.to_dict() != state.config.to_dict():
            logger.warning("hf_chts: the model was sparsified with a different config; the model's config is used")
        self.model = model
        state.engine = self
        self.config: SparsifyConfig = state.config
        self.topology = state.topology
        self.layers: dict[str, SparseLayerMixin] = dict(sorted(sparse_layers(model).items()))
        for layer in self.layers.values():  # FSDP2 may have sharded the weights after sparsify()
            layer.refresh_mask_shard()
        missing = sorted(set(self.topology.layers) - set(self.layers))
        if missing:
            raise ValueError(
                f"the engine cannot see {len(missing)} sparsified layer(s) (e.g. {missing[:3]}): the model was "
                "sparsified, then wrapped, converted or compiled in a way that replaced those modules. Call "
                "sparsify() on the final model object (after such conversions), then build the optimizer and the engine."
            )
        self.schedule = SparseSchedule.from_config(self.config, total_steps, warn=True)  # few updates: warned
        self.completed_steps = 0
        self.generator = torch.Generator()
        self.generator.manual_seed(self.config.seed)
        self.history: list[UpdateStats] = []
        self.optimizer = None
        self._hook_handles: list = []
        self._warned_state_dtype = self._warned_no_optimizer = self._warned_no_scheduler = False
        self._restore: list = []  # undo actions for wrappers installed on the optimizer / scheduler
        self._dense_grads: dict[str, torch.Tensor] = {}
        self._skip_next_optimizer_step = False
        self._lr_scheduler_attached = False
        if optimizer is not None:
            self.attach_optimizer(optimizer)
        if lr_scheduler is not None:
            self.attach_lr_scheduler(lr_scheduler)
        self._prepare_next_step()

    # ------------------------------------------------------------ optimizer
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep the masking invariant around every step of ``optimizer`` (docs/algorithms.md §1).

        Gradients are masked before the step (unless the per-parameter hook already
        did it in a single process); weights are re-masked after the step only for
        optimizers outside :data:`ZERO_PRESERVING_OPTIMIZERS`. The engine also resets (or, through
        the optimizer's ``repack``, re-packs) the state of changed links at each topology update.
        """
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        model_params = {id(p) for p in self.model.parameters()}
        foreign = held - model_params
        if foreign:
            raise ValueError(
                f"the optimizer holds {len(foreign)} parameter(s) that are not parameters of this model: the model was "
                "copied, re-created or wrapped after the optimizer was built. Create the optimizer from the model the "
                "engine sees (sparsify first, then build the optimizer, then the engine)."
            )
        trainable = [name for name, layer in self.layers.items() if layer.weight.requires_grad]
        if trainable and not any(id(self.layers[name].weight) in held for name in trainable):
            raise ValueError("the optimizer holds none of the sparse layers' weights; build it from this model")
        self.optimizer = optimizer
        self._hook_handles.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
        if not isinstance(optimizer, ZERO_PRESERVING_OPTIMIZERS):
            self._hook_handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        if self.config.skip_optimizer_step_on_update:
            self._wrap_optimizer_step(optimizer)

    def _wrap_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        original_step = optimizer.step

        def step(*args, **kwargs):
            if self._skip_next_optimizer_step:
                self._before_optimizer_step(optimizer, args, kwargs)  # still capture/mask gradients
                return None
            return original_step(*args, **kwargs)

        optimizer.step = step
        self._restore.append(lambda: optimizer.__dict__.pop("step", None))

    def attach_lr_scheduler(self, scheduler) -> None:
        """Multiply a ``LambdaLR``-style scheduler's factors by the re-warm-up multiplier (docs/algorithms.md §6.5)."""
        if self.config.lr_rewarmup_steps <= 0:
            return
        scheduler = getattr(scheduler, "scheduler", scheduler)
        if not hasattr(scheduler, "lr_lambdas"):
            raise ValueError(
                f"lr_rewarmup_steps={self.config.lr_rewarmup_steps} needs a LambdaLR-style scheduler (transformers' "
                f"get_*_schedule); got {type(scheduler).__name__}. Use such a scheduler or set lr_rewarmup_steps=0 "
                "(parity=True turns the re-warm-up on by default)"
            )
        # LambdaLR calls each factor with its own step count = optimizer steps completed
        original = scheduler.lr_lambdas
        self._lr_scheduler_attached = True
        self._restore.append(lambda: setattr(scheduler, "lr_lambdas", original))
        scheduler.lr_lambdas = [
            (lambda step, base=base: base(step) * self.lr_multiplier(step)) for base in scheduler.lr_lambdas
        ]
        for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(scheduler.last_epoch)

    def lr_multiplier(self, completed_steps: int | None = None) -> float:
        """Re-warm-up LR factor for the step after ``completed_steps`` (default: the engine's count)."""
        steps = self.completed_steps if completed_steps is None else completed_steps
        return lr_rewarmup_multiplier(steps, self.schedule.update_interval, self.config.lr_rewarmup_steps,
                                      self.schedule.update_end, self.config.lr_rewarmup_mode)

    def _needs_dense_grad(self, step: int) -> bool:
        return self.config.regrowth == "gradient" and self.schedule.is_update_step(step)

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self._needs_dense_grad(self.completed_steps + 1):
            for name, layer in self.layers.items():
                grad = layer.full_logical_grad()
                if grad is not None:
                    self._dense_grads[name] = grad.detach().abs().float().clone()
        # Distributed runs always re-mask: DDP/FSDP write reduced gradients into ``.grad``
        # after (or instead of) the per-parameter hook. In one process the hook already did it.
        # (docs/distributed.md#2-how-an-update-is-computed)
        distributed = dist.is_available() and dist.is_initialized()
        for layer in self.layers.values():
            hooked = layer.mask_gradients and layer.has_grad_hook
            if distributed or not hooked:
                layer.mask_grad_()

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        for layer in self.layers.values():
            layer.apply_mask_()

    def _prepare_next_step(self) -> None:
        """Before the next backward: keep gradients dense if RigL needs them; parity step skip."""
        upcoming = self.completed_steps + 1
        dense = self._needs_dense_grad(upcoming)
        for layer in self.layers.values():
            layer.mask_gradients = not dense
        self._skip_next_optimizer_step = (
            self.config.skip_optimizer_step_on_update and self.schedule.is_update_step(upcoming)
        )

    # --------------------------------------------------------------- stepping
    def step(self, completed_steps: int | None = None, *, optimizer_step_skipped: bool = False) -> UpdateStats | None:
        """Call once after every ``optimizer.step()``; runs a topology update when one is due.

        Args:
            completed_steps: optimizer steps completed so far (e.g. ``state.global_step``);
                by default the engine counts calls.
            optimizer_step_skipped: True when AMP skipped the step (overflow); the
                update due at this step is skipped too.
        """
        self.completed_steps = self.completed_steps + 1 if completed_steps is None else int(completed_steps)
        stats = None
        if self.schedule.is_update_step(self.completed_steps) and not optimizer_step_skipped:
            stats = self.update_topology()
        self._dense_grads.clear()
        self._prepare_next_step()
        return stats

    # ---------------------------------------------------------------- update
    @torch.no_grad()
    def update_topology(self) -> UpdateStats:
        """Prune to schedule, remove, percolate, regrow (docs/algorithms.md §6.6) for every layer."""
        started = time.perf_counter()
        step = self.completed_steps
        density = self.schedule.density_at(step)
        zeta = self.schedule.removal_fraction_at(step) if self.config.removal != "none" else 0.0
        temperature = math.inf if self.config.removal == "rigid" else self.schedule.removal_temperature_at(step)
        if self.optimizer is None and not self._warned_no_optimizer and any(
                layer.weight.requires_grad for layer in self.layers.values()):
            self._warned_no_optimizer = True
            logger.warning(
                "hf_chts: the engine is not attached to an optimizer, so the moments of removed and regrown links "
                "are not reset and an optimizer with momentum will move masked weights off zero. Create it with "
                "SparseTrainingEngine(model, ..., optimizer=optimizer) or call engine.attach_optimizer(optimizer)."
            )
        if self.config.lr_rewarmup_steps > 0 and not self._lr_scheduler_attached and not self._warned_no_scheduler:
            self._warned_no_scheduler = True
            logger.warning("hf_chts: lr_rewarmup_steps=%d but no LR scheduler is attached, so the LR is not re-warmed "
                           "after topology updates. Pass lr_scheduler=... to the engine or call "
                           "engine.attach_lr_scheduler(scheduler).", self.config.lr_rewarmup_steps)
        if self.config.regrowth == "gradient" and not self._dense_grads and self.layers:
            raise ValueError("gradient (RigL) regrowth needs the dense gradient of the update step: create the engine "
                             "with optimizer=... (or call attach_optimizer) so it can capture it before the step")
        old_masks = {name: layer.mask.clone() for name, layer in self.layers.items()}
        budgets = {name: self._block_budgets(name, density) for name in self.layers}
        pruned, masks = {}, {}
        for name in self.layers:
            pruned[name], masks[name] = self._prune_and_remove(name, budgets[name], zeta, temperature)
        if self.config.percolation and (self.topology.attention or self.topology.mlp):
            masks.update(percolate(masks, self.topology, rope_aware=self.config.rope_aware,
                                   constant_rows=constant_output_rows(self.layers)).masks)
        # ANP: after percolation, before regrowth (docs/algorithms.md §4)
        active, total = active_neurons(masks, self.topology)
        grown = {name: self._regrow(name, masks[name], budgets[name]) for name in self.layers}

        removed_total = regrown_total = overlap_total = reset_total = 0
        for name, layer in self.layers.items():
            removed = old_masks[name] & ~(masks[name] & ~grown[name])  # cut during this update, incl. re-grown
            removed_total += int(removed.sum())
            regrown_total += int(grown[name].sum())
            overlap_total += int((removed & grown[name]).sum())
            # Faithful update (docs/algorithms.md §1): the mask is written once, at the end; a link
            # live after decay pruning that is live again now keeps its weight and moments, even
            # when removal cut it and regrowth put it back. Everything else starts at 0.
            keep = masks[name] & pruned[name]
            reset_total += int((masks[name] & ~keep).sum())
            self._apply_layer_update(layer, old_masks[name], masks[name], keep)
        stats = UpdateStats(
            step=step, target_density=density, density=self.density(),
            anp=sum(active.values()) / max(sum(total.values()), 1),
            removed=removed_total, regrown=regrown_total,
            overlap=overlap_total / regrown_total if regrown_total else 0.0, reset=reset_total,
            removal_fraction=zeta, temperature=temperature, seconds=time.perf_counter() - started,
            layer_density={name: float(mask.sum()) / mask.numel() for name, mask in masks.items()},
        )
        self.history.append(stats)
        logger.debug("hf_chts update at step %d: %s", step, stats)
        return stats

    def _block_budgets(self, name: str, density: float) -> list[int]:
        """Links each row block of a layer holds at ``density``: the layer total rounded as
        ``budget_rounding`` says, split exactly over the blocks (docs/algorithms.md §2.1)."""
        mask = self.layers[name].mask
        blocks = self.topology.layers[name].blocks
        total = link_budget(density, mask.numel(), self.config.budget_rounding)
        return allocate_links(total, [len(b.rows) * mask.shape[1] for b in blocks])

    def _prune_and_remove(self, name: str, budgets: list[int], zeta: float,
                          temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Prune each block to its budget by importance top-k, then remove ζ·live links (docs/algorithms.md §3.3).

        Returns the mask after the decay pruning and the mask after the removal."""
        layer = self.layers[name]
        weight = layer.full_logical_weight().detach()
        mask = layer.mask.clone()
        pruned = mask.clone()
        # Rounded-down budgets (released) sit one link below a constant-density layer's initial
        # count; the released code then regrows one link less instead of pruning (docs/parity.md).
        prunes = self.schedule.kind != "constant" or self.config.budget_rounding == "nearest"
        for block, budget in zip(self.topology.layers[name].blocks, budgets):
            block_mask, block_weight = mask[block.rows], weight[block.rows]
            if prunes and int(block_mask.sum()) > budget:  # density decay: the only step that changes density
                block_mask = prune_to_count(block_weight, block_mask, budget, self.config.prune_alpha)
                pruned[block.rows] = block_mask
            live = int(block_mask.sum())
            n_remove = int(math.floor(zeta * live))
            if n_remove > 0:
                block_mask = soft_removal(block_weight, block_mask, live - n_remove, self.config.removal_alpha,
                                          temperature, generator=self.generator)
            mask[block.rows] = block_mask
        return pruned, mask

    def _regrow(self, name: str, mask: torch.Tensor, budgets: list[int]) -> torch.Tensor:
        """Refill each block of ``mask`` (in place) to its budget (docs/algorithms.md §5); returns the grown links."""
        grown = torch.zeros_like(mask)
        if self.config.regrowth == "none":
            return grown
        dense_grad = self._dense_grads.get(name)
        for block, budget in zip(self.topology.layers[name].blocks, budgets):
            block_mask = mask[block.rows]
            n_grow = budget - int(block_mask.sum())
            if n_grow <= 0:
                continue
            new_block, grown_index = regrow(
                block_mask, n_grow, self.config.regrowth, generator=self.generator,
                selection=self.config.regrowth_selection, temperature=self.config.regrowth_temperature,
                weight_grad=None if dense_grad is None else dense_grad[block.rows],
                ch_memory_budget_bytes=self.config.ch_memory_budget_mb * 2**20,
            )
            block_grown = torch.zeros(block_mask.numel(), dtype=torch.bool, device=mask.device)
            block_grown[grown_index] = True
            mask[block.rows] = new_block
            grown[block.rows] = block_grown.view_as(block_mask)
        return grown

    def _apply_layer_update(self, layer: SparseLayerMixin, old_mask, new_mask, keep: torch.Tensor) -> None:
        """Write the mask; zero the weight and moments of every position outside ``keep`` (docs/algorithms.md §1).
        Optimizers with ``repack(weight, old_mask, new_mask, keep)`` re-pack their state (docs/sparse-optimizer.md)."""
        layer.set_mask(new_mask)
        keep = keep.to(layer.mask.device)  # links that keep their weight and moments
        weight, weight_keep = layer.weight, layer.shard_like_weight(layer.storage_view(keep))
        zero_masked_(weight, weight_keep)  # cut links and newly grown links: exactly 0
        if callable(getattr(self.optimizer, "repack", None)):  # storage-layout masks, e.g. hf_chts.SparseAdamW
            self.optimizer.repack(weight, *(layer.storage_view(m.to(keep.device)) for m in (old_mask, new_mask, keep)))
        elif self.optimizer is not None:
            for value in self.optimizer.state.get(weight, {}).values():
                if not (torch.is_tensor(value) and value.shape == weight.shape):
                    continue
                if value.is_floating_point():
                    zero_masked_(value, weight_keep)  # cut and newly grown links: exactly 0, NaN/inf included
                elif not self._warned_state_dtype:  # e.g. 8-bit quantised moments: code 0 is not the value 0
                    self._warned_state_dtype = True
                    logger.warning("hf_chts: optimizer state of dtype %s cannot be reset for regrown links; "
                                   "use an optimizer with floating-point state", value.dtype)

    # ----------------------------------------------------------- inspection
    def masks(self) -> dict[str, torch.Tensor]:
        return {name: layer.mask for name, layer in self.layers.items()}

    def density(self) -> float:
        live = sum(int(layer.mask.sum()) for layer in self.layers.values())
        numel = sum(layer.mask.numel() for layer in self.layers.values())
        return live / numel if numel else 1.0

    def mask_checksum(self) -> int:
        """Cheap order-sensitive checksum of all masks (same on every rank when masks agree)."""
        checksum = 0
        for index, (name, layer) in enumerate(self.layers.items()):
            flat = layer.mask.flatten().to(torch.int64)
            positions = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
            checksum = (checksum * 1_000_003 + int((flat * (positions % 9973 + 1)).sum()) + index) % (2**61 - 1)
        return checksum

    def verify_masks_across_ranks(self) -> None:
        """Raise ``RuntimeError`` if the masks differ between distributed ranks (debug / tests).

        Why they should not: docs/distributed.md#1-same-masks-on-every-rank.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        local = self.mask_checksum()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        if len(set(gathered)) != 1:
            raise RuntimeError(f"hf_chts: masks differ across ranks at step {self.completed_steps}: checksums {gathered}")

    # ---------------------------------------------------------------- state
    def state_dict(self, include_masks: bool = True) -> dict:
        """Step counter, RNG state, schedule size, history and (by default) a copy of the masks.

        ``include_masks=False`` skips the mask copies (the checkpoint code stores
        the masks in ``sparsity.safetensors`` itself).
        """
        state = {
            "version": ENGINE_STATE_VERSION,
            "completed_steps": self.completed_steps,
            "total_steps": self.schedule.total_steps,
            "generator_state": self.generator.get_state(),
            "config": self.config.to_dict(),
            "layers": {name: list(layer.mask.shape) for name, layer in self.layers.items()},
            "history": [asdict(stats) for stats in self.history],
        }
        if include_masks:
            state["masks"] = {name: layer.mask.clone().cpu() for name, layer in self.layers.items()}
        return state

    def load_state_dict(self, state: dict, *, allow_config_change=None) -> None:
        """Restore exactly (masks, step, RNG); validates that the state belongs to this model and this config.

        A state saved under another :class:`SparsifyConfig` is refused with every
        differing field (old → new); ``allow_config_change`` may name fields of
        :data:`~hf_chts.config_changes.RESUME_SAFE_FIELDS` that are allowed to differ.
        """
        if not isinstance(state, dict) or state.get("version") != ENGINE_STATE_VERSION:
            raise ValueError("not an hf_chts engine state (missing or unknown 'version')")
        if not isinstance(state.get("config"), dict):
            raise ValueError("engine state holds no 'config'; cannot check that it belongs to this SparsifyConfig")
        check_resume_config(state["config"], self.config, allow_config_change=allow_config_change)
        expected = {name: list(layer.mask.shape) for name, layer in self.layers.items()}
        if state["layers"] != expected:
            missing = sorted(set(expected) - set(state["layers"]))
            extra = sorted(set(state["layers"]) - set(expected))
            wrong = sorted(n for n in set(expected) & set(state["layers"]) if expected[n] != state["layers"][n])
            raise ValueError(
                "engine state does not match this model: "
                f"missing layers {missing[:5]}, unexpected layers {extra[:5]}, shape mismatch {wrong[:5]}"
            )
        if state["total_steps"] != self.schedule.total_steps:
            raise ValueError(
                f"engine state was saved for a {state['total_steps']}-step run but this run has "
                f"{self.schedule.total_steps} steps; resume with the same max_steps / epochs"
            )
        self.completed_steps = int(state["completed_steps"])
        self.generator.set_state(state["generator_state"])
        for name, mask in state["masks"].items():
            self.layers[name].set_mask(mask)
        # records written before hf_chts counted reset links say -1 ("not recorded")
        self.history = [UpdateStats(**{"reset": -1, **stats}) for stats in state.get("history", [])]
        self._prepare_next_step()

    def close(self) -> None:
        """Remove the optimizer hooks and undo the optimizer-step / LR-scheduler wrappers."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        while self._restore:
            self._restore.pop()()

