"""Sparse weight re-initialisation for the live fan-in of each neuron (not a topology: it changes weights).

Described in docs/algorithms.md#23-sparse-weight-re-initialisation-option.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["reinit_sparse_weight_"]


@torch.no_grad()
def reinit_sparse_weight_(
    weight: Tensor, mask: Tensor, *, gain: float = 1.0, generator: torch.Generator | None = None
) -> None:
    """Re-initialise a sparse weight in place for its live fan-in.

    The CHTs paper text gives no weight-initialisation formula; its
    predecessor CHT (Zhang et al., ICLR 2024, ref. [9]) introduced sparse
    weight initialisation (SWI): scale the initial weights by the fan-in a
    neuron really has after sparsification, ``std = gain / sqrt(live fan-in)``,
    instead of the dense ``in_features`` (the released code uses
    ``sqrt(2 / (links / out))``, a ReLU gain with the layer's mean fan-in).
    Here each row ``o`` (output neuron, ``weight`` in the logical ``out x in``
    layout, e.g. ``conv1d.weight.T`` for GPT-2) gets live weights drawn from
    ``U(-b_o, b_o)`` with ``b_o = gain · sqrt(3 / fan_in_o)`` (a kaiming-uniform
    shape: std ``gain / sqrt(fan_in_o)``), ``fan_in_o`` the live links of the row.
    ``gain = 1`` keeps the pre-activation variance of unit-variance inputs;
    ``gain = sqrt(2)`` is SWI's ReLU scale. Masked weights are set to 0; rows
    without links stay 0.
    """
    if weight.dim() != 2 or tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal weight shape {tuple(weight.shape)} (2-D)")
    if not gain > 0:
        raise ValueError(f"gain must be > 0, got {gain}")
    live = mask.to(device=weight.device, dtype=torch.bool)
    fan_in = live.sum(1, dtype=torch.float32)
    bound = gain * torch.sqrt(3.0 / fan_in.clamp_min(1.0))
    uniform = torch.empty(weight.shape, dtype=torch.float32)
    uniform.uniform_(-1.0, 1.0, generator=generator)
    values = uniform.to(weight.device) * bound.unsqueeze(1) * live
    weight.copy_(values.to(weight.dtype))
