"""``to_sparse_inference``: turn a sparsified model into an inference-only model whose
sparsified layers store only their live weights (docs/inference.md).

The model stays the same ``PreTrainedModel`` object (``generate()``,
``model(**batch)`` and lm-eval's ``HFLM(pretrained=model)`` work); each masked
layer is replaced by a :class:`~hf_chts.inference.linear.SparseInferenceLinear`
and its dense weight storage is released.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers import SparseLayerMixin
from .autotune import DEFAULT_AUTO_TOKENS, KernelChoice, choose_by_timing
from .kernels import csr_supported
from .linear import InferenceOnlyError, SparseInferenceLinear

logger = logging.getLogger(__name__)

KERNELS = ("auto", "csr", "dense")
INFO_ATTR = "hf_chts_inference"


@dataclass
class InferenceInfo:
    """What the conversion attaches to the model (``model.hf_chts_inference``).

    The sparsified layers' link counts, ANP and sparsify settings stay known
    after the masks are gone (``hf-chts eval --inference`` reports them).
    """

    kernel: str
    auto_tokens: tuple[int, ...]
    live_links: int = 0
    total_links: int = 0
    kernels: dict[str, str] = field(default_factory=dict)  # layer name -> "csr" | "dense"
    anp: float | None = None
    method: str | None = None
    target_density: float | None = None

    @property
    def density(self) -> float:
        return self.live_links / self.total_links if self.total_links else 1.0

    def add_layer(self, name: str, kernel: str, mask: torch.Tensor) -> None:
        self.kernels[name] = kernel
        self.live_links += int(mask.sum())
        self.total_links += mask.numel()

    def set_sparsity(self, config, masks: dict[str, torch.Tensor], topology) -> None:
        """Record the method, target density and ANP (from the masks by layer name and the model topology)."""
        from ..topology.percolation import active_neurons

        self.method, self.target_density = config.method, config.target_density
        if topology is not None and masks:
            active, total = active_neurons(masks, topology)
            self.anp = sum(active.values()) / sum(total.values()) if sum(total.values()) else 1.0

    def summary(self) -> dict:
        """The fields of ``evaluation.sparsity_summary`` for this model."""
        return {"density": self.density, "anp": self.anp, "method": self.method,
                "target_density": self.target_density, "live_links": self.live_links,
                "total_links": self.total_links, "sparse": True, "inference_kernel": self.kernel,
                "csr_layers": list(self.kernels.values()).count("csr"), "layers": len(self.kernels)}


def inference_info(model: nn.Module) -> InferenceInfo | None:
    """The :class:`InferenceInfo` of a converted model, ``None`` for any other model."""
    return model.__dict__.get(INFO_ATTR)


def check_kernel_options(kernel: str, auto_tokens) -> tuple[int, ...]:
    """Validate ``kernel`` and ``auto_tokens``; return the token counts as a tuple of ints."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got {kernel!r}")
    tokens = tuple(auto_tokens)
    if not tokens or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tokens):
        raise ValueError(
            f"auto_tokens must be a non-empty sequence of positive ints (token counts), got {auto_tokens!r}")
    return tokens


def select_kernel(kernel: str, *, name: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
                  density: float, make_csr, make_dense, transposed: bool = False, has_bias: bool = False,
                  auto_tokens=DEFAULT_AUTO_TOKENS, cache: dict | None = None) -> SparseInferenceLinear:
    """Build the inference module of one layer with the requested kernel (``"auto"``: the faster one).

    ``make_csr(choice)`` / ``make_dense(choice)`` build the two candidates.
    ``cache`` maps a layer kind (shape, layout, dtype, device, density to
    0.5 %, bias, token counts, threads) to an earlier measurement, so a model's
    many identical layers are timed once.
    """
    if kernel == "dense":
        return make_dense(KernelChoice("dense", "requested"))
    supported = csr_supported(device, dtype)
    if kernel == "csr":
        if not supported:
            raise ValueError(
                f"layer {name!r}: torch has no CSR matmul for {dtype} on {device}; convert the model to float32 "
                "first (model.float(), or dtype=torch.float32 when loading) or use kernel='auto' (keeps such layers "
                "dense) or 'dense'"
            )
        return make_csr(KernelChoice("csr", "requested"))
    if not supported:
        return make_dense(KernelChoice("dense", f"auto: no CSR kernel for {dtype} on {device}"))
    key = (*shape, transposed, dtype, str(device), round(density * 200), has_bias, tuple(auto_tokens),
           torch.get_num_threads())
    cache = {} if cache is None else cache
    if key not in cache:
        sparse_module, dense_module = make_csr(KernelChoice("csr", "auto")), make_dense(KernelChoice("dense", "auto"))
        cache[key] = choose_by_timing(dense_module, sparse_module, shape[1], tokens=auto_tokens, dtype=dtype,
                                      device=device)
        chosen = sparse_module if cache[key].kernel == "csr" else dense_module
    else:
        chosen = (make_csr if cache[key].kernel == "csr" else make_dense)(cache[key])
    chosen.choice = cache[key]
    return chosen


def inference_layer(layer: SparseLayerMixin, kernel: str, *, auto_tokens=DEFAULT_AUTO_TOKENS,
                    cache: dict | None = None) -> SparseInferenceLinear:
    """The inference module for one masked layer (its dense weight is left untouched here)."""
    name = layer.hf_chts_name
    with torch.no_grad():  # masked means exactly 0 in the dense kernel too (NaN/inf included, so no multiply)
        layer.weight.masked_fill_(~layer.storage_mask(), 0)
    weight, mask, bias = layer.weight.detach(), layer.mask, layer.bias
    density = float(mask.sum()) / max(mask.numel(), 1)

    def make_dense(choice: KernelChoice) -> SparseInferenceLinear:
        return SparseInferenceLinear.from_dense_weight(weight, bias, transposed=layer.transposed, density=density,
                                                       choice=choice, name=name)

    def make_csr(choice: KernelChoice) -> SparseInferenceLinear:
        live = layer.logical_weight().detach()[mask.to(weight.device)]
        return SparseInferenceLinear.from_live_values(mask, live, bias, choice=choice, name=name)

    return select_kernel(kernel, name=name, shape=tuple(layer.logical_shape), dtype=weight.dtype, device=weight.device,
                         density=density, make_csr=make_csr, make_dense=make_dense, transposed=layer.transposed,
                         has_bias=bias is not None, auto_tokens=auto_tokens, cache=cache)


def _release_dense_weight(layer: SparseLayerMixin, replacement: SparseInferenceLinear) -> None:
    """Free the masked layer's dense weight storage (also for an optimizer or engine still holding the parameter)."""
    if replacement.kernel == "csr":
        with torch.no_grad():
            layer.weight.data = torch.empty(0, dtype=layer.weight.dtype, device=layer.weight.device)
        layer.weight.grad = None


def _refuse_save_pretrained(*args, **kwargs):
    raise InferenceOnlyError(
        "save_pretrained() on a model converted by to_sparse_inference() is not supported: save the trained model "
        "(hf_chts.save_sparse, compact=True keeps only live weights) before converting, and convert again after "
        "loading with hf_chts.load_sparse(path, inference=True)"
    )


def to_sparse_inference(model: nn.Module, kernel: str = "auto", *, auto_tokens=DEFAULT_AUTO_TOKENS) -> nn.Module:
    """Replace every sparsified linear of ``model`` by an inference-only sparse module, in place.

    Args:
        model: a model sparsified by :func:`hf_chts.sparsify` or loaded by
            :func:`hf_chts.load_sparse` (GPT-2 ``Conv1D`` and fused qkv /
            gate_up layers included).
        kernel: ``"csr"`` stores every sparsified layer as CSR (live values in
            the model's dtype, int32 indices when they fit) and frees its dense
            weight; ``"dense"`` keeps the masked dense weights; ``"auto"``
            times both forwards per layer shape and density at ``auto_tokens``
            token counts and keeps CSR only where it is at least 3 % faster at
            every count (the choice and the measured ratios are in each
            module's repr). Layers of a dtype/device without a torch CSR
            kernel (bfloat16/float16 on CPU) stay dense under ``"auto"``.
        auto_tokens: token counts per forward that ``"auto"`` measures
            (default ``(1, 128)``: one decoding step and a 128-token prefill).
            Pass ``(1,)`` for a decode-only workload.

    Returns:
        The same ``model``, in eval mode with every parameter frozen. ``train()``,
        a forward that records gradients and ``save_pretrained()`` raise
        :class:`InferenceOnlyError`.
    """
    tokens = check_kernel_options(kernel, auto_tokens)
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_sparse_inference() expects a torch.nn.Module, got {type(model).__name__}")
    targets = [(path, module) for path, module in model.named_modules() if isinstance(module, SparseLayerMixin)]
    if not targets:
        if inference_layers(model):
            raise ValueError("this model is already converted by to_sparse_inference()")
        raise ValueError("this model has no sparsified layer; call hf_chts.sparsify() or hf_chts.load_sparse() first")
    from ..state import find_state

    state = find_state(model)
    info = InferenceInfo(kernel, tokens)
    if state is not None:
        info.set_sparsity(state.config, {layer.hf_chts_name: layer.mask for _, layer in targets}, state.topology)
    model.eval()
    cache: dict = {}
    for path, layer in targets:
        replacement = inference_layer(layer, kernel, auto_tokens=tokens, cache=cache)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, replacement)
        _release_dense_weight(layer, replacement)
        info.add_layer(layer.hf_chts_name, replacement.kernel, layer.mask)
    return finish_inference_model(model, info)


def finish_inference_model(model: nn.Module, info: InferenceInfo) -> nn.Module:
    """Eval mode, frozen parameters, ``info`` attached, ``save_pretrained`` refused; returns ``model``."""
    model.eval()
    model.requires_grad_(False)
    model.__dict__[INFO_ATTR] = info
    model.save_pretrained = _refuse_save_pretrained
    counts = list(info.kernels.values())
    logger.info("hf_chts: %d sparse layers ready for inference (csr: %d, dense: %d)", len(counts),
                counts.count("csr"), counts.count("dense"))
    return model


def inference_layers(model: nn.Module) -> dict[str, SparseInferenceLinear]:
    """Every :class:`SparseInferenceLinear` of ``model`` by the sparsified layer's name."""
    return {m.hf_chts_name: m for m in model.modules() if isinstance(m, SparseInferenceLinear)}


def inference_report(model: nn.Module) -> dict:
    """Per-layer kernel, density and weight bytes, with totals and the kernels chosen per layer role."""
    layers = inference_layers(model)
    if not layers:
        raise ValueError("this model has no inference layer; call hf_chts.to_sparse_inference(model) first")
    rows, by_role = [], {}
    for name, module in layers.items():
        role = name.rsplit(".", 1)[-1]
        rows.append({"name": name, "role": role, "kernel": module.kernel, "density": module.density,
                     "weight_bytes": module.weight_bytes(), "dense_weight_bytes": module.dense_weight_bytes(),
                     "chosen": module.choice.describe()})
        counts = by_role.setdefault(role, {"csr": 0, "dense": 0})
        counts[module.kernel] += 1
    weight_bytes = sum(row["weight_bytes"] for row in rows)
    dense_bytes = sum(row["dense_weight_bytes"] for row in rows)
    return {"layers": rows, "kernels_by_role": by_role, "weight_bytes": weight_bytes,
            "dense_weight_bytes": dense_bytes, "weight_ratio": weight_bytes / dense_bytes if dense_bytes else 1.0}


__all__ = ["to_sparse_inference", "inference_layer", "inference_layers", "inference_report", "InferenceInfo",
           "inference_info", "select_kernel", "finish_inference_model", "check_kernel_options",
           "InferenceOnlyError", "KERNELS"]
