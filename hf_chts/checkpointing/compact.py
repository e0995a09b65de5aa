"""The compact checkpoint format: only the live values of sparsified weights
(docs/checkpoint-format.md#4-compact-format).

``save_sparse(..., compact=True)`` or ``hf-chts export --format compact``:
``model.safetensors`` holds only the tensors of non-sparsified modules and
``sparse_weights.safetensors`` holds, per sparsified weight (same key), its live
values as a 1-D tensor in row-major order of the logical mask
(``logical_weight[mask]``), with metadata ``shapes``, ``crc32``, ``save_id`` and the version.
At 30 % density this stores ~30 % of the sparsified bytes (+1 bit per link for the
mask). **A compact folder is not a valid input for a vanilla
``AutoModelForCausalLM.from_pretrained``**, which would report the sparsified weights
as missing and initialise them randomly: its ``config.json`` therefore names, in
transformers' ``transformers_weights`` field, no weight file but :data:`COMPACT_REFUSAL`,
so transformers refuses to load it with that message (:func:`mark_config_compact`).
Load it with ``load_sparse`` (which drops the field, :func:`without_compact_marker`),
or convert it back with ``hf-chts export <in> <out> --format dense``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..layers import sparse_layers
from .format import (
    FORMAT_VERSION, SPARSE_WEIGHTS_FILE, SPARSITY_FILE, check_crc, check_format_version, crc32_hex, json_metadata,
    module_name_of, read_safetensors, weight_key,
)

#: ``config.json``'s ``transformers_weights`` in a compact folder: transformers (>= 5) refuses a value that is not
#: a safetensors file name with an error quoting it, so a vanilla ``from_pretrained`` fails with this text.
COMPACT_REFUSAL = (
    "not loadable by plain transformers: this is an hf_chts compact sparse checkpoint (the sparsified weights "
    "are stored as live values in sparse_weights.safetensors). Load it with hf_chts.load_sparse(folder) "
    "(pip install hf_chts), or convert it with `hf-chts export <folder> <out> --format dense`"
)
COMPACT_MARKER_FIELD = "transformers_weights"


def mark_config_compact(folder: str | os.PathLike) -> None:
    """Write :data:`COMPACT_REFUSAL` into ``folder/config.json`` (a compact save's staging folder)."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config[COMPACT_MARKER_FIELD] = COMPACT_REFUSAL
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def without_compact_marker(config):
    """A transformers config of a compact folder with :data:`COMPACT_REFUSAL` removed (in place; returned)."""
    if getattr(config, COMPACT_MARKER_FIELD, None) == COMPACT_REFUSAL:
        delattr(config, COMPACT_MARKER_FIELD)
    return config


def compact_split(model: nn.Module, state_dict: dict | None,
                  save_id: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(state dict without sparsified weights, live values per weight key, metadata incl. the ``save_id``)."""
    full = dict(state_dict) if state_dict is not None else model.state_dict()
    values, shapes, crcs = {}, {}, {}
    for name, layer in sorted(sparse_layers(model).items()):
        key = weight_key(name)
        stored = full.pop(key, None)
        if stored is None:  # full weight, gathered across ranks when FSDP sharded it
            logical = layer.full_logical_weight()
        else:
            logical = layer.logical_view(stored)
        live = logical.detach()[layer.mask.to(logical.device)].cpu().contiguous()
        values[key] = live
        shapes[key] = list(layer.mask.shape)
        crcs[key] = crc32_hex(live)
    metadata = {
        "format": "pt",
        "hf_chts_format_version": str(FORMAT_VERSION),
        "content": "live values of sparsified weights, 1-D, row-major order of the logical mask",
        "shapes": json.dumps(shapes, sort_keys=True),
        "crc32": json.dumps(crcs, sort_keys=True),
        "save_id": save_id,
    }
    return full, values, metadata


def read_compact_values(path: str | os.PathLike, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Live values of ``sparse_weights.safetensors``, validated against ``masks`` (counts and names)."""
    folder = Path(path)
    file = folder / SPARSE_WEIGHTS_FILE if folder.is_dir() else folder  # read_safetensors refuses non-regular files
    tensors, metadata = read_safetensors(file)
    check_format_version(file, metadata)
    crcs = json_metadata(file, metadata, "crc32") if "crc32" in metadata else {}
    missing = sorted(set(masks) - set(tensors))
    extra = sorted(set(tensors) - set(masks))
    if missing or extra:
        raise ValueError(
            f"{file} does not match {SPARSITY_FILE}: weights without values {missing[:5]}, values without a mask "
            f"{extra[:5]}; the two files come from different checkpoints"
        )
    for key, values in tensors.items():
        expected = int(masks[key].sum())
        if values.dim() != 1 or values.numel() != expected:
            raise ValueError(
                f"{file}: tensor {key!r} has shape {list(values.shape)}, expected 1-D with {expected} live values "
                f"(the mask's live links); the files come from different checkpoints or are corrupted"
            )
        if not values.is_floating_point():
            raise ValueError(f"{file}: tensor {key!r} has dtype {values.dtype}, expected a floating dtype")
        check_crc(file, key, values, crcs)
    return tensors


@torch.no_grad()
def fill_compact(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    layers = sparse_layers(model)
    for key, live in values.items():
        layer = layers[module_name_of(key)]
        logical = layer.logical_weight()
        logical.zero_()
        logical[layer.mask] = live.to(device=logical.device, dtype=logical.dtype)
