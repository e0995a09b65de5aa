"""The sparse state ``sparsify()`` attaches to a model, and finding it through wrappers.

``model.hf_chts_state`` is a plain attribute (not a submodule, not in the
``state_dict``) holding a :class:`SparseModelState`. Everything that needs the
config, the topology or the engine of a sparsified model reads it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .architectures import ModelTopology
from .config import SparsifyConfig

STATE_ATTR = "hf_chts_state"


@dataclass
class SparseModelState:
    """What ``sparsify`` attaches to the model (``model.hf_chts_state``).

    Attributes:
        config: the resolved :class:`SparsifyConfig`.
        topology: the sparsified layers and their percolation couplings.
        engine: the ``SparseTrainingEngine`` driving this model, if any; checkpoints
            save its progress (step, RNG, history).
        loaded_engine_record: the engine record read from the checkpoint this model
            was loaded from (``load_sparse``); saved again when no engine is attached.
    """

    config: SparsifyConfig
    topology: ModelTopology
    engine: Any = None  # a SparseTrainingEngine (not imported here: the engine module imports this one)
    loaded_engine_record: dict[str, Any] | None = None


def attach_state(model: nn.Module, state: SparseModelState) -> None:
    """Attach ``state`` to ``model`` as a plain attribute (not a submodule, not in the ``state_dict``)."""
    model.__dict__[STATE_ATTR] = state


def find_state(model: nn.Module) -> SparseModelState | None:
    """The sparse state attached by ``sparsify``, looking through wrappers (DDP, peft, compile)."""
    for module in model.modules():
        state = module.__dict__.get(STATE_ATTR)
        if state is not None:
            return state
    inner = getattr(model, "_orig_mod", None)
    return find_state(inner) if isinstance(inner, nn.Module) and inner is not model else None


def is_sparsified(model: nn.Module) -> bool:
    """True when ``sparsify`` has been applied to ``model`` (or to the model it wraps)."""
    return find_state(model) is not None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The innermost model under DDP's ``module`` and ``torch.compile``'s ``_orig_mod`` wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner
