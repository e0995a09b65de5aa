"""hf_chts: brain-inspired dynamic sparse training (CHTs / CHTss) for Hugging Face models.

Public API::

    from hf_chts import SparsifyConfig, sparsify, CHTssTrainerCallback
    from hf_chts import SparseAdamW, sparse_adamw_cls_and_kwargs
    from hf_chts import save_sparse, load_sparse, merge_lora, evaluate_model
    from hf_chts import to_sparse_inference

Documentation (in the repository): docs/README.md, with the algorithms (docs/algorithms.md),
the checkpoint format (docs/checkpoint-format.md), distributed semantics (docs/distributed.md)
and sparse inference (docs/inference.md).

Every name is imported on first use (module ``__getattr__``), so ``import hf_chts``
and ``hf-chts --help`` do not import torch or transformers.
"""

from __future__ import annotations

import importlib

from .version import __version__

# public name -> the submodule that defines it
_EXPORTS = {
    "SparsifyConfig": "config",
    "sparsify": "model",
    "sparsity_report": "model",
    "SparsityReport": "model",
    "is_sparsified": "state",
    "SparseTrainingEngine": "engine",
    "CHTssTrainerCallback": "callback",
    "SparseAdamW": "sparse_adamw",
    "sparse_adamw_cls_and_kwargs": "sparse_adamw",
    "save_sparse": "checkpoint",
    "load_sparse": "checkpoint",
    "read_engine_state": "checkpoint",
    "merge_lora": "lora",
    "evaluate_model": "evaluation",
    "to_sparse_inference": "inference",
}

__all__ = list(_EXPORTS)


def __getattr__(name):  # lazy imports keep `import hf_chts` light
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_chts' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
