"""hf_chts: brain-inspired dynamic sparse training (CHTs / CHTss) for Hugging Face models.

Public API::

    from hf_chts import SparsifyConfig, sparsify, CHTssTrainerCallback
    from hf_chts import save_sparse, load_sparse, merge_lora, evaluate_model

Documentation (in the repository): docs/README.md, with the algorithms (docs/algorithms.md),
the checkpoint format (docs/checkpoint-format.md) and distributed semantics (docs/distributed.md).
"""

from .config import SparsifyConfig
from .model import SparsityReport, sparsify, sparsity_report
from .state import is_sparsified
from .version import __version__

__all__ = [
    "SparsifyConfig",
    "sparsify",
    "sparsity_report",
    "SparsityReport",
    "is_sparsified",
    "SparseTrainingEngine",
    "CHTssTrainerCallback",
    "save_sparse",
    "load_sparse",
    "read_engine_state",
    "merge_lora",
    "evaluate_model",
]


def __getattr__(name):  # lazy imports keep `import hf_chts` light
    if name == "SparseTrainingEngine":
        from .engine import SparseTrainingEngine

        return SparseTrainingEngine
    if name == "CHTssTrainerCallback":
        from .callback import CHTssTrainerCallback

        return CHTssTrainerCallback
    if name in ("save_sparse", "load_sparse", "read_engine_state"):
        from . import checkpoint

        return getattr(checkpoint, name)
    if name == "merge_lora":
        from .lora import merge_lora

        return merge_lora
    if name == "evaluate_model":
        from .evaluation import evaluate_model

        return evaluate_model
    raise AttributeError(f"module 'hf_chts' has no attribute {name!r}")
