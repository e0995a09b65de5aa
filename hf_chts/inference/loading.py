"""Build an inference-only sparse model straight from a checkpoint (``load_sparse(path, inference=True)``).

:func:`load_inference_model` opens the checkpoint with
:func:`hf_chts.checkpointing.loading.open_checkpoint` (the same verification as every load)
and builds the model here; ``hf_chts.load_sparse`` (:mod:`hf_chts.checkpoint`) calls it.

No dense copy of a sparsified weight exists at any point: the model skeleton
is created on the ``meta`` device (accelerate's ``init_empty_weights``), the
non-sparsified tensors are loaded into it, and each sparsified layer is built
as CSR from its mask and live values. Live values come from
``sparse_weights.safetensors`` (compact format) or are gathered from the dense
weight file a block of rows at a time (``safe_open(...).get_slice``), so at most
one block of a dense weight is in memory. See docs/inference.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..checkpointing.compact import read_compact_values
from ..checkpointing.format import SPARSITY_FILE
from ..checkpointing.loading import (
    load_dense_model, open_checkpoint, read_one_save, resolve_checkpoint, validate_masks,
)
from ..architectures import build_topology
from ..config import SparsifyConfig
from ..layers import sparse_class_for
from ..model import select_modules
from .autotune import DEFAULT_AUTO_TOKENS, KernelChoice
from .convert import InferenceInfo, check_kernel_options, finish_inference_model, select_kernel
from .linear import SparseInferenceLinear

#: bytes of a dense weight read at once when gathering live values from a dense-format file
READ_BLOCK_BYTES = 16 * 2**20
_WEIGHT_INDEX = "model.safetensors.index.json"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a checkpoint folder (single file or shards from the index)."""
    index = folder / _WEIGHT_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index} is not a valid safetensors index ({error}); re-save the checkpoint") from error
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise ValueError(
        f"{folder} has no model.safetensors (or {_WEIGHT_INDEX}); inference=True reads safetensors only — re-save "
        "the checkpoint with hf_chts.save_sparse, or load it without inference=True and call to_sparse_inference()"
    )


@torch.no_grad()
def live_values_from_slice(tensor_slice, mask: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Live values (row-major order of the logical ``mask``) of a stored dense weight, read a block of rows at a time.

    ``tensor_slice`` is a safetensors slice (or anything indexable the same
    way) of the weight in storage layout (``in x out`` when ``transposed``).
    """
    out_features, in_features = mask.shape
    rows = max(1, READ_BLOCK_BYTES // (4 * max(in_features, 1)))
    parts = []
    for start in range(0, out_features, rows):
        stop = min(out_features, start + rows)
        block = tensor_slice[:, start:stop].t() if transposed else tensor_slice[start:stop]
        parts.append(block[mask[start:stop]])
    return torch.cat(parts) if parts else torch.zeros(0)


def _read_live_values(file: Path, key: str, module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """Live values of one dense-stored weight; the file is mapped for this weight only, so at most one
    weight's pages of the file are resident at a time."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        tensor_slice = handle.get_slice(key)
        if list(tensor_slice.get_shape()) != list(module.weight.shape):
            raise ValueError(f"{file}: tensor {key!r} has shape {tensor_slice.get_shape()}, expected "
                             f"{list(module.weight.shape)}; the file belongs to another model")
        return live_values_from_slice(tensor_slice, mask, sparse_class_for(type(module)).transposed)


def _resolve_dtype(dtype):
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype name (e.g. 'float32', 'bfloat16')")
        return resolved
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, a dtype name or 'auto', got {dtype!r}")
    return dtype


def check_inference_options(kernel: str, auto_tokens, dtype, from_pretrained_kwargs: dict):
    """Validate the options of ``load_sparse(..., inference=True)``; return ``(token counts, dtype or None)``."""
    tokens = check_kernel_options(kernel, auto_tokens)
    kwargs = dict(from_pretrained_kwargs)
    dtype = _resolve_dtype(kwargs.pop("torch_dtype", dtype))
    if kwargs:
        raise ValueError(
            f"load_sparse(..., inference=True) supports dtype=, kernel= and auto_tokens= only; got {sorted(kwargs)} "
            "(move the model afterwards with model.to(device))"
        )
    return tokens, dtype


def empty_model(folder: Path) -> nn.Module:
    """The checkpoint's model class built from its config with every parameter on the ``meta`` device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    weight_files(folder)  # fail early, before building anything, on a folder without safetensors
    from ..checkpointing.compact import without_compact_marker

    config = without_compact_marker(AutoConfig.from_pretrained(str(folder), trust_remote_code=False))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(folder), trust_remote_code=False)
    return model


def load_inference_model(path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
                         token: str | None = None, cache_dir: str | None = None, local_files_only: bool | None = None,
                         kernel: str = "auto", auto_tokens=DEFAULT_AUTO_TOKENS, verify: str | None = None,
                         **from_pretrained_kwargs) -> nn.Module:
    """The inference-only model of a checkpoint: ``hf_chts.load_sparse(path, inference=True)``
    (see :func:`hf_chts.checkpoint.load_sparse`), read from one save (``read_one_save``). A plain model
    folder loads dense, with a warning."""
    folder = resolve_checkpoint(path_or_repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                local_files_only=local_files_only)

    def load(record: dict | None) -> nn.Module:
        options = dict(from_pretrained_kwargs)
        checkpoint = open_checkpoint(folder, record)
        if checkpoint is None:
            return load_dense_model(folder, options)
        tokens, dtype = check_inference_options(kernel, auto_tokens, options.pop("dtype", None), options)
        model = empty_model(folder)
        by_name = validate_masks(folder / SPARSITY_FILE, model, checkpoint.config, checkpoint.masks)
        return build_inference_model(folder, model, checkpoint.config, checkpoint.masks, by_name,
                                     compact=checkpoint.compact, kernel=kernel, auto_tokens=tokens, dtype=dtype)

    return read_one_save(folder, load, verify=verify)


def build_inference_model(folder: Path, model: nn.Module, config: SparsifyConfig, masks: dict[str, torch.Tensor],
                          by_name: dict[str, torch.Tensor], *, compact: bool, kernel: str = "auto",
                          auto_tokens=DEFAULT_AUTO_TOKENS, dtype: torch.dtype | None = None) -> nn.Module:
    """Fill the :func:`empty_model` ``model`` from ``folder`` with CSR / dense inference layers.

    ``masks`` are keyed by weight key, ``by_name`` by module name (the same
    masks, already validated against ``model``); both dicts are emptied as
    the layers are built, so each mask (one byte per weight) is freed once
    its CSR arrays exist. ``dtype`` (``None``: as stored) applies to every
    floating tensor.
    """
    from safetensors import safe_open

    tokens = check_kernel_options(kernel, auto_tokens)
    files = weight_files(folder)
    keys = {f"{name}.weight": name for name in by_name}
    values, state, sparse_in_file = {}, {}, []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key in keys:
                    sparse_in_file.append((file, key))
                else:  # a copy: a tensor backed by the file mapping would keep the whole file resident
                    state[key] = handle.get_tensor(key).clone()
    if compact:
        values = read_compact_values(folder, masks)
    else:
        for file, key in sparse_in_file:
            values[key] = _read_live_values(file, key, model.get_submodule(keys[key]), by_name[keys[key]])
    missing = sorted(set(keys) - set(values))
    if missing:
        raise ValueError(
            f"{folder}: the weight files lack sparsified weights {missing[:5]}; the checkpoint is incomplete")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        values = {k: v.to(dtype) for k, v in values.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"{folder}: the weight files hold tensors this model does not have: "
                         f"{result.unexpected_keys[:5]}; the checkpoint belongs to another model")
    model.tie_weights()

    info = InferenceInfo(kernel, tokens)
    info.set_sparsity(config, by_name, build_topology(model, select_modules(model, config)))
    cache: dict = {}
    for key, name in keys.items():
        module, mask = model.get_submodule(name), by_name[name]
        transposed = sparse_class_for(type(module)).transposed
        bias = getattr(module, "bias", None)
        live = values[key]
        csr = SparseInferenceLinear.from_live_values(mask, live, bias, choice=KernelChoice("csr", "requested"),
                                                     name=name)

        def make_csr(choice: KernelChoice, _csr=csr) -> SparseInferenceLinear:
            _csr.choice = choice
            return _csr

        def make_dense(choice: KernelChoice, _csr=csr, _transposed=transposed) -> SparseInferenceLinear:
            return _csr.densified(choice, transposed=_transposed)

        replacement = select_kernel(kernel, name=name, shape=tuple(mask.shape), dtype=live.dtype, device=live.device,
                                    density=float(mask.sum()) / max(mask.numel(), 1), make_csr=make_csr,
                                    make_dense=make_dense, transposed=transposed, has_bias=bias is not None,
                                    auto_tokens=tokens, cache=cache)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, replacement)
        info.add_layer(name, replacement.kernel, mask)
        del values[key], masks[key], by_name[name], mask, live, csr  # free this layer's mask and loaded values
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if on_meta:
        raise ValueError(f"{folder}: the weight files lack tensors {on_meta[:5]}; the checkpoint is incomplete")
    return finish_inference_model(model, info)
