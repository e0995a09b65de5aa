"""Sparse storage and the CSR forward for inference (see docs/inference.md).

Pure helpers on tensors:

* :func:`csr_from_mask` builds the three CSR arrays of a logical ``out x in``
  weight from its boolean mask and its live values (row-major order, the order
  of ``weight[mask]`` and of the compact checkpoint format), with ``int32``
  indices whenever they fit, so a CSR weight costs ``nnz * (value + 4)`` bytes
  plus one index per row.
* :func:`csr_matmul` is the sparse forward: ``torch.mv`` for a single token
  (MKL's sparse matrix-vector product, several times faster than ``sparse.mm``
  with one column), ``torch.sparse.mm`` for more.
* :func:`csr_supported` probes once per (device, dtype) whether torch has a
  CSR kernel there (torch 2.x on CPU: float32/float64 only).

The ``"auto"`` choice that uses them lives in :mod:`hf_chts.inference.autotune`.
"""

from __future__ import annotations

import warnings

import torch

_INT32_MAX = 2**31 - 1
_SUPPORT: dict[tuple[str, torch.dtype], bool] = {}


def index_dtype(nnz: int, out_features: int, in_features: int) -> torch.dtype:
    """``int32`` when every CSR index fits in it (MKL and cuSPARSE accept both), else ``int64``."""
    return torch.int32 if max(nnz, out_features, in_features) <= _INT32_MAX else torch.int64


@torch.no_grad()
def csr_from_mask(mask: torch.Tensor, values: torch.Tensor, *, rows_per_chunk: int = 256):
    """``(crow_indices, col_indices, values)`` of the logical weight with ``mask`` and live ``values``.

    ``mask`` is the bool ``out x in`` mask; ``values`` the live weights in
    row-major order of the mask (``len(values) == mask.sum()``). Column indices
    are found a chunk of rows at a time so the int64 temporaries of
    ``nonzero`` stay small.
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a 2-D bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
    out_features, in_features = mask.shape
    row_counts = mask.sum(dim=1)
    nnz = int(row_counts.sum())
    if values.dim() != 1 or values.numel() != nnz:
        raise ValueError(f"values must be 1-D with {nnz} live entries (the mask's), got shape {tuple(values.shape)}")
    itype = index_dtype(nnz, out_features, in_features)
    crow = torch.zeros(out_features + 1, dtype=itype, device=mask.device)
    crow[1:] = row_counts.cumsum(0)
    cols = [chunk.nonzero()[:, 1].to(itype) for chunk in mask.split(rows_per_chunk)]
    col = torch.cat(cols) if cols else torch.zeros(0, dtype=itype, device=mask.device)
    return crow, col, values.contiguous()


def make_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A torch sparse CSR tensor over existing arrays (no copy, no invariant check)."""
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def csr_matmul(csr: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    """``x2d @ W.T`` for a CSR ``W`` (``out x in``) and dense ``x2d`` (``tokens x in``): ``tokens x out``."""
    tokens = x2d.shape[0]
    if tokens == 1:
        return torch.mv(csr, x2d[0]).unsqueeze(0)
    if tokens == 0:
        return x2d.new_zeros(0, csr.shape[0])
    return torch.sparse.mm(csr, x2d.t()).t().contiguous()


def csr_supported(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether torch can multiply a CSR matrix of ``dtype`` on ``device`` (probed once and cached)."""
    device = torch.device(device)
    key = (str(device), dtype)
    if key not in _SUPPORT:
        try:
            mask = torch.tensor([[True, False], [False, True]], device=device)
            crow, col, values = csr_from_mask(mask, torch.ones(2, dtype=dtype, device=device))
            csr = make_csr(crow, col, values, (2, 2))
            csr_matmul(csr, torch.ones(1, 2, dtype=dtype, device=device))
            csr_matmul(csr, torch.ones(2, 2, dtype=dtype, device=device))
            _SUPPORT[key] = True
        except (RuntimeError, NotImplementedError):
            _SUPPORT[key] = False
    return _SUPPORT[key]
