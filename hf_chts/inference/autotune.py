"""The ``"auto"`` kernel choice: time a layer's dense and CSR forwards side by side (docs/inference.md).

Timing a single layer in a hot loop flatters the dense kernel: its weight
stays in the CPU caches, while inside a model every other layer runs in
between and the weight streams from main memory (decoding is bound by memory
traffic). So each kernel is timed cycling through enough replicas of the
layer to overflow a large last-level cache, and the two kernels alternate
round by round so both see the same machine load; the decision uses the
median over rounds of the csr/dense time ratio.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch

#: token counts "auto" measures by default: one decoding step and a prefill of a short prompt
DEFAULT_AUTO_TOKENS = (1, 128)
#: "auto" picks CSR only when it is at least this much faster than dense at every measured token count
AUTO_MARGIN = 0.03
#: the replicas of a layer timed in turn take at least this many bytes (more than a large L3 cache)
CACHE_FLUSH_BYTES = 64 * 2**20
MAX_REPLICAS = 16


@dataclass
class KernelChoice:
    """Which kernel a layer uses and why (shown in the module's repr)."""

    kernel: str  # "csr" | "dense"
    how: str  # "requested" | "auto" | "auto: no CSR kernel for <dtype> on <device>"
    csr_over_dense: dict[int, float] = field(default_factory=dict)  # measured time ratio per token count

    def describe(self) -> str:
        if not self.csr_over_dense:
            return self.how
        ratios = ", ".join(f"{tokens} tok {ratio:.2f}" for tokens, ratio in sorted(self.csr_over_dense.items()))
        return f"{self.how} (csr/dense time: {ratios})"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_forward(replicas: dict[str, list[torch.nn.Module]], x: torch.Tensor, *,
                 rounds: int = 7) -> dict[str, list[float]]:
    """Seconds per call of each kernel on ``x`` in each round (one call of each of its replicas per round).

    Within a round the kernels run back to back, so ratios taken round by round
    share the machine's momentary load.
    """
    for modules in replicas.values():
        for module in modules[:2]:  # warm up (MKL handles, allocator)
            module(x)
    seconds = {name: [] for name in replicas}
    for _ in range(rounds):
        for name, modules in replicas.items():
            _synchronize(x.device)
            start = time.perf_counter()
            for module in modules:
                module(x)
            _synchronize(x.device)
            seconds[name].append((time.perf_counter() - start) / len(modules))
    return seconds


def replica_count(dense_weight_bytes: int) -> int:
    """How many replicas of a layer overflow the caches (2 to 16)."""
    return max(2, min(MAX_REPLICAS, math.ceil(CACHE_FLUSH_BYTES / max(dense_weight_bytes, 1))))


def choose_by_timing(dense, csr, in_features: int, *, tokens=DEFAULT_AUTO_TOKENS, dtype: torch.dtype,
                     device: torch.device, margin: float = AUTO_MARGIN) -> KernelChoice:
    """Time both forwards at each token count; CSR only if it is ``margin`` faster at every one of them.

    ``dense`` and ``csr`` are the layer's two candidate modules (with
    ``replica()`` and ``dense_weight_bytes()``). The ratio at a token count is
    the median over rounds of csr time / dense time.
    """
    count = replica_count(dense.dense_weight_bytes())
    replicas = {"dense": [dense] + [dense.replica() for _ in range(count - 1)],
                "csr": [csr] + [csr.replica() for _ in range(count - 1)]}
    generator = torch.Generator().manual_seed(0)
    ratios = {}
    for tokens_per_call in tokens:
        x = torch.randn(int(tokens_per_call), in_features, generator=generator).to(device=device, dtype=dtype)
        seconds = time_forward(replicas, x)
        ratios[int(tokens_per_call)] = statistics.median(c / d for c, d in zip(seconds["csr"], seconds["dense"]))
    kernel = "csr" if all(ratio <= 1.0 - margin for ratio in ratios.values()) else "dense"
    return KernelChoice(kernel, "auto", ratios)
