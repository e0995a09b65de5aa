"""``sparsity_report()``: per-layer density, live links and active neurons (ANP) of a sparsified model.

Its own module so that code which :mod:`hf_chts.model` imports (the checkpoint
writer, the model card) can use it; :mod:`hf_chts.model` re-exports the names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .layers import sparse_layers
from .state import find_state

@dataclass
class LayerReport:
    name: str
    role: str
    shape: tuple[int, int]
    live_links: int
    total_links: int
    active_neurons: int
    total_neurons: int
    masked_nonzero: int = 0  # weights not 0 at masked positions: the forward pass uses them too

    @property
    def mask_density(self) -> float:
        """Live links of the mask over all links."""
        return self.live_links / self.total_links if self.total_links else 1.0

    @property
    def density(self) -> float:
        """Links the forward pass uses (live, or masked but holding a non-zero weight) over all links;
        equal to :attr:`mask_density` while masked weights are exactly 0."""
        return (self.live_links + self.masked_nonzero) / self.total_links if self.total_links else 1.0


@dataclass
class SparsityReport:
    """Per-layer and overall density and active neurons (ANP)."""

    layers: list[LayerReport] = field(default_factory=list)

    @property
    def live_links(self) -> int:
        return sum(layer.live_links for layer in self.layers)

    @property
    def total_links(self) -> int:
        return sum(layer.total_links for layer in self.layers)

    @property
    def masked_nonzero(self) -> int:
        """Weights not exactly 0 at masked positions, over all layers (0 while the masking invariant holds)."""
        return sum(layer.masked_nonzero for layer in self.layers)

    @property
    def mask_density(self) -> float:
        """Live links of the masks over all links."""
        return self.live_links / self.total_links if self.total_links else 1.0

    @property
    def density(self) -> float:
        """Links the forward pass uses over all links: :attr:`mask_density` plus the masked positions that
        hold a non-zero weight (after peft's ``merge_and_unload()``, for example; see :attr:`masked_nonzero`)."""
        return (self.live_links + self.masked_nonzero) / self.total_links if self.total_links else 1.0

    @property
    def anp(self) -> float:
        total = sum(layer.total_neurons for layer in self.layers)
        return sum(layer.active_neurons for layer in self.layers) / total if total else 1.0

    def to_dict(self) -> dict:
        return {
            "density": self.density,
            "mask_density": self.mask_density,
            "masked_nonzero": self.masked_nonzero,
            "anp": self.anp,
            "live_links": self.live_links,
            "total_links": self.total_links,
            "layers": {
                layer.name: {
                    "role": layer.role, "shape": list(layer.shape), "density": layer.density,
                    "live_links": layer.live_links, "masked_nonzero": layer.masked_nonzero,
                    "active_neurons": layer.active_neurons,
                    "total_neurons": layer.total_neurons,
                }
                for layer in self.layers
            },
        }

    def table(self) -> str:
        header = f"{'layer':<48} {'role':<8} {'shape':>13} {'density':>8} {'live':>10} {'active':>13}"
        lines = [header, "-" * len(header)]
        for layer in self.layers:
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            active = f"{layer.active_neurons}/{layer.total_neurons}"
            lines.append(f"{layer.name:<48} {layer.role:<8} {shape:>13} {layer.density:>8.4f} "
                         f"{layer.live_links:>10} {active:>13}")
        lines.append("-" * len(header))
        lines.append(f"{'overall':<48} {'':<8} {'':>13} {self.density:>8.4f} {self.live_links:>10} "
                     f"{'ANP ' + format(self.anp, '.4f'):>13}")
        if self.masked_nonzero:
            leaking = sum(1 for layer in self.layers if layer.masked_nonzero)
            lines.append(f"WARNING: {self.masked_nonzero} weights in {leaking} layer(s) are not 0 at masked positions: "
                         f"the model uses {self.density:.4f} of the links, its masks {self.mask_density:.4f} "
                         "(e.g. after peft's merge_and_unload(); use hf_chts.merge_lora)")
        return "\n".join(lines)

    __str__ = table


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Density, live links and active neurons of every sparsified layer of ``model``."""
    from .topology.percolation import active_neurons

    state = find_state(model)
    if state is None:
        raise ValueError("this model is not sparsified; call hf_chts.sparsify(model, config) first")
    layers = sparse_layers(model)
    masks = {name: layer.mask for name, layer in layers.items()}
    active, total = active_neurons(masks, state.topology) if masks else ({}, {})
    report = SparsityReport()
    for name, layer in layers.items():
        info = state.topology.layers.get(name)
        report.layers.append(
            LayerReport(name, info.role if info else "linear", tuple(layer.mask.shape), int(layer.mask.sum()),
                        layer.mask.numel(), active.get(name, 0), total.get(name, 0), layer.masked_nonzero())
        )
    return report
