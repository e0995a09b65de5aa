"""LoRA adapters and sparse checkpoints: merging without losing sparsity, and adapter files kept apart."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .layers import sparse_layers
from .state import find_state

#: PEFT's adapter files: ``from_pretrained`` loads them into the model automatically when a folder holds them
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def refuse_adapter_files(folder: str | os.PathLike) -> None:
    """``ValueError`` naming the PEFT adapter files in a sparse checkpoint folder, and what to do.

    transformers' ``from_pretrained`` would wrap the layers with the adapter, so the
    checkpoint's masks would no longer match the model's layers (a misleading error
    about the masks) or the model would silently differ from the saved sparse one.
    """
    found = [name for name in ADAPTER_FILES if os.path.lexists(Path(folder) / name)]
    if found:
        raise ValueError(
            f"{folder} holds PEFT adapter files ({', '.join(found)}) next to the sparse checkpoint; transformers would "
            "load them into the model and its layers would no longer match the masks. Move them to a folder of their "
            "own and apply the adapter after loading: peft.PeftModel.from_pretrained(hf_chts.load_sparse(folder), "
            "adapter_folder) (hf_chts.merge_lora merges it keeping the sparsity)")


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Merge LoRA adapters into a sparsified base model and keep its sparsity pattern.

    ``peft_model.merge_and_unload()`` adds the dense low-rank delta ``B @ A`` to
    every wrapped weight, which would fill the masked positions. Here each
    sparse layer's mask is re-applied after the merge: the merged model is
    ``W + mask * (B @ A)``, keeping exactly the masks it had (same live links,
    same density, weights exactly 0 at masked positions), so it saves with
    :func:`save_sparse` and keeps training with the same topology. The part of
    the adapter's update that fell on masked positions is dropped: the merged
    model's outputs can therefore differ slightly from the unmerged peft
    model's (use the unmerged adapter if the dense delta matters more than the
    sparsity).

    Args:
        peft_model: a ``peft.PeftModel`` wrapping a model passed through
            :func:`hf_chts.sparsify` (LoRA on ``SparseLinear`` / ``SparseConv1D`` layers).

    Returns:
        The base model, still sparsified (``find_state`` set, masks unchanged).
    """
    if not hasattr(peft_model, "merge_and_unload"):
        raise ValueError(
            f"merge_lora expects a peft model with merge_and_unload(); got {type(peft_model).__name__}"
        )
    if find_state(peft_model) is None:
        raise ValueError("the base model of this peft model is not sparsified; use peft_model.merge_and_unload()")
    before = {name: layer.mask.clone() for name, layer in sparse_layers(peft_model).items()}
    merged = peft_model.merge_and_unload()
    layers = sparse_layers(merged)
    if set(layers) != set(before) or find_state(merged) is None:
        raise RuntimeError(
            "merge_and_unload() replaced sparse layers of the model; the merged model lost its sparse state "
            f"(layers before {len(before)}, after {len(layers)})"
        )
    with torch.no_grad():
        for name, layer in layers.items():
            if not torch.equal(layer.mask.cpu(), before[name].cpu()):
                layer.set_mask(before[name])
            layer.apply_mask_()
    return merged
