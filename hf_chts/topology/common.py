"""Small helpers shared by the topology functions."""

from __future__ import annotations

import torch
from torch import Tensor


def as_bool_mask(mask: Tensor) -> Tensor:
    """``mask`` as a bool tensor (nonzero = live link); bool masks are returned as they are."""
    return mask if mask.dtype == torch.bool else mask != 0
