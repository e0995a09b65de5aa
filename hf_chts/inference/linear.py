"""``SparseInferenceLinear``: the inference-only stand-in for one sparsified linear layer.

It computes ``y = x @ W.T + b`` for the logical ``out x in`` weight ``W`` of an
``nn.Linear`` or a transformers ``Conv1D`` (GPT-2, stored ``in x out``), with
one of two kernels (docs/inference.md):

* ``"csr"``: only the live weights are stored, as three plain buffers
  ``csr_values`` (model dtype), ``csr_crow_indices`` and ``csr_col_indices``
  (int32 when they fit); the torch CSR tensor over them is rebuilt only when
  the buffers move (``.to()``), and the dense weight no longer exists;
* ``"dense"``: the masked dense weight in its original storage layout, for
  layers where the sparse kernel is slower (chosen by ``"auto"``).

The module refuses to train: ``train()`` raises, and so does a forward that
would record gradients (an input or the bias requiring grad).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .autotune import KernelChoice
from .kernels import csr_from_mask, csr_matmul, csr_supported, make_csr

logger = logging.getLogger(__name__)
_WARNED_UPCAST: set[tuple[str, torch.dtype]] = set()


class InferenceOnlyError(RuntimeError):
    """Raised when a model converted by ``to_sparse_inference`` is asked to train."""


TRAINING_HINT = (
    "this model was converted with hf_chts.to_sparse_inference() and is inference-only (its sparse layers store "
    "no trainable weight); to train, load the checkpoint with hf_chts.load_sparse(path) (without inference=True)"
)


class SparseInferenceLinear(nn.Module):
    """Inference-only replacement of a sparsified linear layer (see the module docstring).

    Build it with :meth:`from_live_values` (CSR) or :meth:`from_dense_weight`.
    ``density`` is the live fraction of the logical weight; ``choice`` records
    how the kernel was chosen (shown by ``repr``).
    """

    def __init__(self, in_features: int, out_features: int, *, kernel: str, density: float, choice: KernelChoice,
                 bias: torch.Tensor | None, name: str = "") -> None:
        super().__init__()
        if kernel not in ("csr", "dense"):
            raise ValueError(f"kernel must be 'csr' or 'dense', got {kernel!r}")
        self.in_features, self.out_features = in_features, out_features
        self.kernel, self.density, self.choice, self.hf_chts_name = kernel, density, choice, name
        self.transposed = False
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._csr_key = None
        self._csr = None
        self.training = False

    # ----------------------------------------------------------- builders
    @classmethod
    def from_live_values(cls, mask: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, *,
                         choice: KernelChoice, name: str = "") -> "SparseInferenceLinear":
        """A CSR layer from its logical bool ``mask`` (``out x in``) and live values in row-major mask order."""
        crow, col, live = csr_from_mask(mask, values)
        return cls.from_csr_arrays(crow, col, live, tuple(mask.shape), bias, choice=choice, name=name)

    @classmethod
    def from_csr_arrays(cls, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
                        bias: torch.Tensor | None, *, choice: KernelChoice, name: str = "") -> "SparseInferenceLinear":
        """A CSR layer over existing CSR arrays of the logical ``out x in`` weight (no copy)."""
        out_features, in_features = shape
        density = values.numel() / max(out_features * in_features, 1)
        module = cls(in_features, out_features, kernel="csr", density=density, choice=choice, bias=bias, name=name)
        module.register_buffer("csr_values", values)
        module.register_buffer("csr_crow_indices", crow)
        module.register_buffer("csr_col_indices", col)
        return module

    def replica(self) -> "SparseInferenceLinear":
        """An independent copy (cloned storage), e.g. to time the kernel with cold caches."""
        bias = None if self.bias is None else self.bias.detach().clone()
        if self.kernel == "csr":
            return self.from_csr_arrays(self.csr_crow_indices.clone(), self.csr_col_indices.clone(),
                                        self.csr_values.clone(), (self.out_features, self.in_features), bias,
                                        choice=self.choice, name=self.hf_chts_name)
        return self.from_dense_weight(self.weight.detach().clone(), bias, transposed=self.transposed,
                                      density=self.density, choice=self.choice, name=self.hf_chts_name)

    @classmethod
    def from_dense_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, transposed: bool, density: float,
                          choice: KernelChoice, name: str = "") -> "SparseInferenceLinear":
        """A dense layer over ``weight`` in its storage layout (``in x out`` when ``transposed``: Conv1D); no copy."""
        out_features, in_features = (weight.shape[1], weight.shape[0]) if transposed else tuple(weight.shape)
        module = cls(in_features, out_features, kernel="dense", density=density, choice=choice, bias=bias, name=name)
        module.transposed = transposed
        module.weight = nn.Parameter(weight.detach(), requires_grad=False)
        return module

    def densified(self, choice: KernelChoice, *, transposed: bool = False) -> "SparseInferenceLinear":
        """The dense-kernel twin of a CSR layer (storage ``in x out`` when ``transposed``, as Conv1D)."""
        logical = self.csr_weight().to_dense()
        weight = logical.t().contiguous() if transposed else logical
        return self.from_dense_weight(weight, self.bias, transposed=transposed, density=self.density, choice=choice,
                                      name=self.hf_chts_name)

    # ------------------------------------------------------------ forward
    def csr_weight(self) -> torch.Tensor:
        """The torch CSR tensor of the logical weight (cached until the buffers change)."""
        key = (self.csr_values.data_ptr(), self.csr_values.dtype, self.csr_crow_indices.data_ptr(),
               self.csr_col_indices.data_ptr())
        if key != self._csr_key:
            self._csr = make_csr(self.csr_crow_indices, self.csr_col_indices, self.csr_values,
                                 (self.out_features, self.in_features))
            self._csr_key = key
        return self._csr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            raise InferenceOnlyError(f"{self.hf_chts_name or 'layer'}: gradients were requested but {TRAINING_HINT}")
        if self.kernel == "dense":
            if not self.transposed:
                return F.linear(x, self.weight, self.bias)
            flat = x.reshape(-1, self.in_features)
            out = torch.mm(flat, self.weight) if self.bias is None else torch.addmm(self.bias, flat, self.weight)
            return out.view(*x.shape[:-1], self.out_features)
        flat = x.reshape(-1, self.in_features)
        if csr_supported(flat.device, self.csr_values.dtype):
            out = csr_matmul(self.csr_weight(), flat)
        else:  # e.g. .to(torch.bfloat16) / .half() after conversion, on CPU: compute in float32
            out = self._float32_matmul(flat).to(x.dtype)
        if self.bias is not None:
            out.add_(self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def _float32_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        """The CSR forward in float32 for a dtype torch has no CSR kernel for on this device (docs/inference.md,
        "dtypes and devices"): the stored values keep their dtype and are upcast for each call."""
        key = (str(flat.device), self.csr_values.dtype)
        if key not in _WARNED_UPCAST:
            _WARNED_UPCAST.add(key)
            logger.warning("hf_chts: torch has no CSR kernel for %s on %s; the sparse layers of this inference "
                           "model compute in float32 (values upcast per call). For speed keep the model in float32 "
                           "(model.float()), or load it with load_sparse(path, inference=True, dtype=%s) so "
                           "kernel='auto' chooses per layer", self.csr_values.dtype, flat.device,
                           self.csr_values.dtype)
        csr = make_csr(self.csr_crow_indices, self.csr_col_indices, self.csr_values.float(),
                       (self.out_features, self.in_features))
        return csr_matmul(csr, flat.float())

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.half(): drop the CSR view of the old buffers
        self._csr_key, self._csr = None, None
        return super()._apply(fn, recurse)

    # ------------------------------------------------------- inference only
    def train(self, mode: bool = True) -> "SparseInferenceLinear":
        if mode:
            raise InferenceOnlyError(f"{self.hf_chts_name or 'layer'}: train() was called but {TRAINING_HINT}")
        return super().train(False)

    # ---------------------------------------------------------- reporting
    def weight_bytes(self) -> int:
        """Bytes of the stored weight (CSR arrays, or the dense weight), bias excluded."""
        if self.kernel == "csr":
            arrays = (self.csr_values, self.csr_crow_indices, self.csr_col_indices)
            return sum(t.numel() * t.element_size() for t in arrays)
        return self.weight.numel() * self.weight.element_size()

    def dense_weight_bytes(self) -> int:
        """Bytes a dense weight of this shape and dtype takes (the baseline for :meth:`weight_bytes`)."""
        values = self.csr_values if self.kernel == "csr" else self.weight
        return self.in_features * self.out_features * values.element_size()

    def extra_repr(self) -> str:
        index = f", index={str(self.csr_col_indices.dtype).replace('torch.', '')}" if self.kernel == "csr" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"density={self.density:.4f}, kernel={self.kernel}{index}, chosen={self.choice.describe()}")
