"""Link budgets: how many links a layer holds at a density, and their split over row blocks.

Used at initialisation and at every topology update (docs/algorithms.md#21-link-budgets).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from .common import check_density

__all__ = ["BUDGET_ROUNDINGS", "count_links", "link_budget", "allocate_links"]

#: how :func:`link_budget` rounds ``ρ·N`` (docs/parity.md: the released code rounds down)
BUDGET_ROUNDINGS = ("nearest", "floor")


def count_links(density: float, numel: int) -> int:
    """Number of links of a layer with ``numel`` entries at ``density``: ``round(density · numel)``.

    Rounds half up (``floor(density · numel + 0.5)``), not Python's
    round-half-even, so that e.g. ``count_links(0.5, 5) == 3``.
    """
    check_density(density)
    if isinstance(numel, bool) or not isinstance(numel, numbers.Integral) or numel < 0:
        raise ValueError(f"numel must be an int >= 0, got {numel!r}")
    return min(int(numel), int(math.floor(density * numel + 0.5)))


def link_budget(density: float, numel: int, rounding: str = "nearest") -> int:
    """Links a layer of ``numel`` entries holds at ``density`` after a topology update:
    :func:`count_links` (``round(ρ·N)``, half up) for ``"nearest"``, ``⌊ρ·N⌋`` for ``"floor"``
    (the released code's ``int(ρ·N)``, docs/parity.md)."""
    nearest = count_links(density, numel)  # also validates the arguments
    if rounding == "nearest":
        return nearest
    if rounding == "floor":
        return min(int(numel), int(math.floor(density * numel)))
    raise ValueError(f"unknown budget rounding {rounding!r}; expected one of {', '.join(BUDGET_ROUNDINGS)}")


def allocate_links(total: int, sizes: Sequence[int]) -> list[int]:
    """Split a link budget over row blocks in proportion to their sizes (largest remainder).

    Used for fused layers (q|k|v, gate|up): each block gets ``floor(total·size/Σsize)``
    links, and the links left over go one each to the blocks with the largest
    remainders (ties: the earlier block). The result sums exactly to ``total``
    and never exceeds a block's ``size``. Exact integer arithmetic.
    """
    sizes = [int(s) for s in sizes]
    if any(s < 0 for s in sizes):
        raise ValueError(f"sizes must all be >= 0, got {sizes}")
    capacity = sum(sizes)
    if isinstance(total, bool) or not isinstance(total, numbers.Integral) or not 0 <= total <= capacity:
        raise ValueError(f"total must be an int in [0, sum(sizes)={capacity}], got {total!r}")
    if capacity == 0:
        return [0] * len(sizes)
    total = int(total)
    shares = [total * s // capacity for s in sizes]
    remainders = [total * s % capacity for s in sizes]
    leftover = total - sum(shares)  # < number of blocks with a positive remainder
    by_remainder = sorted(range(len(sizes)), key=lambda b: (-remainders[b], b))
    for block in by_remainder[:leftover]:
        shares[block] += 1
    return shares
