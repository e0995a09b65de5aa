"""``SparseAdamW``: AdamW whose moments exist only for the live links of sparsified weights.

For a weight of a sparsified layer (:class:`~hf_chts.layers.SparseLayerMixin`) the optimizer
keeps ``exp_avg`` / ``exp_avg_sq`` (and ``max_exp_avg_sq`` with ``amsgrad``) as 1-D tensors with
one entry per live link, in the row-major order of the mask in the weight's storage layout
(:meth:`~hf_chts.layers.SparseLayerMixin.storage_mask`; GPT-2 ``Conv1D`` stores ``in x out``). The
mask defines the order, so no index tensor is stored. Every other parameter (embeddings, norms,
layers left dense) gets ordinary AdamW state.

A step gathers the weight and its gradient at the live positions, runs torch's own AdamW arithmetic
(``torch.optim.adam.adam``: the same for-loop / foreach / fused kernels as ``torch.optim.AdamW``)
on the packed tensors and writes the weight back at those positions. Masked weights are never read
or written, so they stay exactly 0, and weight decay touches live links only. Because the arithmetic
is elementwise and identical, the result equals ``torch.optim.AdamW`` plus the engine's masking
(docs/sparse-optimizer.md states the measured exactness).

At every topology update the engine calls :meth:`SparseAdamW.repack` (docs/algorithms.md §1, the
faithful update): links it keeps keep their moments, newly grown links start at 0, cut links drop.

Usage::

    model = sparsify(model, SparsifyConfig(method="chtss", target_density=0.3))
    optimizer = SparseAdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    engine = SparseTrainingEngine(model, total_steps=steps, optimizer=optimizer)

    # transformers.Trainer
    Trainer(..., optimizer_cls_and_kwargs=sparse_adamw_cls_and_kwargs(args), callbacks=[CHTssTrainerCallback(cfg)])
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam

from .layers import is_dtensor, layer_of_weight

#: The per-link state entries of a sparsified weight (packed, one entry per live link).
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

FSDP2_REFUSED = ("SparseAdamW does not support FSDP2-sharded (DTensor) parameters; use torch.optim.AdamW "
                 "with FSDP2 (docs/sparse-optimizer.md#4-where-it-plugs-in)")


def live_index(storage_mask: torch.Tensor) -> torch.Tensor:
    """Flat positions (int64, ascending) of the live links of a storage-layout mask, on the mask's device.

    Computed for one weight at a time during a step and dropped after it: it is not kept as state.
    """
    return storage_mask.reshape(-1).nonzero().squeeze(1)


def _scalar_dtype(fused: bool | None) -> torch.dtype:
    """The dtype torch's Adam uses for its ``step`` counter."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 and not fused else torch.float32


class SparseAdamW(torch.optim.AdamW):
    """AdamW with optimizer state proportional to density (docs/sparse-optimizer.md).

    Same arguments and defaults as :class:`torch.optim.AdamW` (``foreach`` / ``fused`` choose the same
    kernels). ``capturable`` and ``differentiable`` are not supported, nor are FSDP2-sharded (DTensor)
    parameters (refused when the optimizer is built). A sparsified weight's moments hold one entry per
    live link; the :class:`~hf_chts.engine.SparseTrainingEngine` it is attached to re-packs them at each
    topology update through :meth:`repack`. Build the optimizer after ``sparsify()`` or before: a weight
    is packed at its first step.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
                         fused=fused)
        if any(is_dtensor(p) for group in self.param_groups for p in group["params"]):
            raise ValueError(FSDP2_REFUSED)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step; sparsified weights are updated at their live links only."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["capturable"] or group["differentiable"]:
                raise ValueError("SparseAdamW does not support capturable=True or differentiable=True")
            dense = [p for p in group["params"] if p.grad is not None and layer_of_weight(p) is None]
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
            # dense parameters: torch's own state initialisation and checks
            has_complex = self._init_group({**group, "params": dense}, params, grads, exp_avgs, exp_avg_sqs,
                                           max_exp_avg_sqs, steps)
            write_back = []
            for p in group["params"]:
                layer = layer_of_weight(p)
                if p.grad is None or layer is None:
                    continue
                index = live_index(self._storage_mask(layer))
                packed_weight = p.reshape(-1).index_select(0, index)
                state = self._packed_state(p, group, index)
                params.append(packed_weight)
                grads.append(p.grad.reshape(-1).index_select(0, index))
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                if group["amsgrad"]:
                    max_exp_avg_sqs.append(state["max_exp_avg_sq"])
                steps.append(state["step"])
                write_back.append((p, index, packed_weight))
            if not params:
                continue
            beta1, beta2 = group["betas"]
            adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad=group["amsgrad"],
                 has_complex=has_complex, beta1=beta1, beta2=beta2, lr=group["lr"],
                 weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                 foreach=group["foreach"], capturable=False, differentiable=False, fused=group["fused"],
                 grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
                 decoupled_weight_decay=True)
            for p, index, packed_weight in write_back:
                p.view(-1).index_copy_(0, index, packed_weight)
        return loss

    @staticmethod
    def _storage_mask(layer) -> torch.Tensor:
        if layer.is_sharded:
            raise ValueError(FSDP2_REFUSED)
        if not layer.weight.is_contiguous():
            raise ValueError(f"SparseAdamW: the weight of {layer.hf_chts_name!r} is not contiguous; "
                             "make it contiguous before building the optimizer")
        return layer.storage_mask()

    def _packed_state(self, p: torch.Tensor, group: dict, index: torch.Tensor) -> dict:
        """The packed state of sparsified weight ``p`` (created at its first step; dense state is packed)."""
        state = self.state[p]
        live = index.numel()
        if len(state) == 0:
            fused = group["fused"]
            state["step"] = (torch.zeros((), dtype=_scalar_dtype(fused), device=p.device) if fused
                             else torch.tensor(0.0, dtype=_scalar_dtype(fused)))
            for key in MOMENT_KEYS[:3 if group["amsgrad"] else 2]:
                state[key] = torch.zeros(live, dtype=p.dtype, device=p.device)
            return state
        for key in MOMENT_KEYS:
            value = state.get(key)
            if value is None:
                continue
            if value.shape == p.shape:  # AdamW state of a weight sparsified after its first step: pack it
                state[key] = value.reshape(-1).index_select(0, index)
            elif value.shape != (live,):
                raise ValueError(
                    f"SparseAdamW: the {key} of {layer_of_weight(p).hf_chts_name!r} holds {value.numel()} entries "
                    f"but the layer has {live} live links. The mask changed without a re-pack: attach this "
                    "optimizer to the SparseTrainingEngine (optimizer=...), and load an optimizer state only "
                    "together with the masks it was saved with")
        return state

    # ---------------------------------------------------------------- repack
    @torch.no_grad()
    def repack(self, weight: torch.Tensor, old_mask: torch.Tensor, new_mask: torch.Tensor,
               keep: torch.Tensor) -> None:
        """Re-pack the moments of ``weight`` for a topology update, in one pass per moment.

        The three bool masks are in the weight's storage layout (full, not sharded): ``old_mask`` the
        mask the state is packed for, ``new_mask`` the mask after the update, ``keep`` the links that
        keep their moments (a subset of both). Links in ``new_mask`` but not in ``keep`` start at 0;
        links only in ``old_mask`` are dropped. Kept entries keep their relative order, so the i-th kept
        entry of the old packing is the i-th kept entry of the new one.
        """
        state = self.state.get(weight)
        if not state:
            return
        device = state["exp_avg"].device
        old_mask, new_mask, keep = (m.to(device=device, dtype=torch.bool) for m in (old_mask, new_mask, keep))
        if bool((keep & ~(old_mask & new_mask)).any()):
            raise ValueError("SparseAdamW.repack: 'keep' holds links outside the old or the new mask")
        keep_in_old = keep.reshape(-1)[old_mask.reshape(-1)]  # per old packed entry: kept?
        keep_in_new = keep.reshape(-1)[new_mask.reshape(-1)]  # per new packed entry: kept?
        for key in MOMENT_KEYS:
            value = state.get(key)
            if value is None:
                continue
            if value.shape == weight.shape:  # not packed yet (no step since sparsify): pack the kept part
                value = value.reshape(-1)[old_mask.reshape(-1)]
            if value.shape != keep_in_old.shape:
                raise ValueError(f"SparseAdamW.repack: {key} holds {value.numel()} entries but the old mask has "
                                 f"{keep_in_old.numel()} live links")
            packed = torch.zeros(keep_in_new.numel(), dtype=value.dtype, device=device)
            packed.masked_scatter_(keep_in_new, value[keep_in_old])
            state[key] = packed

    # ------------------------------------------------------------- inspection
    def state_bytes(self) -> int:
        """Bytes held by the optimizer state tensors (moments and step counters)."""
        return sum(value.numel() * value.element_size() for state in self.state.values()
                   for value in state.values() if torch.is_tensor(value))


def sparse_adamw_cls_and_kwargs(args) -> tuple[type[SparseAdamW], dict]:
    """``(SparseAdamW, kwargs)`` for ``transformers.Trainer(optimizer_cls_and_kwargs=...)`` from ``TrainingArguments``.

    Learning rate, betas and epsilon come from ``args`` (the Trainer's parameter groups carry the weight
    decay); the fused kernel is used when ``args.optim`` is a fused AdamW (transformers' default).
    """
    optim = str(getattr(args.optim, "value", args.optim))
    return SparseAdamW, {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2),
                         "eps": args.adam_epsilon, "fused": True if "fused" in optim else None}
