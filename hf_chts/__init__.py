"""hf_chts: brain-inspired dynamic sparse training (CHTs / CHTss) for Hugging Face models.

Public API::

    from hf_chts import SparsifyConfig, sparsify, CHTssTrainerCallback
"""

from .config import SparsifyConfig
from .model import SparsityReport, is_sparsified, sparsify, sparsity_report

__version__ = "0.1.0"

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
]


def __getattr__(name):  # lazy imports keep `import hf_chts` light
    if name == "SparseTrainingEngine":
        from .engine import SparseTrainingEngine

        return SparseTrainingEngine
    if name == "CHTssTrainerCallback":
        from .callback import CHTssTrainerCallback

        return CHTssTrainerCallback
    if name in ("save_sparse", "load_sparse"):
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'hf_chts' has no attribute {name!r}")
