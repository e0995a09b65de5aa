"""Sparse inference: run a sparsified model with only its live weights (docs/inference.md).

Public API::

    from hf_chts.inference import to_sparse_inference, inference_report, SparseInferenceLinear
"""

from .convert import InferenceInfo, inference_info, inference_layers, inference_report, to_sparse_inference
from .autotune import DEFAULT_AUTO_TOKENS, KernelChoice
from .kernels import csr_supported
from .linear import InferenceOnlyError, SparseInferenceLinear

__all__ = ["to_sparse_inference", "inference_report", "inference_layers", "inference_info", "InferenceInfo",
           "InferenceOnlyError",
           "SparseInferenceLinear", "KernelChoice", "csr_supported", "DEFAULT_AUTO_TOKENS"]
