"""The on-disk format of a sparse checkpoint: file names, encoding and decoding, validation.

The format is specified in docs/checkpoint-format.md. In short, a checkpoint folder is a
Hugging Face model folder (dense weights, exactly 0 at masked positions) plus
``sparsity.safetensors`` (one bit-packed uint8 mask per sparsified weight, keyed by the
weight's ``state_dict`` key, logical ``out x in`` layout, shapes and CRC-32s in the
metadata, and the save id; docs/checkpoint-format.md#2-sparsitysafetensors-the-masks) and
``sparsify_config.json`` (the SparsifyConfig, a summary, the engine's progress, and the save id
and manifest that bind the folder to one save; docs/checkpoint-format.md#3-sparsify_configjson,
docs/checkpoint-format.md#7-consistency-between-files-and-crash-safety). The mask keys name the
sparsified modules: loading restores exactly these and never runs the stored ``target_modules``
pattern. :func:`decode_engine_record` turns the
stored engine record back into the exact ``SparseTrainingEngine.state_dict()`` format.
The compact format's ``sparse_weights.safetensors`` is in :mod:`hf_chts.checkpointing.compact`.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint_files import CONFIG_FILE, SPARSE_WEIGHTS_FILE, SPARSITY_FILE  # noqa: F401 - part of the format
from ..config import SparsifyConfig
from ..io_utils import read_json_object, require_regular_file
from ..layers import sparse_layers

FORMAT_VERSION = 2  # 2: save id + manifest (version-1 folders load unverified, with a warning)


_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)"
                          r"|model\.safetensors\.index\.json|pytorch_model\.bin\.index\.json")


def is_weight_file(name: str) -> bool:
    """True for a weight file name transformers writes and loads by default (``model.safetensors``, its shards
    ``model-00001-of-00002.safetensors`` and index, the ``pytorch_model.bin`` equivalents). Other names
    (``model.fp16.safetensors``, ``model-backup.safetensors``) are the user's: a save keeps them."""
    return _WEIGHT_FILE.fullmatch(name) is not None


PACKING = "numpy.packbits(mask, axis=-1, bitorder='little'), logical out x in"


def weight_key(module_name: str) -> str:
    """``state_dict`` key of a sparsified module's weight."""
    return f"{module_name}.weight"


def module_name_of(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a bool mask along its last dim (``numpy.packbits``, little bit order) -> uint8."""
    array = mask.detach().to("cpu", torch.bool).numpy()
    return torch.from_numpy(np.ascontiguousarray(np.packbits(array, axis=-1, bitorder="little")))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of :func:`pack_mask` for a mask of logical ``shape``."""
    bits = np.unpackbits(packed.numpy(), axis=-1, count=int(shape[-1]), bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))


def crc32_hex(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return format(zlib.crc32(data) & 0xFFFFFFFF, "08x")


def _packed_shape(shape: list[int]) -> list[int]:
    return [*shape[:-1], math.ceil(shape[-1] / 8)]


def mask_entries(model: nn.Module, save_id: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Packed masks and the metadata of ``sparsity.safetensors`` (one save's ``save_id`` included)."""
    tensors, shapes, crcs = {}, {}, {}
    for name, layer in sorted(sparse_layers(model).items()):
        key = weight_key(name)
        tensors[key] = pack_mask(layer.mask)
        shapes[key] = list(layer.mask.shape)
        crcs[key] = crc32_hex(tensors[key])
    metadata = {
        "format": "pt",
        "hf_chts_format_version": str(FORMAT_VERSION),
        "content": "masks",
        "packing": PACKING,
        "shapes": json.dumps(shapes, sort_keys=True),
        "crc32": json.dumps(crcs, sort_keys=True),
        "save_id": save_id,
    }
    return tensors, metadata


def encode_engine_state(state: dict) -> dict:
    """``SparseTrainingEngine.state_dict()`` -> JSON-able record (masks and config dropped)."""
    record = {}
    for key, value in state.items():
        if key in ("masks", "config"):
            continue
        if key == "generator_state":
            value = base64.b64encode(value.cpu().numpy().tobytes()).decode("ascii")
        if key == "history":  # per-layer densities (layers x updates numbers) stay out of the JSON
            value = [{k: v for k, v in stats.items() if k != "layer_density"} for stats in value]
        record[key] = value
    return record


def dump_record_json(record: dict) -> str:
    def refuse(value):
        raise TypeError(f"cannot write {type(value).__name__} to {CONFIG_FILE}: engine state values must be JSON-able")

    return json.dumps(record, indent=2, sort_keys=True, default=refuse) + "\n"


def read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; ``ValueError`` naming it if unreadable."""
    from safetensors import safe_open

    require_regular_file(file, "safetensors file")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # SafetensorError, OSError, ...
        raise ValueError(
            f"{file} is not a readable safetensors file ({type(error).__name__}: {error}); it is truncated or "
            "corrupted — copy or download it again, or re-save the checkpoint"
        ) from error
    return tensors, metadata


def read_safetensors_metadata(file: Path) -> dict[str, str]:
    """The metadata of a safetensors file, reading only its header (which is checked against the file's size);
    ``ValueError`` naming the file if it is not a regular file or the header is broken or truncated."""
    from safetensors import safe_open

    require_regular_file(file, "safetensors file")
    try:
        with safe_open(str(file), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # SafetensorError, OSError, ...
        raise ValueError(
            f"{file} is not a readable safetensors file ({type(error).__name__}: {error}); it is truncated or "
            "corrupted — copy or download it again, or re-save the checkpoint"
        ) from error


def json_metadata(file: Path, metadata: dict[str, str], field: str) -> dict:
    try:
        value = json.loads(metadata[field])
        if not isinstance(value, dict):
            raise TypeError("not a JSON object")
        return value
    except (KeyError, TypeError, RecursionError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{file}: metadata field {field!r} is missing or invalid ({error}); this is not an hf_chts file or it is "
            "corrupted"
        ) from error


def check_format_version(file: Path, metadata: dict[str, str]) -> None:
    version = metadata.get("hf_chts_format_version")
    if version is None or not version.isdigit():
        raise ValueError(f"{file} has no hf_chts_format_version metadata; it was not written by hf_chts.save_sparse")
    if int(version) > FORMAT_VERSION:
        raise ValueError(
            f"{file} uses hf_chts checkpoint format {version}, newer than this hf_chts supports ({FORMAT_VERSION}); "
            "upgrade hf_chts"
        )


def check_crc(file: Path, key: str, tensor: torch.Tensor, crcs: dict) -> None:
    expected = crcs.get(key)
    if expected is not None and crc32_hex(tensor) != expected:
        raise ValueError(f"{file}: tensor {key!r} fails its crc32 check; the file is corrupted — re-save or re-download it")


def read_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Masks of a checkpoint folder (or a ``sparsity.safetensors`` file) by weight key, as bool ``out x in``.

    Raises ``ValueError`` naming the file and the tensor on a truncated or
    corrupted file, a wrong dtype, or a packed shape that does not match the
    recorded logical shape.
    """
    file = Path(path)
    file = file / SPARSITY_FILE if file.is_dir() else file
    if not os.path.lexists(file):
        raise FileNotFoundError(f"{file} does not exist")
    tensors, metadata = read_safetensors(file)
    check_format_version(file, metadata)
    shapes = json_metadata(file, metadata, "shapes")
    crcs = json_metadata(file, metadata, "crc32") if "crc32" in metadata else {}
    for key, crc in crcs.items():
        if not isinstance(crc, str):
            raise ValueError(f"{file}: metadata field 'crc32' entry {key!r} is {crc!r}, expected a hex string")
    masks = {}
    for key, packed in tensors.items():
        if key not in shapes:
            raise ValueError(f"{file}: tensor {key!r} has no logical shape in the metadata 'shapes'; the file is corrupted")
        shape = shapes[key]
        if not (isinstance(shape, list) and len(shape) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
            raise ValueError(f"{file}: metadata field 'shapes' entry {key!r} is {shape!r}, expected [out, in] "
                             "(two positive integers); the file is corrupted")
        if packed.dtype != torch.uint8:
            raise ValueError(
                f"{file}: tensor {key!r} has dtype {packed.dtype}, expected torch.uint8 (bit-packed with "
                "numpy.packbits(bitorder='little')); masks must not be saved as bool/float tensors"
            )
        if list(packed.shape) != _packed_shape(shape):
            raise ValueError(
                f"{file}: tensor {key!r} has packed shape {list(packed.shape)}, expected {_packed_shape(shape)} for "
                f"logical shape {shape}; the file is corrupted or was written by another tool"
            )
        check_crc(file, key, packed, crcs)
        masks[key] = unpack_mask(packed, shape)
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise ValueError(f"{file}: the metadata lists masks that are not in the file: {missing[:5]}; the file is corrupted")
    return masks


def read_sparsify_config(path: str | os.PathLike) -> dict | None:
    """The ``sparsify_config.json`` record of a folder (``None`` if absent); ``ValueError`` if unreadable."""
    folder = Path(path)
    file = folder / CONFIG_FILE if folder.is_dir() else folder
    if not os.path.lexists(file):
        return None
    record = read_json_object(file, what=CONFIG_FILE)
    if not isinstance(record.get("config"), dict):
        raise ValueError(f"{file} has no 'config' object; it was not written by hf_chts.save_sparse or is corrupted")
    version = record.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{file}: format_version {version!r} is unknown (this hf_chts reads up to {FORMAT_VERSION}); upgrade hf_chts"
        )
    _check_record_types(file, record)
    return record


_RECORD_TYPES = {"hf_chts_version": str, "weights_format": str, "summary": dict, "save_id": str, "manifest": dict,
                 "engine": dict}
_ENGINE_TYPES = {"version": int, "completed_steps": int, "total_steps": int, "generator_state": str, "layers": dict,
                 "history": list, "target_density": (int, float), "schedule": dict}


def _check_record_types(file: Path, record: dict) -> None:
    """``ValueError`` naming the field when a known field of ``sparsify_config.json`` has the wrong JSON type."""
    def check(prefix: str, values: dict, types: dict) -> None:
        for field, expected in types.items():
            value = values.get(field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, expected):
                names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
                raise ValueError(f"{file}: field {prefix + field!r} is {type(value).__name__} {value!r:.60}, expected "
                                 f"{names}; the file is corrupted or was not written by hf_chts")

    check("", record, _RECORD_TYPES)
    if record.get("weights_format", "dense") not in ("dense", "compact"):
        raise ValueError(f"{file}: field 'weights_format' is {record['weights_format']!r}, expected 'dense' or 'compact'")
    engine = record.get("engine")
    if engine is not None:
        check("engine.", engine, _ENGINE_TYPES)
        if not all(isinstance(item, dict) for item in engine.get("history") or []):
            raise ValueError(f"{file}: field 'engine.history' must be a list of objects; the file is corrupted")


def config_from_record(file: Path, record: dict) -> SparsifyConfig:
    try:
        return SparsifyConfig.from_dict(record["config"])
    except (ValueError, TypeError, re.error) as error:
        raise ValueError(f"{file}: the stored SparsifyConfig is invalid: {error}") from error


def decode_engine_record(record: dict, masks: dict[str, torch.Tensor], config: dict) -> dict:
    """JSON engine record + masks (by weight key) -> ``SparseTrainingEngine.state_dict()`` format."""
    state = {}
    for key, value in record.items():
        if key in ("target_density", "schedule"):
            continue  # informative only
        if key == "generator_state":
            try:
                raw = base64.b64decode(value.encode("ascii"), validate=True)
            except (ValueError, AttributeError) as error:
                raise ValueError(f"{CONFIG_FILE}: engine.generator_state is not valid base64 ({error})") from error
            value = torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()
        state[key] = value
    state["config"] = config
    by_module = {module_name_of(key): mask for key, mask in masks.items()}
    state["masks"] = {name: by_module[name].clone() for name in sorted(by_module)}
    state.setdefault("layers", {name: list(mask.shape) for name, mask in state["masks"].items()})
    return state
