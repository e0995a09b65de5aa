"""Masked linear modules.

A sparsified layer keeps its class's parameters (``weight``/``bias``, same
names, shapes and storage as before, so ``state_dict()`` keys are unchanged)
and gains a boolean ``mask`` buffer (not persistent: it is saved explicitly
in ``sparsity.safetensors``). The forward pass is the parent's plain dense
matmul: the masking invariant of docs/algorithms.md#1-notation-and-the-masking-invariant (masked weights, gradients
and optimizer moments are exactly zero) is maintained around the optimizer
step instead of by multiplying in every forward.

``mask`` always has the logical ``out x in`` shape. GPT-2's ``Conv1D`` stores
its weight ``in x out``. This module is the one owner of that storage layout:
:func:`logical_shape_of` gives any linear-like module's ``(out, in)`` and
:meth:`SparseLayerMixin.storage_view` / :meth:`SparseLayerMixin.logical_view`
translate a tensor between the two views; nothing else transposes for Conv1D.

Modules are converted in place by swapping their class (as
``torch.nn.utils.parametrize`` does), so parameter objects, devices and any
optimizer already holding them stay valid.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # transformers' GPT-2 style Conv1D (weight stored in x out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = None


class SparseLayerMixin:
    """Mask state and helpers shared by every sparsified module."""

    mask: torch.Tensor
    hf_chts_name: str
    transposed: bool = False  # True when the weight is stored in x out (Conv1D)

    # ------------------------------------------------------------- views
    @property
    def logical_shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` whatever the storage layout."""
        rows, cols = self.weight.shape
        return (cols, rows) if self.transposed else (rows, cols)

    def storage_view(self, logical: torch.Tensor) -> torch.Tensor:
        """A logical ``out x in`` tensor (mask, weight, gradient) in the weight's storage layout (a view)."""
        return logical.t() if self.transposed else logical

    def logical_view(self, stored: torch.Tensor) -> torch.Tensor:
        """A tensor in the weight's storage layout as logical ``out x in`` (a view); inverse of :meth:`storage_view`."""
        return stored.t() if self.transposed else stored

    def logical_weight(self) -> torch.Tensor:
        """The weight as ``out x in`` (a view; Conv1D weights are transposed)."""
        return self.logical_view(self.weight)

    def storage_mask(self) -> torch.Tensor:
        """The mask in the weight's storage layout (a view), sharded like the weight under FSDP2."""
        shard = self.__dict__.get("_mask_shard")
        if shard is not None:
            return shard
        return self.storage_view(self.mask)

    @property
    def is_sharded(self) -> bool:
        """True when the weight is a DTensor (FSDP2 ``fully_shard``)."""
        return is_dtensor(self.weight)

    @property
    def has_grad_hook(self) -> bool:
        """True when this layer's post-accumulate-grad hook masks its weight's gradient (set by :func:`convert_to_sparse`)."""
        return getattr(self.weight, "_hf_chts_layer", None) is self

    def full_logical_weight(self) -> torch.Tensor:
        """The whole ``out x in`` weight, gathered across ranks when it is sharded."""
        weight = self.weight.full_tensor() if self.is_sharded else self.weight
        return self.logical_view(weight)

    def full_logical_grad(self) -> torch.Tensor | None:
        """The whole ``out x in`` gradient (gathered when sharded), or ``None`` before the first backward."""
        grad = self.weight.grad
        if grad is None:
            return None
        grad = grad.full_tensor() if is_dtensor(grad) else grad
        return self.logical_view(grad)

    def shard_like_weight(self, storage_tensor: torch.Tensor) -> torch.Tensor:
        """Distribute a full storage-layout tensor with the weight's mesh and placements (FSDP2)."""
        if not self.is_sharded:
            return storage_tensor
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(storage_tensor.contiguous(), self.weight.device_mesh, self.weight.placements)

    def refresh_mask_shard(self) -> None:
        """(Re)build the sharded copy of the mask used by the in-place masking ops under FSDP2.

        The full mask stays on every rank (one byte per weight) for the topology
        code; the masking of weights, gradients and optimizer moments uses the
        shard that follows the weight's sharding (docs/distributed.md §2).
        """
        if self.is_sharded:
            full = self.storage_view(self.mask)
            self.__dict__["_mask_shard"] = self.shard_like_weight(full.to(self.weight.device))
        else:
            self.__dict__.pop("_mask_shard", None)

    # ------------------------------------------------------------ updates
    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (logical ``out x in`` bool) and zero the masked weights."""
        if mask.shape != self.mask.shape:
            raise ValueError(
                f"mask for {self.hf_chts_name!r} has shape {tuple(mask.shape)}, expected {tuple(self.mask.shape)} "
                "(logical out x in)"
            )
        self.mask.copy_(mask.to(device=self.mask.device, dtype=torch.bool))
        self.refresh_mask_shard()
        self.apply_mask_()

    def apply_mask_(self) -> None:
        """Set the weight to exactly 0 at masked positions (in place; NaN and inf included)."""
        zero_masked_(self.weight, self.storage_mask())

    def mask_grad_(self) -> None:
        """Set the gradient to exactly 0 at masked positions (in place; NaN and inf included)."""
        if self.weight.grad is not None:
            zero_masked_(self.weight.grad, self.storage_mask())

    @property
    def density(self) -> float:
        return float(self.mask.sum()) / self.mask.numel()

    @torch.no_grad()
    def masked_nonzero(self) -> int:
        """How many weights are not exactly 0 at masked positions (NaN and inf count; this rank's shard
        under FSDP2): 0 while the masking invariant holds, many after e.g. peft's ``merge_and_unload()``."""
        weight, keep = self.weight.detach(), self.storage_mask()
        if is_dtensor(weight):
            weight, keep = weight.to_local(), (keep.to_local() if is_dtensor(keep) else keep)
        if weight.device.type == "meta":
            return 0
        return int(torch.count_nonzero(weight[~keep.to(weight.device)]))

    def extra_repr(self) -> str:  # noqa: D401 - nn.Module hook
        return f"{super().extra_repr()}, density={self.density:.4f}"


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2-sharded), without importing torch.distributed."""
    return type(tensor).__name__ == "DTensor"


def logical_shape_of(module: nn.Module) -> tuple[int, int]:
    """Logical ``(out, in)`` shape of a linear-like module, sparse or not (Conv1D stores ``in x out``)."""
    if isinstance(module, SparseLayerMixin):
        return module.logical_shape
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    weight = module.weight
    return weight.shape[1], weight.shape[0]  # transformers Conv1D: (in, out)


#: Integer dtype of each floating-point element size, to mask a float tensor through its bit pattern.
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_view(tensor: torch.Tensor) -> torch.Tensor | None:
    """A float tensor's bit patterns as integers of the same width (a view), or None if it is not float."""
    bits = _SAME_WIDTH_INT.get(tensor.element_size()) if tensor.is_floating_point() else None
    return None if bits is None else tensor.view(bits)


@torch.no_grad()
def zero_masked_(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Set ``tensor`` to exactly 0 where the bool ``keep`` is False, in place; returns ``tensor``.

    Masked means exactly 0, NaN and inf included (docs/algorithms.md §1), so this never multiplies
    floats by the mask (0 * NaN is NaN). A float tensor is multiplied as integers of the same width by the
    bool mask: ``bits * 1`` keeps every bit pattern, ``bits * 0`` is the pattern of +0.0. On CPU
    this is ~2x faster than a float multiply by a bool mask and 4-6x faster than ``masked_fill_`` or
    ``torch.where`` (``bench/speed.py --parts masking``), and needs no float or inverted mask copy. ``keep`` has ``tensor``'s shape (storage
    layout); DTensors (FSDP2) are masked shard by shard with a mask sharded like the tensor.
    """
    if is_dtensor(tensor):  # under no_grad, to_local() is the shard itself: in-place ops write the DTensor
        tensor = tensor.to_local()
        keep = keep.to_local() if is_dtensor(keep) else keep
    bits = bit_view(tensor)
    if bits is not None:
        bits.mul_(keep)
    else:  # integer, bool or complex tensors
        tensor.masked_fill_(~keep, 0)
    return tensor


def layer_of_weight(weight: torch.Tensor) -> SparseLayerMixin | None:
    """The sparsified layer whose ``weight`` this parameter is (set by :func:`convert_to_sparse`), else ``None``."""
    layer = getattr(weight, "_hf_chts_layer", None)
    return layer if isinstance(layer, SparseLayerMixin) and layer.weight is weight else None


def _mask_grad_hook(param: torch.Tensor) -> None:
    layer = getattr(param, "_hf_chts_layer", None)
    if layer is not None and layer.mask_gradients:
        layer.mask_grad_()


class SparseLinear(SparseLayerMixin, nn.Linear):
    """An ``nn.Linear`` with a boolean connectivity mask (peft wraps it like any Linear)."""


if Conv1D is not None:

    class SparseConv1D(SparseLayerMixin, Conv1D):
        """transformers' ``Conv1D`` (GPT-2) with a mask in the logical ``out x in`` view.

        It stays a ``Conv1D`` subclass so peft recognises the ``in x out`` storage
        (``fan_in_fan_out``) when it adds LoRA adapters.
        """

        transposed = True


_DYNAMIC_CLASSES: dict[type, type] = {}


def sparse_class_for(cls: type) -> type:
    """The sparse counterpart of a linear-like class (built once per class)."""
    if issubclass(cls, SparseLayerMixin):
        return cls
    if cls is nn.Linear:
        return SparseLinear
    if Conv1D is not None and cls is Conv1D:
        return SparseConv1D
    if cls not in _DYNAMIC_CLASSES:
        transposed = Conv1D is not None and issubclass(cls, Conv1D)
        _DYNAMIC_CLASSES[cls] = type(f"Sparse{cls.__name__}", (SparseLayerMixin, cls), {"transposed": transposed})
    return _DYNAMIC_CLASSES[cls]


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` (and subclasses) or transformers ``Conv1D``."""
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def convert_to_sparse(module: nn.Module, name: str, mask: torch.Tensor) -> SparseLayerMixin:
    """Turn ``module`` into its sparse class in place, with ``mask`` (out x in), and zero masked weights."""
    if isinstance(module, SparseLayerMixin):
        raise ValueError(f"module {name!r} is already sparse; call sparsify() once per model")
    if not is_linear_like(module):
        raise ValueError(f"module {name!r} is a {type(module).__name__}, not nn.Linear or Conv1D; it cannot be sparsified")
    module.__class__ = sparse_class_for(type(module))
    module.hf_chts_name = name
    module.mask_gradients = True
    out_features, in_features = module.logical_shape
    module.register_buffer(
        "mask", torch.ones(out_features, in_features, dtype=torch.bool, device=module.weight.device), persistent=False
    )
    module.weight._hf_chts_layer = module
    module.weight.register_post_accumulate_grad_hook(_mask_grad_hook)
    module.set_mask(mask)
    return module


def sparse_layers(model: nn.Module) -> dict[str, SparseLayerMixin]:
    """Every sparsified module of ``model`` keyed by its name in the unwrapped model.

    Works through wrappers (DDP's ``module.``, peft's ``base_model.model.``)
    because each layer remembers the name it had when it was sparsified.
    """
    return {m.hf_chts_name: m for m in model.modules() if isinstance(m, SparseLayerMixin)}
