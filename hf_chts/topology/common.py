"""Small helpers shared by the topology functions: mask dtype, argument checks, noise."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor


def as_bool_mask(mask: Tensor) -> Tensor:
    """``mask`` as a bool tensor (nonzero = live link); bool masks are returned as they are."""
    return mask if mask.dtype == torch.bool else mask != 0


def exponential_noise(shape: tuple[int, ...] | torch.Size, generator: torch.Generator) -> Tensor:
    """E ~ Exp(1) as ``-log U`` (U uniform on [0, 1)), float32, positive and finite.

    ``-log U`` is several times faster than ``Tensor.exponential_`` on CPU;
    U < 1 keeps E > 0, and the clamp turns the U = 0 case into a finite key.
    """
    noise = torch.rand(tuple(shape), dtype=torch.float32, generator=generator).log_().neg_()
    return noise.clamp_(max=torch.finfo(torch.float32).max)


def checked_link_count(mask: Tensor, n_links: int) -> Tensor:
    count = int(mask.sum())
    assert count == n_links, f"topology builder produced {count} links instead of {n_links}"
    return mask


def check_shape(out_features: int, in_features: int) -> None:
    for name, value in (("out_features", out_features), ("in_features", in_features)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_n_links(n_links: int, out_features: int, in_features: int) -> None:
    numel = out_features * in_features
    if isinstance(n_links, bool) or not isinstance(n_links, numbers.Integral) or not 0 <= n_links <= numel:
        raise ValueError(f"n_links must be an int in [0, {numel}] (out_features·in_features), got {n_links!r}")


def check_density(density: float) -> None:
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")


def check_unit_interval(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
